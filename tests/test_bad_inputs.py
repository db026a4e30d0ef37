"""Hostile and careless inputs, one table row each: the user gets a `cascade_rt.errors` message naming the
problem and the fix, before any model is loaded or any stage runs, and the CLI exits 2 without a traceback.

A row is (id, what to run, expected, phrase):
* what to run: a CLI argv (list; "{tmp}" and "{name}" stand for the files the `files` fixture makes), run
  in-process through `cascade_rt.cli.main`; or a callable(ctx) for the Python API.
* expected: 2 (the CLI's exit code for a user error) or an error type.
* phrase: a regular expression the message must contain.

CLI rows run with model loading disabled (`no_models`), which proves they are refused before any model is built
or read, unless the row id is in `LOADS_MODELS` (a failure that can only happen after the compute: the disk
filling up while the image is written). Python rows run against a pipeline whose text encoder and Stage C fail
if called (`guarded`), which proves they are refused before any work.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

from cascade_rt.cli import main
from cascade_rt.errors import ConfigError, FileError, NumericsError, WeightsError
from cascade_rt.models.presets import build_model
from cascade_rt.pipeline import StableCascadePipeline, build_random_pipeline
from cascade_rt.validation import check_engine_dir, check_output_path

CPU = ["--random-weights", "--device", "cpu", "--dtype", "fp32"]
FAST = ["--steps-c", "1", "--steps-b", "1"]


def gen(*extra: str) -> list[str]:
    return ["generate", "a cat", *CPU, "-o", "{tmp}/out.png", *extra]


def rec(image: str, *extra: str) -> list[str]:
    return ["reconstruct", image, *CPU, "-o", "{tmp}/rec.png", *extra]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bad (and a few good) files the rows refer to by name."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    f = {"tmp": tmp}
    f["good"] = tmp / "good.png"
    Image.new("RGB", (256, 256), (10, 200, 30)).save(f["good"])
    f["odd_size"] = tmp / "odd.png"
    Image.new("RGB", (300, 200)).save(f["odd_size"])
    f["text"] = tmp / "notes.png"
    f["text"].write_text("these are notes, not pixels\n")
    data = f["good"].read_bytes()
    f["truncated"] = tmp / "truncated.png"
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["bomb_warning"] = tmp / "bomb_warning.png"  # 90 M pixels: over PIL's warning limit (89.5 M)
    Image.new("1", (10000, 9000)).save(f["bomb_warning"])
    f["bomb_error"] = tmp / "bomb_error.png"  # 180 M pixels: over PIL's error limit (2x)
    Image.new("1", (20000, 9000)).save(f["bomb_error"])
    f["loop"] = tmp / "loop.png"
    os.symlink(f["loop"], f["loop"])
    f["loop_dir"] = tmp / "loop_dir"
    os.symlink(f["loop_dir"], f["loop_dir"])
    f["a_file"] = tmp / "a_file.txt"
    f["a_file"].write_text("x")
    f["full_disk"] = tmp / "full.png"  # writing here fails with ENOSPC, as on a full disk
    os.symlink("/dev/full", f["full_disk"])
    f["looped_file"] = tmp / "looped_file"  # a weights folder whose Stage C file is a symlink loop
    f["looped_file"].mkdir()
    os.symlink(f["looped_file"] / "stage_c_bf16.safetensors", f["looped_file"] / "stage_c_bf16.safetensors")
    f["lite_only"] = tmp / "lite_only"  # a weights folder with only the lite Stage C / B files
    f["lite_only"].mkdir()
    for name in ("stage_c_lite_bf16.safetensors", "stage_b_lite_bf16.safetensors", "stage_a.safetensors"):
        (f["lite_only"] / name).write_bytes(b"not read: the variant check happens first")
    return f


def fill(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: str(files[m.group(1)]), a) for a in argv]


@pytest.fixture
def no_models(monkeypatch):
    """Loading or building any model fails the test: what is checked here must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or loaded before the bad input was refused")

    monkeypatch.setattr("cascade_rt.runtime.api.build_random_pipeline", refuse)
    monkeypatch.setattr("cascade_rt.weights.load_stage", refuse)


@pytest.fixture(scope="module")
def pipe() -> StableCascadePipeline:
    return build_random_pipeline("tiny", dtype=torch.float32, seed=0)


