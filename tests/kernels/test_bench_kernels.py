"""The kernel benchmark cannot time anything without a GPU; here: its shape tables and argument parsing."""
import pytest
import torch

from cascade_rt.benchmarks import bench_kernels as bk


def test_shape_tables_match_the_real_stages():
    cases = {(c.op, c.stage): c for c in bk.kernel_cases(1024, 1024, batch=2)}
    att_c = cases[("attention", "c")]
    assert (att_c.batch, att_c.h, att_c.w, att_c.c, att_c.heads, att_c.cond_tokens) == (2, 24, 24, 2048, 32, 85)
    assert cases[("gelu_grn", "c")].c == 8192
    assert [(cases[("dwconv_layernorm", f"b-l{i}")].h, cases[("dwconv_layernorm", f"b-l{i}")].c) for i in range(4)] == [
        (128, 320), (64, 640), (32, 1280), (16, 1280)]
    assert (cases[("attention", "b-l2")].heads, cases[("attention", "b-l2")].cond_tokens) == (20, 4)
    assert ("attention", "b-l0") not in cases and ("attention", "b-l1") not in cases  # nhead -1 levels
    assert (cases[("layernorm_modulate", "a-l0")].h, cases[("layernorm_modulate", "a-l0")].c) == (256, 384)
    assert (
        cases[("dwconv_replicate_residual", "a-l1")].h, cases[("dwconv_replicate_residual", "a-l1")].c
    ) == (512, 192)
    assert all(c.c // max(c.heads, 1) == 64 for c in cases.values() if c.op == "attention")


def test_argument_parsing():
    args = bk.parse_args(["--ops", "attention,gelu_grn", "--no-stages", "--graphs"])
    assert args.ops == ["attention", "gelu_grn"] and args.no_stages and args.graphs and args.batch == 2
    with pytest.raises(SystemExit):
        bk.parse_args(["--ops", "softmax"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_cuda(tmp_path, caplog):
    assert bk.main(["--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in caplog.text
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("op", bk.OPS)
def test_each_case_runs_its_kernel_and_reference(op, device):
    heads = 2 if op == "attention" else 0
    case = bk.KernelCase(op, "tiny", 1, 3, 4, 64, heads, 5 if heads else 0)
    fn, ref, args, kwargs, nbytes, flops = bk._inputs(case, device, torch.float32)
    out, expected = fn(*args, **kwargs), ref(*args, **kwargs)
    for o, e in zip(
        out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)
    ):
        torch.testing.assert_close(o, e, atol=1e-4, rtol=1e-4)
    assert nbytes > 0 and (flops > 0) == (op == "attention")
