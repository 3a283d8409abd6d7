"""`hsc random-checkpoint`: a checkpoint of random weights in Meta's own layout (or Hugging Face's:
write_random_hf_checkpoint), at a real model's shape.

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
so they cost address space, not resident memory (peak memory: docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import contextlib
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
from toolchain.meta_source import CHECKLIST, SPLIT_AXIS, _read_sentencepiece
from toolchain.outdir import clear_leftovers, commit, make_temp, output_lock, write_error
from toolchain.safetensors_writer import StreamingSafetensorsWriter

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
    # Drawn in fp32, then rounded: the same values as an fp16 draw on torch 2.13, and never on CPU
    # normal_'s half-precision path, which older torch versions leave unvectorised (pytorch/pytorch#173173)
    # and run in the output dtype, clipping the tails (#166853).
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
    per_rank = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    with _writing(out_dir, n_shards * per_rank, force, log) as tmp:
        # Meta's LLaMA-1/2 params.json says vocab_size -1: the tokenizer decides.
        (tmp / "params.json").write_text(json.dumps({**args.params_json(), "vocab_size": -1}))
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        head_dim = args.head_dim
        freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        log(f"{n_shards} shard(s) of {per_rank / 1e9:.2f} GB: {args.n_layers} layers, dim {args.dim}, "
            f"{args.n_heads} heads ({args.kv_heads} kv), ffn {args.ffn_dim}, vocab {vocab}, "
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
    return out_dir


# ---- Hugging Face layout ---------------------------------------------------------------------------------

# transformers' names for Meta's, relative to `layers.{i}.` / `model.layers.{i}.`, in the order
# save_pretrained lists a layer's tensors. Written out here, not imported from toolchain/hf_source.py:
# the reader is tested against what this writes.
_HF_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
}
HF_SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size (transformers 4): "5GB"


def hf_tensor_shapes(args: ModelArgs) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF name -> (shape, Meta name: the draw's seed) of every tensor, in save_pretrained's order (untied
    LM head)."""
    g, per_layer = global_shapes(args), layer_shapes(args)
    out = {"model.embed_tokens.weight": (g["tok_embeddings.weight"], "tok_embeddings.weight")}
    for i in range(args.n_layers):
        out.update({f"model.layers.{i}.{hf}": (per_layer[meta], f"layers.{i}.{meta}") for meta, hf in _HF_LAYER.items()})
    out["model.norm.weight"] = (g["norm.weight"], "norm.weight")
    out["lm_head.weight"] = (g["output.weight"], "output.weight")
    return out


def _hf_files(shapes: dict, dtype: torch.dtype, n_files: int | None) -> list[list[str]]:
    """The tensor names of each file: whole layers, in order, n_files files (default: <= 5 GB each)."""
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, _) in shapes.items()}
    n = n_files or max(1, math.ceil(sum(sizes.values()) / HF_SHARD_BYTES))
    names = list(shapes)
    bounds = [round(k * len(names) / n) for k in range(n + 1)]
    return [names[a:b] for a, b in zip(bounds, bounds[1:])]


def hf_config_json(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json as transformers 4 writes it for a LLaMA-1 conversion."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
            "intermediate_size": args.ffn_dim, "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.kv_heads, "num_hidden_layers": args.n_layers, "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "rope_scaling": None, "vocab_size": args.vocab_size,
            "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch.")}


def write_random_hf_checkpoint(out_dir: Path, args: ModelArgs, tokenizer: Path, n_files: int | None = None,
                               seed: int = 0, dtype: torch.dtype = torch.float16, force: bool = False,
                               log=print) -> Path:
    """Write config.json, model-0000k-of-0000n.safetensors + model.safetensors.index.json,
    tokenizer.model (a copy of `tokenizer`) and tokenizer_config.json into out_dir, one tensor in memory
    at a time (a few, drawn ahead), through a temporary sibling renamed when complete. The weights are
    random, so HF's q/k row order needs no permuting."""
    out_dir = Path(out_dir)
    vocab = _read_sentencepiece(Path(tokenizer)).vocab_size
    if args.vocab_size > 0 and args.vocab_size != vocab:
        raise file_error(tokenizer, f"has {vocab} pieces; the shape's vocab_size is {args.vocab_size}")
    args = ModelArgs(**{**vars(args), "vocab_size": vocab})
    shapes = hf_tensor_shapes(args)
    if n_files is not None and not 1 <= n_files <= len(shapes):
        raise HscError(f"--shards {n_files}: choose 1..{len(shapes)} files")
    files = _hf_files(shapes, dtype, n_files)
    names = [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    total = sum(math.prod(shape) for shape, _ in shapes.values()) * dtype.itemsize
    with _writing(out_dir, total, force, log) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config_json(args, dtype), indent=2) + "\n")
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
             "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
        log(f"{len(files)} file(s), {total / 1e9:.2f} GB: {args.n_layers} layers, dim {args.dim}, {args.n_heads} "
            f"heads ({args.kv_heads} kv), ffn {args.ffn_dim}, vocab {vocab}, {str(dtype).removeprefix('torch.')}, "
            f"seed {seed}")

        def make(name: str) -> torch.Tensor:
            shape, meta = shapes[name]
            return random_slice(meta, shape[-1], shape, seed, 0, dtype)

        for file, chunk in zip(names, files):
            t0 = time.perf_counter()
            made = _MadeAhead(make, chunk, DRAW_AHEAD)
            try:
                w = StreamingSafetensorsWriter(tmp / file, [(n, shapes[n][0], dtype) for n in chunk], {"format": "pt"})
                for name in chunk:
                    w.write(name, made(name))
                w.close()
            finally:
                made.close()
            log(f"{file}: {(tmp / file).stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, chunk in zip(names, files) for n in chunk}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


@contextlib.contextmanager
def _writing(out_dir: Path, needed_bytes: int, force: bool, log):
    """The temporary sibling to write a checkpoint into, under the output's lock, after checking that out_dir
    may be (re)placed and that the disk has room; renamed into place when the block ends, removed if it raises."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out_dir.parent).free
    except OSError as e:
        raise file_error(out_dir.parent, f"cannot create the checkpoint directory here ({e.strerror or e})") from None
    if free < needed_bytes:  # found out before writing, not 60 GB in
        raise file_error(out_dir.parent, f"{free / 1e9:.1f} GB free, the checkpoint needs {needed_bytes / 1e9:.1f} GB")
    with output_lock(out_dir, "checkpoint"):
        clear_leftovers(out_dir, log)
        if out_dir.exists() and not (force and out_dir.is_dir()):
            raise file_error(out_dir, "already exists (use --force to replace a directory)")
        tmp = make_temp(out_dir, "checkpoint")
        try:
            yield tmp
            commit(tmp, out_dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise write_error(out_dir, e) from None
            raise
