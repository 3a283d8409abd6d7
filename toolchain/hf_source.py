"""Reader for Hugging Face LLaMA checkpoints (a transformers `LlamaForCausalLM` directory).

A checkpoint directory holds config.json, the weights as model.safetensors, or shards named by
model.safetensors.index.json, or the same as pytorch_model*.bin (+ pytorch_model.bin.index.json),
and a tokenizer: tokenizer.model (sentencepiece) or tokenizer.json, with tokenizer_config.json.

Layout: transformers' convert_llama_weights_to_hf.py permuted the rows of q_proj and k_proj so that
its RoPE rotates halves (j, j + head_dim/2) of each head instead of Meta's adjacent pairs (2j, 2j+1):

    permute(w, n_heads) = w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(w.shape)

(k_proj with the kv heads). The reader applies the inverse (view(n_heads, 2, head_dim // 2, dim),
the same transpose) and hands Meta's interleaved layout to the compiler, as the other sources do.

Host memory stays near one layer: as in toolchain/meta_source.py, every read opens the files it needs
afresh (safetensors' safe_open, or torch.load with mmap for .bin), copies the tensors out and drops
the mappings, so pages read do not accumulate over the compile.

config.json is parsed strictly: the fields hsc models are type-checked, and every field that would
change the model's arithmetic in a way hsc does not implement (RoPE scaling, sliding windows,
biases, another activation or architecture) is refused by name. Other fields (transformers'
bookkeeping: use_cache, initializer_range, ...) do not change the forward pass and are ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import torch

from runtime.config import LAYER_TENSORS, ModelArgs, global_shapes, layer_shapes
from runtime.errors import HscError, file_error
from toolchain.hashing import sha256_file
from toolchain.meta_source import _load_shard, _read_sentencepiece
from toolchain.source import ModelSource, TokenizerSource

CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# The weight files transformers writes, in the order it prefers them: (index, single file).
WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                  ("pytorch_model.bin.index.json", "pytorch_model.bin"))

# HF name -> Meta name for the whole-model tensors.
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# HF name -> Meta name, relative to `model.layers.{i}.` / `layers.{i}.`.
LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
assert sorted(LAYER_NAMES.values()) == sorted(LAYER_TENSORS)
# Buffers older conversions saved beside the weights (the RoPE table); recomputed, never read.
IGNORED_LAYER_KEYS = frozenset({"self_attn.rotary_emb.inv_freq"})
SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


# ---- config.json ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HFConfig:
    args: ModelArgs  # vocab_size: the embedding's rows
    tied: bool  # tie_word_embeddings: the LM head is the embedding matrix
    bos_id: int | None
    eos_id: int | None


def _load_json(path: Path, what: str) -> dict:
    """A JSON object; a key given twice is an error (json.loads would keep the last silently)."""
    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise HscError(f"{path}: {what} names {k!r} twice")
            seen[k] = v
        return seen

    try:
        raw = json.loads(path.read_text(), object_pairs_hook=no_duplicates)
    except FileNotFoundError:
        raise file_error(path, "missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise file_error(path, "expected a JSON object")
    return raw


class _Fields:
    """Typed, named access to config.json's fields: every problem is one line naming the field."""

    def __init__(self, path: Path, raw: dict):
        self.path, self.raw = path, raw

    def fail(self, name: str, problem: str) -> HscError:
        return file_error(self.path, f"field {name}: {problem}")

    def int(self, name: str, default=None, required=True) -> int | None:
        if name not in self.raw or self.raw[name] is None:
            if required:
                raise file_error(self.path, f"missing field {name}")
            return default
        v = self.raw[name]
        if type(v) is not int or v <= 0:
            raise self.fail(name, f"expected a positive integer, got {v!r}")
        return v

    def float(self, name: str, value=None, default=None) -> float:
        v = self.raw.get(name, default) if value is None else value
        if v is None:
            raise file_error(self.path, f"missing field {name}")
        if type(v) not in (int, float) or not math.isfinite(v) or v <= 0:
            raise self.fail(name, f"expected a positive number, got {v!r}")
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        v = self.raw.get(name, default)
        if type(v) is not bool:
            raise self.fail(name, f"expected true or false, got {v!r}")
        return v

    def token_id(self, name: str, vocab: int) -> int | None:
        v = self.raw.get(name)
        if isinstance(v, list) and len(v) >= 1:  # generation configs may list several EOS ids; the first is the tokenizer's
            v = v[0]
        if v is None:
            return None
        if type(v) is not int or not 0 <= v < vocab:
            raise self.fail(name, f"expected a token id in 0..{vocab - 1}, got {v!r}")
        return v

    def refuse_unless(self, name: str, allowed: tuple, what: str) -> None:
        if name in self.raw and self.raw[name] not in allowed:
            raise self.fail(name, f"{self.raw[name]!r}: {what} is not supported")


