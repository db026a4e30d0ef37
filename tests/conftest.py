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


@pytest.fixture(scope="session")
def hf_clip_tokenizer(tmp_path_factory):
    """A transformers CLIPTokenizer with the released CLIP vocabulary, built from open_clip's own BPE file (no
    download): the reference our tokenizer is checked against. A factory: each call gives a fresh tokenizer."""
    import gzip
    import json

    transformers = pytest.importorskip("transformers")
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    root = tmp_path_factory.mktemp("clip_bpe")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (root / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return lambda: transformers.CLIPTokenizer(
        vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"), pad_token="<|endoftext|>"
    )
