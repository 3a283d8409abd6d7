"""SmoothQuant folding (exact, against the float64 reference), its factors, the alpha search, and
layer-by-layer calibration (against forward hooks on the whole runtime model)."""

import math

import pytest
import torch

from runtime.config import LAYER_TENSORS, ModelArgs, global_shapes, layer_shapes
from runtime.hellaswag import load_six_line
from runtime.model import Transformer
from runtime.scoring import build_requests
from runtime.tokenizer import Tokenizer
from tests import reference
from tests.tiny_meta import write_tiny_meta_checkpoint
from toolchain import smoothquant as sq
from toolchain.calibrate import CalibrationStats, calibrate
from toolchain.meta_source import MetaSource
from toolchain.source import ModelSource

# dim 64, 4 heads of 16, FFN 192.
MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=32, rope_theta=500.0, max_seq_len=64)
GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, rope_theta=500.0,
                max_seq_len=64)
MQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=97, multiple_of=32, rope_theta=500.0,
                max_seq_len=64)


def random_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {**global_shapes(args), **{f"layers.{i}.{n}": s for i in range(args.n_layers)
                                         for n, s in layer_shapes(args).items()}}
    return {name: (1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)) if len(shape) == 1
            else torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(shape[-1])
            for name, shape in shapes.items()}


def split_layer(W: dict, i: int) -> dict:
    return {n: W[f"layers.{i}.{n}"] for n in LAYER_TENSORS}


def with_layer(W: dict, i: int, layer: dict) -> dict:
    return {**W, **{f"layers.{i}.{n}": t for n, t in layer.items()}}


