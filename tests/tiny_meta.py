"""Write tiny checkpoints in Meta's exact on-disk layout, for tests.

The shards are split the way Meta's model-parallel (fairscale) layers hold them, so a reader that
merges them back must reproduce the returned ground truth bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from runtime.config import ModelArgs, global_shapes, layer_shapes, weight_names
from runtime.hellaswag import find_shared_file

# The real LLaMA tokenizer beside the HellaSwag file: ../shared/data here and in CI,
# ./shared/data on the device machine.
_HELLASWAG = find_shared_file(Path(__file__).resolve().parents[1])
TOKENIZER = (_HELLASWAG.parent if _HELLASWAG else Path("shared/data")) / "llama-tokenizer.model"
TOKENIZER_VOCAB = 32000

# Column-parallel layers hold output rows (dim 0), row-parallel ones input columns (dim 1),
# norms are replicated (None). tok_embeddings is the caller's choice (LLaMA-1/2: 1, LLaMA-3: 0).
# Kept apart from toolchain/meta_source.py on purpose: the reader is tested against this writer.
_SPLIT = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w2.weight": 1,
}


def write_tiny_meta_checkpoint(
    dirpath,
    args: ModelArgs,
    n_shards: int,
    seed: int,
    embed_split_dim: int = 1,
    dtype=torch.float32,
    with_checklist=True,
) -> dict[str, torch.Tensor]:
    """Write params.json, consolidated.NN.pth, tokenizer.model and checklist.chk into `dirpath`;
    return the full (unsharded) weights under Meta's names."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    vocab = args.vocab_size if args.vocab_size > 0 else TOKENIZER_VOCAB
    full_args = ModelArgs(**{**args.params_json(), "vocab_size": vocab})

    shapes = {"tok_embeddings.weight": global_shapes(full_args)["tok_embeddings.weight"]}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{n}": s for n, s in layer_shapes(full_args).items()})
    shapes.update({n: s for n, s in global_shapes(full_args).items() if n != "tok_embeddings.weight"})
    assert list(shapes) == weight_names(full_args)

    gen = torch.Generator().manual_seed(seed)
    truth = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        # Norm gains near 1 and small matrices keep a forward pass in a sane numeric range.
        x = 1.0 + 0.1 * x if len(shape) == 1 else x * (1.0 / math.sqrt(shape[-1]))
        truth[name] = x.to(dtype)

    shards = [{} for _ in range(n_shards)]
    for name, tensor in truth.items():
        base = name.split(".", 2)[2] if name.startswith("layers.") else name
        axis = embed_split_dim if base == "tok_embeddings.weight" else _SPLIT.get(base)
        if axis is None:
            pieces = [tensor] * n_shards
        else:
            assert tensor.shape[axis] % n_shards == 0, f"{name} {tuple(tensor.shape)} not divisible by {n_shards}"
            pieces = tensor.chunk(n_shards, dim=axis)
        for shard, piece in zip(shards, pieces):
            # clone: torch.save of a view would write the whole underlying storage.
            shard[name] = piece.clone()
    # LLaMA-1 shards carry the RoPE frequency table (not a weight).
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for shard in shards:
        shard["rope.freqs"] = freqs.to(dtype)

    (dirpath / "params.json").write_text(json.dumps(args.params_json()))
    files = ["params.json"]
    for k, shard in enumerate(shards):
        torch.save(shard, dirpath / f"consolidated.{k:02d}.pth")
        files.append(f"consolidated.{k:02d}.pth")
    shutil.copyfile(TOKENIZER, dirpath / "tokenizer.model")
    if with_checklist:
        write_checklist(dirpath, sorted(files))
    return truth


def write_checklist(dirpath, names) -> None:
    dirpath = Path(dirpath)
    lines = [f"{hashlib.md5((dirpath / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    (dirpath / "checklist.chk").write_text("".join(lines))
