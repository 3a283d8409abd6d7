"""Read a llama GGUF file (llama.cpp's format) as a ModelSource.

The file is memory-mapped through gguf.GGUFReader; metadata and the tensor index are read up
front, tensors are dequantized to float32 one layer at a time.

Layout notes
------------
* Axis order: GGUF lists a tensor's dims innermost-first (ggml's ne[0] is the contiguous one), so
  a weight listed as [in, out] is a row-major [out, in] array, which is nn.Linear's layout.
  GGUFReader already presents the data with numpy's (outermost-first) shape; we reshape to the
  reversed GGUF dims after dequantizing.
* RoPE: Meta's checkpoints rotate adjacent pairs (2j, 2j+1) of each head; Hugging Face's
  checkpoints were permuted to rotate halves (j, j + head_dim/2). llama.cpp's convert_hf_to_gguf.py
  (LlamaModel.modify_tensors) undoes that for q_proj (n_head) and k_proj (n_head_kv) with

      permute(w, n_head, n_head_kv):
          w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

  Within each head the rows are viewed as [2 halves, head_dim/2] and transposed to
  [head_dim/2, 2], i.e. rows (j, j + head_dim/2) become rows (2j, 2j+1): exactly the inverse of
  transformers' convert_llama_weights_to_hf.py permute (view(n_heads, head_dim/2, 2, dim)
  .transpose(1, 2)). llama.cpp's llama architecture then uses "normal" (adjacent-pair) RoPE.
  So GGUF attn_q / attn_k are already in Meta's interleaved layout and are passed through
  without any permutation. (GGUFs converted from Meta's own .pth checkpoints were never permuted
  either, so the same holds for them.)
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from runtime.config import LAYER_TENSORS, MODEL_LIMITS, ModelArgs, global_shapes, layer_shapes
from runtime.errors import HscError, file_error
from runtime.tokenizer import check_bpe, hf_call
from runtime.validate import FieldError, bool_of, entries, int_in, list_of, number_in, str_of
from toolchain.hashing import sha256_file
from toolchain.source import ModelSource, TokenizerSource, check_finite

# GGUF name -> Meta name for the whole-model tensors.
GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
# GGUF name -> Meta name, relative to `blk.{i}.` / `layers.{i}.`.
LAYER_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
assert sorted(LAYER_NAMES.values()) == sorted(LAYER_TENSORS)

# llama.cpp token types (llama_token_type / gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# ... which are sentencepiece's piece types, number for number: NORMAL UNKNOWN CONTROL USER_DEFINED UNUSED BYTE.
_SP_TYPES = frozenset(range(1, 7))

_REQUIRED = object()


class _Reader(GGUFReader):
    """gguf.GGUFReader over a plain ndarray view of its read-only memory map.

    GGUFReader slices its np.memmap once per metadata value (~250k slices for a 49k-token
    vocabulary), and np.memmap's per-slice bookkeeping makes that several times slower than slicing a
    plain ndarray over the same mapping. The view keeps the map alive and read-only; nothing is copied.
    """

    @property
    def data(self):
        return self._map

    @data.setter
    def data(self, value):
        self._map = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def _clean_float(x):
    """GGUF stores float32; give back the shortest decimal that round-trips (1e-05, not 9.9999997e-06).
    A value of another type is handed on for ModelArgs to refuse."""
    return float(str(np.float32(x))) if type(x) is float else x


# ModelArgs field -> GGUF key (after "llama.").
GGUF_KEYS = {
    "dim": "embedding_length",
    "n_layers": "block_count",
    "n_heads": "attention.head_count",
    "n_kv_heads": "attention.head_count_kv",
    "vocab_size": "vocab_size",
    "norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "hidden_dim": "feed_forward_length",
    "max_seq_len": "context_length",
}
# The types a llama weight is stored in: norms (1-D) as floats, matrices as floats or a llama.cpp
# quantization. Anything else (integer types, F64, the Q8_1/Q8_K intermediate types) is not a weight.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})
MATRIX_TYPES = FLOAT_TYPES | {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS",
                              "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0",
                              "TQ2_0", "MXFP4"}


class GGUFSource(ModelSource):
    source_format = "gguf"

    def __init__(self, path: Path, tokenizer_path: Path | None = None):
        self.path = Path(path)
        if tokenizer_path is not None and not Path(tokenizer_path).is_file():
            raise file_error(tokenizer_path, "tokenizer not found")
        self._tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
        if not self.path.is_file():
            raise file_error(self.path, "missing (expected a .gguf file)" if not self.path.exists() else "not a file")
        try:
            self._reader = _Reader(self.path, "r")
        except Exception as e:  # GGUFReader raises ValueError/struct/numpy errors on bad or cut files
            raise file_error(self.path, f"not a readable GGUF file, or truncated ({type(e).__name__}: {e})") from None
        self._fields = self._reader.fields

        split = self._get("split.count", None, int_in, 0, 1 << 16)
        if split is not None and split > 1:
            raise file_error(
                self.path, f"is one part of a {split}-part split GGUF; merge it first (llama-gguf-split --merge)"
            )
        arch = self._get("general.architecture", None, str_of, 256)
        if arch != "llama":
            raise file_error(self.path, f"GGUF architecture is {arch!r}; only 'llama' is supported")

        self._tokens = self._get_strings("tokenizer.ggml.tokens", MODEL_LIMITS["vocab_size"][1])
        self.args = self._model_args()
        self.model_name = self._get("general.name", None, str_of, 1024) or self.path.stem
        self._index = self._tensor_index()

    # -- metadata -----------------------------------------------------------------------------

    def _get(self, key: str, default=_REQUIRED, reader=None, *args):
        """The value of a metadata key, checked by `reader(value, key, *args)` (runtime/validate.py)."""
        field = self._fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise file_error(self.path, f"missing GGUF metadata key {key}")
            return default
        try:
            value = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise file_error(self.path, f"unreadable GGUF metadata key {key} ({type(e).__name__}: {e})") from None
        try:
            return value if reader is None else reader(value, key, *args)
        except FieldError as e:
            raise e.at(self.path) from None

    def _get_strings(self, key: str, max_len: int) -> list[str] | None:
        return self._get(key, None, entries, max_len, str_of)

    def _model_args(self) -> ModelArgs:
        g = lambda key, default=_REQUIRED: self._get(f"llama.{key}", default)  # noqa: E731
        experts = self._get("llama.expert_count", 0, int_in, 0, 1 << 16)
        if experts:
            raise file_error(self.path, f"is a mixture-of-experts model ({experts} experts); not supported")
        scaling = self._get("llama.rope.scaling.type", None, str_of, 256)
        if scaling not in (None, "none"):
            raise file_error(self.path, f"uses RoPE scaling {scaling!r}; not supported")
        if "rope_freqs.weight" in {t.name for t in self._reader.tensors}:
            raise file_error(self.path, "holds rope_freqs.weight (Llama 3.1-style RoPE scaling); not supported")

        if self._tokens is not None:
            vocab_size = len(self._tokens)
        else:
            vocab_size = self._get("llama.vocab_size", None, int_in, *MODEL_LIMITS["vocab_size"])
            if vocab_size is None:
                raise file_error(self.path, "has neither tokenizer.ggml.tokens nor llama.vocab_size")
        stated = self._get("llama.vocab_size", None, int_in, *MODEL_LIMITS["vocab_size"])
        if stated is not None and stated != vocab_size:
            raise file_error(
                self.path, f"llama.vocab_size {stated} disagrees with the {vocab_size} tokens of tokenizer.ggml.tokens"
            )

        # Types and ranges are ModelArgs' (one owner); a refusal names the GGUF key.
        defaults = {"n_kv_heads": None, "rope_theta": 10000.0}
        values = {field: _clean_float(g(key, defaults.get(field, _REQUIRED)))
                  for field, key in GGUF_KEYS.items() if field != "vocab_size"}
        try:
            args = ModelArgs(**values, vocab_size=vocab_size)
        except FieldError as e:
            key = f"llama.{GGUF_KEYS[e.field]}" if e.field in GGUF_KEYS else e.field
            raise file_error(self.path, f"{key}: {e.problem}") from None
        for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
            value = g(key, None)
            if value is not None and value != args.head_dim:
                raise file_error(
                    self.path, f"llama.{key} is {value}, but dim/n_heads is {args.head_dim}; not supported"
                )
        return args

    def _tensor_index(self) -> dict[str, object]:
        """Meta name -> ReaderTensor, with every name and shape checked against ModelArgs."""
        per_layer = layer_shapes(self.args)
        expected = {f"layers.{i}.{k}": v for i in range(self.args.n_layers) for k, v in per_layer.items()}
        expected.update(global_shapes(self.args))
        index = {}
        for t in self._reader.tensors:
            meta = self._meta_name(t.name)
            if meta is None:
                raise file_error(self.path, f"unexpected tensor {t.name} (not part of a plain llama model)")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            allowed = FLOAT_TYPES if len(expected[meta]) == 1 else MATRIX_TYPES
            if t.tensor_type.name not in allowed:
                raise file_error(self.path, f"tensor {t.name} has type {t.tensor_type.name}, not a type a llama "
                                            f"{'norm' if len(expected[meta]) == 1 else 'weight'} is stored in")
            if shape != expected[meta]:
                raise file_error(
                    self.path,
                    f"tensor {t.name} has shape {list(shape)} ([out, in]);"
                    f" the model's hyper-parameters need {list(expected[meta])}",
                )
            if int(t.data.nbytes) != int(t.n_bytes):
                raise file_error(self.path, f"tensor {t.name} is cut short (file truncated?)")
            index[meta] = t
        missing = [m for m in expected if m not in index and m != "output.weight"]
        if missing:
            gguf_names = {v: k for k, v in GLOBAL_NAMES.items()}
            first = missing[0]
            if first.startswith("layers."):
                _, i, rest = first.split(".", 2)
                gname = "blk." + i + "." + {v: k for k, v in LAYER_NAMES.items()}[rest]
            else:
                gname = gguf_names[first]
            raise file_error(self.path, f"missing tensor {gname} ({len(missing)} missing in all)")
        return index

    def _meta_name(self, name: str) -> str | None:
        if name in GLOBAL_NAMES:
            return GLOBAL_NAMES[name]
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
            i = int(parts[1])
            if i < self.args.n_layers:
                return f"layers.{i}.{LAYER_NAMES[parts[2]]}"
        return None

    @functools.cached_property
    def source_digests(self) -> dict[str, str]:
        files = [self.path] if self._tokenizer_path is None else [self.path, self._tokenizer_path]
        return {f.name: sha256_file(f) for f in files}

    # -- tensors ------------------------------------------------------------------------------

    def _load(self, meta: str) -> torch.Tensor:
        t = self._index[meta]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            problem = f"tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize"
            raise file_error(self.path, problem) from None
        except (ValueError, TypeError) as e:
            problem = f"tensor {t.name} ({t.tensor_type.name}) could not be dequantized ({e})"
            raise file_error(self.path, problem) from None
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if not arr.flags.writeable or not arr.flags.c_contiguous:  # f32 comes back as a view of the map
            arr = np.array(arr, dtype=np.float32, order="C")
        tensor = torch.from_numpy(arr)
        check_finite(self.path, t.name, tensor)
        return tensor

    def global_tensors(self) -> dict[str, torch.Tensor]:
        emb = self._load("tok_embeddings.weight")
        out = self._load("output.weight") if "output.weight" in self._index else emb.clone()  # absent: tied
        return {"tok_embeddings.weight": emb, "norm.weight": self._load("norm.weight"), "output.weight": out}

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.args.n_layers:
            raise IndexError(f"layer {i} out of range for {self.args.n_layers} layers")
        return {name: self._load(f"layers.{i}.{name}") for name in LAYER_TENSORS}

    @property
    def tied_embeddings(self) -> bool:
        return "output.weight" not in self._index

    # -- tokenizer ----------------------------------------------------------------------------

    @functools.cached_property
    def tokenizer(self) -> TokenizerSource:
        """--tokenizer's file, else the embedded tokenizer: a byte-level BPE as an HF tokenizer.json,
        a sentencepiece vocabulary as a tokenizer.model. Built on first use, so a caller that brings
        its own tokenizer never trips over an embedded one we cannot convert."""
        if self._tokenizer_path is not None:
            return self._given_tokenizer(self._tokenizer_path)
        model = self._get("tokenizer.ggml.model", None, str_of, 256)
        if model is None or self._tokens is None:
            raise file_error(self.path, "has no embedded tokenizer; pass --tokenizer with the model's "
                                        "tokenizer.model or tokenizer.json")
        if model == "llama":
            return self._sentencepiece_tokenizer()
        if model != "gpt2":
            raise file_error(self.path, f"embedded tokenizer type {model!r} is not supported; pass --tokenizer "
                                        "with the model's tokenizer.model or tokenizer.json")
        return self._byte_level_tokenizer()

    def _given_tokenizer(self, path: Path) -> TokenizerSource:
        """A tokenizer.model or tokenizer.json in place of the embedded one; BOS/EOS ids from the
        GGUF's metadata where it has them."""
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            data = path.read_bytes()
            try:
                n = Tokenizer.from_str(data.decode("utf-8")).get_vocab_size(with_added_tokens=True)
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise file_error(path, f"not a tokenizer.json ({e})") from None
            add_bos = self._get("tokenizer.ggml.add_bos_token", None, bool_of)
            tok = TokenizerSource(kind="hf", data=data, bos_id=None, eos_id=None,
                                  add_bos=bool(add_bos) if add_bos is not None else False, vocab_size=n)
        else:
            from toolchain.meta_source import _read_sentencepiece

            tok = _read_sentencepiece(path)
        if tok.vocab_size > self.args.vocab_size:
            raise file_error(path, f"has {tok.vocab_size} tokens; the model {self.path} has {self.args.vocab_size}")
        vocab = self.args.vocab_size
        bos, eos = (self._get(f"tokenizer.ggml.{k}_token_id", None, int_in, 0, (1 << 31) - 1) for k in ("bos", "eos"))
        return dataclasses.replace(tok, bos_id=bos if bos is not None and 0 <= bos < vocab else tok.bos_id,
                                   eos_id=eos if eos is not None and 0 <= eos < vocab else tok.eos_id)

    def _sentencepiece_tokenizer(self) -> TokenizerSource:
        """llama.cpp's converter stores a sentencepiece model's pieces, scores and piece types
        (tokenizer.ggml.model 'llama'); they are written back into a sentencepiece model (BPE with
        byte fallback, no normalization but the dummy-prefix space, as llama.cpp's tokenizer runs it)."""
        import sentencepiece as spm

        tokens = self._tokens
        scores = self._get("tokenizer.ggml.scores", None, entries, len(tokens), number_in, -1e30, 1e30)
        types = self._get("tokenizer.ggml.token_type", None, entries, len(tokens), int_in, 0, 255)
        for key, values in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
            if values is None or len(values) != len(tokens):
                got = "missing" if values is None else f"{len(values)} entries"
                raise file_error(self.path, f"{key} is {got}; a sentencepiece vocabulary needs one per token "
                                            f"({len(tokens)}); pass --tokenizer tokenizer.model")
        bad = next((t for t in types if t not in _SP_TYPES), None)
        if bad is not None:
            raise file_error(self.path, f"tokenizer.ggml.token_type holds {bad}, not a sentencepiece piece type")
        unk = self._token_id("tokenizer.ggml.unknown_token_id")
        if unk is None:
            unk = next((i for i, t in enumerate(types) if t == 2), None)  # the UNKNOWN piece
        bos, eos = self._token_id("tokenizer.ggml.bos_token_id"), self._token_id("tokenizer.ggml.eos_token_id")
        space_prefix = self._get("tokenizer.ggml.add_space_prefix", True, bool_of)
        data = sentencepiece_model_bytes(tokens, scores, types, unk, bos, eos, bool(space_prefix))
        try:
            spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, TypeError) as e:
            raise file_error(self.path, f"embedded sentencepiece vocabulary is inconsistent ({e})") from None
        add_bos = self._get("tokenizer.ggml.add_bos_token", None, bool_of)
        return TokenizerSource(kind="sentencepiece", data=data, bos_id=bos, eos_id=eos,
                               add_bos=True if add_bos is None else bool(add_bos),  # LLaMA's convention
                               vocab_size=len(tokens))

    def _token_id(self, key: str) -> int | None:
        return self._get(key, None, int_in, 0, len(self._tokens) - 1)

    def _byte_level_tokenizer(self) -> TokenizerSource:
        from tokenizers import AddedToken, Tokenizer, decoders, processors
        from tokenizers.models import BPE

        tokens = self._tokens
        types = self._get("tokenizer.ggml.token_type", None, list_of, len(tokens)) or [_NORMAL] * len(tokens)
        merges = self._get_strings("tokenizer.ggml.merges", 1 << 24) or []
        if len(types) != len(tokens):
            raise file_error(self.path, f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        pre = self._get("tokenizer.ggml.pre", None, str_of, 256)
        pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(self.path, pre)

        # A normal token is spelled in GPT-2's byte-level alphabet; one that is not (llama.cpp
        # writes a few undecodable ones raw) is respelled so the merges that name it still resolve.
        alphabet, spelling = _byte_level_alphabet()
        vocab = {}
        for i, (tok, kind) in enumerate(zip(tokens, types)):
            if kind == _NORMAL and not set(tok) <= alphabet:
                tok = "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab[tok] = i
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise file_error(self.path, f"malformed merge {m!r} in tokenizer.ggml.merges")
            pairs.append((a, b))
        check_bpe(self.path, vocab, pairs)
        bpe = hf_call(self.path, "embedded BPE vocabulary is inconsistent", BPE, vocab, pairs, byte_fallback=False,
                      fuse_unk=False, ignore_merges=ignore_merges)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
        if special:
            tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)
        n = tok.get_vocab_size(with_added_tokens=True)
        if n != len(tokens):
            raise file_error(self.path, f"embedded tokenizer has {len(tokens)} tokens but only {n} distinct ones")

        add_bos = self._get("tokenizer.ggml.add_bos_token", None, bool_of)
        return TokenizerSource(
            kind="hf",
            data=tok.to_str().encode("utf-8"),
            bos_id=self._token_id("tokenizer.ggml.bos_token_id"),
            eos_id=self._token_id("tokenizer.ggml.eos_token_id"),
            add_bos=bool(add_bos) if add_bos is not None else False,  # gpt2-style vocabularies default to no BOS
            vocab_size=len(tokens),
        )

    def close(self) -> None:
        # Drop every view of the memory map; numpy closes the file when the last one goes.
        self._reader = self._fields = self._index = None