def random_factors(args: ModelArgs, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Positive factors over e^-2..e^2 at every point; wo's constrained per kv group."""
    rand = lambda n: torch.randn(n, generator=g, dtype=torch.float64).clamp(-2, 2).exp()
    hd = args.head_dim
    return {sq.WQKV_IN: rand(args.dim), sq.W13_IN: rand(args.dim), sq.W2_IN: rand(args.ffn_dim),
            sq.WO_IN: sq.expand_kv(rand(args.kv_heads * hd), args.n_heads, args.kv_heads)}


# ---- (i) the smoothing identity ----------------------------------------------------------------

@pytest.mark.parametrize("args", [MHA, GQA, MQA], ids=["mha", "gqa", "mqa"])
def test_smoothing_identity_float64(args):
    W = random_weights(args, seed=1)
    before = {k: v.clone() for k, v in W.items()}
    g = torch.Generator().manual_seed(2)
    smoothed = W
    for i in range(args.n_layers):
        smoothed = with_layer(smoothed, i, sq.fold_layer(split_layer(smoothed, i), random_factors(args, g), args))
    for k in W:  # the caller's tensors are untouched
        assert torch.equal(W[k], before[k]), k
    # Every smoothed tensor really changed (so the identity is not trivially true).
    changed = {k.split(".", 2)[2] for k in W if k.startswith("layers.") and not torch.equal(W[k], smoothed[k])}
    assert changed == set(LAYER_TENSORS)
    tokens = torch.randint(0, args.vocab_size, (20,), generator=g).tolist()
    want = reference.forward_logprobs(W, args, tokens)
    got = reference.forward_logprobs(smoothed, args, tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("args", [MHA, GQA], ids=["mha", "gqa"])
def test_smooth_layer_from_statistics_is_exact(args):
    """The factors smooth_layer computes from (outlier-laden) statistics keep the model exact too."""
    W = random_weights(args, seed=3)
    g = torch.Generator().manual_seed(4)
    dims = {sq.WQKV_IN: args.dim, sq.WO_IN: args.dim, sq.W13_IN: args.dim, sq.W2_IN: args.ffn_dim}
    smoothed = W
    for i in range(args.n_layers):
        absmax = {p: torch.rand(n, generator=g) * 3 for p, n in dims.items()}
        absmax[sq.WQKV_IN][[3, 17]] = 300.0
        layer, factors = sq.smooth_layer(split_layer(W, i), absmax, 0.85, args)
        assert factors[sq.WQKV_IN][3] > 10 * factors[sq.WQKV_IN].median()
        smoothed = with_layer(smoothed, i, layer)
    tokens = torch.randint(0, args.vocab_size, (16,), generator=g).tolist()
    torch.testing.assert_close(reference.forward_logprobs(smoothed, args, tokens),
                               reference.forward_logprobs(W, args, tokens), rtol=0, atol=1e-10)


def test_fold_keeps_dtype_and_refuses_bad_factors():
    layer = {k.split(".", 2)[2]: v.float() for k, v in random_weights(GQA, 5).items() if k.startswith("layers.0.")}
    out = sq.fold_attention_input(layer, torch.full((64,), 2.0, dtype=torch.float64))
    assert all(t.dtype == torch.float32 for t in out.values())
    assert torch.equal(out["attention.wq.weight"], layer["attention.wq.weight"] * 2)
    with pytest.raises(ValueError, match="positive"):
        sq.fold_ffn_input(layer, torch.zeros(64))
    with pytest.raises(ValueError, match="channels"):
        sq.fold_w2_input(layer, torch.ones(64))
    with pytest.raises(ValueError, match="share a kv head"):
        sq.fold_wo_input(layer, torch.rand(64, generator=torch.Generator().manual_seed(0)) + 0.5, 4, 2)


# ---- (ii) the formula, (iii) GQA groups ---------------------------------------------------------

def test_smoothing_factors_hand_example():
    act = torch.tensor([4.0, 1.0, 0.25, 0.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 1.0], [0.5, 1.0, -1.0, 3.0]])
    w2 = torch.tensor([[-0.5, 4.0, 0.25, 1.0]])
    # column maxima over both weights: [1, 4, 1, 3]
    s = sq.smoothing_factors(act, [w1, w2], alpha=0.5)
    assert s.dtype == torch.float64
    # 4^.5/1^.5 = 2; 1/4^.5 = .5; .25^.5/1 = .5; a dead channel (absmax 0) is left alone: 1.
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 0.5, 1.0], dtype=torch.float64), rtol=1e-15, atol=0)
    s = sq.smoothing_factors(act, [w1, w2], alpha=0.8)
    want = torch.tensor([4 ** 0.8, 1 / 4 ** 0.2, 0.25 ** 0.8, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s, want, rtol=1e-15, atol=0)
    # alpha 1: s = max|X| (weights ignored); extreme inputs are clamped, never 0 or inf.
    torch.testing.assert_close(sq.smoothing_factors(act[:3], [w1[:, :3]], 1.0), act[:3].double())
    s = sq.smoothing_factors(torch.tensor([1e30, 1e-30, float("inf")]), [torch.tensor([[1.0, 1e30, 1.0]])], 0.5)
    assert s.tolist() == [sq.S_MAX, sq.S_MIN, 1.0]
    with pytest.raises(ValueError):
        sq.smoothing_factors(act, [w1], 1.5)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_factors_equal_within_each_group(n_kv_heads):
    n_heads, hd, dim = 4, 16, 64
    rep = n_heads // n_kv_heads
    g = torch.Generator().manual_seed(n_kv_heads)
    act = torch.rand(n_heads * hd, generator=g) + 0.1
    wo = torch.randn(dim, n_heads * hd, generator=g)
    s, s_kv = sq.wo_smoothing_factors(act, wo, 0.85, n_heads, n_kv_heads)
    assert s.shape == (n_heads * hd,) and s_kv.shape == (n_kv_heads * hd,)
    grouped = s.view(n_kv_heads, rep, hd)
    assert torch.equal(grouped, grouped[:, :1].expand_as(grouped))
    torch.testing.assert_close(grouped[:, 0].reshape(-1), s_kv, rtol=0, atol=0)
    # The group's factor comes from the group's maxima (over its query heads, and wo's rows).
    a = act.view(n_kv_heads, rep, hd).amax(1).double()
    w = wo.abs().view(dim, n_kv_heads, rep, hd).amax(dim=(0, 2)).double()
    torch.testing.assert_close(s_kv.view(n_kv_heads, hd), a ** 0.85 / w ** 0.15)
    if n_kv_heads == n_heads:  # no GQA: the plain per-channel formula
        torch.testing.assert_close(s, sq.smoothing_factors(act, [wo], 0.85), rtol=0, atol=0)


# ---- (v) the alpha search -----------------------------------------------------------------------

def outlier_stats(args: ModelArgs, layer: dict, n: int, outliers: bool, seed: int) -> sq.LayerStats:
    g = torch.Generator().manual_seed(seed)
    dims = {sq.WQKV_IN: args.dim, sq.WO_IN: args.dim, sq.W13_IN: args.dim, sq.W2_IN: args.ffn_dim}
    sample = {p: torch.randn(n, d, generator=g) for p, d in dims.items()}
    if outliers:  # LLaMA-like: a few channels of the normed inputs far larger than the rest, every token
        for p in (sq.WQKV_IN, sq.W13_IN):
            sample[p][:, [5, 23, 41]] *= 100.0
    return sq.LayerStats({p: x.abs().amax(0) for p, x in sample.items()}, sample)


def test_choose_alpha_prefers_smoothing_with_outlier_channels():
    layer = {k.split(".", 2)[2]: v.float() for k, v in random_weights(GQA, 6).items() if k.startswith("layers.0.")}
    stats = outlier_stats(GQA, layer, 256, outliers=True, seed=7)
    choice = sq.choose_alpha(layer, stats, GQA, candidates=(None, *sq.DEFAULT_ALPHAS))
    assert set(choice.errors) == {None, *sq.DEFAULT_ALPHAS}
    assert choice.baseline == choice.errors[None]
    assert choice.alpha is not None
    assert choice.errors[choice.alpha] == min(choice.errors.values())
    # Measured, not assumed: smoothing cuts the error of the outlier-reading linears a lot.
    assert choice.errors[choice.alpha] < 0.5 * choice.baseline
    for n in ("attention.wq.weight", "feed_forward.w1.weight"):
        assert choice.per_linear[choice.alpha][n] < 0.5 * choice.per_linear[None][n]
    # e4m3 plugs in the same way and also gains from smoothing here.
    e4 = sq.choose_alpha(layer, stats, GQA, candidates=(0.5, 0.85), fake_quant=sq.fake_quant_e4m3)
    assert e4.errors[e4.alpha] < e4.baseline
    # Without outliers the gain (if any) is much smaller than with them.
    plain = sq.choose_alpha(layer, outlier_stats(GQA, layer, 256, outliers=False, seed=7), GQA)
    assert plain.errors[plain.alpha] / plain.baseline > choice.errors[choice.alpha] / choice.baseline


def test_quant_errors_smoothing_does_not_change_float_outputs():
    """With an identity 'quantizer' every smoothed linear reproduces the original outputs, wv/w3
    included once their outputs are scaled back: the error space is the original one."""
    layer = {k.split(".", 2)[2]: v for k, v in random_weights(GQA, 8).items() if k.startswith("layers.0.")}
    stats = outlier_stats(GQA, layer, 64, outliers=True, seed=9)
    stats.sample = {p: x.double() for p, x in stats.sample.items()}
    errs = sq.quant_errors(layer, stats, 0.9, GQA, fake_quant=lambda w, x: x @ w.T)
    assert len(errs) == 7 and max(errs.values()) < 1e-25


# ---- (iv) calibration ------------------------------------------------------------------------------

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=512)


