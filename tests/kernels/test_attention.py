import pytest
import torch

from cascade_rt.kernels.attention import attention, attention_ref


def _inputs(b, n, s, heads, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    c = heads * d
    qkv = torch.randn(b, n, 3 * c, generator=g).to(device, dtype)
    kv = torch.randn(b, s, 2 * c, generator=g).to(device, dtype)  # cond k|v as column views of one buffer
    return qkv, kv[..., :c], kv[..., c:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,n,s,heads,d", [
    (1, 1, 1, 1, 32),      # single query, single cond token
    (2, 35, 5, 2, 32),     # 5x7 image, odd everything
    (1, 16, 4, 1, 64),     # exact blocks, Stage B-like cond length
    (2, 20, 17, 1, 128),   # cond longer than one 16-block (masked cond tail)
    (1, 9, 3, 2, 24),      # head_dim not a power of two (tiny presets): padded and masked
])
def test_matches_ref(b, n, s, heads, d, dtype, device, close_to_ref):
    qkv, ck, cv = _inputs(b, n, s, heads, d, dtype, device, seed=n * s + d)
    close_to_ref(attention(qkv, heads, ck, cv), attention_ref, (qkv, heads, ck, cv))


def test_without_cond_and_large_logits(device, close_to_ref):
    qkv, _, _ = _inputs(1, 19, 1, 2, 32, torch.float32, device, seed=7)
    qkv = qkv * 6  # sharp softmax: the online max has to be right
    close_to_ref(attention(qkv, 2), attention_ref, (qkv, 2))


def test_readable_errors(device):
    qkv, ck, cv = _inputs(1, 4, 2, 2, 32, torch.float32, device, seed=0)
    with pytest.raises(ValueError, match="3C"):
        attention(qkv[..., :-1], 2, ck, cv)
    with pytest.raises(ValueError, match="heads"):
        attention(qkv, 5, ck, cv)
    with pytest.raises(ValueError, match="both"):
        attention(qkv, 2, ck, None)
    with pytest.raises(ValueError, match="cond_v"):
        attention(qkv, 2, ck, cv[:, :1])
    with pytest.raises(TypeError, match="cond_k"):
        attention(qkv, 2, ck.bfloat16(), cv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (real Stage C / B shapes)")
@pytest.mark.parametrize("b,n,s,heads", [(2, 576, 85, 32), (2, 1024, 4, 20), (2, 256, 4, 20)])
def test_real_shapes_gpu(b, n, s, heads, close_to_ref):
    qkv, ck, cv = _inputs(b, n, s, heads, 64, torch.bfloat16, "cuda", seed=1)
    close_to_ref(attention(qkv, heads, ck, cv), attention_ref, (qkv, heads, ck, cv))
