"""Tokenizers the runtime can load: sentencepiece `tokenizer.model` and HF `tokenizer.json`.

`encode` never adds special tokens: whether a BOS goes in front is the scorer's decision, made
from a recorded policy (see runtime/scoring.py), so both backends behave the same way here.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import file_error
from runtime.validate import Fields, object_of, parse_json, read_bounded

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

            text = read_bounded(path, TOKENIZER_MAX_BYTES, "a tokenizer.json")
            model = Fields(parse_json(text, path), path).obj("model", default=None)
            if model is not None and model.get("type", None) == "BPE":
                for key in ("continuing_subword_prefix", "end_of_word_suffix"):  # byte-level BPE has neither
                    if model.get(key, None):
                        raise model.fail(key, "is not supported (hsc reads byte-level BPE vocabularies)")
                vocab = model.read(object_of, "vocab")
                merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.list("merges", 1 << 24)]
                check_bpe(path, vocab, merges)
            self._hf = hf_call(path, "not a tokenizer.json", HFTokenizer.from_str, text.decode("utf-8"))
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self._encode = lambda text: hf_call(path, "cannot encode", self._hf.encode, text,
                                                add_special_tokens=False).ids
        else:
            raise file_error(path, f"unknown tokenizer kind {kind!r}")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return list(self._encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return [e.ids for e in hf_call(self.path, "cannot encode", self._hf.encode_batch, texts,
                                           add_special_tokens=False)]
        return [list(ids) for ids in self._sp.EncodeAsIds(texts)]


def hf_call(path: Path, problem: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) from the tokenizers library, whose failures on a malformed vocabulary are one
    line naming `path`: a bare Exception, or a Rust panic (pyo3's PanicException, which derives from
    BaseException, so `except Exception` would let it through)."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit
        raise file_error(path, f"{problem} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def check_bpe(path: Path, vocab: dict, merges: list) -> None:
    """A BPE vocabulary the tokenizers library can build: ids are integers, each merge is two tokens of
    the vocabulary whose join is one too. The library would report some of these with a Rust panic,
    printed to stderr whether or not it is caught."""
    for token, i in vocab.items():
        if type(i) is not int or not 0 <= i < 1 << 31:
            raise file_error(path, f"token {token[:40]!r} has id {str(i)[:40]}, not an integer 0..2^31-1")
    for k, merge in enumerate(merges):
        if (type(merge) not in (list, tuple) or len(merge) != 2 or not all(type(t) is str for t in merge)
                or not all(t in vocab for t in (*merge, "".join(merge)))):
            raise file_error(path, f"merge {k} {str(merge)[:60]} is not two tokens of the vocabulary that join "
                                   "into a third")
