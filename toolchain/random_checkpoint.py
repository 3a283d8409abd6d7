"""`hsc random-checkpoint`: a checkpoint of random weights in Meta's own layout, at a real model's shape.

What a LLaMA download holds: params.json, one consolidated.NN.pth per model-parallel rank (torch.save
of a dict, zip format, fp16), tokenizer.model and checklist.chk (MD5s). Every rank's file holds its
slice of every split tensor, split on the axes fairscale's layers split them (toolchain/meta_source.py:
SPLIT_AXIS; LLaMA-1/2's ParallelEmbedding splits tok_embeddings on the embedding dim, 1), norms on
every rank, and LLaMA-1's rope.freqs table. It exists so that the compiler's time and host memory can be
measured at 30B (65 GB) without Meta's weights.

Weights are N(0, 1/fan_in) (fan_in of the whole tensor, not of the slice) and norms 1, as
runtime/bench.py: random_model, so activations stay O(1) through any depth. Each rank's slice of each
tensor is drawn directly from its own seed (a hash of --seed, the name and the rank): the full tensor
is never built, and the files do not depend on the order they are written in.

Memory: a few tensors at a time. torch's own zip writer (the one torch.save uses) is handed a dict of
placeholder tensors, whose metadata is all the pickle needs; each tensor's bytes are drawn shortly
before the writer reaches its record (the next DRAW_AHEAD of them in threads, so that drawing overlaps
writing) and freed right after. The placeholders are slices of one allocation that is never written,
so they cost address space, not resident memory. (Measured at the 30B width, 4 shards, 2 layers, on the
2-core machine, drawing one ahead: peak RSS 0.82-0.88 GB, most of it torch and the C allocator's free
lists; docs/benchmarks.md, fourth session.)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import pickle
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from runtime.bench import SHAPES
from runtime.config import LAYER_TENSORS, ModelArgs, global_shapes, layer_shapes
from runtime.errors import HscError, file_error
from toolchain.hashing import file_digests
from toolchain.outdir import clear_leftovers, commit, make_temp, output_lock, write_error
from toolchain.meta_source import CHECKLIST, SPLIT_AXIS, _read_sentencepiece

# The axis each tensor is split on across model-parallel ranks (None: on every rank), LLaMA-1/2 style.
SHARD_AXIS = {**SPLIT_AXIS, "tok_embeddings.weight": 1}
# Meta's model-parallel degree for the shapes it published (LLaMA-1: 7B 1, 13B 2, 30B 4, 65B 8).
META_SHARDS = {"llama-7b": 1, "llama-30b": 4}
# Within a layer, the order Meta's state dicts list the tensors (module registration order).
_META_LAYER_ORDER = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                     "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                     "attention_norm.weight", "ffn_norm.weight")
assert sorted(_META_LAYER_ORDER) == sorted(LAYER_TENSORS)


# Tensors drawn in threads while the writer writes another (save_streaming): up to 4, leaving a core for
# the writer. Each holds up to 0.21 GB at 30B while drawn in fp32, half that once rounded, until written.
DRAW_AHEAD = max(1, min(4, (os.cpu_count() or 2) - 1))


def resolve_shape(shape: str) -> ModelArgs:
    """A shape of runtime/bench.py (llama-30b, llama-7b) or the path of a Meta params.json."""
    if shape in SHAPES:
        if shape not in META_SHARDS:
            raise HscError(f"--shape {shape}: not a LLaMA shape with Meta's sentencepiece vocabulary; "
                           f"use {' or '.join(META_SHARDS)} or a params.json")
        return SHAPES[shape]
    path = Path(shape)
    if not path.is_file():
        raise HscError(f"--shape {shape}: neither {' nor '.join(META_SHARDS)} nor a params.json file")
    return ModelArgs.from_params_json(path)


def rank_shapes(args: ModelArgs, n_shards: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of one rank's consolidated.NN.pth (all ranks hold the same shapes), in Meta's order:
    embeddings, final norm, LM head, then each layer."""
    full = dict(global_shapes(args))
    per_layer = layer_shapes(args)
    for i in range(args.n_layers):
        full.update({f"layers.{i}.{n}": per_layer[n] for n in _META_LAYER_ORDER})
    return {name: _slice_shape(name, shape, n_shards) for name, shape in full.items()}


