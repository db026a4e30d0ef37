"""Checks of user settings and paths that run before any model is built, loaded or run (docs/reliability.md).

One function per kind of input, each raising a `cascade_rt.errors` type whose message names the setting, what is
wrong and the fix. The settings are named as the caller knows them: `names` maps a parameter to what the user
typed (`CLI_FLAGS` for the command line, e.g. images_per_prompt -> --batch); without it the Python parameter
name is used. The pipeline (`__call__`, `reconstruct`), the CLI commands and the server all call these.

* `check_generation(...)`, `check_reconstruction(...)`: steps, CFG, shift, seed, strength, batch size.
* `check_seed(seed)`: an integer in [0, 2**64 - 1] (what a torch generator accepts).
* `resolve_device(spec)`: 'cpu', 'cuda' or 'cuda:N' (None: cuda when available), checked against this machine.
* `check_output_path(path)`, `check_engine_dir(path)`: writable places, checked before the work.

The batch size is bounded by memory one floor up, where the memory estimate lives (`cascade_rt.runtime.budget`).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade_rt.errors import ConfigError, FileError
from cascade_rt.images import output_format, path_problem
from cascade_rt.stages import check_resolution

CLI_FLAGS = {
    "images_per_prompt": "--batch", "steps_c": "--steps-c", "steps_b": "--steps-b", "cfg_c": "--cfg-c",
    "cfg_b": "--cfg-b", "shift_c": "--shift-c", "shift_b": "--shift-b", "seed": "--seed", "strength": "--strength",
    "device": "--device", "height": "--height", "width": "--width", "image": "--image",
}
SEED_MIN, SEED_MAX = 0, 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit value


def _name(param: str, names: Mapping[str, str] | None) -> str:
    return (names or {}).get(param, param)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_steps(value: Any, param: str, names: Mapping[str, str] | None = None) -> None:
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{_name(param, names)}={value!r}: the number of sampling steps must be an integer >= 1")


def check_number(
    value: Any, param: str, names: Mapping[str, str] | None = None, *, optional: bool = False,
    positive: bool = False, what: str = "",
) -> None:
    """A finite real number (None allowed when `optional`; > 0 when `positive`)."""
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ConfigError(f"{_name(param, names)}={value!r}: {what or 'the value'} must be {need}")


def check_seed(seed: Any, names: Mapping[str, str] | None = None) -> None:
    if seed is None:
        return
    if not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX:
        raise ConfigError(
            f"{_name('seed', names)}={seed!r}: a seed must be an integer in [0, 2**64 - 1] "
            f"(0 to {SEED_MAX}), the range of a 64-bit torch generator"
        )


def check_size(height: Any, width: Any, names: Mapping[str, str] | None = None) -> None:
    """`stages.check_resolution`, its message naming the options as the caller knows them."""
    try:
        check_resolution(height, width)
    except ConfigError as exc:
        message = str(exc)
        for param in ("height", "width"):
            if message.startswith(f"{param}="):
                message = _name(param, names) + message[len(param) :]
        raise ConfigError(message) from None


def check_generation(
    *, height: Any = 1024, width: Any = 1024, images_per_prompt: Any = 1, steps_c: Any = 20, steps_b: Any = 10,
    cfg_c: Any = None, cfg_b: Any = None, shift_c: Any = 1.0, shift_b: Any = 1.0, seed: Any = None,
    strength: Any = None, image_given: bool = False, names: Mapping[str, str] | None = None,
) -> None:
    """Every text-to-image / image-to-image setting, before any work (nothing here builds or runs a model)."""
    check_size(height, width, names)
    if not _is_int(images_per_prompt) or images_per_prompt < 1:
        raise ConfigError(f"{_name('images_per_prompt', names)}={images_per_prompt!r}: give an integer >= 1")
    check_steps(steps_c, "steps_c", names)
    check_steps(steps_b, "steps_b", names)
    check_number(cfg_c, "cfg_c", names, optional=True, what="the classifier-free guidance scale")
    check_number(cfg_b, "cfg_b", names, optional=True, what="the classifier-free guidance scale")
    check_number(shift_c, "shift_c", names, positive=True, what="the noise schedule shift")
    check_number(shift_b, "shift_b", names, positive=True, what="the noise schedule shift")
    check_seed(seed, names)
    if strength is not None and image_given:
        check_number(strength, "strength", names, what="the image-to-image strength")
        if not 0.0 < strength <= 1.0:
            raise ConfigError(f"{_name('strength', names)}={strength}: the strength must be in (0, 1]")
        if int(steps_c * strength) < 1:
            raise ConfigError(
                f"{_name('steps_c', names)} * {_name('strength', names)} = {steps_c} * {strength} gives no Stage C "
                f"step (image-to-image runs int(steps * strength) steps); raise either"
            )


def check_reconstruction(
    *, steps_b: Any = 10, cfg_b: Any = None, shift_b: Any = 1.0, seed: Any = None,
    names: Mapping[str, str] | None = None,
) -> None:
    check_steps(steps_b, "steps_b", names)
    check_number(cfg_b, "cfg_b", names, optional=True, what="the classifier-free guidance scale")
    check_number(shift_b, "shift_b", names, positive=True, what="the noise schedule shift")
    check_seed(seed, names)


def resolve_device(device: Any = None, names: Mapping[str, str] | None = None) -> Any:
    """A torch.device from 'cpu', 'cuda', 'cuda:N' or a torch.device (None: cuda when available, else cpu)."""
    import torch  # here, not at the top: the CLI's parser (`cascade-rt --help`) imports this module without torch

    flag = _name("device", names)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choices = "cpu, cuda or cuda:N"
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag}={device!r} is not a device: use {choices}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"{flag}={device!r}: cascade-rt runs on {choices}, not {dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag}={device!r}: torch sees no CUDA GPU on this machine; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{flag}={device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


# ------------------------------------------------------------------------------------------ paths
def _writable_folder(folder: Path) -> Path | None:
    """The first existing ancestor of `folder` (itself included) if it is a writable folder, else None."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: creating the folder would fail
            return None
        probe = probe.parent
    effective = os.access in os.supports_effective_ids  # the user the process runs as
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK, effective_ids=effective):
        return None
    return probe