class Refuses:
    """A stage runner / text encoder that fails if any of its work is asked for."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.preset = getattr(model, "preset", None)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the pipeline ran a stage before refusing the bad setting")

    encode = prepare_conditioning = denoise = decode = _refuse


@pytest.fixture(scope="module")
def guarded(pipe) -> StableCascadePipeline:
    """The tiny pipeline with a text encoder, Stage C and Stage B that fail if called."""
    return StableCascadePipeline(
        text_encoder=Refuses(pipe.text_encoder), stage_c=Refuses(pipe.stage_c), stage_b=Refuses(pipe.stage_b),
        stage_a=pipe.stage_a, effnet=pipe.effnet, previewer=pipe.previewer, image_encoder=pipe.image_encoder,
    )


@dataclass
class Ctx:
    files: dict[str, Path]
    pipe: StableCascadePipeline
    guarded: StableCascadePipeline
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest


# ------------------------------------------------------------------------------------------ Python-API helpers
def as_nobody(fn: Callable[[], None]) -> tuple[int, str]:
    """Run `fn` in a forked child as user nobody (root ignores folder permissions); (exit code, error text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only pure-Python checks run here
        code = 0
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            fn()
            os.write(w, b"no error")
            code = 1
        except FileError as exc:
            os.write(w, str(exc).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, repr(exc).encode())
            code = 3
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        text = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


def read_only_folder(ctx: Ctx) -> Path:
    """A folder no one but root may write, in a folder anyone may traverse (pytest's tmp_path is private to its
    user), so the check fails on the folder itself; removed after the test."""
    base = Path(tempfile.mkdtemp(prefix="cascade-ro-"))
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir(mode=0o555)
    ro.chmod(0o555)
    ctx.request.addfinalizer(lambda: (ro.chmod(0o755), shutil.rmtree(base)))
    return ro


def refused_read_only(check: Callable[[Path], None], sub: str) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        folder = read_only_folder(ctx)
        target = folder / sub if sub else folder
        if os.geteuid() == 0:
            code, text = as_nobody(lambda: check(target))
            assert code == 0, text
            raise FileError(text)
        check(target)

    return run


def relabelled_checkpoint(ctx: Ctx) -> None:
    """A Stage C checkpoint whose float tensors' header dtype says I32 (same width as F32) for two tensors."""
    from safetensors.torch import save_file

    from cascade_rt.weights import load_stage

    model = build_model("stage_c_tiny", seed=0)
    path = ctx.files["tmp"] / "relabelled.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for key in ("clip_txt_mapper.weight", "clf.1.weight"):
        assert header[key]["dtype"] == "F32"
        header[key]["dtype"] = "I32"
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])
    load_stage("stage_c_tiny", path)


def nan_text_encoder(ctx: Ctx) -> None:
    class NaNText:
        def __init__(self, inner: Any) -> None:
            self.inner, self.preset = inner, inner.preset

        def encode(self, prompts: list[str]):
            text, pooled = self.inner.encode(prompts)
            return text * float("nan"), pooled

    p = ctx.pipe
    broken = StableCascadePipeline(
        text_encoder=NaNText(p.text_encoder), stage_c=Refuses(p.stage_c), stage_b=p.stage_b, stage_a=p.stage_a,
        effnet=p.effnet, previewer=p.previewer, image_encoder=p.image_encoder,
    )
    broken("a cat", height=256, width=256, steps_c=1, steps_b=1, seed=0)


def api(**kwargs: Any) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        ctx.guarded("a cat", **{"height": 256, "width": 256, **kwargs})

    return run


@pytest.fixture(scope="module")
def runtime_pipe():
    from cascade_rt import load_pipeline

    return load_pipeline(random_weights=True, preset="tiny", device="cpu", dtype=torch.float32)


def runtime_api(prompt: Any = "a cat", **kwargs: Any) -> Callable[[Ctx], None]:
    """`load_pipeline`'s pipeline (it bounds the batch by memory) with a text encoder that fails if called."""

    def run(ctx: Ctx) -> None:
        rp = ctx.request.getfixturevalue("runtime_pipe")
        ctx.monkeypatch.setattr(rp, "text_encoder", Refuses(rp.text_encoder))
        rp(prompt, **{"height": 256, "width": 256, **kwargs})

    return run


def api_reconstruct(**kwargs: Any) -> Callable[[Ctx], None]:
    return lambda ctx: ctx.guarded.reconstruct(torch.rand(1, 3, 256, 256), **kwargs)


def load(**kwargs: Any) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        from cascade_rt import load_pipeline

        ctx.monkeypatch.setattr("cascade_rt.runtime.api.build_random_pipeline", lambda *a, **k: 1 / 0)
        given = {k: fill([v], ctx.files)[0] if isinstance(v, str) else v for k, v in kwargs.items()}
        load_pipeline(**{"random_weights": True, "preset": "tiny", "dtype": torch.float32, **given})

    return run