# -- sentencepiece models, written as protobuf (sentencepiece_model.proto) without the protobuf package ----

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative ids (-1: none) as two's complement, as protobuf writes int32
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, (bytes, str)):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(raw)) + raw
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def sentencepiece_model_bytes(tokens, scores, types, unk: int | None, bos: int | None, eos: int | None,
                              add_dummy_prefix: bool) -> bytes:
    """A serialized sentencepiece ModelProto: the pieces (piece 1, score 2, type 3), a TrainerSpec
    (model_type 3 = BPE, byte_fallback 35, unk/bos/eos/pad ids 40-43) and an identity NormalizerSpec
    (name 1, add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5)."""
    out = bytearray()
    for tok, score, kind in zip(tokens, scores, types):
        piece = _field(1, tok) + _field(2, float(score)) + (b"" if kind == _NORMAL else _field(3, kind))
        out += _field(1, piece)
    ids = [(40, unk), (41, bos), (42, eos), (43, None)]
    trainer = _field(3, 2) + _field(4, len(tokens)) + _field(35, 1) + b"".join(
        _field(n, -1 if v is None else v) for n, v in ids)
    normalizer = _field(1, "identity") + _field(3, int(add_dummy_prefix)) + _field(4, 0) + _field(5, 1)
    return bytes(out + _field(2, trainer) + _field(3, normalizer))


