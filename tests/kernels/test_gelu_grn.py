import pytest
import torch

from cascade_rt.kernels.gelu_grn import gelu_grn, gelu_grn_ref

SHAPES = [(1, 1, 1, 5), (2, 5, 7, 48), (1, 9, 7, 100), (2, 4, 3, 72)]


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    h = (torch.randn(shape, generator=g) * 1.5).to(device, dtype)
    gamma = (torch.randn(1, 1, 1, c, generator=g) * 0.5).to(device, dtype)
    beta = (torch.randn(1, 1, 1, c, generator=g) * 0.5).to(device, dtype)
    return h, gamma, beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_ref(shape, dtype, device, close_to_ref):
    h, gamma, beta = _inputs(shape, dtype, device, seed=sum(shape))
    close_to_ref(gelu_grn(h, gamma, beta), gelu_grn_ref, (h, gamma, beta))


@pytest.mark.parametrize("split", [1, 3, 63])
def test_split_does_not_change_the_result(split, device):
    h, gamma, beta = _inputs((2, 9, 7, 40), torch.float32, device, seed=3)
    torch.testing.assert_close(gelu_grn(h, gamma, beta, split=split), gelu_grn_ref(h, gamma, beta),
                               atol=2e-5, rtol=2e-5)


def test_readable_errors(device):
    h, gamma, beta = _inputs((1, 3, 3, 8), torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="contiguous NHWC"):
        gelu_grn(h.transpose(1, 2), gamma, beta)
    with pytest.raises(ValueError, match="gamma"):
        gelu_grn(h, gamma[..., :4], beta)
    with pytest.raises(TypeError, match="dtype"):
        gelu_grn(h.int(), gamma, beta)
    with pytest.raises(ValueError, match="split"):
        gelu_grn(h, gamma, beta, split=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Stage C / B shapes)")
@pytest.mark.parametrize("shape", [(2, 24, 24, 8192), (2, 128, 128, 1280), (2, 16, 16, 5120)])
def test_real_shapes_gpu(shape, close_to_ref):
    h, gamma, beta = _inputs(shape, torch.bfloat16, "cuda", seed=1)
    close_to_ref(gelu_grn(h, gamma, beta), gelu_grn_ref, (h, gamma, beta))
