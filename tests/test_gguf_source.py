"""GGUFSource: tiny GGUF round trips, the embedded tokenizer, user errors, and the real SmolLM2."""

from __future__ import annotations

import hashlib

import gguf
import pytest
import torch

from runtime.config import LAYER_TENSORS, ModelArgs, global_shapes, layer_shapes
from runtime.errors import HscError
from runtime.tokenizer import Tokenizer
from tests.tiny_gguf import MIN_VOCAB, write_tiny_gguf
from toolchain.gguf_source import GGUFSource

ARGS = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=MIN_VOCAB + 4,
    norm_eps=1e-6, rope_theta=500000.0, hidden_dim=96, max_seq_len=256,
)


def _tiny(tmp_path, tensor_type="f32", tied=False, name="tiny.gguf", **kw):
    path = tmp_path / name
    return path, write_tiny_gguf(path, ARGS, seed=3, tensor_type=tensor_type, tied=tied, **kw)


def _hf_tokenizer(tmp_path, source) -> Tokenizer:
    tok = source.tokenizer
    path = tmp_path / "tokenizer.json"
    path.write_bytes(tok.data)
    return Tokenizer(tok.kind, path, tok.bos_id, tok.eos_id)


# -- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tensor_type", ["f32", "f16", "bf16", "q8_0", "q4_1"])
def test_round_trip(tmp_path, tensor_type):
    path, truth = _tiny(tmp_path, tensor_type)
    with GGUFSource(path) as src:
        assert src.args == ARGS
        assert src.source_format == "gguf"
        assert src.model_name == "tiny-llama"
        assert src.source_digests == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
        g = src.global_tensors()
        assert set(g) == set(global_shapes(ARGS))
        for name, t in g.items():
            assert t.dtype == torch.float32 and t.shape == global_shapes(ARGS)[name]
            assert torch.equal(t, truth[name]), name
        for i in range(ARGS.n_layers):
            layer = src.layer_tensors(i)
            assert list(layer) == list(LAYER_TENSORS)
            for name, t in layer.items():
                assert t.dtype == torch.float32 and t.shape == layer_shapes(ARGS)[name]
                assert t.is_contiguous()
                assert torch.equal(t, truth[f"layers.{i}.{name}"]), (i, name)
        with pytest.raises(IndexError):
            src.layer_tensors(ARGS.n_layers)


def test_quantized_values_are_quantized(tmp_path):
    """The q4_1 ground truth really went through 4 bits (guards against a helper that wrote f32)."""
    _, f32 = _tiny(tmp_path, "f32", name="a.gguf")
    _, q4 = _tiny(tmp_path, "q4_1", name="b.gguf")
    w = "layers.0.attention.wq.weight"
    assert not torch.equal(f32[w], q4[w])
    assert torch.allclose(f32[w], q4[w], atol=0.25)
    assert torch.equal(f32["layers.0.attention_norm.weight"], q4["layers.0.attention_norm.weight"])  # norms stay f32


def test_tied_embeddings(tmp_path):
    path, truth = _tiny(tmp_path, "q8_0", tied=True)
    with GGUFSource(path) as src:
        assert src.tied_embeddings
        g = src.global_tensors()
        assert torch.equal(g["output.weight"], g["tok_embeddings.weight"])
        assert torch.equal(g["output.weight"], truth["output.weight"])
        assert g["output.weight"].data_ptr() != g["tok_embeddings.weight"].data_ptr()  # a copy, not an alias


def test_model_name_falls_back_to_stem(tmp_path):
    path = tmp_path / "nameless.gguf"
    write_tiny_gguf(path, ARGS, seed=0, name=None)
    with GGUFSource(path) as src:
        assert src.model_name == "nameless"


# -- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_loads_in_runtime(tmp_path):
    path, _ = _tiny(tmp_path)
    with GGUFSource(path) as src:
        info = src.tokenizer
        tok = _hf_tokenizer(tmp_path, src)
    assert (info.kind, info.bos_id, info.eos_id, info.add_bos, info.vocab_size) == ("hf", 0, 1, False, ARGS.vocab_size)
    assert tok.vocab_size == ARGS.vocab_size
    ids = tok.encode("the man is on the mat")
    assert tok._hf.decode(ids) == "the man is on the mat"
    vocab = tok._hf.get_vocab()
    assert tok.encode(" the") == [vocab["Ġthe"]]
    assert tok.encode(" man") == [vocab["Ġman"]]
    assert tok.encode("<s>x</s>") == [0, vocab["x"], 1]  # control tokens are special added tokens
    assert tok.encode_batch(["a", " the"]) == [[vocab["a"]], [vocab["Ġthe"]]]
    assert tok.encode("héllo") and tok._hf.decode(tok.encode("héllo")) == "héllo"  # byte-level: no unknowns


