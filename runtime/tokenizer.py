"""Tokenizers the runtime can load: sentencepiece `tokenizer.model` and HF `tokenizer.json`.

`encode` never adds special tokens: whether a BOS goes in front is the scorer's decision, made
from a recorded policy (see runtime/scoring.py), so both backends behave the same way here.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import file_error

TOKENIZER_MAX_BYTES = 64 << 20  # LLaMA's tokenizer.model is 500 kB, Llama 3's tokenizer.json 9 MB


class Tokenizer:
    def __init__(self, kind: str, path: Path, bos_id: int | None, eos_id: int | None):
        self.kind, self.path, self.bos_id, self.eos_id = kind, Path(path), bos_id, eos_id
        if self.path.is_file() and self.path.stat().st_size > TOKENIZER_MAX_BYTES:
            raise file_error(path, f"larger than {TOKENIZER_MAX_BYTES:,} bytes: too large for a tokenizer")
        if kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.Load(str(path))
            except (OSError, RuntimeError, ValueError) as e:  # ValueError: a piece that is not UTF-8
                raise file_error(path, f"not a sentencepiece model ({e})") from None
            self.vocab_size = self._sp.GetPieceSize()
            if self.bos_id is None and self._sp.bos_id() >= 0:
                self.bos_id = self._sp.bos_id()
            self._encode = lambda text: self._sp.EncodeAsIds(text)
        elif kind == "hf":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise file_error(path, f"not a tokenizer.json ({e})") from None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self._encode = lambda text: self._hf.encode(text, add_special_tokens=False).ids
        else:
            raise file_error(path, f"unknown tokenizer kind {kind!r}")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return list(self._encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self._sp.EncodeAsIds(texts)]