class CountingSource(ModelSource):
    """A MetaSource that records the layer reads and gives the padding token (id 0, never produced
    by the tokenizer for text) a one-hot embedding on channel 0: after RMSNorm that channel is
    sqrt(dim) * gain, larger than any real token's, so counting padding would show."""

    def __init__(self, inner: MetaSource):
        self.inner, self.calls, self.global_calls = inner, [], 0
        for name in ("path", "model_name", "args", "tokenizer", "source_digests"):
            setattr(self, name, getattr(inner, name))
        self.source_format = inner.source_format

    def global_tensors(self):
        self.global_calls += 1
        return patch_pad(self.inner.global_tensors())

    def layer_tensors(self, i):
        self.calls.append(i)
        return self.inner.layer_tensors(i)


def patch_pad(glob: dict) -> dict:
    emb = glob["tok_embeddings.weight"].clone()
    emb[0] = 0.0
    emb[0, 0] = 1.0
    return {**glob, "tok_embeddings.weight": emb}


def hooked_reference(truth: dict, args: ModelArgs, requests) -> tuple[dict, dict]:
    """Per-channel abs-max and every activation row of each point, from forward hooks on the whole
    runtime Transformer, a plain causal forward of each request as lm-eval runs it (context +
    continuation without its last token): no shared-context packing; the requests are right-padded
    into one batch, and the padded positions (which no real position attends to) are dropped."""
    model = Transformer(args)
    model.load_state_dict(truth)
    rows = {f"layers.{i}.{p}": [] for i in range(args.n_layers) for p in sq.POINTS}
    hooked = {"attention.wq": sq.WQKV_IN, "attention.wo": sq.WO_IN, "feed_forward.w1": sq.W13_IN,
              "feed_forward.w2": sq.W2_IN}
    for i, layer in enumerate(model.layers):
        for mod, p in hooked.items():
            layer.get_submodule(mod).register_forward_pre_hook(
                lambda m, inp, key=f"layers.{i}.{p}": rows[key].append(inp[0][valid]))
    seqs = [list(r.context + r.continuation[:-1]) for r in requests]
    T = max(map(len, seqs))
    tokens = torch.tensor([q + [0] * (T - len(q)) for q in seqs])
    valid = torch.arange(T)[None, :] < torch.tensor([len(q) for q in seqs])[:, None]  # [B, T]
    with torch.no_grad():
        model(tokens)
    rows = {k: torch.cat(v) for k, v in rows.items()}
    return {k: v.abs().amax(0) for k, v in rows.items()}, rows


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("calib") / "tiny"
    truth = write_tiny_meta_checkpoint(path, TINY, n_shards=2, seed=11)
    items = load_six_line(shared_data)[:40]
    tok = Tokenizer("sentencepiece", path / "tokenizer.model", None, None)
    return path, {**truth, **patch_pad(truth)}, items, tok