def check_output_path(path: str | Path, flag: str = "-o") -> str:
    """An image path that can be written: not a folder, an extension PIL writes, a writable (or creatable)
    folder. Returns the PIL format."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"{flag} {path} is a folder: give a file name inside it, e.g. {path / 'out.png'}")
    fmt = output_format(path, flag)
    folder = path.parent if str(path.parent) else Path(".")
    problem = path_problem(folder) if folder.is_symlink() else None
    if problem:
        raise FileError(f"{flag} {path}: its folder {folder} {problem}; choose another {flag}")
    if folder.exists() and not folder.is_dir():
        raise FileError(f"{flag} {path}: {folder} is a file, not a folder; choose another {flag}")
    base = _writable_folder(folder)
    if base is None:
        raise FileError(
            f"{flag} {path}: the folder {folder} cannot be written (read-only, or a part of the path is a file); "
            f"choose a writable folder for {flag}"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise FileError(f"{flag} {path} exists and is read-only: remove it or choose another {flag}")
    return fmt


def check_engine_dir(path: str | Path, flag: str = "--engine-dir") -> None:
    """An engine cache folder the runtime can write engines (and lock files) into, or create."""
    path = Path(path)
    problem = path_problem(path) if os.path.islink(path) else None
    if problem:
        raise FileError(f"{flag} {path} {problem}: give a folder for the engine cache")
    if path.exists() and not path.is_dir():
        raise FileError(f"{flag} {path} is a file, not a folder: give a folder for the engine cache (default engines/)")
    if _writable_folder(path) is None:
        raise FileError(
            f"{flag} {path} is not writable: the runtime writes engines and lock files there; make it writable "
            f"or choose another {flag}"
        )
