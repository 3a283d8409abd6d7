"""GPU checks (run on the device machine: python -m pytest -m gpu tests/test_gpu.py).

The packed engine, compiled with CUDA graphs, against the float64 reference on fresh random weights."""

import pytest
import torch

from runtime.bench import random_model
from runtime.config import ModelArgs
from runtime.hellaswag import load_six_line
from runtime.packed import PackedScorer
from runtime.scoring import build_requests, score_reference
from runtime.tokenizer import Tokenizer
from tests import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def requests(shared_data):
    tok = Tokenizer("sentencepiece", shared_data.parent / "llama-tokenizer.model", None, None)
    return build_requests(load_six_line(shared_data)[:48], tok, add_bos=True)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_packed_compiled_matches_float64(requests, n_kv_heads):
    args = ModelArgs(dim=256, n_layers=3, n_heads=8, n_kv_heads=n_kv_heads, vocab_size=32000, multiple_of=64)
    model = random_model(args, torch.float32, "cuda", seed=torch.seed() % 2**31)
    torch.backends.cuda.matmul.allow_tf32 = False
    scorer = PackedScorer(model, "cuda", None, batch_tokens=2048, compile=True)
    batches = scorer.prepare(requests)
    scorer.warmup(batches)
    got = scorer.score(batches)
    eager = score_reference(model, requests, "cuda")
    W = reference.to_float64({k: v.cpu() for k, v in model.state_dict().items()})
    want = [reference.loglikelihood(W, args, list(r.context), list(r.continuation)) for r in requests[:64]]
    assert max(abs(a - b) for a, b in zip(got[:64], want)) < 1e-3
    assert max(abs(a - b) for a, b in zip(got, eager)) < 1e-3


def test_bf16_packed_close_to_fp32(requests):
    args = ModelArgs(dim=256, n_layers=3, n_heads=8, vocab_size=32000, multiple_of=64)
    model = random_model(args, torch.float32, "cuda", seed=1)
    ref = score_reference(model, requests, "cuda")
    model_bf16 = random_model(args, torch.bfloat16, "cuda", seed=1)
    torch.backends.cuda.matmul.allow_tf32 = True
    scorer = PackedScorer(model_bf16, "cuda", None, batch_tokens=2048, compile=True)
    batches = scorer.prepare(requests)
    scorer.warmup(batches)
    got = scorer.score(batches)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert rel < 0.05, rel


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_compile_on_cuda_matches_cpu(tmp_path, shared_data, precision):
    """Calibration, smoothing, quantization and the check computed on the GPU give the artifact the
    CPU gives: the same alphas and (nearly) the same quantized weights; the check is recorded."""
    import json

    from runtime.hellaswag import load_six_line as load
    from tests.tiny_meta import write_tiny_meta_checkpoint
    from toolchain.compile import compile_checkpoint
    from toolchain.quantize import QuantOptions

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32)
    write_tiny_meta_checkpoint(tmp_path / "ckpt", args, 1, seed=3)
    data = tmp_path / "hs.txt"
    with open(data, "w") as f:
        for it in load(shared_data)[:48]:
            f.write("\n".join([it.query, str(it.label), *it.endings]) + "\n")
    arts = {}
    for device in ("cuda", "cpu"):
        opts = QuantOptions(calib_data=str(data), calib_items=16, check_items=16, device=device)
        _, arts[device] = compile_checkpoint(tmp_path / "ckpt", "h200x1", precision, tmp_path / device, "test",
                                             quant=opts, log=lambda *_: None)
    m = {d: json.loads((p / "manifest.json").read_text()) for d, p in arts.items()}
    assert m["cuda"]["smoothing"]["per_layer"] == m["cpu"]["smoothing"]["per_layer"]
    assert m["cuda"]["quant_report"]["check"]["items"] == 16
    from safetensors.torch import load_file

    a, b = load_file(arts["cuda"] / "rank0.safetensors"), load_file(arts["cpu"] / "rank0.safetensors")
    for k in a:
        if k.endswith(".qdata"):  # the same values but for a rounding tie here and there
            assert (a[k].float() == b[k].float()).float().mean() > 0.99, k
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6, msg=k)