def _base(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def _slice_shape(name: str, shape: tuple[int, ...], n_shards: int) -> tuple[int, ...]:
    axis = SHARD_AXIS[_base(name)]
    if axis is None:
        return shape
    if shape[axis] % n_shards:
        raise HscError(f"--shards {n_shards}: {name} {shape} does not split evenly on axis {axis}")
    return tuple(s // n_shards if k == axis else s for k, s in enumerate(shape))


def tensor_seed(seed: int, name: str, rank: int) -> int:
    """The generator seed of one rank's slice of one tensor."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}/{rank}".encode()).digest()[:8], "little")


def random_slice(name: str, fan_in: int, shape: tuple[int, ...], seed: int, rank: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """One rank's slice: norms 1, everything else N(0, 1/fan_in)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(tensor_seed(seed, name, rank))
    # Drawn in fp32, then rounded: on torch 2.13 the same values as an fp16 draw (every record of a
    # 2-layer 30B checkpoint compared), and never on CPU normal_'s half-precision path. Before the fix of
    # pytorch/pytorch#173173 that path was not vectorised (3-5x slower than fp32 there), which matches the
    # device's torch 2.11 writing 4.5x slower than torch 2.13 here; #166853 reports it also ran the
    # transform in the output dtype, clipping the tails.
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen).to(dtype)


def _private_writer_available() -> bool:
    """torch.save's two private halves, with the signature this module was written against (torch 2.x)."""
    try:
        params = list(inspect.signature(torch.serialization._save).parameters)
        return callable(torch.serialization._open_zipfile_writer) and params[:2] == ["obj", "zip_file"] \
            and len(params) == 5
    except (AttributeError, TypeError, ValueError):
        return False


class _MadeAhead:
    """make(name) for the names of `order`, each drawn in a worker thread a few names before the writer
    asks for it, so that drawing overlaps writing (torch's normal_ and its zip writer both release the
    GIL). At most `ahead` + 1 tensors are in memory. A name asked for out of order is made on the spot."""

    def __init__(self, make: Callable[[str], torch.Tensor], order: list[str], ahead: int):
        self._make, self._order, self._ahead = make, order, ahead
        self._pool = ThreadPoolExecutor(ahead, thread_name_prefix="draw") if ahead > 0 else None
        self._pending: dict[str, Future] = {}
        self._made_on_the_spot: set[str] = set()  # never drawn again when `order` reaches them
        self._next = 0  # the first name of `order` not submitted yet
        self.waited_s = 0.0  # the writer's time spent waiting for tensors (drawing, if it is the slower)
        self._top_up()

    def _top_up(self) -> None:
        while self._pool is not None and len(self._pending) < self._ahead and self._next < len(self._order):
            name = self._order[self._next]
            if name not in self._made_on_the_spot:
                self._pending[name] = self._pool.submit(self._make, name)
            self._next += 1

    def __call__(self, name: str) -> torch.Tensor:
        t0 = time.perf_counter()
        future = self._pending.pop(name, None)
        if future is None:
            self._made_on_the_spot.add(name)
        t = future.result() if future is not None else self._make(name)
        self.waited_s += time.perf_counter() - t0
        self._top_up()
        return t

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def save_streaming(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                   make: Callable[[str], torch.Tensor], ahead: int = 0) -> float | None:
    """torch.save({name: make(name)}, path), one tensor in memory at a time (see the module docstring);
    with `ahead` > 0, that many more are being made in threads while one is written (_MadeAhead).
    Returns the seconds the writer waited for make (None on the fallback path).

    torch.save pickles the dict first (metadata only: dtype, shape, stride, a key per storage), then
    writes each storage's bytes as a zip record; the writer below substitutes make(name)'s bytes for
    the placeholder's when that record is written. The records are those torch.save writes for the
    made tensors, byte for byte (a test checks it)."""
    if not _private_writer_available():  # another torch: one shard in memory (16 GB at 30B) instead
        torch.save({name: make(name) for name in shapes}, str(path))
        return None
    made = _MadeAhead(make, list(shapes), ahead)  # the writer reaches the records in the dict's order
    try:
        _save_filling(path, shapes, dtype, made)
    finally:
        made.close()
    return made.waited_s


def _save_filling(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                  make: Callable[[str], torch.Tensor]) -> None:
    """save_streaming's torch 2.x path: torch's own writer, handed placeholders filled by make(name)."""
    # Slices of one never-written allocation: a fresh mapping, so none of it is resident.
    sizes = {name: math.prod(shape) * dtype.itemsize for name, shape in shapes.items()}
    arena = torch.empty(sum(sizes.values()), dtype=torch.uint8).untyped_storage()
    placeholders, offset = {}, 0
    for name, shape in shapes.items():
        storage = arena[offset:offset + sizes[name]]
        placeholders[name] = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        offset += sizes[name]
    owner = {t.untyped_storage().data_ptr(): name for name, t in placeholders.items()}

    class FillingWriter:
        def __init__(self, inner):
            self._inner = inner

        def write_record(self, record, data, nbytes):
            if isinstance(data, torch.UntypedStorage) and data.data_ptr() in owner:
                name = owner.pop(data.data_ptr())
                t = make(name).contiguous()
                if (tuple(t.shape), t.dtype) != (tuple(placeholders[name].shape), dtype) or t.storage_offset():
                    raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, expected {shapes[name]} {dtype}")
                data = t.untyped_storage()
            self._inner.write_record(record, data, nbytes)

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    # torch.save(obj, path) is exactly these two calls; they are private, so a test compares the result
    # with torch.save's.
    with torch.serialization._open_zipfile_writer(str(path)) as zf:
        torch.serialization._save(placeholders, FillingWriter(zf), pickle, torch.serialization.DEFAULT_PROTOCOL,
                                  False)
    if owner:
        raise RuntimeError(f"{path}: torch's writer skipped {len(owner)} tensors (e.g. {next(iter(owner.values()))})")


def write_random_checkpoint(out_dir: Path, args: ModelArgs, n_shards: int, tokenizer: Path, seed: int = 0,
                            checklist: bool = True, dtype: torch.dtype = torch.float16, force: bool = False,
                            log=print) -> Path:
    """Write params.json, consolidated.00..NN.pth, tokenizer.model (a copy of `tokenizer`) and, with
    `checklist`, checklist.chk into out_dir: through a temporary sibling renamed when complete."""
    out_dir = Path(out_dir)
    if n_shards < 1:
        raise HscError(f"--shards {n_shards}: must be at least 1")
    if args.n_heads % n_shards or args.kv_heads % n_shards:
        raise HscError(f"--shards {n_shards}: Meta's ranks hold whole heads; {args.n_heads} heads "
                       f"({args.kv_heads} kv) do not split {n_shards} ways")
    vocab = _read_sentencepiece(Path(tokenizer)).vocab_size
    if args.vocab_size > 0 and args.vocab_size != vocab:
        raise file_error(tokenizer, f"has {vocab} pieces; the shape's vocab_size is {args.vocab_size}")
    args = ModelArgs(**{**vars(args), "vocab_size": vocab})
    shapes = rank_shapes(args, n_shards)
    fan_in = {name: shape[-1] for name, shape in {**global_shapes(args), **layer_shapes(args)}.items()}
    if out_dir.exists() and not (force and out_dir.is_dir()):
        raise file_error(out_dir, "already exists (use --force to replace a directory)")
    per_rank = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out_dir.parent).free
        if free < n_shards * per_rank:  # found out before writing, not 60 GB in
            raise file_error(out_dir.parent, f"{free / 1e9:.1f} GB free, the checkpoint needs "
                                             f"{n_shards * per_rank / 1e9:.1f} GB")
    except OSError as e:
        raise file_error(out_dir.parent, f"cannot create the checkpoint directory here ({e.strerror or e})") from None
    with output_lock(out_dir, "checkpoint"):
        clear_leftovers(out_dir, log)
        if out_dir.exists() and not (force and out_dir.is_dir()):
            raise file_error(out_dir, "already exists (use --force to replace a directory)")
        return _write(out_dir, args, n_shards, tokenizer, seed, dtype, checklist, shapes, fan_in, per_rank, log)


