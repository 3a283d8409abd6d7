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


@pytest.fixture(autouse=True)
def fresh_compile_state():
    """Tests here switch TF32 on or off as hsc run would; none may leave it to the next. Each test
    compiles its own model, as one hsc run does once: without a reset, the ninth model's step in one
    process exceeds dynamo's recompile limit (8), which fullgraph=True turns into a failure."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch._dynamo.reset()
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def requests(shared_data):
    tok = Tokenizer("sentencepiece", shared_data.parent / "llama-tokenizer.model", None, None)
    return build_requests(load_six_line(shared_data)[:48], tok, add_bos=True)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_packed_compiled_matches_float64(requests, n_kv_heads):
    args = ModelArgs(dim=256, n_layers=3, n_heads=8, n_kv_heads=n_kv_heads, vocab_size=32000, multiple_of=64)
    model = random_model(args, torch.float32, "cuda", seed=int(torch.randint(2**31, ())))
    torch.backends.cuda.matmul.allow_tf32 = False
    scorer = PackedScorer(model, "cuda", None, batch_tokens=2048, compile=True)
    batches = scorer.prepare(requests)
    scorer.warmup(batches)
    got = scorer.score(batches)
    eager = score_reference(model, requests, "cuda")
    W = reference.model_weights_float64(model)
    want = [reference.loglikelihood(W, args, list(r.context), list(r.continuation)) for r in requests[:64]]
    assert max(abs(a - b) for a, b in zip(got[:64], want)) < 1e-3
    assert max(abs(a - b) for a, b in zip(got, eager)) < 1e-3


@pytest.mark.parametrize("layout", ["flat", "rows"])
@pytest.mark.parametrize("n_heads,n_kv_heads", [(8, None), (4, None), (2, None), (3, 1)])
def test_bf16_packed_close_to_fp32(requests, layout, n_heads, n_kv_heads):
    """Head sizes 32, 64 and 128 and a GQA model with 64-wide heads (SmolLM2's): each has its own
    FlexAttention kernel tiles, which the flat layout's mask blocks must fit (runtime.packed.flex_kv_block)."""
    args = ModelArgs(dim=256 if n_heads != 3 else 192, n_layers=3, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=32000, multiple_of=64)
    model = random_model(args, torch.float32, "cuda", seed=1)
    ref = score_reference(model, requests, "cuda")
    model_bf16 = random_model(args, torch.bfloat16, "cuda", seed=1)
    torch.backends.cuda.matmul.allow_tf32 = True
    scorer = PackedScorer(model_bf16, "cuda", None, batch_tokens=2048, compile=True, layout=layout)
    batches = scorer.prepare(requests)
    scorer.warmup(batches)
    got = scorer.score(batches)
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert rel < 0.05, rel


def test_hsc_run_on_cuda_matches_the_reference_loop(tmp_path, shared_data):
    """hsc run's own path on the GPU (runtime.run.run: the flat layout, compiled, CUDA graphs) on an
    fp32 artifact: every ending's log-likelihood within 1e-3 of the reference loop's, same predictions;
    with trees cut at 256 tokens, so that the 48 items make several rows and batches of two."""
    import json

    from runtime.run import RunConfig, run
    from tests.tiny_meta import write_tiny_meta_checkpoint
    from toolchain.compile import compile_checkpoint

    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32)
    write_tiny_meta_checkpoint(tmp_path / "ckpt", args, 1, seed=5)
    _, art = compile_checkpoint(tmp_path / "ckpt", "h200x1", "fp32", tmp_path / "art", "test", log=lambda *_: None)
    samples = {}
    for engine, extra in (("packed", dict(row_len=256, batch_tokens=512)), ("reference", {})):
        out = tmp_path / engine
        results = run(RunConfig(art, str(shared_data), 48, out, device="cuda", engine=engine, **extra), "test",
                      echo=lambda *_: None)
        samples[engine] = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        if engine == "packed":
            assert results["layout"] == "flat" and results["batch_shape"][:2] == [2, 256]
    for a, b in zip(samples["packed"], samples["reference"]):
        assert (a["index"], a["pred"], a["pred_norm"]) == (b["index"], b["pred"], b["pred_norm"])
        assert max(abs(x - y) for x, y in zip(a["loglik"], b["loglik"])) < 1e-3


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_compile_on_cuda_matches_cpu(tmp_path, shared_data, precision):
    """Calibration, smoothing, quantization and the check computed on the GPU give the artifact the
    CPU gives: the same alphas and (nearly) the same quantized weights; the check is recorded. Also
    with TF32 switched on in the process (it failed so before toolchain.quantize.fp32_matmuls)."""
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
    torch.backends.cuda.matmul.allow_tf32 = True  # as hsc run leaves it: the compiler must not use it
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


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("shape", [(300, 17920), (40, 1000), (17, 8)])
def test_fused_swiglu_quantize_equals_torch(precision, shape):
    """The Triton kernel against the torch ops it replaces (silu(a) * b in bf16, per-row quantization):
    the same scales, and the same quantized values except where silu's last fp32 bit lands on a bf16
    rounding tie (a few in a million), and there at most one step apart."""
    from runtime import kernels
    from runtime.quant import SCALE_FLOOR, SCHEMES, _quantize_rows
    import torch.nn.functional as F

    if not kernels.fused_swiglu_available(torch.ones(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no Triton")
    scheme = SCHEMES[precision]()
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(2**31, ())))
    a = (torch.randn(shape, device="cuda", generator=g) * 3).bfloat16()
    b = torch.randn(shape, device="cuda", generator=g).bfloat16()
    a[0] = 0  # a zero row: floored scale, q exactly zero
    want_q, want_s = _quantize_rows(F.silu(a) * b, scheme)
    q, s = kernels.swiglu_quantize_cuda(a, b, scheme.weight_dtype, scheme.qmax, SCALE_FLOOR)
    assert q.dtype == scheme.weight_dtype and s.dtype == torch.float32
    assert torch.equal(q[0].float(), torch.zeros(shape[1], device="cuda"))
    assert ((s - want_s).abs() <= 1e-6 * want_s).all()
    differ = q.float() != want_q.float()
    assert differ.float().mean().item() < 1e-4
    if precision == "int8":
        assert (q.float() - want_q.float()).abs().max().item() <= 1
    else:  # one e4m3 step: 1/8 of the value's power of two, 2**-9 among subnormals
        step = torch.maximum(want_q.float().abs() / 8, torch.tensor(2.0 ** -9, device="cuda"))
        assert ((q.float() - want_q.float()).abs() <= step * 1.0001).all()


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_quantized_packed_fused_equals_unfused(requests, precision):
    """A quantized model's packed, compiled scores with the fused SwiGLU kernel against the same
    model through the plain torch ops (eager reference loop): equal up to bf16 noise."""
    from runtime import kernels

    args = ModelArgs(dim=256, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=64)
    model = random_model(args, torch.bfloat16, "cuda", seed=3, scheme=precision)
    torch.backends.cuda.matmul.allow_tf32 = True
    scorer = PackedScorer(model, "cuda", None, batch_tokens=2048, compile=True)
    batches = scorer.prepare(requests)
    scorer.warmup(batches)
    got = scorer.score(batches)
    fused = kernels.fused_swiglu_available
    kernels.fused_swiglu_available = lambda a: False
    try:
        ref = score_reference(model, requests, "cuda")
    finally:
        kernels.fused_swiglu_available = fused
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    assert rel < 0.05, rel


