"""Test helper: write a tiny llama GGUF (weights + an embedded byte-level BPE tokenizer).

`write_tiny_gguf` returns the ground truth under Meta's names, as float32 in nn.Linear's [out, in]
layout. For quantized types the ground truth is the dequantized value of what was written, so a
reader can be compared exactly.
"""

from __future__ import annotations


import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from runtime.config import LAYER_TENSORS, ModelArgs, global_shapes, layer_shapes

TENSOR_TYPES = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_1": QT.Q4_1}

# GGUF name -> Meta name, relative to blk.N. / layers.N. Written out again here on purpose (not
# imported from toolchain/gguf_source.py): a wrong mapping there must not be mirrored by the writer.
_LAYER_NAMES = {
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
assert sorted(_LAYER_NAMES.values()) == sorted(LAYER_TENSORS)

# The tiny tokenizer: two control tokens, the 256 byte tokens, then one token per merge.
BOS, EOS = "<s>", "</s>"
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"),
    ("Ġ", "s"), ("o", "n"), ("Ġ", "w"), ("r", "e"), ("Ġ", "o"), ("a", "t"),
    ("Ġ", "c"), ("e", "n"), ("i", "s"), ("Ġ", "m"), ("a", "n"), ("Ġm", "an"),
]
MIN_VOCAB = 2 + 256 + len(MERGES)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE spelling)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny tokenizer, padded with unused [PADi] tokens."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"the tiny tokenizer needs vocab_size >= {MIN_VOCAB}, got {vocab_size}")
    spelling = bytes_to_unicode()
    tokens = [BOS, EOS] + [spelling[b] for b in range(256)]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * 256
    for a, b in MERGES:
        tokens.append(a + b)
        types.append(gguf.TokenType.NORMAL)
    assert len(set(tokens)) == len(tokens)
    for i in range(len(tokens), vocab_size):  # llama.cpp's converter pads exactly like this
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in MERGES]


def sentencepiece_vocab(model_file) -> tuple[list[str], list[float], list[int], tuple[int, int, int]]:
    """(pieces, scores, token types, (unk, bos, eos)) of a sentencepiece model, read the way
    llama.cpp's convert_hf_to_gguf.py (SentencePiece vocab) reads them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(int(kind))
    return tokens, scores, types, (sp.unk_id(), sp.bos_id(), sp.eos_id())


def _encode(name: str, x: np.ndarray, qtype: QT, writer: gguf.GGUFWriter) -> np.ndarray:
    """Write `x` ([out, in] float32) as `qtype`; return what a reader should get back."""
    if x.ndim == 1 or qtype == QT.F32:  # llama.cpp keeps norms in f32 whatever the file type
        writer.add_tensor(name, x)
        return x
    if qtype == QT.F16:
        writer.add_tensor(name, x.astype(np.float16))
        return x.astype(np.float16).astype(np.float32)
    packed = quantize(x, qtype)
    writer.add_tensor(name, packed, raw_dtype=qtype)
    return dequantize(packed, qtype).reshape(x.shape).astype(np.float32)


def write_tiny_gguf(
    path,
    args: ModelArgs,
    seed: int,
    tensor_type: str = "f32",
    tied: bool = False,
    *,
    arch: str = "llama",
    pre: str | None = "smollm",
    add_bos: bool | None = None,
    name: str | None = "tiny-llama",
    vocab: str = "gpt2",
    sentencepiece_model=None,
) -> dict[str, torch.Tensor]:
    """Write a tiny llama GGUF at `path`; return its float32 tensors under Meta's names.

    Quantized types need every input dimension to be a multiple of 32 (the block size).
    `tied` leaves out output.weight; the returned dict then holds a copy of the embeddings there.
    vocab: "gpt2" (the tiny byte-level BPE), "llama" (the pieces, scores and types of
    `sentencepiece_model`, as llama.cpp's converter stores a sentencepiece vocabulary; vocab_size must be
    its piece count) or "none" (no embedded tokenizer).
    """
    qtype = TENSOR_TYPES[tensor_type]
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, norm=False):
        # Weights ~ 1/sqrt(fan-in) like a trained model, so activations stay O(1) and fp32
        # round-off stays comparable to a real model's.
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        return (1.0 + 0.1 * t if norm else t / shape[-1] ** 0.5).numpy()

    w = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    if vocab == "gpt2":
        tokens, types, merges = tiny_vocab(args.vocab_size)
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    elif vocab == "llama":
        tokens, scores, types, (unk, bos, eos) = sentencepiece_vocab(sentencepiece_model)
        assert len(tokens) == args.vocab_size, "vocab_size must be the sentencepiece model's piece count"
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(unk)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
    else:
        assert vocab == "none", vocab
    if add_bos is not None:
        w.add_add_bos_token(add_bos)

    truth: dict[str, np.ndarray] = {}
    g = global_shapes(args)
    truth["tok_embeddings.weight"] = _encode("token_embd.weight", rand(g["tok_embeddings.weight"]), qtype, w)
    shapes = layer_shapes(args)
    for i in range(args.n_layers):
        for gname, meta in _LAYER_NAMES.items():
            x = rand(shapes[meta], norm=meta.endswith("norm.weight"))
            truth[f"layers.{i}.{meta}"] = _encode(f"blk.{i}.{gname}", x, qtype, w)
    truth["norm.weight"] = _encode("output_norm.weight", rand(g["norm.weight"], norm=True), qtype, w)
    if tied:
        truth["output.weight"] = truth["tok_embeddings.weight"].copy()
    else:
        truth["output.weight"] = _encode("output.weight", rand(g["output.weight"]), qtype, w)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in truth.items()}


__all__ = ["write_tiny_gguf", "sentencepiece_vocab", "tiny_vocab", "bytes_to_unicode", "MIN_VOCAB", "TENSOR_TYPES", "BOS", "EOS"]
