"""hsc bench's CPU-side pieces: the baseline's item sample, FLOP counting, random quantized models."""

import pytest
import torch

from runtime.bench import SHAPES, baseline_sample, model_flops, random_model
from runtime.config import ModelArgs


def test_baseline_sample_spreads_over_the_set():
    s = baseline_sample(10042, 1000)
    assert len(s) == len(set(s)) == 1000 and s == sorted(s)
    assert s[0] == 0 and s[-1] >= 10042 - 11  # reaches the end of the set, not just its start
    assert baseline_sample(10, None) == baseline_sample(10, 10) == baseline_sample(10, 50) == list(range(10))


def test_model_flops_llama_30b():
    # 2 x 32.5 B parameters in the blocks' linears, about 64 GFLOP a token, plus attention and head.
    args = SHAPES["llama-30b"]
    body = model_flops(args, tokens=1, attended_keys=0, scored=0)
    assert body == pytest.approx(2 * 60 * (4 * 6656 ** 2 + 3 * 6656 * 17920), rel=0)
    assert 63e9 < body < 65e9
    assert model_flops(args, 1, 100, 0) - body == 60 * 4 * 100 * 6656
    assert model_flops(args, 1, 0, 3) - body == 3 * 2 * 6656 * 32000


@pytest.mark.parametrize("scheme", ["int8", "fp8", "w8"])
def test_random_quantized_model_tracks_its_float_weights(scheme):
    """The quantized random model is quantized from exactly the float model's weights."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=100, hidden_dim=128)
    ref = random_model(args, torch.float32, "cpu", seed=3)
    q = random_model(args, torch.float32, "cpu", seed=3, scheme=scheme)
    tokens = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        a, b = ref(tokens), q(tokens)
    rel = ((a - b).norm() / a.norm()).item()
    # e4m3 keeps 3 mantissa bits (~2% rms per product), int8 per-row ~0.5%; another seed's model is ~140% off.
    assert 0 < rel < {"fp8": 0.25, "int8": 0.05, "w8": 0.05}[scheme], rel
    lin = q.layers[1].feed_forward.w2
    assert lin.qdata.dtype == {"int8": torch.int8, "w8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]


def test_random_model_tp_slice_has_the_rank_shapes():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=128)
    m = random_model(args, torch.float32, "cpu", tp=2)  # no group: the slice alone, as one rank holds it
    attn, ffn = m.layers[0].attention, m.layers[0].feed_forward
    assert attn.wq.weight.shape == (32, 64) and attn.wk.weight.shape == (16, 64) and attn.wo.weight.shape == (64, 32)
    assert ffn.w1.weight.shape == (64, 64) and ffn.w2.weight.shape == (64, 64)


@pytest.mark.parametrize("argv, message", [
    (["--tp", "3"], "--tp 3: must divide --gpus 1 and the shape's 52 heads"),
    (["--gpus", "2", "--tp", "4"], "--tp 4: must divide --gpus 2"),
    (["--gpus", "4", "--tp", "4", "--baseline", "hf"], "--baseline runs on one GPU"),
    (["--precision", "int8", "--fast-accum"], "hsc bench --fast-accum: an option of fp8's products, not of precision int8"),
    (["--layout", "flat", "--no-compile"], "hsc bench --layout flat needs --compile"),
])
def test_bench_refusals(hsc, shared_data, argv, message):
    code, _, err = hsc("bench", "--shape", "llama-30b", *argv)
    assert code == 1 and message in err and len(err.splitlines()) == 1


def test_sustained_gemm_rate_is_flops_over_back_to_back_time(monkeypatch):
    from types import SimpleNamespace

    import runtime.bench as bench

    real = bench.sustained_gemm_rate("fp32", 64, 64, 64, "cpu", seconds=0.05, window_s=0.005)  # the real kernel
    assert real > 0
    # A clock that moves only when a product runs (2 ms each, as a GPU at steady clocks would take):
    # the rate and the number of products cannot depend on how busy this machine is.
    clock, calls = SimpleNamespace(now=0.0), []

    def fake_product(*args, **kwargs):
        def product():
            calls.append(1)
            clock.now += 0.002
        return product

    monkeypatch.setattr(bench, "gemm_product", fake_product)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    rate = bench.sustained_gemm_rate("bf16", 10, 10, 10, "cpu", seconds=0.3, window_s=0.02)
    assert rate == pytest.approx(1.0e6)  # 2 * 10**3 FLOP per 2 ms
    assert len(calls) >= 150  # back to back for the whole 0.3 s, in windows of several products