def test_add_bos_recorded(tmp_path):
    path, _ = _tiny(tmp_path, add_bos=True)
    with GGUFSource(path) as src:
        assert src.tokenizer.add_bos is True


@pytest.mark.parametrize(
    "pre, pieces",
    [("smollm", ["2", "0", "2", "4", "Ġyears"]), ("gpt2", ["2024", "Ġyears"]), (None, ["2024", "Ġyears"]),
     ("llama-bpe", ["202", "4", "Ġyears"])],
)
def test_pre_tokenizer_follows_ggml_pre(tmp_path, pre, pieces):
    path, _ = _tiny(tmp_path, pre=pre)
    with GGUFSource(path) as src:
        tok = _hf_tokenizer(tmp_path, src)
    assert [p for p, _ in tok._hf.pre_tokenizer.pre_tokenize_str("2024 years")] == pieces


def test_unknown_pre_tokenizer_is_an_error_on_use(tmp_path):
    path, _ = _tiny(tmp_path, pre="qwen2")
    with GGUFSource(path) as src:  # weights stay readable: the user may bring a tokenizer
        assert src.args == ARGS
        with pytest.raises(HscError, match="qwen2") as e:
            src.tokenizer
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# -- user errors --------------------------------------------------------------------------------


def test_wrong_architecture(tmp_path):
    path, _ = _tiny(tmp_path, arch="qwen2")
    with pytest.raises(HscError) as e:
        GGUFSource(path)
    assert str(path) in str(e.value) and "qwen2" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("keep", [0, 3, 40, 2000, 0.5, 0.999])