def _rope_theta(f: _Fields) -> float:
    """rope_theta, from transformers 4's top-level fields or transformers 5's rope_parameters; any
    RoPE scaling (linear, dynamic, yarn, llama3, longrope...) is refused by name."""
    for name in ("rope_scaling", "rope_parameters"):
        spec = f.raw.get(name)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise f.fail(name, f"expected an object, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            raise f.fail(name, f"RoPE scaling type {kind!r} is not supported (only unscaled RoPE)")
        if "rope_theta" in spec:
            return f.float(f"{name}.rope_theta", spec["rope_theta"])
    return f.float("rope_theta", default=10000.0)


def read_config(path: Path) -> HFConfig:
    f = _Fields(path, _load_json(path, "config.json"))
    archs = f.raw.get("architectures")
    if archs is not None and archs != ["LlamaForCausalLM"]:
        raise f.fail("architectures", f"{archs!r}: only LlamaForCausalLM is supported")
    f.refuse_unless("model_type", ("llama",), "a model type other than llama")
    if archs is None and "model_type" not in f.raw:
        raise file_error(path, "missing field architectures (or model_type): cannot tell it is a LLaMA model")
    f.refuse_unless("hidden_act", ("silu",), "an activation other than silu")
    for name in ("attention_bias", "mlp_bias"):
        f.refuse_unless(name, (False,), "a model with biases")
    for name in ("sliding_window", "use_sliding_window"):
        f.refuse_unless(name, (None, False), "sliding-window attention")

    dim, n_heads = f.int("hidden_size"), f.int("num_attention_heads")
    kv = f.int("num_key_value_heads", default=n_heads, required=False)
    head_dim = f.int("head_dim", required=False)
    if head_dim is not None and head_dim * n_heads != dim:
        raise f.fail("head_dim", f"{head_dim} x {n_heads} heads is not hidden_size {dim}; not supported")
    vocab = f.int("vocab_size")
    try:
        args = ModelArgs(dim=dim, n_layers=f.int("num_hidden_layers"), n_heads=n_heads,
                         n_kv_heads=kv if kv != n_heads else None, vocab_size=vocab,
                         norm_eps=f.float("rms_norm_eps"), rope_theta=_rope_theta(f),
                         hidden_dim=f.int("intermediate_size"),
                         max_seq_len=f.int("max_position_embeddings", default=2048, required=False))
    except ValueError as e:
        raise file_error(path, f"unusable LLaMA hyper-parameters ({e})") from None
    return HFConfig(args=args, tied=f.bool("tie_word_embeddings", False),
                    bos_id=f.token_id("bos_token_id", vocab), eos_id=f.token_id("eos_token_id", vocab))


# ---- tokenizer -----------------------------------------------------------------------------------------


def _read_tokenizer(path: Path, cfg: HFConfig) -> tuple[TokenizerSource, Path]:
    """tokenizer.model (sentencepiece, as LLaMA ships) if present, else tokenizer.json; add_bos from
    tokenizer_config.json's add_bos_token, else from the tokenizer itself."""
    tc_path = path / TOKENIZER_CONFIG
    add_bos = None
    if tc_path.is_file():
        tc = _Fields(tc_path, _load_json(tc_path, TOKENIZER_CONFIG))
        if "add_bos_token" in tc.raw:
            add_bos = tc.bool("add_bos_token", True)
    sp_file, json_file = path / "tokenizer.model", path / "tokenizer.json"
    if sp_file.is_file():
        # BOS/EOS ids from the sentencepiece model itself: early LLaMA-1 conversions wrote wrong ones
        # (0 and 1) into config.json.
        tok, file = _read_sentencepiece(sp_file), sp_file
        tok = dataclasses.replace(tok, add_bos=tok.add_bos if add_bos is None else add_bos)
    elif json_file.is_file():
        tok, file = _read_tokenizer_json(json_file, cfg, add_bos), json_file
    else:
        raise file_error(path, "no tokenizer.model or tokenizer.json (a Hugging Face checkpoint needs one)")
    if tok.vocab_size > cfg.args.vocab_size:
        raise file_error(path / CONFIG, f"vocab_size {cfg.args.vocab_size} is smaller than {file.name}'s "
                                        f"{tok.vocab_size} tokens")
    return tok, file


def _read_tokenizer_json(path: Path, cfg: HFConfig, add_bos: bool | None) -> TokenizerSource:
    from tokenizers import Tokenizer

    data = path.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise file_error(path, f"not a tokenizer.json ({e})") from None
    if add_bos is None:  # the file's own post-processor decides, as transformers' fast tokenizer does
        with_special = tok.encode("a", add_special_tokens=True).ids
        add_bos = cfg.bos_id is not None and with_special[:1] == [cfg.bos_id] != tok.encode("a", add_special_tokens=False).ids[:1]
    return TokenizerSource(kind="hf", data=data, bos_id=cfg.bos_id, eos_id=cfg.eos_id, add_bos=add_bos,
                           vocab_size=tok.get_vocab_size(with_added_tokens=True))


# ---- weights -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class HFSource(ModelSource):
    source_format = "hf"

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise file_error(self.path, "not a directory (a Hugging Face checkpoint is a directory with config.json)")
        self.model_name = self.path.resolve().name
        cfg = read_config(self.path / CONFIG)
        self.args, self.tied = cfg.args, cfg.tied
        self.tokenizer, tok_file = _read_tokenizer(self.path, cfg)
        self._files = self._weight_files()
        self._entries = self._check_layout()
        self._hashed = [self.path / CONFIG, *self._files, tok_file]

    @functools.cached_property
    def source_digests(self) -> dict[str, str]:
        """Hashed when the manifest asks (a dry run never does)."""
        return {f.name: sha256_file(f) for f in self._hashed}

    # ---- ModelSource ----

    def global_tensors(self) -> dict[str, torch.Tensor]:
        emb, norm = "model.embed_tokens.weight", "model.norm.weight"
        got = self._read([emb, norm] if self.tied else [emb, norm, "lm_head.weight"])
        out = got.get("lm_head.weight")
        return {"tok_embeddings.weight": got[emb], "norm.weight": got[norm],
                "output.weight": got[emb].clone() if out is None else out}

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.args.n_layers:
            raise IndexError(f"layer {i} out of range (n_layers={self.args.n_layers})")
        got = self._read([f"model.layers.{i}.{hf}" for hf in LAYER_NAMES])
        out = {meta: got[f"model.layers.{i}.{hf}"] for hf, meta in LAYER_NAMES.items()}
        a = self.args
        out["attention.wq.weight"] = unpermute_rope_rows(out["attention.wq.weight"], a.n_heads)
        out["attention.wk.weight"] = unpermute_rope_rows(out["attention.wk.weight"], a.kv_heads)
        return out

    # ---- opening ----

    def _weight_files(self) -> list[Path]:
        """The weight files, from an index when there is one; every file it names must exist."""
        for index_name, single in WEIGHT_LAYOUTS:
            index = self.path / index_name
            if index.is_file():
                self._index = self._read_index(index)
                return sorted({self.path / f for f in self._index.values()})
            if (self.path / single).is_file():
                self._index = None
                return [self.path / single]
        names = ", ".join(n for pair in WEIGHT_LAYOUTS for n in pair)
        raise file_error(self.path, f"no weight files (looked for {names})")

    def _read_index(self, index: Path) -> dict[str, str]:
        raw = _load_json(index, "the index")
        weight_map = raw.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise file_error(index, "weight_map must be an object of tensor name -> file name")
        for name, file in weight_map.items():
            if Path(file).name != file:
                raise file_error(index, f"{name} is in {file!r}, which is not a file name in this directory")
            if not (self.path / file).is_file():
                raise file_error(self.path / file, f"missing, but {index.name} names it (for {name})")
        return weight_map

    def _check_layout(self) -> dict[str, _Entry]:
        """Every tensor's file, shape and dtype, read from the headers up front (nothing is read);
        names, shapes and dtypes checked against config.json."""
        entries: dict[str, _Entry] = {}
        for file in self._files:
            for name, (shape, dtype) in _headers(file).items():
                if name in entries:
                    raise file_error(file, f"holds tensor {name}, which {entries[name].file.name} holds too")
                if self._index is not None and self._index.get(name) != file.name:
                    where = f"puts it in {self._index[name]}" if name in self._index else "does not list it"
                    raise file_error(file, f"holds tensor {name}, but the index {where}")
                entries[name] = _Entry(file, shape, dtype)
        expected = self._expected_shapes()
        for name, e in list(entries.items()):
            if name.startswith("model.layers.") and name.split(".", 3)[3] in IGNORED_LAYER_KEYS:
                del entries[name]
                continue
            if name not in expected:
                hint = f" (config.json: num_hidden_layers={self.args.n_layers})" if name.startswith("model.layers.") else ""
                raise file_error(e.file, f"unexpected tensor {name}{hint}")
            if e.shape != expected[name]:
                raise file_error(e.file, f"tensor {name} has shape {e.shape}, expected {expected[name]} from config.json")
            if e.dtype not in SOURCE_DTYPES:
                raise file_error(e.file, f"tensor {name} is {str(e.dtype).removeprefix('torch.')}; "
                                         "only float16, bfloat16 and float32 weights are supported")
        if self._index is not None:
            for name, file in self._index.items():
                if name not in entries and name.split(".", 3)[-1] not in IGNORED_LAYER_KEYS:
                    raise file_error(self.path / file, f"does not hold tensor {name}, which the index puts there")
        missing = [n for n in expected if n not in entries and not (n == "lm_head.weight" and self.tied)]
        if missing:
            where = self._files[0] if len(self._files) == 1 else self.path
            raise file_error(where, f"missing tensor {missing[0]} ({len(missing)} missing in all"
                                    + ("; config.json: tie_word_embeddings is false)" if missing == ["lm_head.weight"] else ")"))
        return entries

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        g = global_shapes(self.args)
        out = {hf: g[meta] for hf, meta in GLOBAL_NAMES.items()}
        per_layer = layer_shapes(self.args)
        for i in range(self.args.n_layers):
            out.update({f"model.layers.{i}.{hf}": per_layer[meta] for hf, meta in LAYER_NAMES.items()})
        return out

    # ---- reading ----

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of freshly opened files that are closed on return (module
        docstring); each checked for NaN/inf on the way (one pass over data that is in cache anyway)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._entries[name].file, []).append(name)
        out = {}
        for file, wanted in by_file.items():
            out.update(_read_tensors(file, wanted))
        for name, t in out.items():
            if not bool(torch.isfinite(t).all()):
                raise file_error(self._entries[name].file, f"tensor {name} holds non-finite values (NaN or inf)")
        return out


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of convert_llama_weights_to_hf.py's permute: HF's half-split rows -> Meta's interleaved."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _headers(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """name -> (shape, dtype) of every tensor in one weight file, without reading tensor data."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as h:
                out = {}
                for k in h.keys():
                    s = h.get_slice(k)
                    out[k] = (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()))
                return out
        except (SafetensorError, OSError) as e:
            raise file_error(file, f"not a readable safetensors file ({e})") from None
    sd = _load_shard(file)
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise file_error(file, f"{k} is a {type(v).__name__}, not a tensor")
        out[k] = (tuple(v.shape), v.dtype)
    return out


def _read_tensors(file: Path, names: list[str]) -> dict[str, torch.Tensor]:
    # clone: a tensor from either loader is a view of the file's mapping, which would stay alive with it.
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt") as h:
                return {n: h.get_tensor(n).clone() for n in names}
        except (SafetensorError, OSError) as e:
            raise file_error(file, f"cannot be read ({e})") from None
    sd = _load_shard(file)
    return {n: sd[n].clone() for n in names}


__all__ = ["HFSource", "read_config", "unpermute_rope_rows"]
