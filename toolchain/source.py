"""What every checkpoint reader (Meta, Hugging Face, GGUF) hands to the compiler.

A reader resolves the model's hyper-parameters and tokenizer up front, then yields tensors one
layer at a time, under Meta's names and in Meta's layout (interleaved RoPE for wq/wk), at full
(unsharded) shape. Streaming per layer keeps host memory near one layer, not the whole model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import ModelArgs
from runtime.errors import file_error


@dataclass(frozen=True)
class TokenizerSource:
    kind: str  # "sentencepiece" (bytes of a tokenizer.model) or "hf" (bytes of a tokenizer.json)
    data: bytes
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # the tokenizer's own convention for prepending BOS
    vocab_size: int


class ModelSource(ABC):
    """A checkpoint opened for reading. Use as a context manager."""

    path: Path
    source_format: str  # "meta", "hf" or "gguf"
    model_name: str
    args: ModelArgs  # vocab_size resolved (> 0)
    tokenizer: TokenizerSource
    source_digests: dict[str, str]  # file name -> sha256, for provenance

    @abstractmethod
    def global_tensors(self) -> dict[str, torch.Tensor]:
        """tok_embeddings.weight [vocab, dim], norm.weight [dim], output.weight [vocab, dim]
        (a copy of the embeddings when the checkpoint ties them)."""

    @abstractmethod
    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors named as in runtime.config.LAYER_TENSORS, full shapes, nn.Linear [out, in]."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_shape(src: ModelSource, name: str, tensor: torch.Tensor, want: tuple[int, ...]) -> None:
    """Strict ingest: every tensor a reader hands over must have the shape params say it has."""
    if tuple(tensor.shape) != want:
        raise file_error(src.path, f"tensor {name} has shape {tuple(tensor.shape)}, expected {want}")


def check_finite(path: Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor holding NaN or inf, as it is read. One float32 sum is the cheap test (a NaN or an inf
    makes it non-finite); only when it is not finite is every element looked at, since finite values
    near the bfloat16 maximum could overflow the sum."""
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return
    bad = ~torch.isfinite(tensor)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise file_error(path, f"tensor {name} holds {int(bad.sum())} non-finite value(s) (NaN or inf), "
                               f"the first at {list(first)}; the checkpoint is damaged")