def test_bf16_head_on_cuda_is_the_fp32_product_of_bf16_values():
    """On CUDA a bf16 head runs as a bf16 product with fp32 output and keeps no fp32 copy; its
    log-probs are those of the same bf16 values in float64, to fp32 summation error."""
    from runtime.model import Transformer

    args = ModelArgs(dim=256, n_layers=1, n_heads=8, vocab_size=32000, multiple_of=64)
    model = Transformer(args).to(device="cuda", dtype=torch.bfloat16)
    model.keep_fp32_head()
    assert model.head_fp32 is None
    hidden = torch.randn(300, 256, device="cuda").bfloat16()
    targets = torch.randint(0, 32000, (300,), device="cuda")
    got = model.token_logprobs(hidden, targets)
    want = (hidden.double() @ model.output.weight.double().t()).log_softmax(-1)[torch.arange(300, device="cuda"), targets]
    assert got.dtype == torch.float32 and (got.double() - want).abs().max().item() < 1e-4


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs sm_89+")
def test_fp8_fast_accumulation_is_the_fast_kernel_and_close_to_exact():
    """A fast-accumulating fp8 QuantLinear is torch._scaled_mm(use_fast_accum=True) bit for bit, differs
    from the default kernel at K = 6,656 (the option is not dropped on the way), and stays within a
    small fraction of the quantization error of the exact product of the same quantized values
    (measured: rms 2.4e-3 of the output's rms, docs/benchmarks.md)."""
    from torch import nn

    from runtime.quant import Float8WeightFloat8Activation, QuantLinear, quantize_activation_per_token

    g = torch.Generator(device="cuda").manual_seed(5)
    lin = nn.Linear(6656, 1024, bias=False, device="cuda").bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 6656, device="cuda", generator=g) / 80)
    x = torch.randn(512, 6656, device="cuda", generator=g).bfloat16()
    fast = QuantLinear.from_float(lin, Float8WeightFloat8Activation(fast_accumulation=True))
    plain = QuantLinear.from_float(lin, Float8WeightFloat8Activation())
    q, s = quantize_activation_per_token(x, fast.scheme)
    want = torch._scaled_mm(q, fast.qdata.t(), scale_a=s[:, None].contiguous(), scale_b=fast.scale[None, :].contiguous(),
                            out_dtype=torch.bfloat16, use_fast_accum=True)
    got = fast(x)
    assert torch.equal(got, want)
    assert not torch.equal(got, plain(x))
    exact = (q.double() * s.double()[:, None]) @ (fast.qdata.double() * fast.scale.double()[:, None]).t()
    rms = exact.pow(2).mean().sqrt()
    assert ((got.double() - exact).pow(2).mean().sqrt() / rms).item() < 1e-2
