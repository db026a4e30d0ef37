"""CLIP encoders against transformers' CLIPTextModelWithProjection / CLIPVisionModelWithProjection (tiny, random)."""

from __future__ import annotations

import pytest
import torch

from cascade_rt.errors import WeightsError
from cascade_rt.models.text import (
    BOS_ID,
    CLIP_MEAN,
    CLIP_STD,
    EOS_ID,
    ClipTextConfig,
    ClipTokenizer,
    ClipVisionConfig,
    ImageEncoder,
    TextEncoder,
)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on the moon, highly detailed, 4k, trending"]


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (LN weights 1, biases 0) so each one is exercised."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf_text(tmp_path_factory):
    cfg = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=24,
        hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    _perturb(model, 1)
    root = tmp_path_factory.mktemp("sc")
    model.save_pretrained(root / "text_encoder")
    return model, root


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=24,
        image_size=224, patch_size=32, attn_implementation="eager",
    )  # hidden_act defaults to quick_gelu, as in openai ViT-L/14
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    _perturb(model, 2)
    root = tmp_path_factory.mktemp("sc")
    model.save_pretrained(root / "image_encoder")
    return model, root


def test_tokenizer_pads_with_eos_and_truncates():
    tok = ClipTokenizer()
    ids, mask = tok(["a photo of a cat", "", "word " * 200])
    assert ids.shape == mask.shape == (3, 77)
    assert ids[0, :7].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert (ids[0, 7:] == EOS_ID).all() and mask[0].tolist() == [1] * 7 + [0] * 70
    assert ids[1, :2].tolist() == [BOS_ID, EOS_ID] and mask[1].sum().item() == 2 and (ids[1, 2:] == EOS_ID).all()
    assert ids[2, 0].item() == BOS_ID and ids[2, -1].item() == EOS_ID and (ids[2, 1:-1] != EOS_ID).all()
    assert mask[2].sum().item() == 77


def test_tokenizer_matches_hf_clip_tokenizer(hf_clip_tokenizer):
    """An HF CLIPTokenizer built from open_clip's own BPE file (no download): the same ids and masks."""
    hf = hf_clip_tokenizer()
    prompts = [*PROMPTS, "word " * 100]
    ref = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ClipTokenizer()(prompts)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_text_encoder_matches_transformers(hf_text):
    ref_model, root = hf_text
    ours = TextEncoder.from_pretrained(root, dtype=torch.float32)
    assert ours.config.act == "gelu" and ours.config.output_dim == 24
    ids, mask = ours.tokenizer(PROMPTS)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        clip_text, pooled = ours.encode(PROMPTS)
    assert clip_text.shape == (3, 77, 32) and pooled.shape == (3, 1, 24)
    torch.testing.assert_close(clip_text, ref.hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref.text_embeds.unsqueeze(1), rtol=1e-5, atol=1e-5)
    # the padding mask matters for the pad positions (used by Stage C), not for the real tokens or the pool
    with torch.no_grad():
        no_mask = ref_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert (no_mask[0, 10:] - clip_text[0, 10:]).abs().max().item() > 1e-3
    torch.testing.assert_close(no_mask[0, :7], clip_text[0, :7], rtol=1e-5, atol=1e-5)
    # hidden_states[-1] is pre-final-LayerNorm: last_hidden_state differs
    assert (ref.last_hidden_state - clip_text).abs().max().item() > 1e-2


def test_text_encoder_bf16(hf_text):
    _, root = hf_text
    ref = TextEncoder.from_pretrained(root, dtype=torch.float32).encode(PROMPTS)
    out = TextEncoder.from_pretrained(root).encode(PROMPTS)  # default dtype: bf16, as the official pipeline
    assert out[0].dtype == torch.bfloat16
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05)


def test_vision_encoder_matches_transformers(hf_vision):
    ref_model, root = hf_vision
    ours = ImageEncoder.from_pretrained(root / "image_encoder", dtype=torch.float32)
    assert ours.config.act == "quick_gelu"
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(pixel_values=pixels).image_embeds
        out = ours(pixels)
    assert out.shape == (2, 1, 24)
    torch.testing.assert_close(out, ref.unsqueeze(1), rtol=1e-5, atol=1e-5)


def test_image_preprocess():
    enc = ImageEncoder.random()
    gray = torch.full((1, 3, 300, 200), 0.5)
    x = enc.preprocess(gray)
    assert x.shape == (1, 3, 224, 224)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(x[0, :, 100, 100], expected, rtol=1e-5, atol=1e-5)
    # center crop of the longer side: a marker in the cropped-away top rows does not survive
    img = torch.zeros(1, 3, 400, 224)
    img[:, :, :50] = 1.0
    black = ((0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)).max().item()
    assert enc.preprocess(img).max().item() == pytest.approx(black, abs=1e-5)
    assert enc.encode(torch.rand(2, 3, 256, 256)).shape == (2, 1, 24)


def test_open_clip_layout_round_trip(tmp_path, hf_text, hf_vision):
    """Save both towers as one open_clip checkpoint (text top-level, vision under visual.) and load each back."""
    from safetensors.torch import save_file

    text = TextEncoder.from_pretrained(hf_text[1], dtype=torch.float32)
    image = ImageEncoder.from_pretrained(hf_vision[1], dtype=torch.float32)
    state = {k: v.contiguous() for k, v in text.tower.state_dict().items()}
    state.update({f"visual.{k}": v.contiguous() for k, v in image.tower.state_dict().items()})
    state["logit_scale"] = torch.tensor(4.6)
    assert state["text_projection"].shape == (32, 24) and "transformer.resblocks.0.attn.in_proj_weight" in state
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    model_cfg = {
        "embed_dim": 24, "quick_gelu": False,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0,
                       "patch_size": 32},
    }
    (tmp_path / "open_clip_config.json").write_text(__import__("json").dumps({"model_cfg": model_cfg}))
    text2 = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    for a, b in zip(text2.encode(PROMPTS), text.encode(PROMPTS)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # quick_gelu False in the config: the vision tower is rebuilt with GELU, so its outputs must differ
    image2 = ImageEncoder.from_pretrained(tmp_path / "open_clip_model.safetensors", dtype=torch.float32)
    assert image2.config.act == "gelu"
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert (image2(pixels) - image(pixels)).abs().max().item() > 1e-4


def test_random_encoders_are_seeded():
    a = TextEncoder.random(ClipTextConfig.tiny(32), seed=3).encode(["x"])[1]
    b = TextEncoder.random(ClipTextConfig.tiny(32), seed=3).encode(["x"])[1]
    c = TextEncoder.random(ClipTextConfig.tiny(32), seed=4).encode(["x"])[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    image = ImageEncoder.random(ClipVisionConfig.tiny(output_dim=16))
    assert image.encode(torch.rand(1, 3, 64, 64)).shape == (1, 1, 16)


def test_missing_files_name_the_layout(tmp_path):
    with pytest.raises(WeightsError, match=r"text_encoder/config.json.*open_clip"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="model.safetensors"):
        TextEncoder.from_pretrained(tmp_path)


def test_wrong_weights_are_reported(tmp_path, hf_text):
    from safetensors.torch import save_file

    text = TextEncoder.from_pretrained(hf_text[1], dtype=torch.float32)
    state = {k: v.contiguous() for k, v in text.tower.state_dict().items() if "resblocks.1." not in k}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing: transformer\.resblocks\.1\."):
        TextEncoder.from_pretrained(tmp_path)  # ViT-bigG-14 config vs tiny weights: missing + shape mismatch
