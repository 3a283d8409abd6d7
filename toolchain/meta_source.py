"""Reader for Meta's own checkpoint layout (LLaMA 1/2/3 as downloaded from Meta).

A checkpoint directory holds params.json, consolidated.00.pth .. consolidated.NN.pth (one file per
model-parallel rank, each holding a slice of every split tensor), usually checklist.chk, and a
sentencepiece tokenizer.model here or in the parent directory (LLaMA-1 keeps one tokenizer beside
all model sizes). Shards are memory-mapped, so a tensor is only read from disk when a layer asks
for it, and merged back to full shape then.

Host memory stays near one layer: every page of a mapping that has been read stays in the
process (resident, file-backed) for as long as the mapping lives, so mappings kept for the whole
compile would grow to the checkpoint's size (65 GB at 30B) over the compiler's two passes. Each
read therefore opens the shards afresh (torch.load with mmap only unpickles the metadata: a few
milliseconds), copies the tensors it was asked for out of them, and drops the mappings.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import torch

from runtime.config import ModelArgs, global_shapes, layer_shapes, weight_names
from runtime.errors import file_error
from runtime.paths import confined, regular_file
from runtime.tokenizer import TOKENIZER_MAX_BYTES
from runtime.validate import read_bounded
from toolchain.hashing import file_digests
from toolchain.source import ModelSource, TokenizerSource, check_finite

SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
CHECKLIST = "checklist.chk"
CHECKLIST_MAX_BYTES = 1 << 20  # Meta's lists a dozen files

# Keys Meta's shards carry that are not weights (LLaMA-1 stores the RoPE table); we recompute them.
IGNORED_KEYS = frozenset({"rope.freqs"})

# The axis fairscale's model-parallel layers split each tensor on, keyed by name without the
# "layers.{i}." prefix. ColumnParallelLinear splits outputs (dim 0 of [out, in]),
# RowParallelLinear splits inputs (dim 1); None: replicated on every rank. tok_embeddings is
# missing on purpose: LLaMA-1/2 split the embedding dimension, LLaMA-3 the vocabulary, so its
# axis is read off the shard shapes.
SPLIT_AXIS = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "output.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
}


class MetaSource(ModelSource):
    source_format = "meta"

    def __init__(self, path: Path, tokenizer_path: Path | None = None, verify: bool = True):
        """verify=False: neither hashed nor checked against checklist.chk (no source_digests); for a
        dry run, which reads no weight."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise file_error(self.path, "not a directory (a Meta checkpoint is a directory with params.json)")
        self.model_name = self.path.resolve().name
        args = ModelArgs.from_params_json(confined(self.path, "params.json", "checkpoint"))

        tok_file = self._find_tokenizer(tokenizer_path)
        self.tokenizer = _read_sentencepiece(tok_file)
        if args.vocab_size <= 0:  # Meta writes -1: the tokenizer decides
            args = dataclasses.replace(args, vocab_size=self.tokenizer.vocab_size)
        elif args.vocab_size != self.tokenizer.vocab_size:
            raise file_error(
                self.path / "params.json",
                f"vocab_size {args.vocab_size} does not match {tok_file}'s {self.tokenizer.vocab_size} pieces",
            )
        self.args = args

        self._shard_paths = self._find_shards()
        # Hash before unpickling: a damaged download is better reported as an MD5 mismatch.
        if verify:
            self.source_digests = self._hash_and_verify(tok_file)
        # Keys, shapes and dtypes of every shard, checked up front (metadata only: nothing is read).
        self._axes = self._check_layout(self._open_shards())

    # ---- ModelSource ----

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self._read(list(global_shapes(self.args)))

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.args.n_layers:
            raise IndexError(f"layer {i} out of range (n_layers={self.args.n_layers})")
        names = list(layer_shapes(self.args))
        merged = self._read([f"layers.{i}.{name}" for name in names])
        return dict(zip(names, merged.values()))

    # ---- opening ----

    def _find_tokenizer(self, explicit: Path | None) -> Path:
        # An explicit path wins: it is how a user overrides whatever sits beside the weights.
        if explicit is not None:
            return regular_file(Path(explicit), missing="tokenizer not found")
        if (self.path / "tokenizer.model").exists() or (self.path / "tokenizer.model").is_symlink():
            return confined(self.path, "tokenizer.model", "checkpoint")
        # LLaMA-1 keeps one tokenizer beside all model sizes, in the directory above them.
        beside = self.path.resolve().parent / "tokenizer.model"
        if beside.exists():
            return regular_file(beside)
        raise file_error(
            self.path, "no tokenizer.model here or in the parent directory; pass the tokenizer's path"
        )

    def _find_shards(self) -> list[Path]:
        found = {}
        for p in self.path.iterdir():
            if m := SHARD_RE.fullmatch(p.name):
                found[int(m.group(1))] = confined(self.path, p.name, "checkpoint")  # no FIFO, no symlink out
        if not found:
            raise file_error(self.path, "no consolidated.NN.pth weight files")
        n = max(found) + 1
        missing = [f"consolidated.{k:02d}.pth" for k in range(n) if k not in found]
        if missing:
            raise file_error(
                self.path / missing[0],
                f"missing, but consolidated.{n - 1:02d}.pth exists (shards must be numbered 00..{n - 1:02d};"
                f" missing: {', '.join(missing)})",
            )
        return [found[k] for k in range(n)]

    def _read_checklist(self) -> dict[str, str]:
        path = self.path / CHECKLIST
        if not path.exists() and not path.is_symlink():
            return {}
        confined(self.path, CHECKLIST, "checkpoint")
        expected = {}
        text = read_bounded(path, CHECKLIST_MAX_BYTES, "a checklist").decode(errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{32}", parts[0]):
                raise file_error(path, f"line {lineno}: expected '<md5>  <file name>', got {line!r}")
            name = parts[1].strip().lstrip("*").removeprefix("./")  # md5sum marks binary mode with '*'
            confined(self.path, name, f"checkpoint ({CHECKLIST} line {lineno})", must_exist=False)
            expected[name] = parts[0].lower()
        return expected

    def _hash_and_verify(self, tok_file: Path) -> dict[str, str]:
        """sha256 of params.json, every shard and the tokenizer; MD5 of whatever checklist.chk lists,
        all in one read of each file."""
        expected_md5 = self._read_checklist()
        provenance = [self.path / "params.json", *self._shard_paths, tok_file]
        listed = [self.path / name for name in expected_md5 if (self.path / name).is_file()]
        digests = {}
        for f in dict.fromkeys(provenance + listed):  # ordered, without duplicates
            want = expected_md5.get(f.name) if f.parent == self.path else None
            got = file_digests(f, ("md5", "sha256") if want else ("sha256",))
            if want and got["md5"] != want:
                raise file_error(f, f"MD5 {got['md5']} does not match {CHECKLIST} ({want}); re-download it")
            if f in provenance:
                digests[f.name] = got["sha256"]
        return digests

    def _open_shards(self) -> list[dict]:
        return [_load_shard(p) for p in self._shard_paths]

    def _check_layout(self, shards: list[dict]) -> dict[str, int | None]:
        """Check keys and shapes of every shard up front (shapes need no reads with mmap), and
        return the merge axis of every tensor."""
        names = weight_names(self.args)
        wanted = set(names)
        for path, sd in zip(self._shard_paths, shards):
            for name in names:
                if name not in sd:
                    raise file_error(path, f"missing tensor {name}")
            for key, value in sd.items():
                if key in IGNORED_KEYS:
                    continue
                if key not in wanted:
                    hint = f" (params.json: n_layers={self.args.n_layers})" if key.startswith("layers.") else ""
                    raise file_error(path, f"unexpected key {key!r}{hint}")
                if not isinstance(value, torch.Tensor):
                    raise file_error(path, f"{key} is a {type(value).__name__}, not a tensor")

        expected = dict(global_shapes(self.args))
        for i in range(self.args.n_layers):
            expected.update({f"layers.{i}.{n}": s for n, s in layer_shapes(self.args).items()})

        n = len(shards)
        first_path = self._shard_paths[0]
        axes = {}
        for name in names:
            first = shards[0][name]
            for path, sd in zip(self._shard_paths[1:], shards[1:]):
                t = sd[name]
                if t.shape != first.shape or t.dtype != first.dtype:
                    raise file_error(
                        path,
                        f"{name} is {_desc(t)} but {first_path.name} has {_desc(first)};"
                        " model-parallel shards must hold equal slices",
                    )
            axis = self._split_axis(name, first, n)
            merged = list(first.shape)
            if axis is not None and axis < len(merged):
                merged[axis] *= n
            if tuple(merged) != expected[name]:
                where = "" if n == 1 else f" (merged from {n} shards)"
                raise file_error(
                    first_path,
                    f"{name} has shape {tuple(merged)}{where}, expected {expected[name]} from params.json",
                )
            axes[name] = axis if n > 1 else None
        return axes

    def _split_axis(self, name: str, shard: torch.Tensor, n: int) -> int | None:
        base = re.sub(r"^layers\.\d+\.", "", name)
        if base != "tok_embeddings.weight":
            return SPLIT_AXIS[base]
        # LLaMA-3's VocabParallelEmbedding splits rows; LLaMA-1/2's ParallelEmbedding splits columns.
        if n > 1 and shard.ndim == 2 and shard.shape[0] * n == self.args.vocab_size and shard.shape[1] == self.args.dim:
            return 0
        return 1

    # ---- reading ----

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors at full shape, copied out of freshly opened shard mappings, which are
        dropped on return: what was read leaves the process with them (module docstring)."""
        shards = self._open_shards()
        out = {}
        for name in names:
            parts = [sd[name] for sd in shards]
            for path, part in zip(self._shard_paths, parts):  # the shard that holds a NaN is the one named
                check_finite(path, name, part)
            axis = self._axes[name]
            # cat reads just this tensor's slices; a replicated (or single-shard) tensor is cloned,
            # since a view would keep its whole shard mapped.
            out[name] = parts[0].clone() if axis is None else torch.cat(parts, dim=axis)
        return out


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _read_sentencepiece(path: Path) -> TokenizerSource:
    """The tokenizer as LLaMA uses it: a BOS piece to put in front of every document (add_bos)."""
    import sentencepiece as spm

    data = read_bounded(path, TOKENIZER_MAX_BYTES, "a sentencepiece model")
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
        n = sp.GetPieceSize() if data else 0
    except (RuntimeError, TypeError, ValueError) as e:  # ValueError: a piece that is not UTF-8
        raise file_error(
            path, f"not a sentencepiece model (LLaMA-3's tiktoken tokenizer.model is not supported): {e}"
        ) from None
    if n < 1:
        raise file_error(path, "not a sentencepiece model (no pieces)")
    if sp.bos_id() < 0:  # sentencepiece says -1 for "none"
        raise file_error(path, "has no BOS piece (bos_id -1); LLaMA puts BOS in front of every document")
    return TokenizerSource(
        kind="sentencepiece",
        data=data,
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id() if sp.eos_id() >= 0 else None,
        add_bos=True,  # LLaMA was trained with BOS in front of every document
        vocab_size=n,
    )


def _load_shard(path: Path) -> dict:
    """Open one consolidated.NN.pth memory-mapped; any failure is one line naming the file."""
    try:
        # weights_only refuses pickles that would import or call anything beyond tensors and
        # containers; mmap leaves tensor data on disk until it is used.
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise file_error(path, f"refused by weights_only: {_weights_only_reason(e)}") from None
    except OSError as e:
        raise file_error(path, f"cannot be read: {e.strerror or e}") from None
    except Exception as e:  # torch reports damaged zip archives as RuntimeError, among others
        raise file_error(path, _load_problem(path, e)) from None
    if not isinstance(sd, dict):
        raise file_error(path, f"expected a dict of tensors, got a {type(sd).__name__}")
    return sd


def _load_problem(path: Path, e: Exception) -> str:
    with open(path, "rb") as f:
        head = f.read(2)
    # mmap needs the zip container torch.save has written since 1.6; the older format is one
    # pickle stream (starts with the pickle PROTO opcode 0x80) and would have to be read whole.
    if head[:1] == b"\x80":
        return "legacy (pre-zip) torch.save format, which cannot be memory-mapped; re-save it with a current torch.save"
    first_sentence = str(e).split(". ")[0].strip()
    return f"truncated or corrupt: {first_sentence}"


def _weights_only_reason(e: Exception) -> str:
    # torch's message is boilerplate around one paragraph that names the refused global.
    paragraphs = [p.strip() for p in str(e).split("\n\n") if p.strip()]
    return paragraphs[1] if len(paragraphs) > 2 else str(e)


__all__ = ["MetaSource"]
