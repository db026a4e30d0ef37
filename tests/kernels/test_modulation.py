import pytest
import torch

from cascade_rt.kernels.modulation import modulation, modulation_ref

SHAPES = [(1, 1, 1, 3), (2, 5, 7, 48), (1, 3, 9, 100), (2, 2, 3, 300)]


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    bsz, c = shape[0], shape[-1]
    x = torch.randn(shape, generator=g).to(device, dtype)
    res = torch.randn(shape, generator=g).to(device, dtype)
    ab = (torch.randn(bsz, 2 * c, generator=g) * 0.5).to(device, dtype)  # like TimestepBlock's mapper output
    return x, res, ab[:, :c], ab[:, c:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fused", ["plain", "residual", "residual+norm"])
def test_matches_ref(shape, dtype, fused, device, close_to_ref):
    x, res, a, b = _inputs(shape, dtype, device, seed=sum(shape))
    res = None if fused == "plain" else res
    norm = fused.endswith("norm")
    out = modulation(x, a, b, res, return_norm=norm)
    close_to_ref(out, modulation_ref, (x, a, b, res), {"return_norm": norm})


def test_readable_errors(device):
    x, res, a, b = _inputs((2, 3, 3, 8), torch.float32, device, seed=0)
    with pytest.raises(ValueError, match=r"a must have shape \(2, 8\)"):
        modulation(x, a[:1], b)
    with pytest.raises(ValueError, match="residual"):
        modulation(x, a, b, res[:, :2])
    with pytest.raises(TypeError, match="residual"):
        modulation(x, a, b, res.bfloat16())
    with pytest.raises(ValueError, match="unit channel stride"):
        modulation(x, a.t().contiguous().t(), b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Stage C / B shapes)")
@pytest.mark.parametrize("shape", [(2, 24, 24, 2048), (2, 128, 128, 320), (2, 32, 32, 1280)])
def test_real_shapes_gpu(shape, close_to_ref):
    x, res, a, b = _inputs(shape, torch.bfloat16, "cuda", seed=1)
    close_to_ref(modulation(x, a, b, res, return_norm=True), modulation_ref, (x, a, b, res), {"return_norm": True})