def test_truncated_file(tmp_path, keep):
    path, _ = _tiny(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(HscError) as e:
        GGUFSource(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(HscError, match="missing"):
        GGUFSource(tmp_path / "nope.gguf")


def test_shape_mismatch_names_file_and_tensor(tmp_path, monkeypatch):
    real = gguf.GGUFWriter.add_feed_forward_length
    monkeypatch.setattr(gguf.GGUFWriter, "add_feed_forward_length", lambda self, n: real(self, n + 32))
    path, _ = _tiny(tmp_path)
    with pytest.raises(HscError) as e:
        GGUFSource(path)
    msg = str(e.value)
    assert str(path) in msg and "blk.0.ffn_" in msg and "\n" not in msg


# -- the real model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    with GGUFSource(smollm2_path) as src:
        yield src


def test_find_smollm2(smollm2_path):
    assert smollm2_path.suffix == ".gguf" and smollm2_path.is_file()


def test_smollm2_args(smollm2):
    assert smollm2.args == ModelArgs(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
        norm_eps=1e-5, rope_theta=100000.0, hidden_dim=1536, max_seq_len=8192,
    )
    assert smollm2.tied_embeddings  # SmolLM2 ties its LM head to the embeddings


def test_smollm2_tokenizer(smollm2, tmp_path):
    info = smollm2.tokenizer
    # SmolLM2-Instruct: bos <|im_start|>, eos <|im_end|>, and the file says not to prepend BOS.
    assert (info.bos_id, info.eos_id, info.add_bos, info.vocab_size) == (1, 2, False, 49152)
    tok = _hf_tokenizer(tmp_path, smollm2)
    text = "Roof shingle removal: A man is sitting on a roof. he"
    ids = tok.encode(text)
    assert tok._hf.decode(ids) == text
    assert len(tok.encode(" he")) == 1 and len(tok.encode(" sitting")) == 1
    assert ids[-1] == tok.encode(" he")[0]
    assert len(tok.encode(" 1997")) == 5  # "smollm" pre-tokenizer: every digit on its own
    assert tok.encode("<|im_start|>") == [1]


def test_smollm2_layer(smollm2):
    layer = smollm2.layer_tensors(0)
    for name, t in layer.items():
        assert t.shape == layer_shapes(smollm2.args)[name]
        assert torch.isfinite(t).all()
    assert layer["attention.wq.weight"].abs().mean() > 0


# -- sentencepiece vocabularies (LLaMA-1/2 GGUFs from llama.cpp's converter) --------------------

SP_ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32000, hidden_dim=96, max_seq_len=1024)


def test_sentencepiece_vocab_rebuilt_as_the_real_tokenizer(tmp_path, shared_data):
    """The real LLaMA tokenizer.model's pieces/scores/types written into a GGUF and rebuilt: the same
    token ids as the original on HellaSwag contexts and context+ending strings (the full set:
    docs/profiling/tokenizer_fidelity.py), byte fallback included."""
    import sentencepiece as spm

    from runtime.hellaswag import load_six_line
    from tests.tiny_meta import TOKENIZER

    path = tmp_path / "sp.gguf"
    write_tiny_gguf(path, SP_ARGS, seed=0, vocab="llama", sentencepiece_model=TOKENIZER)
    with GGUFSource(path) as src:
        tok = src.tokenizer
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == ("sentencepiece", 1, 2, True, 32000)
    rebuilt = spm.SentencePieceProcessor(model_proto=tok.data)
    real = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    items = load_six_line(shared_data)[:1000]
    texts = [t for it in items for t in (it.query, *(it.query + " " + e for e in it.endings))]
    texts += ["byte fallback: \u2407 \U0001f600 \x01", "  two  spaces\n\ttab", ""]
    assert rebuilt.EncodeAsIds(texts) == real.EncodeAsIds(texts)
    assert 0x0A + 3 in rebuilt.EncodeAsIds("\n")  # <0x0A>: a byte piece


def test_sentencepiece_gguf_end_to_end(tmp_path, hsc, shared_data):
    import json

    import sentencepiece as spm

    from runtime.hellaswag import load_six_line
    from tests.test_end_to_end import N_ITEMS, check_against_reference
    from tests.tiny_meta import TOKENIZER

    sd = write_tiny_gguf(tmp_path / "sp.gguf", SP_ARGS, seed=int(torch.randint(2**31, ())), vocab="llama",
                         sentencepiece_model=TOKENIZER)
    assert hsc("compile", tmp_path / "sp.gguf", "--target", "cpu", "-o", tmp_path / "art")[0] == 0
    assert (tmp_path / "art" / "tokenizer.model").is_file()
    code, out, err = hsc("run", tmp_path / "art", "--data", shared_data, "--limit", N_ITEMS, "--output", tmp_path / "r")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "results.json").read_text())["bos"] is True
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    items = load_six_line(shared_data)[:N_ITEMS]
    check_against_reference(tmp_path / "r", sd, SP_ARGS, items, sp.EncodeAsIds, bos=1)


def test_tokenizer_option_for_a_gguf_without_one(tmp_path, hsc):
    """The error says to pass --tokenizer, and the CLI takes it."""
    from tests.tiny_meta import TOKENIZER

    path = tmp_path / "bare.gguf"
    write_tiny_gguf(path, SP_ARGS, seed=0, vocab="none")
    code, _, err = hsc("compile", path, "--target", "cpu", "-o", tmp_path / "a")
    assert code == 1 and err == f"hsc: error: {path}: has no embedded tokenizer; pass --tokenizer with the model's " \
                                "tokenizer.model or tokenizer.json\n"
    code, _, err = hsc("compile", path, "--target", "cpu", "--tokenizer", TOKENIZER, "-o", tmp_path / "a")
    assert code == 0, err
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    code, _, err = hsc("compile", path, "--target", "cpu", "--tokenizer", tmp_path / "nope.model", "-o", tmp_path / "b")
    assert code == 1 and err == f"hsc: error: {tmp_path / 'nope.model'}: tokenizer not found\n"


def test_sentencepiece_vocab_without_scores(tmp_path):
    from tests.tiny_meta import TOKENIZER

    path = tmp_path / "sp.gguf"
    write_tiny_gguf(path, SP_ARGS, seed=0, vocab="llama", sentencepiece_model=TOKENIZER)
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.scores"
    at = data.find(key)
    data[at:at + len(key)] = b"tokenizer.ggml.scorez"  # same length: the file stays readable
    path.write_bytes(bytes(data))
    with GGUFSource(path) as src, pytest.raises(HscError) as e:
        src.tokenizer
    assert str(e.value) == (f"{path}: tokenizer.ggml.scores is missing; a sentencepiece vocabulary needs one per "
                            "token (32000); pass --tokenizer tokenizer.model")
