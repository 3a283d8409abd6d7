"""compile -> artifact -> run on tiny random checkpoints, against the float64 lm-eval loop."""

import json

import pytest
import sentencepiece as spm
import torch

from runtime.config import ModelArgs
from runtime.hellaswag import load_six_line
from runtime.progress import Progress
from runtime.tokenizer import Tokenizer
from tests import reference
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_meta import write_tiny_meta_checkpoint

N_ITEMS = 64


def check_against_reference(out_dir, sd, args, items, tokenize, bos):
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["index"] for s in samples] == list(range(len(items)))
    worst, W = 0.0, reference.to_float64(sd)
    for s, item in zip(samples, items):
        reqs = reference.lm_eval_requests(tokenize, item.query, item.endings, bos)
        want = [reference.loglikelihood(W, args, c, k) for c, k in reqs]
        worst = max(worst, max(abs(a - b) for a, b in zip(s["loglik"], want)))
        assert s["cont_tokens"] == [len(k) for _, k in reqs]
        assert s["cont_chars"] == [len(e) for e in item.endings]
        assert s["pred"] == max(range(4), key=lambda j: want[j])
        assert s["pred_norm"] == max(range(4), key=lambda j: want[j] / len(item.endings[j]))
    assert worst < 1e-4, f"max |loglik - float64 reference| = {worst}"
    return samples


@pytest.mark.parametrize("n_shards, n_heads, n_kv_heads, engine", [
    (1, 4, None, "packed"), (2, 4, 2, "packed"), (4, 8, 4, "packed"), (4, 8, None, "packed"), (2, 4, 2, "reference"),
    (2, 4, 2, "flat")])
def test_meta_checkpoint_end_to_end(tmp_path, hsc, shared_data, monkeypatch, n_shards, n_heads, n_kv_heads, engine):
    args = ModelArgs(dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=-1, multiple_of=32)
    sd = write_tiny_meta_checkpoint(tmp_path / "ckpt", args, n_shards, seed=int(torch.randint(2**31, ())))
    art = tmp_path / "art"
    code, out, err = hsc("compile", tmp_path / "ckpt", "--target", "cpu", "--precision", "fp32", "-o", art)
    assert code == 0, err
    assert "plan:" in out and (art / "rank0.safetensors").is_file() and (art / "tokenizer.model").is_file()
    # flat: the CUDA default layout (one long tree per row, FlexAttention), here compiled on the CPU
    options = ("--engine", "packed", "--layout", "flat", "--compile") if engine == "flat" else ("--engine", engine)
    progress = []
    monkeypatch.setattr(Progress, "update", lambda self, n=1: progress.append(n))
    code, out, err = hsc("run", art, "--data", shared_data, "--limit", N_ITEMS, "--output", tmp_path / "res", *options)
    assert code == 0, err
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["n"] == N_ITEMS and results["bos"] is True and results["split"] == "validation"
    assert results["engine"] == ("packed" if engine == "flat" else engine)
    assert results["layout"] == {"flat": "flat", "packed": "rows", "reference": None}[engine]
    assert set(results["timings"]) >= {"load_s", "warmup_s", "scoring_s"}
    assert "acc_norm" in out and "±" in out

    full_args = ModelArgs(**{**args.__dict__, "vocab_size": 32000})
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ckpt" / "tokenizer.model"))
    items = load_six_line(shared_data)[:N_ITEMS]
    samples = check_against_reference(tmp_path / "res", sd, full_args, items, sp.EncodeAsIds, bos=sp.bos_id())
    # Every engine's throughput and progress count scored tokens (the continuations), whatever it forwards.
    scored = sum(sum(s["cont_tokens"]) for s in samples)
    assert results["scored_tokens"] == sum(progress) == scored
    assert f"{results['scored_tokens_per_s']:,.0f} scored tokens/s" in out


@pytest.mark.parametrize("tensor_type, tied", [("f32", True), ("q8_0", False)])
def test_gguf_end_to_end(tmp_path, hsc, shared_data, tensor_type, tied):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=96,
                     max_seq_len=1024)
    sd = write_tiny_gguf(tmp_path / "tiny.gguf", args, seed=int(torch.randint(2**31, ())), tensor_type=tensor_type, tied=tied)
    art = tmp_path / "art"
    assert hsc("compile", tmp_path / "tiny.gguf", "--target", "cpu", "-o", art)[0] == 0
    code, out, err = hsc("run", art, "--data", shared_data, "--limit", N_ITEMS, "--output", tmp_path / "res")
    assert code == 0, err
    assert json.loads((tmp_path / "res" / "results.json").read_text())["bos"] is False
    tok = Tokenizer("hf", art / "tokenizer.json", None, None)
    check_against_reference(tmp_path / "res", sd, args, load_six_line(shared_data)[:N_ITEMS], tok.encode, bos=None)
