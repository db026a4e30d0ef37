import pytest
import torch

from cascade_rt.kernels.dwconv_layernorm import dwconv_layernorm, dwconv_layernorm_ref

SHAPES = [(1, 1, 1, 3), (2, 5, 7, 48), (1, 6, 3, 100), (2, 3, 9, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_ref(shape, dtype, device, close_to_ref):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    b, h, w, c = shape
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    weight = torch.randn(c, 1, 3, 3, generator=g).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    close_to_ref(dwconv_layernorm(x, weight, bias), dwconv_layernorm_ref, (x, weight, bias))


def test_channel_last_weight_and_out_slice(device):
    x = torch.randn(2, 4, 5, 20, device=device)
    weight, bias = torch.randn(20, 1, 3, 3, device=device), torch.randn(20, device=device)
    w_cl = weight.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # same values, channel-last memory
    buf = torch.full((2, 4, 5, 32), 7.0, device=device)
    dwconv_layernorm(x, w_cl, bias, out=buf[..., :20])
    torch.testing.assert_close(buf[..., :20], dwconv_layernorm_ref(x, weight, bias), atol=1e-5, rtol=1e-5)
    assert (buf[..., 20:] == 7.0).all()


def test_readable_errors(device):
    x = torch.randn(1, 4, 4, 8, device=device)
    w, b = torch.randn(8, 1, 3, 3, device=device), torch.randn(8, device=device)
    with pytest.raises(ValueError, match="contiguous NHWC"):
        dwconv_layernorm(x.permute(0, 3, 1, 2), w, b)
    with pytest.raises(ValueError, match="weight"):
        dwconv_layernorm(x, torch.randn(8, 1, 5, 5, device=device), b)
    with pytest.raises(TypeError, match="dtype"):
        dwconv_layernorm(x.long(), w, b)
    with pytest.raises(ValueError, match="bias"):
        dwconv_layernorm(x, w, torch.randn(9, device=device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Stage C / B shapes)")
@pytest.mark.parametrize("shape", [(2, 24, 24, 2048), (2, 128, 128, 320), (2, 32, 32, 1280)])
def test_real_shapes_gpu(shape, close_to_ref):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(shape[-1], 1, 3, 3, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16)
    close_to_ref(dwconv_layernorm(x, w, b), dwconv_layernorm_ref, (x, w, b))
