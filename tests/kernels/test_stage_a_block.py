import pytest
import torch

from cascade_rt.kernels.stage_a_block import (
    dwconv_replicate_residual,
    dwconv_replicate_residual_ref,
    layernorm_modulate,
    layernorm_modulate_ref,
)

SHAPES = [(1, 1, 1, 3), (2, 5, 7, 48), (1, 6, 3, 100), (2, 2, 9, 24), (1, 2, 19, 8)]  # W=19: two W strips


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(device, dtype)
    h = torch.randn(shape, generator=g).to(device, dtype)
    w = torch.randn(c, 1, 3, 3, generator=g).to(device, dtype)
    b = torch.randn(c, generator=g).to(device, dtype)
    gammas = torch.randn(6, generator=g).to(device, dtype)
    return x, h, w, b, gammas


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_gammas", [True, False])
def test_layernorm_modulate(shape, dtype, with_gammas, device, close_to_ref):
    x, _, _, _, gammas = _inputs(shape, dtype, device, seed=sum(shape))
    args = (x, gammas, 3) if with_gammas else (x,)
    close_to_ref(layernorm_modulate(*args), layernorm_modulate_ref, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dwconv_replicate_residual(shape, dtype, device, close_to_ref):
    x, h, w, b, gammas = _inputs(shape, dtype, device, seed=sum(shape) + 1)
    args = (h, x, w, b, gammas, 2)
    close_to_ref(dwconv_replicate_residual(*args), dwconv_replicate_residual_ref, args)


def test_readable_errors(device):
    x, h, w, b, gammas = _inputs((1, 3, 3, 8), torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="gammas index"):
        layernorm_modulate(x, gammas, 5)
    with pytest.raises(ValueError, match="contiguous NHWC"):
        layernorm_modulate(x.transpose(1, 2))
    with pytest.raises(ValueError, match="residual"):
        dwconv_replicate_residual(h, x[:, :2].contiguous(), w, b, gammas)
    with pytest.raises(TypeError, match="dtype"):
        dwconv_replicate_residual(h, x.bfloat16(), w, b, gammas)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Stage A shapes)")
@pytest.mark.parametrize("shape", [(1, 256, 256, 384), (1, 512, 512, 192)])
def test_real_shapes_gpu(shape, close_to_ref):
    x, h, w, b, gammas = _inputs(shape, torch.bfloat16, "cuda", seed=1)
    close_to_ref(layernorm_modulate(x, gammas, 0), layernorm_modulate_ref, (x, gammas, 0))
    args = (h, x, w, b, gammas, 2)
    close_to_ref(dwconv_replicate_residual(*args), dwconv_replicate_residual_ref, args)
