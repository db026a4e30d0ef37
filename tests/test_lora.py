"""LoRA / ReToken against a reference written from the official code (modules/lora.py, train/train_c_lora.py).

The reference below parametrizes a copy of Stage C the way official `apply_lora` does, collects its LoRA modules
the way train_c_lora.py builds the checkpoint (`generator.modules()` order, in an `nn.ModuleDict`) and loads the
file with `load_state_dict(strict=True)`: our loader, our parametrization and our in-place merge must all give
its output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from cascade_rt.errors import ConfigError, WeightsError
from cascade_rt.models import build_model
from cascade_rt.models.lora import (
    LoRAMerger,
    ReTokenMerger,
    attach_official,
    detach_official,
    load_lora,
    lora_targets,
    random_lora,
    save_lora,
)
from cascade_rt.models.stage_c import StageC
from cascade_rt.models.text import ClipTextConfig, TextEncoder


# ------------------------------------------------------------------------------------------ reference
class RefLoRA(nn.Module):
    def __init__(self, layer, name="weight", rank=16, alpha=1):
        super().__init__()
        weight = getattr(layer, name)
        self.lora_down = nn.Parameter(torch.zeros((rank, weight.size(1))))
        self.lora_up = nn.Parameter(torch.zeros((weight.size(0), rank)))
        nn.init.normal_(self.lora_up, mean=0, std=1)
        self.scale = alpha / rank

    def forward(self, original_weights):
        shape = list(original_weights.shape[:2]) + [1] * (len(original_weights.shape) - 2)
        return original_weights + torch.matmul(self.lora_up.clone(), self.lora_down.clone()).view(*shape) * self.scale


def ref_apply_lora(model, filters, rank):
    def plain(module, name):
        return (hasattr(module, name) and not parametrize.is_parametrized(module, name)
                and isinstance(getattr(module, name), nn.Parameter))

    for name, module in model.named_modules():
        if filters is None or any(f in name for f in filters):
            for pname in ("weight", "in_proj_weight"):
                if plain(module, pname):
                    w = getattr(module, pname)
                    parametrize.register_parametrization(module, pname, RefLoRA(module, pname, rank).to(w.dtype))
                    break


def ref_lora_module(model) -> nn.ModuleDict:
    lora = nn.ModuleDict()
    lora["weights"] = nn.ModuleList(m for m in model.modules() if isinstance(m, RefLoRA))
    return lora


@pytest.fixture(scope="module")
def stage_c():
    return build_model("stage_c_tiny", seed=11)


def c_inputs(gen, batch=2, hw=(5, 4)):
    return (torch.randn(batch, 16, *hw, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 7, 32, generator=gen), torch.randn(batch, 1, 32, generator=gen),
            torch.randn(batch, 1, 24, generator=gen))


def reference_output(model, path, inputs, rank=4):
    ref = copy.deepcopy(model)
    ref_apply_lora(ref, [".attn"], rank)
    from safetensors.torch import load_file

    state = load_file(str(path))
    ref_lora_module(ref).load_state_dict({k: v for k, v in state.items() if k.startswith("weights.")}, strict=True)
    with torch.no_grad():
        return ref(*inputs)


# ------------------------------------------------------------------------------------------ tests
def test_targets_follow_the_official_checkpoint_order(stage_c):
    ref = copy.deepcopy(stage_c)
    ref_apply_lora(ref, [".attn"], 4)
    ref_shapes = [(tuple(m.lora_up.shape), tuple(m.lora_down.shape)) for m in ref_lora_module(ref)["weights"]]
    targets = lora_targets(stage_c)
    assert [(t.shape[0], 4) for t in targets] == [s[0] for s in ref_shapes]
    assert [(4, t.shape[1]) for t in targets] == [s[1] for s in ref_shapes]
    # per attention block: out_proj before the MultiheadAttention holding it (parametrizations come last)
    assert targets[0].name.endswith("attention.attn.out_proj") and targets[1].name.endswith("attention.attn")
    assert [t.param for t in targets[:2]] == ["weight", "in_proj_weight"]
    assert len(targets) == 2 * len(stage_c.attn_blocks())


@torch.no_grad()
def test_lora_output_equals_official_reference(stage_c, tmp_path, gen):
    lora = random_lora(stage_c, rank=4, seed=1, std=0.2)
    path = save_lora(lora, tmp_path / "lora.safetensors")
    inputs = c_inputs(gen)
    expected = reference_output(stage_c, path, inputs)
    base = stage_c(*inputs)
    assert (expected - base).abs().max() > 1e-3  # the LoRA changes the output

    loaded = load_lora(path, stage_c)
    model = copy.deepcopy(stage_c)
    attach_official(model, [loaded])  # parametrized, as official
    torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-5)
    detach_official(model)
    torch.testing.assert_close(model(*inputs), base, rtol=0, atol=0)

    merger = LoRAMerger(model)  # merged in place: the same arithmetic, so the same bits as the parametrization
    merger.apply([loaded])
    attached = copy.deepcopy(stage_c)
    attach_official(attached, [loaded])
    assert torch.equal(model(*inputs), attached(*inputs))
    torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_several_loras_with_scales(stage_c, gen):
    a, b = random_lora(stage_c, seed=2, std=0.2), random_lora(stage_c, rank=2, seed=3, std=0.2)
    inputs = c_inputs(gen)
    model = copy.deepcopy(stage_c)
    LoRAMerger(model).apply([a.with_scale(0.7), b.with_scale(-0.4)])
    ref = copy.deepcopy(stage_c)  # reference: W + 0.7 * up_a down_a / 4 - 0.4 * up_b down_b / 2, in fp64
    for t, ta, la, lb in zip(lora_targets(ref), lora_targets(stage_c), a.layers, b.layers):
        w = ta.original().double()
        view = list(w.shape[:2]) + [1] * (w.dim() - 2)
        w = w + 0.7 * (la.lora_up.double() @ la.lora_down.double()).view(view) / 4
        w = w - 0.4 * (lb.lora_up.double() @ lb.lora_down.double()).view(view) / 2
        t.original().copy_(w.float())
    torch.testing.assert_close(model(*inputs), ref(*inputs), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unmerge_and_switch_are_exact_and_in_place(stage_c, gen):
    model = copy.deepcopy(stage_c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    merger = LoRAMerger(model)
    loras = [random_lora(model, seed=s, std=0.3) for s in (4, 5)]
    inputs = c_inputs(gen)
    for _ in range(3):  # switch back and forth: no drift accumulates
        merger.apply([loras[0]])
        first = model(*inputs)
        seconds = merger.apply([loras[1].with_scale(0.5), loras[0]])
        assert merger.last_switch_s == seconds and seconds >= 0.0
        merger.apply([loras[0]])
        assert torch.equal(model(*inputs), first)
    merger.unmerge()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact base weights
    assert all(after[k].data_ptr() == ptrs[k] for k in ptrs)  # same storage: CUDA graphs stay valid


def test_strict_loading_errors(stage_c, tmp_path):
    lora = random_lora(stage_c, rank=4, seed=6)
    path = save_lora(lora, tmp_path / "r4.safetensors")
    with pytest.raises(WeightsError, match="rank-4 LoRA.*rank 8 was asked"):
        load_lora(path, stage_c, rank=8)
    # another model: a Stage C of other widths has the same layer count but other shapes
    other = StageC(c_cond=48, c_hidden=[32, 64], nhead=[2, 2], blocks=[[1, 2], [2, 1]], c_clip_text=32,
                   c_clip_text_pooled=32, c_clip_img=24).eval()
    with pytest.raises(WeightsError, match="trained for another model"):
        load_lora(path, other)
    deeper = StageC(c_cond=48, c_hidden=[48, 64], nhead=[2, 2], blocks=[[2, 2], [2, 2]], c_clip_text=32,
                    c_clip_text_pooled=32, c_clip_img=24).eval()
    with pytest.raises(WeightsError, match=r"holds 12 LoRA layers, but this StageC has 16"):
        load_lora(path, deeper)
    from safetensors.torch import save_file

    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attn.lora_down.weight": torch.zeros(4, 8)}, str(kohya))
    with pytest.raises(WeightsError, match="kohya LoRA layout.*matches no layer"):
        load_lora(kohya, stage_c)
    with pytest.raises(ConfigError, match="match no layer"):
        load_lora(path, stage_c, filters=["no_such_module"])
    with pytest.raises(WeightsError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", stage_c)


@torch.no_grad()
def test_retoken_adds_rows_and_unmerges(tmp_path):
    encoder = TextEncoder.random(ClipTextConfig.tiny(32), seed=1)
    table = encoder.tower.token_embedding.weight
    base = table.detach().clone()
    model = build_model("stage_c_tiny", seed=12)
    lora = random_lora(model, seed=7, token_indices=[3, 41], token_dim=32)
    loaded = load_lora(save_lora(lora, tmp_path / "t.safetensors"), model)
    merger = ReTokenMerger.for_text_encoder(encoder)
    merger.apply([loaded])
    expected = base.clone()
    expected[3] += lora.retoken.embeddings[0]
    expected[41] += lora.retoken.embeddings[1]
    assert torch.equal(table, expected) and encoder.tower.token_embedding.weight is table  # in place
    merger.unmerge()
    assert torch.equal(table, base)
    too_far = random_lora(model, seed=8, token_indices=[49408], token_dim=32)  # adds a token it does not name
    with pytest.raises(WeightsError, match=r"adds 1 new token.*--lora-tokens"):
        merger.apply([too_far])
    assert torch.equal(table, base)