def test_calibrate_streams_layers_and_matches_full_model_hooks(tiny_checkpoint, tmp_path):
    path, truth, items, tok = tiny_checkpoint
    with MetaSource(path) as meta:
        src = CountingSource(meta)
        stats = calibrate(src, items, tok, add_bos=True, n_items=16, seed=3, batch_tokens=1024, sample_rows=300)
        args = src.args
    assert src.calls == list(range(args.n_layers)) and src.global_calls == 1  # one layer at a time, in order
    assert len(stats.item_indices) == 16 and len(set(stats.item_indices)) == 16
    assert stats.item_indices != list(range(16))  # a seeded permutation, not the first 16
    assert (stats.split, stats.seed, stats.holdout_indices) == ("validation", 3, [])
    assert stats.info["n_positions"] > stats.info["n_tokens"]  # there was padding to exclude

    chosen = [items[k] for k in stats.item_indices]
    requests = build_requests(chosen, tok, add_bos=True)
    want, rows = hooked_reference(truth, args, requests)
    # Packed positions are the per-request forwards' positions, each shared prefix at most once: no
    # fewer than the distinct prefixes of all sequences, no more than one tree per item.
    seqs = [(*r.context, *r.continuation[:-1]) for r in requests]
    prefixes = lambda group: len({s[:n] for s in group for n in range(1, len(s) + 1)})
    per_item = sum(prefixes(seqs[k:k + 4]) for k in range(0, len(seqs), 4))
    assert prefixes(seqs) <= stats.info["n_tokens"] <= per_item
    assert set(stats.absmax) == set(want)
    for k in want:
        assert stats.absmax[k].dtype == torch.float32
        torch.testing.assert_close(stats.absmax[k], want[k], rtol=2e-5, atol=1e-6, msg=k)
    # The check bites: a padding token's normed channel 0 would beat every real token's.
    pad_ch0 = math.sqrt(args.dim) * truth["layers.0.attention_norm.weight"][0].abs()
    assert stats.absmax["layers.0.attention.wqkv_in"][0] < 0.9 * pad_ch0

    # Samples: the same 300 real tokens at every layer, each row one of the reference's rows.
    for k, sample in stats.samples.items():
        assert sample.shape == (300, want[k].shape[0])
        nearest = torch.cdist(sample, rows[k], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        assert nearest.max() < 1e-4, k
    layer0 = stats.layer(0)
    assert set(layer0.absmax) == set(sq.POINTS) == set(layer0.sample)

    # Save/load round trip, with and without the samples.
    stats.save(tmp_path / "calib.safetensors")
    back = CalibrationStats.load(tmp_path / "calib.safetensors")
    assert back.samples == {}
    assert (back.item_indices, back.split, back.seed, back.info) == (stats.item_indices, "validation", 3, stats.info)
    assert all(torch.equal(back.absmax[k], v) for k, v in stats.absmax.items()) and set(back.absmax) == set(stats.absmax)
    stats.save(tmp_path / "full.safetensors", with_samples=True)
    full = CalibrationStats.load(tmp_path / "full.safetensors")
    assert set(full.samples) == set(stats.samples)
    assert all(torch.equal(full.samples[k], v) for k, v in stats.samples.items())

    # A same-seed rerun picks the same items and gives the same statistics.
    with MetaSource(path) as meta:
        again = calibrate(CountingSource(meta), items, tok, add_bos=True, n_items=16, seed=3, batch_tokens=1024,
                          sample_rows=300)
    assert again.item_indices == stats.item_indices
    assert all(torch.equal(again.absmax[k], v) for k, v in stats.absmax.items())


def test_calibrate_holdout_items_give_samples_only(tiny_checkpoint):
    path, truth, items, tok = tiny_checkpoint
    with MetaSource(path) as meta:
        src = CountingSource(meta)
        stats = calibrate(src, items, tok, add_bos=False, n_items=8, seed=5, holdout_items=4, batch_tokens=1024,
                          sample_rows=100000, split="train", data="somefile")
        args = src.args
    assert len(stats.holdout_indices) == 4 and not set(stats.holdout_indices) & set(stats.item_indices)
    assert (stats.split, stats.info["data"], stats.info["add_bos"]) == ("train", "somefile", False)
    want, _ = hooked_reference(truth, args, build_requests([items[k] for k in stats.item_indices], tok, False))
    held_requests = build_requests([items[k] for k in stats.holdout_indices], tok, False)
    _, held_rows = hooked_reference(truth, args, held_requests)
    for k in want:
        torch.testing.assert_close(stats.absmax[k], want[k], rtol=2e-5, atol=1e-6, msg=k)
        # sample_rows above the token count: every held-out position once (no padding, no duplicates).
        assert stats.samples[k].shape[0] == stats.info["sample_rows"]
        assert torch.cdist(stats.samples[k], held_rows[k], compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values.max() < 1e-4
    # Every held-out tree node once: between the distinct prefixes of all sequences and one tree per item.
    seqs = [(*r.context, *r.continuation[:-1]) for r in held_requests]
    prefixes = lambda group: len({s[:n] for s in group for n in range(1, len(s) + 1)})
    assert prefixes(seqs) <= stats.info["sample_rows"] <= sum(prefixes(seqs[k:k + 4]) for k in range(0, len(seqs), 4))


def test_calibration_samples_spill_to_a_file_a_layer(tiny_checkpoint, tmp_path):
    """With spill_dir, no layer's samples stay in memory: each layer's go to a file as the layer is done,
    layer(i) reads back exactly what was recorded, drop_layer(i) deletes it."""
    path, _, items, tok = tiny_checkpoint
    kw = dict(add_bos=True, n_items=8, seed=2, batch_tokens=1024, sample_rows=64)
    spill = tmp_path / "spill"
    with MetaSource(path) as src:
        kept = calibrate(src, items, tok, **kw)
        files_after = []
        spilled = calibrate(src, items, tok, **kw, spill_dir=spill,
                            progress=lambda done, n: files_after.append(sorted(p.name for p in spill.iterdir())))
        n_layers = src.args.n_layers
    names = [f"samples.layers.{i}.safetensors" for i in range(n_layers)]
    assert files_after == [names[:k] for k in range(1, n_layers + 1)]  # written layer by layer
    assert spilled.samples == {} and kept.samples and spilled.info == kept.info
    assert spilled.info["sample_rows"] == 64
    for i in range(n_layers):
        a, b = kept.layer(i), spilled.layer(i)
        assert set(b.sample) == set(sq.POINTS) == set(a.sample)
        assert all(torch.equal(a.sample[p], b.sample[p]) for p in sq.POINTS)
        assert all(torch.equal(a.absmax[p], b.absmax[p]) for p in sq.POINTS)
    spilled.save(tmp_path / "full.safetensors", with_samples=True)  # read back from the files
    full = CalibrationStats.load(tmp_path / "full.safetensors")
    assert set(full.samples) == set(kept.samples)
    assert all(torch.equal(full.samples[k], v) for k, v in kept.samples.items())
    spilled.drop_layer(0)
    assert sorted(p.name for p in spill.iterdir()) == names[1:] and spilled.layer(0).sample == {}
    kept.drop_layer(0)
    assert not [k for k in kept.samples if k.startswith("layers.0.")] and kept.layer(1).sample


def test_calibration_feeds_choose_alpha(tiny_checkpoint):
    """End to end on the tiny model: calibrate -> choose_alpha per layer -> smoothed layers keep the
    model's outputs (float64 reference)."""
    path, truth, items, tok = tiny_checkpoint
    with MetaSource(path) as src:
        stats = calibrate(src, items, tok, add_bos=True, n_items=4, seed=0, batch_tokens=1024, sample_rows=128)
        args = src.args
        W = reference.to_float64(truth)
        smoothed = W
        for i in range(args.n_layers):
            layer = src.layer_tensors(i)
            choice = sq.choose_alpha(layer, stats.layer(i), args, candidates=(0.5, 0.85))
            assert choice.alpha in (0.5, 0.85) and all(math.isfinite(e) for e in choice.errors.values())
            new, _ = sq.smooth_layer(split_layer(W, i), stats.layer(i).absmax, choice.alpha, args)
            smoothed = with_layer(smoothed, i, new)
    tokens = [1, 450, 4996, 17354, 1701, 432]
    torch.testing.assert_close(reference.forward_logprobs(smoothed, args, tokens),
                               reference.forward_logprobs(W, args, tokens), rtol=0, atol=1e-10)


def test_calibration_shows_progress_in_a_log(tiny_checkpoint, capsys, monkeypatch):
    """stderr not a terminal (as under pytest): plain `hsc: calibration: ...` lines, one per batch of
    every layer here (LOG_EVERY_S 0), and none of tqdm's carriage returns."""
    import runtime.progress

    monkeypatch.setattr(runtime.progress, "LOG_EVERY_S", 0.0)
    path, _, items, tok = tiny_checkpoint
    with MetaSource(path) as meta:
        calibrate(meta, items, tok, add_bos=True, n_items=8, seed=3, batch_tokens=1024, sample_rows=16)
        n_layers = meta.args.n_layers
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("hsc: calibration: ") for line in lines) and "\r" not in "".join(lines)
    total = int(lines[-1].split("/")[1].split()[0])
    assert total % n_layers == 0 and f"{total}/{total} layer-batches (100%)" in lines[-1]
    assert len(lines) == total  # one a batch of a layer, the last at 100%


@pytest.mark.parametrize("rate, warned", [(1e6, True), (1e15, False)])
def test_a_slow_quantized_compile_warns_with_its_estimate(tiny_checkpoint, monkeypatch, rate, warned):
    from toolchain import quantize

    path, _, items, tok = tiny_checkpoint
    monkeypatch.setattr(quantize, "cpu_matmul_rate", lambda dim: rate)
    warnings = []
    with MetaSource(path) as meta:
        seconds = quantize.warn_if_slow(meta.args, items, tok, True, quantize.QuantOptions(), torch.device("cpu"),
                                        "h200x1", warnings.append)
        want, n_tokens = quantize.forward_seconds(meta.args, items, tok, True, quantize.QuantOptions(), rate)
    assert seconds == want and n_tokens > 40 * 20  # 40 items: all calibrate, none is left for the check
    assert bool(warnings) == warned
    if warned:
        assert f"at least {seconds / 60:.0f} min here" in warnings[0] and "h200x1" in warnings[0]
    assert quantize.warn_if_slow(meta.args, items, tok, True, quantize.QuantOptions(), torch.device("cuda"),
                                 "h200x1", warnings.append) is None

