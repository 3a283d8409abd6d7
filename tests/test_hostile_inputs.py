"""One test per class of damaged or hostile input that fuzzing finds (tests/fuzz.py): each is refused with
one line naming the file and the field, before it can hang, exhaust memory or score NaN."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.artifact import load_manifest, sha256_of
from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.hellaswag import MAX_FIELD_BYTES, load_split
from tests.fuzz import TIME_LIMIT_S, gguf_part_offset, patch
from tests.test_cli_errors import (COMPILE, art_copy, artifact, assert_nothing_left,  # noqa: F401 (fixtures)
                                   assert_one_line_error, ckpt, ckpt_master)
from tests.tiny_gguf import MIN_VOCAB, write_tiny_gguf

GGUF_ARGS = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=MIN_VOCAB, hidden_dim=64, max_seq_len=128)


@pytest.fixture
def art(art_copy) -> Path:
    return art_copy


@pytest.fixture
def gguf_path(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, GGUF_ARGS, seed=1)
    return path


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


# ---------------------------------------------------------------- manifest fields, in inspect and run


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["model"].update(hidden_dim="64"), "model.hidden_dim"),
    (lambda d: d["model"].update(hidden_dim=[64]), "model.hidden_dim"),
    (lambda d: d["model"].pop("vocab_size"), "model.vocab_size"),
    (lambda d: d["model"].update(dim=-16), "model.dim"),
    (lambda d: d["model"].update(n_heads=True), "model.n_heads"),
    (lambda d: d["model"].update(n_heads=3), "model.n_heads"),
    (lambda d: d["model"].update(n_kv_heads=3), "model.n_kv_heads"),
    (lambda d: d["model"].update(n_layers=1 << 40), "model.n_layers"),
    (lambda d: d["model"].update(norm_eps=float("nan")), "manifest.json"),
    (lambda d: d["mapping"].update(tp=2), "shards"),
    (lambda d: d["shards"][0].update(bytes=10**9), "shards[0].bytes"),
    (lambda d: d["tokenizer"].update(bos_id=10**6), "tokenizer.bos_id"),
    (lambda d: d.update(calibration={"item_ids": [[1]]}), "calibration.item_ids[0]"),
])
def test_manifest_field_of_the_wrong_type_or_range(hsc, art, shared_data, tmp_path, edit, field):
    _edit_json(art / "manifest.json", edit)
    assert_one_line_error(*hsc("inspect", art), "manifest.json", field)
    res = tmp_path / "res"
    assert_one_line_error(*hsc("run", art, "--data", shared_data, "--limit", 2, "--output", res), field)
    assert not res.exists()


def test_manifest_nested_deeply_or_huge(art):
    (art / "manifest.json").write_text('{"format_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(HscError, match="nested more than"):
        load_manifest(art)
    with open(art / "manifest.json", "wb") as f:  # sparse: the size alone refuses it, nothing is read
        f.truncate(1 << 30)
    with pytest.raises(HscError, match="too large for a manifest"):
        load_manifest(art)


def test_manifest_model_unlike_the_rank_file_refused_before_loading(art, monkeypatch):
    """The rank file's header is compared with the manifest's model before any tensor is read."""
    import runtime.artifact
    from runtime.artifact import build_model

    _edit_json(art / "manifest.json", lambda d: d["model"].update(hidden_dim=32))
    monkeypatch.setattr(runtime.artifact, "load_file", lambda *a, **k: pytest.fail("tensors were read"))
    with pytest.raises(HscError, match=r"rank0.safetensors: .*feed_forward.w1.weight has shape \[192, 64\], the manifest's model needs \[32, 64\]"):
        build_model(art, load_manifest(art), "cpu")


# ---------------------------------------------------------------- params.json


@pytest.mark.parametrize("edit, fragment", [
    (lambda p: p.update(n_heads=True), "n_heads: must be an integer, got a boolean"),
    (lambda p: p.update(n_layers="2"), "n_layers: must be an integer, got a string"),
    (lambda p: p.update(dim=64.0), "dim: must be an integer"),
    (lambda p: p.update(n_layers=10**12), "n_layers: 1000000000000 is outside 1..1024"),
    (lambda p: p.update(n_heads=3), "n_heads: 3 does not divide dim 64"),
    (lambda p: p.update(n_kv_heads=4, n_heads=2), "n_kv_heads: 4 does not divide n_heads 2"),
    (lambda p: p.update(norm_eps=0), "norm_eps: 0 is outside (0, 1]"),
    (lambda p: p.update(multiple_of=-256), "multiple_of"),
])
def test_params_json_values(hsc, ckpt, tmp_path, edit, fragment):
    _edit_json(ckpt / "params.json", edit)
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", ckpt, *COMPILE, "-o", out), "params.json", fragment)
    assert_nothing_left(out)


@pytest.mark.parametrize("text, fragment", [
    ('{"dim": 64, "n_layers": 2, "n_heads": 4, "x": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested more than"),
    ('{"dim": ' + "9" * 5000 + ', "n_layers": 1, "n_heads": 2}', "not valid JSON"),
    ('{"dim": 1e400, "n_layers": 1, "n_heads": 2}', "dim: must be an integer, got a number inf"),
    ('{"dim": NaN, "n_layers": 1, "n_heads": 2}', "NaN is not a number hsc accepts"),
])
def test_params_json_hostile_text(hsc, ckpt, tmp_path, text, fragment):
    (ckpt / "params.json").write_text(text)
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", ckpt, *COMPILE, "-o", out), "params.json", fragment)
    assert_nothing_left(out)


# ---------------------------------------------------------------- GGUF metadata and tensor types


@pytest.mark.parametrize("key, value, fragment", [
    ("llama.block_count", 0x7FFFFFFF, "llama.block_count: 2147483647 is outside 1..1024"),
    ("llama.context_length", 0, "llama.context_length: 0 is outside 1..1048576"),
    ("llama.attention.head_count", 0, "llama.attention.head_count: 0 is outside"),
    ("llama.embedding_length", 0xFFFFFFFF, "llama.embedding_length: 4294967295 is outside"),
])
def test_gguf_absurd_counts(hsc, gguf_path, tmp_path, key, value, fragment):
    offset, width = gguf_part_offset(gguf_path, key)
    patch(gguf_path, offset, value, width)
    out = tmp_path / "out" / "art"
    t0 = time.perf_counter()
    assert_one_line_error(*hsc("compile", gguf_path, *COMPILE, "-o", out), "tiny.gguf", fragment)
    assert time.perf_counter() - t0 < TIME_LIMIT_S  # refused before any work sized by the count
    assert_nothing_left(out)


def test_gguf_tensor_type_that_is_not_a_weight_type(hsc, gguf_path, tmp_path):
    """I32 has F32's size, so the bytes fit: without a check the norm would be read as integers."""
    from gguf import GGMLQuantizationType as QT

    offset, width = gguf_part_offset(gguf_path, "blk.0.attn_norm.weight", part=4)
    patch(gguf_path, offset, int(QT.I32), width)
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", gguf_path, *COMPILE, "-o", out), "tiny.gguf",
                          "tensor blk.0.attn_norm.weight has type I32")
    assert_nothing_left(out)


