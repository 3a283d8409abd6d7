"""Hugging Face LLaMA checkpoints: the reader gives back Meta's tensors bit for bit (q/k un-permuted),
compiles and scores within 1e-4 of the float64 reference, and refuses bad input with one line."""

import json

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.hellaswag import load_six_line
from tests.test_end_to_end import N_ITEMS, check_against_reference
from tests.test_meta_source import assert_same, merged
from tests.tiny_hf import hf_permute, write_tiny_hf_checkpoint
from tests.tiny_meta import TOKENIZER
from toolchain.hf_source import HFSource, unpermute_rope_rows

# dim 64, 4 heads of 16; FFN 192.
MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=32)
GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)


def open_error(path) -> str:
    with pytest.raises(HscError) as e:
        HFSource(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (2, 1)])
def test_unpermute_inverts_hf_permute(heads):
    n_heads, rows = heads[0], heads[1] * 16
    w = torch.randn(rows, 48)
    back = unpermute_rope_rows(hf_permute(w, rows // 16), rows // 16)
    assert torch.equal(back, w)
    assert not torch.equal(hf_permute(w, rows // 16), w)


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("fmt, n_files", [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_reader_gives_meta_tensors(tmp_path, args, fmt, n_files):
    truth = write_tiny_hf_checkpoint(tmp_path / "hf", args, seed=n_files, fmt=fmt, n_files=n_files)
    with HFSource(tmp_path / "hf") as src:
        assert src.source_format == "hf" and src.model_name == "hf"
        assert src.args == ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=args.n_kv_heads, vocab_size=32000,
                                     hidden_dim=192)
        assert_same(merged(src), truth)
        tok = src.tokenizer
        assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == ("sentencepiece", 1, 2, True, 32000)
        assert tok.data == TOKENIZER.read_bytes()
        assert "config.json" in src.source_digests and "tokenizer.model" in src.source_digests


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tied_v5_config(tmp_path, dtype):
    truth = write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=3, dtype=dtype, tied=True, v5=True, add_bos=False)
    with HFSource(tmp_path / "hf") as src:
        assert src.tied and src.tokenizer.add_bos is False
        assert_same(merged(src), truth)


def test_same_tensors_as_the_meta_checkpoint(tmp_path):
    """The HF conversion of a Meta checkpoint reads back as that Meta checkpoint."""
    from tests.tiny_meta import write_tiny_meta_checkpoint
    from toolchain.meta_source import MetaSource

    write_tiny_meta_checkpoint(tmp_path / "meta", GQA, 2, seed=11)
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=11, fmt="safetensors", n_files=2)
    with MetaSource(tmp_path / "meta") as m, HFSource(tmp_path / "hf") as h:
        assert_same(merged(h), merged(m))


def test_tokenizer_json_and_add_bos_from_the_file(tmp_path):
    """No tokenizer.model: tokenizer.json is used; without add_bos_token, its post-processor decides."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel

    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0, add_bos=None)
    (tmp_path / "hf" / "tokenizer.model").unlink()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    with HFSource(tmp_path / "hf") as src:
        t = src.tokenizer
        assert (t.kind, t.bos_id, t.eos_id, t.add_bos, t.vocab_size) == ("hf", 1, 2, True, 4)
    tok.post_processor = None
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    with HFSource(tmp_path / "hf") as src:
        assert src.tokenizer.add_bos is False


# ---- end to end: compile + run vs the float64 reference ----


@pytest.mark.parametrize("args, fmt, n_files, tied", [
    (MHA, "safetensors", 1, False), (GQA, "safetensors", 3, True), (GQA, "bin", 2, False), (MHA, "bin", 1, True)],
    ids=["mha-st-1", "gqa-st-3-tied", "gqa-bin-2", "mha-bin-1-tied"])
def test_hf_checkpoint_end_to_end(tmp_path, hsc, shared_data, args, fmt, n_files, tied):
    sd = write_tiny_hf_checkpoint(tmp_path / "hf", args, seed=int(torch.randint(2**31, ())), fmt=fmt, n_files=n_files,
                                  tied=tied)
    art = tmp_path / "art"
    code, out, err = hsc("compile", tmp_path / "hf", "--target", "cpu", "--precision", "fp32", "-o", art)
    assert code == 0, err
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["provenance"]["source_format"] == "hf" and manifest["tokenizer"]["add_bos"] is True
    code, out, err = hsc("run", art, "--data", shared_data, "--limit", N_ITEMS, "--output", tmp_path / "res")
    assert code == 0, err
    full_args = ModelArgs(**{**args.__dict__, "vocab_size": 32000})
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    items = load_six_line(shared_data)[:N_ITEMS]
    check_against_reference(tmp_path / "res", sd, full_args, items, sp.EncodeAsIds, bos=sp.bos_id())


# ---- bad input: one line naming the file, through the CLI ----


def _edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _compile_error(hsc, ckpt, tmp_path) -> str:
    code, out, err = hsc("compile", ckpt, "--target", "cpu", "-o", tmp_path / "art")
    assert code == 1 and out.count("\n") <= 1, (out, err)
    assert err.startswith("hsc: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "art").exists()
    return err.removeprefix("hsc: error: ").strip()


@pytest.mark.parametrize("change, problem", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "field rope_scaling: RoPE scaling type 'linear' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "field rope_parameters: RoPE scaling type 'llama3'"),
    ({"sliding_window": 4096}, "field sliding_window: 4096: sliding-window attention is not supported"),
    ({"architectures": ["MistralForCausalLM"]}, "field architectures: ['MistralForCausalLM']: only LlamaForCausalLM"),
    ({"hidden_act": "gelu"}, "field hidden_act: 'gelu'"),
    ({"attention_bias": True}, "field attention_bias: True: a model with biases is not supported"),
    ({"num_hidden_layers": KeyError}, "missing field num_hidden_layers"),
    ({"rms_norm_eps": KeyError}, "missing field rms_norm_eps"),
    ({"hidden_size": "64"}, "field hidden_size: expected a positive integer, got '64'"),
    ({"tie_word_embeddings": "yes"}, "field tie_word_embeddings: expected true or false"),
    ({"head_dim": 32}, "field head_dim: 32 x 4 heads is not hidden_size 64"),
    ({"vocab_size": 31000}, "vocab_size 31000 is smaller than tokenizer.model's 32000 tokens"),
])
def test_config_refusals(tmp_path, hsc, change, problem):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0)
    _edit_config(tmp_path / "hf", **change)
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg.startswith(f"{tmp_path / 'hf' / 'config.json'}: ") and problem in msg, msg


def test_missing_shard_named_in_index(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0, n_files=3)
    (tmp_path / "hf" / "model-00002-of-00003.safetensors").unlink()
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg.startswith(f"{tmp_path / 'hf' / 'model-00002-of-00003.safetensors'}: missing, but "
                          "model.safetensors.index.json names it")


def test_index_naming_a_tensor_twice(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0, n_files=2)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    text = index.read_text()
    first = '"model.norm.weight": "model-00002-of-00002.safetensors"'
    assert first in text
    index.write_text(text.replace(first, first + ',\n    "model.norm.weight": "model-00001-of-00002.safetensors"'))
    assert _compile_error(hsc, tmp_path / "hf", tmp_path) == f"{index}: the index names 'model.norm.weight' twice"


def test_tensor_in_two_shards(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0, n_files=2)
    shard = tmp_path / "hf" / "model-00002-of-00002.safetensors"
    sd = load_file(shard)
    first = load_file(tmp_path / "hf" / "model-00001-of-00002.safetensors")
    sd["model.embed_tokens.weight"] = first["model.embed_tokens.weight"]
    save_file(sd, shard)
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg == (f"{shard}: holds tensor model.embed_tokens.weight, which model-00001-of-00002.safetensors holds "
                   "too") or msg.startswith(f"{shard}: holds tensor model.embed_tokens.weight, but the index puts it")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_shape_mismatch(tmp_path, hsc, fmt):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0, fmt=fmt)
    _edit_config(tmp_path / "hf", num_key_value_heads=4)  # the weights are GQA with 2
    file = tmp_path / "hf" / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg == (f"{file}: tensor model.layers.0.self_attn.k_proj.weight has shape (32, 64), expected (64, 64) "
                   "from config.json")


def test_missing_tensor_and_untied_head(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0, tied=True)
    _edit_config(tmp_path / "hf", tie_word_embeddings=False)
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg.startswith(f"{tmp_path / 'hf' / 'model.safetensors'}: missing tensor lm_head.weight")
    assert "tie_word_embeddings is false" in msg


def test_non_finite_values(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0)
    file = tmp_path / "hf" / "model.safetensors"
    sd = load_file(file)
    sd["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(sd, file)
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg == f"{file}: tensor model.layers.1.mlp.up_proj.weight holds non-finite values (NaN or inf)"


def test_unsupported_dtype_and_unexpected_tensor(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0)
    file = tmp_path / "hf" / "model.safetensors"
    sd = load_file(file)
    save_file({**sd, "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, file)
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg == f"{file}: unexpected tensor model.layers.2.mlp.up_proj.weight (config.json: num_hidden_layers=2)"
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float64)
    save_file(sd, file)
    msg = _compile_error(hsc, tmp_path / "hf", tmp_path)
    assert msg.startswith(f"{file}: tensor model.norm.weight is F64; only float16")


def test_no_weights_no_tokenizer_bad_json(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0)
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    assert _compile_error(hsc, tmp_path / "hf", tmp_path).startswith(f"{tmp_path / 'hf'}: no weight files")
    (tmp_path / "elsewhere.safetensors").rename(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "tokenizer.model").unlink()
    assert _compile_error(hsc, tmp_path / "hf", tmp_path) == (
        f"{tmp_path / 'hf'}: no tokenizer.model or tokenizer.json (a Hugging Face checkpoint needs one)")
    (tmp_path / "hf" / "config.json").write_text("{")
    assert _compile_error(hsc, tmp_path / "hf", tmp_path).startswith(f"{tmp_path / 'hf' / 'config.json'}: not valid JSON")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{bad")
    (tmp_path / "hf" / "config.json").unlink()
    assert _compile_error(hsc, tmp_path / "hf", tmp_path).startswith(f"{tmp_path / 'hf' / 'params.json'}: missing")


def test_tokenizer_option_refused_for_hf(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "hf", GQA, seed=0)
    code, _, err = hsc("compile", tmp_path / "hf", "--target", "cpu", "--tokenizer", TOKENIZER, "-o", tmp_path / "a")
    assert code == 1 and "--tokenizer is for Meta checkpoints and GGUF files" in err