def weights_dir(path_key: str, **kwargs: Any) -> Callable[[Ctx], None]:
    def run(ctx: Ctx) -> None:
        from cascade_rt.weights import load_pipeline_models

        load_pipeline_models(ctx.files[path_key], **kwargs)

    return run


def no_cuda(row: Any) -> Any:
    skip = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
    return pytest.param(*row, id=row[0], marks=skip)


# ------------------------------------------------------------------------------------------ the table
ROWS = [
    # 4: batch size bounded by memory
    ("batch-too-big", gen("--batch", "100000"), 2, r"--batch=100000: 100000 images of 256x256 need about .* GiB "
     r"\(estimate\) but the (available RAM|GPU's memory) .*is \d+\.\d GiB; lower --batch to at most \d+"),
    ("batch-zero", gen("--batch", "0"), 2, r"--batch=0: give an integer >= 1"),
    ("api-prompts-times-batch-too-big", runtime_api(["a cat"] * 1000, images_per_prompt=100), ConfigError,
     r"images_per_prompt=100: 100000 images .* give at most \d+ images at once \(1000 prompts x images_per_prompt"),
    ("api-batch-too-big", runtime_api(images_per_prompt=100000), ConfigError, r"images_per_prompt=100000: 100000 "
     r"images of 256x256 need about .* GiB \(estimate\).*lower images_per_prompt to at most \d+"),
    # 5: input files, before any model is loaded
    ("image-missing", gen("--image", "{tmp}/nope.png"), 2, r"--image \S+nope.png does not exist: give the path"),
    ("image-folder", gen("--image", "{tmp}"), 2, r"--image \S+ is a folder"),
    ("image-not-an-image", gen("--image", "{text}"), 2, r"notes.png is not an image PIL can read"),
    ("image-truncated", gen("--image", "{truncated}"), 2, r"truncated.png is truncated or corrupt"),
    ("image-bomb-warning", gen("--image", "{bomb_warning}"), 2, r"decompression-bomb limit.*2048 px"),
    ("image-bomb-error", gen("--image", "{bomb_error}"), 2, r"decompression-bomb limit"),
    ("image-symlink-loop", gen("--image", "{loop}"), 2, r"loop.png is a symlink loop"),
    ("clip-image-missing", gen("--clip-image", "{tmp}/nope.png"), 2, r"--clip-image \S+ does not exist"),
    ("clip-image-not-an-image", gen("--clip-image", "{text}"), 2, r"--clip-image \S+ is not an image"),
    ("reconstruct-missing", rec("{tmp}/nope.png"), 2, r"the input image \S+ does not exist"),
    ("reconstruct-folder", rec("{tmp}"), 2, r"is a folder"),
    ("reconstruct-not-an-image", rec("{text}"), 2, r"is not an image PIL can read"),
    ("reconstruct-truncated", rec("{truncated}"), 2, r"is truncated or corrupt"),
    ("reconstruct-size", rec("{odd_size}"), 2, r"is 300x200: reconstruction needs each side a multiple of 128"),
    # 5: output paths, before any model is loaded; a full disk at save time
    ("output-folder", ["generate", "x", *CPU, "-o", "{tmp}"], 2, r"-o \S+ is a folder: give a file name"),
    ("output-no-extension", ["generate", "x", *CPU, "-o", "{tmp}/out"], 2, r"has no extension.*use \.png"),
    ("output-unknown-extension", ["generate", "x", *CPU, "-o", "{tmp}/out.xyz"], 2, r"cannot write RGB .* \.xyz"),
    ("output-format-without-rgb", ["generate", "x", *CPU, "-o", "{tmp}/out.xbm"], 2, r"cannot write RGB .* \.xbm"),
    ("output-under-a-file", ["generate", "x", *CPU, "-o", "{a_file}/out.png"], 2, r"a_file.txt is a file, not a "),
    ("output-folder-symlink-loop", ["generate", "x", *CPU, "-o", "{loop_dir}/out.png"], 2, r"symlink loop"),
    ("reconstruct-output-folder", ["reconstruct", "{good}", *CPU, "-o", "{tmp}"], 2, r"-o \S+ is a folder"),
    ("output-read-only", refused_read_only(check_output_path, "out.png"), FileError, r"cannot be written"),
    ("output-disk-full", gen(*FAST, "-o", "{full_disk}"), 2, r"could not write -o \S+full.png: No space left on "
     r"device; free some disk space"),
    ("engine-dir-file", gen("--backend", "onnxruntime", "--engine-dir", "{a_file}"), 2, r"--engine-dir \S+ is a file"),
    ("api-engine-dir-file", load(backend="c=onnxruntime", engine_dir="{a_file}"), FileError,
     r"engine_dir \S+a_file.txt is a file, not a folder"),
    ("engines-clean-on-a-file", ["engines", "clean", "--engine-dir", "{a_file}"], 2, r"is a file, not an engine cache"),
    ("engines-verify-on-a-file", ["engines", "verify", "--engine-dir", "{a_file}"], 2, r"is a file, not an engine "),
    ("engine-dir-read-only", refused_read_only(check_engine_dir, ""), FileError, r"is not writable"),
    # 9: settings, validated before any work, naming the flag
    ("cfg-c-nan", gen("--cfg-c", "nan"), 2, r"--cfg-c=nan: the classifier-free guidance scale must be a finite"),
    ("cfg-b-inf", gen("--cfg-b", "inf"), 2, r"--cfg-b=inf"),
    ("shift-c-inf", gen("--shift-c", "inf"), 2, r"--shift-c=inf: the noise schedule shift must be a finite number > 0"),
    ("shift-c-zero", gen("--shift-c", "0"), 2, r"--shift-c=0.0"),
    ("seed-2**70", gen("--seed", str(2**70)), 2, r"--seed=1180591620717411303424: .*\[0, 2\*\*64 - 1\]"),
    ("seed-negative", gen("--seed", "-1"), 2, r"--seed=-1: a seed must be an integer in \[0, 2\*\*64 - 1\]"),
    ("device-foo", gen("--device", "foo"), 2, r"--device='foo' is not a device: use cpu, cuda or cuda:N"),
    ("device-mps", gen("--device", "meta"), 2, r"runs on cpu, cuda or cuda:N, not meta"),
    no_cuda(("device-cuda-without-gpu", gen("--device", "cuda"), 2, r"--device='cuda': torch sees no CUDA GPU")),
    ("steps-b-zero", gen("--steps-b", "0"), 2, r"--steps-b=0: the number of sampling steps must be an integer >= 1"),
    ("steps-c-zero", gen("--steps-c", "0"), 2, r"--steps-c=0"),
    ("strength-zero", gen("--image", "{good}", "--strength", "0"), 2, r"--strength=0.0: the strength must be in"),
    ("strength-times-steps", gen("--image", "{good}", "--strength", "0.1", "--steps-c", "5"), 2,
     r"--steps-c \* --strength = 5 \* 0.1 gives no Stage C step"),
    ("reconstruct-steps-b-zero", rec("{good}", "--steps-b", "0"), 2, r"--steps-b=0"),
    ("reconstruct-cfg-b-nan", rec("{good}", "--cfg-b", "nan"), 2, r"--cfg-b=nan"),
    ("api-steps-b-zero", api(steps_b=0), ConfigError, r"steps_b=0: the number of sampling steps"),
    ("api-steps-c-float", api(steps_c=2.5), ConfigError, r"steps_c=2.5"),
    ("api-cfg-c-nan", api(cfg_c=float("nan")), ConfigError, r"cfg_c=nan"),
    ("api-shift-c-inf", api(shift_c=float("inf")), ConfigError, r"shift_c=inf"),
    ("api-seed-2**70", api(seed=2**70), ConfigError, r"seed=1180591620717411303424: .*2\*\*64 - 1"),
    ("api-strength", api(image=torch.rand(1, 3, 256, 256), strength=1.5), ConfigError, r"strength=1.5"),
    ("api-image-0-255", api(image=torch.full((1, 3, 256, 256), 200.0)), ConfigError,
     r"image tensor values must be in \[0, 1\], got \[200, 200\]; divide 0-255 pixels by 255"),
    ("api-image-nan", api(image=torch.full((1, 3, 256, 256), float("nan"))), ConfigError, r"must be in \[0, 1\]"),
    ("api-image-shape", api(image=torch.rand(1, 4, 256, 256)), ConfigError, r"must be \(B, 3, H, W\)"),
    ("api-image-missing-path", api(image="/nonexistent/in.png"), FileError, r"image /nonexistent/in.png does not "),
    ("api-image-wrong-type", api(image=[1, 2]), ConfigError, r"an image must be a PIL image"),
    ("api-reconstruct-steps-b-zero", api_reconstruct(steps_b=0), ConfigError, r"steps_b=0"),
    ("api-reconstruct-seed", api_reconstruct(seed=-5), ConfigError, r"seed=-5"),
    ("api-device-foo", load(device="foo"), ConfigError, r"device='foo' is not a device: use cpu, cuda or cuda:N"),
    ("checkpoint-floats-relabelled-int", relabelled_checkpoint, WeightsError,
     r"2 tensors that are floating point .* stored with an integer dtype: clf.1.weight \(torch.int32\), "
     r"clip_txt_mapper.weight \(torch.int32\)"),
    ("text-encoder-nan", nan_text_encoder, NumericsError, r"^the text encoder produced NaN/Inf"),
    # 12: options that were ignored silently, messages that misled
    ("weights-and-random-weights", ["generate", "x", "--weights", "{tmp}", "--random-weights"], 2,
     r"--weights and --random-weights both given: choose one"),
    ("text-encoder-with-random-weights", gen("--text-encoder", "{tmp}"), 2, r"--text-encoder applies only to "),
    ("height-names-the-flag", gen("--height", "250"), 2, r"--height=250 is not supported: each side must be a "),
    ("strength-without-image", gen("--strength", "0.5"), 2, r"--strength applies only to image-to-image: add --image"),
    ("preset-with-weights", ["generate", "x", "--weights", "{tmp}", "--preset", "lite"], 2,
     r"--preset lite applies only to --random-weights: with --weights, pass --lite"),
    ("lite-with-random-weights", gen("--lite"), 2, r"--lite applies only to --weights.*--preset lite"),
    ("weights-is-a-file", ["generate", "x", "--weights", "{a_file}"], 2,
     r"--weights \S+a_file.txt is a file: --weights takes the folder"),
    ("weights-missing", ["generate", "x", "--weights", "{tmp}/nope"], 2, r"--weights \S+nope does not exist"),
    ("weights-symlink-loop", ["generate", "x", "--weights", "{loop_dir}"], 2, r"is a symlink loop"),
    ("api-weights-is-a-file", weights_dir("a_file"), WeightsError, r"is a file: give the folder"),
    ("api-weights-symlink-loop", weights_dir("loop_dir"), WeightsError, r"is a symlink loop"),
    ("checkpoint-symlink-loop", weights_dir("looped_file"), WeightsError,
     r"Stage C big: \S+stage_c_bf16.safetensors is a symlink loop.*Point the link at the checkpoint file"),
    ("lite-hint-cli-and-python", ["generate", "x", "--weights", "{lite_only}", "--device", "cpu"], 2,
     r"Found the lite variant at \S+: pass --lite on the command line \(lite=True in Python"),
    ("api-lite-hint", weights_dir("lite_only"), WeightsError, r"pass --lite on the command line \(lite=True in Python"),
]
LOADS_MODELS = {"output-disk-full"}