# -- byte-level pre-tokenizers, keyed by tokenizer.ggml.pre ------------------------------------

# GPT-2's split (what ByteLevel(use_regex=True) applies): llama.cpp's "gpt2".
# llama.cpp's "smollm" (and the starcoder family it shares code with) first isolates every digit
# (\p{N}), then applies GPT-2's split: the original SmolLM2 tokenizer.json spells this
# Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
_GPT2 = ("gpt2", "default", None)
# Llama 3 (llama.cpp "llama-bpe"): HF's tokenizer.json splits with this regex, then ByteLevel
# without its own regex, and its BPE has ignore_merges=True (llama.cpp mirrors both).
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(path, pre):
    """(pre_tokenizer, ignore_merges) for a tokenizer.ggml.pre value. An unknown value is an error,
    not a guess: a wrong split changes token ids silently."""
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in _DIGITS_THEN_GPT2:
        digits_then_gpt2 = [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)]
        return pt.Sequence(digits_then_gpt2), False
    if pre in _GPT2:
        return pt.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _LLAMA3:
        split = pt.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False)
        return pt.Sequence([split, pt.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    known = ", ".join(repr(p) for p in (*_DIGITS_THEN_GPT2, *_GPT2[:2], *_LLAMA3))
    raise file_error(
        path,
        f"byte-level pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported (known: {known});"
        " pass --tokenizer with the model's tokenizer.json",
    )


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> tuple[frozenset[str], dict[int, str]]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    spelling = {b: chr(c) for b, c in zip(bs, cs)}
    return frozenset(spelling.values()), spelling


__all__ = ["GGUFSource", "GLOBAL_NAMES", "LAYER_NAMES", "HscError"]
