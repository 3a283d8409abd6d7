"""Offline tensor-parallel sharding, Megatron style (the vocabulary of gpt-fast's tp.py).

Column-parallel layers (wq, wk, wv, w1, w3) are split along their output rows: rows are laid
out head by head, so an even split hands each rank whole heads and whole kv heads.
Row-parallel layers (wo, w2) are split along their input columns; their partial outputs are
summed by an all-reduce at run time. Everything else (norms, embeddings, the LM head) is
replicated: the embedding is a lookup and the LM head runs only where a log-prob is needed,
so splitting them would add a collective per step to save a few hundred MB per GPU.
"""

from __future__ import annotations

import torch

COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


# Tensors of a quantized linear (runtime/quant.py: QuantLinear) besides `.weight`.
_LINEAR_SUFFIXES = (".weight", ".qdata", ".scale")


def split_dim(name: str) -> int | None:
    """0 for column-parallel weights, 1 for row-parallel ones, None for replicated tensors.

    Quantized linears: `.qdata` [out, in] splits as the weight; `.scale` [out] (one per output row)
    splits with the rows of a column-parallel layer and is replicated for a row-parallel one."""
    if not name.startswith("layers."):
        return None
    suffix = next((x for x in _LINEAR_SUFFIXES if name.endswith(x)), None)
    if suffix is None:
        return None
    stem = name.removesuffix(suffix).split(".", 2)[-1]
    column, row = stem in COLUMN_PARALLEL, stem in ROW_PARALLEL
    if not (column or row):
        return None
    if suffix in (".weight", ".qdata"):
        return 0 if column else 1
    return 0 if column else None  # .scale


def shard_shape(name: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = split_dim(name)
    if dim is None or tp == 1:
        return tuple(shape)
    assert shape[dim] % tp == 0, f"{name}: {shape[dim]} does not split {tp} ways"
    return tuple(s // tp if i == dim else s for i, s in enumerate(shape))


def shard_tensor(name: str, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    dim = split_dim(name)
    if dim is None or tp == 1:
        return tensor
    return tensor.chunk(tp, dim=dim)[rank]