PARAMS = [row if hasattr(row, "marks") else pytest.param(*row, id=row[0]) for row in ROWS]


@pytest.mark.parametrize("row_id, run, expected, phrase", PARAMS)
def test_bad_input(row_id, run, expected, phrase, files, pipe, guarded, monkeypatch, capsys, request):
    if row_id not in LOADS_MODELS and isinstance(run, list):
        request.getfixturevalue("no_models")
    if isinstance(run, list):
        argv = fill(run, files)
        code = main(argv)
        err = capsys.readouterr().err
        assert code == expected, err
        assert "Traceback" not in err
        assert err.startswith("cascade-rt: error: ") or "RANDOM WEIGHTS" in err, err
        assert re.search(phrase, err), f"{phrase!r} not in {err!r}"
    else:
        with pytest.raises(expected) as info:
            run(Ctx(files, pipe, guarded, monkeypatch, request))
        assert re.search(phrase, str(info.value)), f"{phrase!r} not in {str(info.value)!r}"


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """A write that fails midway removes what it wrote (here: an OSError after the first bytes)."""
    from cascade_rt.images import save_image

    def failing_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    out = tmp_path / "out.png"
    with pytest.raises(FileError, match="No space left on device; free some disk space"):
        save_image(Image.new("RGB", (4, 4)), out)
    assert not out.exists()


def test_good_inputs_still_pass(files, tmp_path, capsys):
    """The checks refuse only what is wrong: a writable -o in a new folder, an image input, a batch that fits."""
    out = tmp_path / "new" / "img.png"
    argv = ["generate", "a cat", *CPU, *FAST, "-o", str(out), "--image", str(files["good"]), "--strength", "1.0",
            "--batch", "2", "--seed", str(2**64 - 1)]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.parent.iterdir()) == ["img_0.png", "img_1.png"]


def test_cli_stderr_is_one_line(files, capsys, no_models):
    """A user error is one line on stderr: no traceback, no log noise."""
    assert main(fill(gen("--cfg-c", "nan"), files)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cascade-rt: error: --cfg-c=nan")
