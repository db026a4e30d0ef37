"""LoRAs that add tokens (the released '[fernando]' example): tokenizer, embedding table and pooling against the
official setup (train/train_c_lora.py's setup_models) run on transformers' CLIP classes, tiny and random."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.models import build_model
from cascade_rt.models.lora import (
    ReTokenMerger,
    load_lora,
    parse_token_spec,
    random_lora,
    read_train_tokens,
    save_lora,
)
from cascade_rt.models.text import BOS_ID, EOS_ID, ClipTokenizer, TextEncoder

transformers = pytest.importorskip("transformers")

TOKENS = [["[fernando]", "^dog</w>"], ["<sks>", None], ["^cat</w>", None]]  # two new tokens, one existing
CAT = 2368  # 'cat</w>'
PROMPTS = ["a photo of [fernando] with a cat", "<sks> [Fernando] in the snow", "a photo of a cat", ""]


@pytest.fixture(scope="module")
def laion_text(tmp_path_factory):
    """A tiny CLIPTextModelWithProjection with the official text model's config conventions (laion's config:
    bos 0, eos 2, pad 1: transformers pools at input_ids.argmax()), saved in the HF layout."""
    cfg = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, projection_dim=24,
        hidden_act="gelu", vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
        pad_token_id=1, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    root = tmp_path_factory.mktemp("laion")
    model.save_pretrained(root / "text_encoder")
    return root


class _OfficialReToken(nn.Module):
    """The official ReToken parametrization (modules/lora.py), written out for the reference."""

    def __init__(self, indices, embeddings):
        super().__init__()
        self.indices, self.embeddings = list(indices), embeddings

    def forward(self, table):
        table = table.clone()
        for i, idx in enumerate(self.indices):
            table[idx] += self.embeddings[i]
        return table


def _official(root, tokenizer, train_tokens, lora_state):
    """train/train_c_lora.py setup_models' token part, then the checkpoint's ReToken, on transformers' classes."""
    model = transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder").eval()
    emb = model.text_model.embeddings.token_embedding
    update = []
    for tkn, aggr in train_tokens:
        if (tkn.startswith("[") and tkn.endswith("]")) or (tkn.startswith("<") and tkn.endswith(">")):
            tokenizer.add_tokens([tkn])
            new = torch.zeros_like(emb.weight.data)[:1]
            if aggr is not None:
                ids = [v for k, v in tokenizer.get_vocab().items() if re.search(aggr, k) is not None]
                if ids:
                    new = emb.weight.data[ids].mean(dim=0, keepdim=True)
            emb.weight.data = torch.cat([emb.weight.data, new], dim=0)
            update += [len(tokenizer.get_vocab()) - 1]
        else:
            update += [v for k, v in tokenizer.get_vocab().items() if re.search(tkn, k) is not None]
    update = list(set(update))
    assert sorted(update) == sorted(lora_state["embeddings.indices"].tolist())  # the file is this config's
    parametrize.register_parametrization(
        emb, "weight", _OfficialReToken(lora_state["embeddings.indices"].tolist(), lora_state["embeddings.embeddings"])
    )
    return model


def _lora_for(encoder, seed=3, indices=(49408, 49409, CAT), tokens=TOKENS):
    stage_c = build_model("stage_c_tiny", seed=12)
    width = encoder.tower.token_embedding.weight.shape[1]
    return stage_c, random_lora(stage_c, seed=seed, std=0.5, token_indices=list(indices), token_dim=width,
                                tokens=tokens)


def test_tokenizer_with_added_tokens_matches_transformers(hf_clip_tokenizer):
    hf, ours = hf_clip_tokenizer(), ClipTokenizer()
    hf.add_tokens(["[fernando]", "<cat-toy>"])
    assert (ours.add_token("[fernando]"), ours.add_token("<cat-toy>"), ours.add_token("[fernando]")) == (
        49408, 49409, 49408)
    prompts = ["a photo of [fernando] the dog", "[Fernando]s x[fernando]y ![fernando]!", "[fernando][fernando]",
               "<xy> [ fernando ] <cat-toy>", "a <CAT-TOY>, [fernando]'s  hat", "naïve café [fernando]\n\tok",
               "word " * 80 + "[fernando]", ""]
    ref = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = ours(prompts)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert ids[0, :7].tolist() == [BOS_ID, 320, 1125, 539, 49408, 518, 1929]
    assert ours.vocab() == hf.get_vocab()
    ours.reset_added()
    assert 49408 not in ours(["[fernando]"])[0] and len(ours.vocab()) == 49408