def _write(out_dir: Path, args: ModelArgs, n_shards: int, tokenizer: Path, seed: int, dtype, checklist: bool,
           shapes: dict, fan_in: dict, per_rank: int, log) -> Path:
    tmp = make_temp(out_dir, "checkpoint")
    try:
        # Meta's LLaMA-1/2 params.json says vocab_size -1: the tokenizer decides.
        (tmp / "params.json").write_text(json.dumps({**args.params_json(), "vocab_size": -1}))
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        head_dim = args.head_dim
        freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        log(f"{n_shards} shard(s) of {per_rank / 1e9:.2f} GB: {args.n_layers} layers, dim {args.dim}, "
            f"{args.n_heads} heads ({args.kv_heads} kv), ffn {args.ffn_dim}, vocab {args.vocab_size}, "
            f"{str(dtype).removeprefix('torch.')}, seed {seed}")
        for rank in range(n_shards):
            name = f"consolidated.{rank:02d}.pth"
            t0 = time.perf_counter()

            def make(tensor: str, rank=rank) -> torch.Tensor:
                if tensor == "rope.freqs":  # LLaMA-1 keeps its RoPE table in every shard; readers ignore it
                    return freqs.to(dtype)
                return random_slice(tensor, fan_in[_base(tensor)], shapes[tensor], seed, rank, dtype)

            waited = save_streaming(tmp / name, {**shapes, "rope.freqs": tuple(freqs.shape)}, dtype, make,
                                    ahead=DRAW_AHEAD)
            # The wait says which side is slow: drawing (the writer waits) or writing (it does not).
            waits = "" if waited is None else f" (waited {waited:.1f} s for drawing, {DRAW_AHEAD} ahead)"
            log(f"{name}: {(tmp / name).stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s{waits}")
        if checklist:
            files = ["params.json"] + [f"consolidated.{r:02d}.pth" for r in range(n_shards)]
            (tmp / CHECKLIST).write_text("".join(f"{file_digests(tmp / f, ('md5',))['md5']}  {f}\n" for f in files))
        commit(tmp, out_dir)
        return out_dir
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(out_dir, e) from None
        raise
