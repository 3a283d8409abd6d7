"""Tokenizer fidelity: the LLaMA tokenizer as hsc uses it vs Hugging Face's fast tokenizer built from the
same tokenizer.model, on every string hsc tokenizes for HellaSwag.

The strings are exactly what runtime/scoring.py encodes: each item's context and each context+ending
(after lm-eval's move of the context's trailing spaces). Three tokenizers:

- hsc: runtime.tokenizer.Tokenizer("sentencepiece", tokenizer.model), what a Meta or HF checkpoint with
  a tokenizer.model records (the sentencepiece library);
- hf-fast: transformers' LlamaTokenizer built from the same tokenizer.model (its convert_slow_tokenizer
  path, a `tokenizers` BPE), encoding without special tokens; also what a checkpoint that ships only
  that tokenizer.json would get (runtime.tokenizer.Tokenizer("hf", ...) runs the same `tokenizers` object);
- gguf-rebuilt: the sentencepiece model hsc rebuilds from a GGUF's tokens/scores/types
  (toolchain.gguf_source.sentencepiece_model_bytes), as a LLaMA-1/2 GGUF stores them.

Every string whose ids differ from hsc's is listed in the JSON output with both id sequences.
Needs `transformers` and `protobuf` (pip install transformers protobuf).

    PYTHONPATH=. python3 docs/profiling/tokenizer_fidelity.py [--tokenizer shared/data/llama-tokenizer.model]
        [--data shared/data/hellaswag_val_full.txt.bz2] [--output fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from runtime.hellaswag import load_items
from runtime.scoring import split_context
from runtime.tokenizer import Tokenizer


def hellaswag_strings(items) -> list[str]:
    """Every distinct string build_requests encodes, in first-seen order."""
    out: dict[str, None] = {}
    for item in items:
        for ending in item.endings:
            ctx, cont = split_context(item.query, " " + ending)
            out.setdefault(ctx)
            out.setdefault(ctx + cont)
    return list(out)


def hf_fast(tokenizer_model: Path):
    """transformers' fast LLaMA tokenizer converted from tokenizer.model (the `tokenizers` object)."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(tokenizer_model, Path(d) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(d).backend_tokenizer


def gguf_rebuilt(tokenizer_model: Path):
    """The sentencepiece model hsc rebuilds from a GGUF vocabulary holding this model's pieces."""
    import sentencepiece as spm

    from tests.tiny_gguf import sentencepiece_vocab
    from toolchain.gguf_source import sentencepiece_model_bytes

    tokens, scores, types, (unk, bos, eos) = sentencepiece_vocab(tokenizer_model)
    return spm.SentencePieceProcessor(model_proto=sentencepiece_model_bytes(tokens, scores, types, unk, bos, eos, True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, default=Path("shared/data/llama-tokenizer.model"))
    ap.add_argument("--data", default=None, help="as hsc run --data [default: the shared full validation file]")
    ap.add_argument("--output", type=Path, default=None, help="write the numbers and every difference here (JSON)")
    a = ap.parse_args()

    items, source = load_items(a.data)
    texts = hellaswag_strings(items)
    t0 = time.perf_counter()
    hsc = Tokenizer("sentencepiece", a.tokenizer, None, None).encode_batch(texts)
    fast = [e.ids for e in hf_fast(a.tokenizer).encode_batch(texts, add_special_tokens=False)]
    rebuilt = [list(ids) for ids in gguf_rebuilt(a.tokenizer).EncodeAsIds(texts)]
    report = {"data": source, "items": len(items), "strings": len(texts), "tokens": sum(map(len, hsc)),
              "seconds": round(time.perf_counter() - t0, 1)}
    for name, ids in (("hf-fast", fast), ("gguf-rebuilt", rebuilt)):
        diffs = [{"text": t, "hsc": a_, name: b} for t, a_, b in zip(texts, hsc, ids) if a_ != b]
        report[name] = {"identical": len(texts) - len(diffs), "different": len(diffs), "differences": diffs}
        print(f"{name}: {len(texts) - len(diffs)} of {len(texts)} strings with identical ids, {len(diffs)} differ")
        for d in diffs[:5]:
            print(f"  {d['text']!r}\n    hsc {d['hsc']}\n    {name} {d[name]}")
    print(f"{report['items']} items, {report['strings']} distinct strings, {report['tokens']} tokens (hsc)")
    if a.output:
        a.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