@torch.no_grad()
def test_lora_tokens_match_the_official_setup(laion_text, hf_clip_tokenizer, tmp_path):
    ours = TextEncoder.from_pretrained(laion_text, dtype=torch.float32)
    base = ours.encode(PROMPTS)
    _, lora = _lora_for(ours)
    path = save_lora(lora, tmp_path / "tokens.safetensors")
    hf_tok = hf_clip_tokenizer()
    ref_model = _official(laion_text, hf_tok, TOKENS, lora.state_dict())
    stage_c = build_model("stage_c_tiny", seed=12)
    merger = ReTokenMerger.for_text_encoder(ours)
    merger.apply([load_lora(path, stage_c)])  # tokens from the file's metadata
    enc = hf_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = ref_model(**enc, output_hidden_states=True)
    ids, _ = ours.tokenizer(PROMPTS)
    assert torch.equal(ids, enc["input_ids"]) and ours.tower.token_embedding.weight.shape[0] == 49410
    clip_text, pooled = ours.encode(PROMPTS)
    torch.testing.assert_close(clip_text, ref.hidden_states[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref.text_embeds.unsqueeze(1), rtol=1e-5, atol=1e-5)
    # the added token's row: mean of 'dog</w>' (one row: itself) plus the learned vector; '<sks>' starts at zeros
    table, orig = ours.tower.token_embedding.weight, merger._original
    dog = hf_tok.get_vocab()["dog</w>"]
    order = lora.retoken.indices.tolist()
    assert torch.equal(table[49408], orig[dog] + lora.retoken.embeddings[order.index(49408)])
    assert torch.equal(table[49409], lora.retoken.embeddings[order.index(49409)])
    # pooling: at the added token (the highest id), as the official text model does, not at the first EOS
    first_eos = (ids == EOS_ID).int().argmax(-1)
    h = ref.last_hidden_state[0, first_eos[0]] @ ref_model.text_projection.weight.T
    assert (h - pooled[0, 0]).abs().max() > 1e-3
    # prompts without the new tokens: only the existing token's vector ('cat') changes anything
    assert torch.equal(clip_text[3], base[0][3])
    merger.unmerge()
    for a, b in zip(ours.encode(PROMPTS), base):
        assert torch.equal(a, b)
    assert ours.tower.token_embedding.weight.shape[0] == 49408 and ours.tokenizer.added == {}


@torch.no_grad()
def test_token_config_must_fit_the_file(tmp_path):
    encoder = TextEncoder.random(seed=1)
    stage_c, lora = _lora_for(encoder, indices=(49408, 49409, CAT))
    merger = ReTokenMerger.for_text_encoder(encoder)
    path = save_lora(lora, tmp_path / "l.safetensors")
    unnamed = load_lora(path, stage_c, tokens=[])
    with pytest.raises(WeightsError, match=r"adds 2 new token.*train_tokens: --lora-tokens CONFIG.yaml"):
        merger.apply([unnamed])
    wrong = load_lora(path, stage_c, tokens=[["[fernando]", "^dog</w>"], ["^dog</w>", None]])
    with pytest.raises(WeightsError, match="not the tokens this LoRA was trained with"):
        merger.apply([wrong])
    # a refused switch leaves what was merged before
    good = load_lora(path, stage_c)
    merger.apply([good])
    before = encoder.encode(PROMPTS)
    with pytest.raises(WeightsError):
        merger.apply([wrong])
    assert encoder.tokenizer.added == {"[fernando]": 49408, "<sks>": 49409}
    for a, b in zip(encoder.encode(PROMPTS), before):
        assert torch.equal(a, b)


@torch.no_grad()
def test_two_loras_adding_tokens_get_their_own_ids(tmp_path):
    encoder = TextEncoder.random(seed=1)
    stage_c = build_model("stage_c_tiny", seed=12)
    width = encoder.tower.token_embedding.weight.shape[1]
    a = random_lora(stage_c, seed=1, token_indices=[49408], token_dim=width, tokens=[["[a]", "^dog</w>"]])
    b = random_lora(stage_c, seed=2, token_indices=[49408], token_dim=width, tokens=[["[b]", None]])
    both = random_lora(stage_c, seed=3, token_indices=[49408], token_dim=width, tokens=[["[a]", None]])
    merger = ReTokenMerger.for_text_encoder(encoder)
    orig = encoder.tower.token_embedding.weight.detach().clone()
    merger.apply([a, b, both])
    table = encoder.tower.token_embedding.weight
    assert encoder.tokenizer.added == {"[a]": 49408, "[b]": 49409} and table.shape[0] == 49410
    dog = encoder.tokenizer.vocab()["dog</w>"]
    assert torch.equal(table[49408], orig[dog] + a.retoken.embeddings[0] + both.retoken.embeddings[0])
    assert torch.equal(table[49409], b.retoken.embeddings[0])  # no init regex: zeros + its vector
    assert encoder.tokenizer(["[b] [a]"])[0][0, 1:3].tolist() == [49409, 49408]


def test_token_specs(tmp_path):
    cfg = tmp_path / "lora_c_3b.yaml"
    cfg.write_text("module_filters: ['.attn']\nrank: 4\ntrain_tokens:\n  - ['[fernando]', '^dog</w>']\n")
    assert read_train_tokens(cfg) == (("[fernando]", "^dog</w>"),) == parse_token_spec(str(cfg))
    assert parse_token_spec("[fernando]=^dog</w>") == (("[fernando]", "^dog</w>"),)
    assert parse_token_spec("<x>") == (("<x>", None),) and parse_token_spec("^cat</w>") == (("^cat</w>", None),)
    with pytest.raises(ConfigError, match="TOKEN=INIT_REGEX"):
        parse_token_spec("[fernando]^dog")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        parse_token_spec("[x]=(unclosed")
    (tmp_path / "other.yaml").write_text("rank: 4\n")
    with pytest.raises(ConfigError, match="has no train_tokens"):
        read_train_tokens(tmp_path / "other.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        read_train_tokens(tmp_path / "missing.yaml")


def test_cli_lora_tokens_belong_to_the_lora_before(tmp_path):
    import argparse

    from cascade_rt.commands.generate import add_extension_args, lora_args

    parser = argparse.ArgumentParser()
    add_extension_args(parser)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train_tokens: [['[fernando]', '^dog</w>']]\n")
    args = parser.parse_args(["--lora", "a.safetensors:0.5", "--lora", "b.safetensors", "--lora-tokens", str(cfg),
                              "--lora-tokens", "<sks>"])
    a, b = lora_args(args)
    assert (a.path, a.scale, a.tokens) == ("a.safetensors", 0.5, None)
    assert b.tokens == (("[fernando]", "^dog</w>"), ("<sks>", None))
    with pytest.raises(SystemExit):
        parser.parse_args(["--lora-tokens", "<sks>", "--lora", "a.safetensors"])


@torch.no_grad()
def test_pipeline_and_cli_run_a_token_lora(tmp_path):
    """load_pipeline / generate with a LoRA that adds '[fernando]' (named by --lora-tokens): the token reaches the
    text encoder, the Stage C LoRA is merged, switching it off restores the base encoder exactly."""
    import json

    import cascade_rt
    from cascade_rt.cli import main
    from cascade_rt.extensions import LoRAArg, switch_loras
    from cascade_rt.pipeline import build_random_pipeline

    base = build_random_pipeline("tiny", dtype=torch.float32)
    width = base.text_encoder.tower.token_embedding.weight.shape[1]
    lora = random_lora(base.stage_c, seed=4, std=0.5, token_indices=[49408], token_dim=width)  # names no token
    path = save_lora(lora, tmp_path / "fernando.safetensors")
    tokens = (("[fernando]", "^dog</w>"),)
    pipe = cascade_rt.load_pipeline(random_weights=True, preset="tiny", device="cpu", dtype=torch.float32,
                                    lora=[LoRAArg(str(path), 1.0, tokens)])
    prompt = ["a photo of [fernando]"]
    assert pipe.text_encoder.tokenizer(prompt)[0][0, 4].item() == 49408
    assert (pipe.text_encoder.encode(prompt)[1] - base.text_encoder.encode(prompt)[1]).abs().max() > 1e-3
    assert pipe.extensions.describe()["lora"][0]["tokens"] == [["[fernando]", "^dog</w>"]]
    switch_loras(pipe, [])
    for a, b in zip(pipe.text_encoder.encode(prompt), base.text_encoder.encode(prompt)):
        assert torch.equal(a, b)
    out = tmp_path / "f.png"
    argv = ["generate", "[fernando] as a pirate", "--random-weights", "--preset", "tiny", "--device", "cpu",
            "--dtype", "fp32", "--height", "256", "--width", "256", "--steps-c", "1", "--steps-b", "1",
            "--lora", str(path), "--lora-tokens", "[fernando]=^dog</w>", "-o", str(out)]
    assert main(argv) == 0
    from PIL import Image

    meta = json.loads(Image.open(out).text["cascade-rt"])
    assert meta["extensions"]["lora"][0]["tokens"] == [["[fernando]", "^dog</w>"]]
    assert main(argv[:-4] + ["-o", str(out)]) == 2  # without --lora-tokens: refused, with the fix named