def test_gguf_float_where_a_count_belongs(hsc, gguf_path, tmp_path):
    """The key's value type turned from UINT32 to FLOAT32 (same size, so the file still parses)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(gguf_path), "r")
    field = reader.fields["llama.block_count"]
    offset = field.offset + sum(int(p.nbytes) for p in field.parts[:2])  # key length, key, then the type
    del reader
    patch(gguf_path, offset, int(GGUFValueType.FLOAT32), 4)
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", gguf_path, *COMPILE, "-o", out), "tiny.gguf",
                          "llama.block_count: must be an integer, got a number")


# ---------------------------------------------------------------- non-finite weights


def test_nan_in_a_meta_weight_refused_at_compile(hsc, ckpt, tmp_path):
    sd = torch.load(ckpt / "consolidated.00.pth", weights_only=True)
    sd["layers.0.attention.wq.weight"][3, 5] = float("nan")
    torch.save(sd, ckpt / "consolidated.00.pth")
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", ckpt, *COMPILE, "-o", out), "consolidated.00.pth",
                          "tensor layers.0.attention.wq.weight holds 1 non-finite value(s)", "[3, 5]")
    assert_nothing_left(out)


def test_inf_in_a_gguf_weight_refused_at_compile(hsc, gguf_path, tmp_path):
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r")
    t = next(t for t in reader.tensors if t.name == "output_norm.weight")
    offset = int(t.data_offset)
    del reader
    with open(gguf_path, "r+b") as f:
        f.seek(offset + 4)
        f.write(torch.tensor([float("inf")]).numpy().tobytes())
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", gguf_path, *COMPILE, "-o", out), "tiny.gguf",
                          "tensor output_norm.weight holds 1 non-finite value(s)", "[1]")
    assert_nothing_left(out)


def test_nan_embedding_row_with_consistent_checksums_stops_the_run(hsc, art, shared_data, tmp_path):
    """A broken conversion: the checksums agree with the damaged rank file, so only the scores show it."""
    from runtime.tokenizer import Tokenizer

    shard = art / "rank0.safetensors"
    sd = load_file(shard)
    manifest = json.loads((art / "manifest.json").read_text())
    tok = Tokenizer("sentencepiece", art / "tokenizer.model", None, None)
    sd["tok_embeddings.weight"][tok.bos_id] = float("nan")  # every item starts with BOS
    save_file(sd, shard, metadata={"format": "pt"})
    manifest["shards"][0].update(sha256=sha256_of(shard), bytes=shard.stat().st_size)
    (art / "manifest.json").write_text(json.dumps(manifest))
    res = tmp_path / "res"
    code, out, err = hsc("run", art, "--data", shared_data, "--limit", 3, "--output", res, "--engine", "reference")
    assert_one_line_error(code, out, err, "non-finite log-likelihoods (NaN or inf) for 3 of 3 items (0, 1, 2)")
    assert not (res / "results.json").exists()


# ---------------------------------------------------------------- tokenizer


def test_sentencepiece_model_without_bos_refused_at_compile(hsc, ckpt, tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    sentences = ["the quick brown fox jumps over the lazy dog"] * 50 + ["a man is sitting on a roof"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=30,
                                   bos_id=-1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (ckpt / "tokenizer.model").write_bytes(model.getvalue())
    out = tmp_path / "out" / "art"
    assert_one_line_error(*hsc("compile", ckpt, *COMPILE, "-o", out), "tokenizer.model", "has no BOS piece")
    assert_nothing_left(out)


# ---------------------------------------------------------------- HellaSwag data


def _jsonl(tmp_path, label_text: str, ending: str = "a ending") -> Path:
    doc = {"query": "A man is sitting on a roof.", "choices": [ending, "b", "c", "d"], "gold": "@LABEL@"}
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(doc).replace('"@LABEL@"', label_text) + "\n")
    return path


@pytest.mark.parametrize("label", ["1e400", "9" * 5000, '"0_1"', "true", "2.0", '" 12"', "-1"])
def test_hellaswag_labels(tmp_path, label):
    with pytest.raises(HscError, match=r"items.jsonl:1: (label|not valid JSON)") as e:
        load_split(str(_jsonl(tmp_path, label)))
    assert len(str(e.value)) < 300


def test_hellaswag_huge_ending_refused(hsc, artifact, tmp_path):
    path = _jsonl(tmp_path, "0", ending="x" * (10 << 20))
    res = tmp_path / "res"
    assert_one_line_error(*hsc("run", artifact, "--data", path, "--limit", 1, "--output", res),
                          "items.jsonl:1", "longer than")
    path = _jsonl(tmp_path, "0", ending="x" * (MAX_FIELD_BYTES + 1))
    with pytest.raises(HscError, match=f"at most {MAX_FIELD_BYTES}"):
        load_split(str(path))


def test_hellaswag_label_strings_that_are_numbers_still_read(tmp_path):
    items, _, _ = load_split(str(_jsonl(tmp_path, '"3"')))
    assert items[0].label == 3


def test_bpe_merge_outside_the_vocabulary_is_one_line_and_no_panic(tmp_path, capfd):
    """The tokenizers library panics (a Rust panic, printed to stderr) on such a merge: hsc refuses first."""
    from runtime.tokenizer import Tokenizer

    doc = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(HscError, match="tokenizer.json: merge 0 .* is not two tokens of the vocabulary"):
        Tokenizer("hf", path, None, None)
    doc["model"].update(vocab={"a": 0, "b": 1, "ab": -5})
    path.write_text(json.dumps(doc))
    with pytest.raises(HscError, match="tokenizer.json: token 'ab' has id -5"):
        Tokenizer("hf", path, None, None)
    assert capfd.readouterr().err == ""
