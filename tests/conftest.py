"""Shared test fixtures: small and generic (CPU only; no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator seeded with 0, for inputs that must not depend on test order."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def save_official() -> Callable[..., Path]:
    """save_official(model_or_state_dict, path, dtype=None) -> path: an official-layout safetensors file.

    With `dtype`, floating-point tensors are cast (integer buffers such as num_batches_tracked are kept).
    """
    from safetensors.torch import save_file

    def save(obj: nn.Module | dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> Path:
        state = obj.state_dict() if isinstance(obj, nn.Module) else obj
        cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
        save_file({k: cast(v).contiguous() for k, v in state.items()}, str(path))
        return Path(path)

    return save
