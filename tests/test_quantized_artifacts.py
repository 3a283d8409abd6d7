"""Quantized artifacts (fp8 / int8 / w8) on CPU: calibrate on HellaSwag, smooth, quantize, shard, run.

A tiny Meta checkpoint is compiled with `--target cpu --precision int8|w8|fp8 --calib-items 16` against a
64-item slice of the shared validation file (so that some scored items are calibration items), and
scored next to the fp32 artifact of the same checkpoint. Measured on this model (seed 7, 32 items, mean
|loglik| ~150 per ending; random Gaussian weights have no activation outliers, so smoothing barely moves
the numbers): mean |d loglik| per ending int8 0.106 (0.112 unsmoothed), w8 0.063 (0.069), fp8 0.41
(0.40); per continuation token int8 0.008, w8 0.005, fp8 0.032; acc predictions agree on 32/32.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from runtime.artifact import build_model, load_manifest
from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.hellaswag import load_six_line
from tests.tiny_meta import write_tiny_meta_checkpoint
from toolchain.shard import split_dim
from toolchain.targets import get_target, make_plan, weight_bytes

N_DATA, N_CALIB, N_RUN = 64, 16, 32
BATCH_TOKENS = "2048"
MODELS = {
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32),
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=None, vocab_size=-1, multiple_of=32),
}
# precision: (mean |d loglik| per ending, mean |d| per continuation token), about 2x the measured values
BOUNDS = {"int8": (0.25, 0.02), "w8": (0.15, 0.012), "fp8": (0.8, 0.07)}
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _samples(res: Path) -> list[dict]:
    return [json.loads(line) for line in (res / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("quant")
    data = root / "hellaswag_val64.txt"  # the first 64 validation items, 6-line format (same indices)
    with open(data, "w") as f:
        for it in load_six_line(shared_data)[:N_DATA]:
            f.write("\n".join([it.query, str(it.label), *it.endings]) + "\n")
    for i, (name, args) in enumerate(MODELS.items()):
        write_tiny_meta_checkpoint(root / f"ckpt-{name}", args, 1, seed=7 + i)
    return SimpleNamespace(root=root, data=data, arts={}, res={})


def _compile(hsc, work, model, precision, target="cpu", *extra):
    key = (model, precision, target, *extra)
    if key not in work.arts:
        out = work.root / "-".join(map(str, key)).replace("/", "_")
        args = ["compile", work.root / f"ckpt-{model}", "--target", target, "--precision", precision, "-o", out]
        if precision not in ("fp32", "bf16", "fp16"):
            args += ["--calib-data", work.data, "--calib-items", N_CALIB]
        code, out_text, err = hsc(*args, *extra)
        assert code == 0, err
        assert "compile: wall" in out_text and "peak host memory" in out_text
        work.arts[key] = out
    return work.arts[key]


def _run(hsc, work, art, *extra):
    key = (art, *extra)
    if key not in work.res:
        res = work.root / f"res-{len(work.res)}"
        code, _, err = hsc("run", art, "--data", work.data, "--limit", N_RUN, "--output", res, "--device", "cpu",
                           "--batch-tokens", BATCH_TOKENS, *extra)
        assert code == 0, err
        work.res[key] = res
    return work.res[key]


def test_int8_artifact_contents_manifest_and_verify(hsc, work):
    art = _compile(hsc, work, "gqa", "int8")
    m = load_manifest(art)
    assert m.format_version == 1 and m.precision == "int8" and m.compute_dtype == "float32"
    assert m.quantization["name"] == "int8" and m.quantization["version"] == 1
    c = m.calibration
    assert c["n_items"] == N_CALIB and len(c["item_ids"]) == N_CALIB and c["seed"] == 0
    assert c["split"] == "validation" and c["source"] == str(work.data.resolve())
    assert set(c["item_ids"]) <= set(range(N_DATA))
    assert m.smoothing["alpha"] == "auto" and len(m.smoothing["per_layer"]) == 2
    assert set(m.quant_report["per_linear"]) == {f"layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert all(r["sqnr_db"] > 30 for r in m.quant_report["per_linear"].values())

    with safe_open(art / "rank0.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("layers.0.attention.wq.qdata").dtype == torch.int8
        assert f.get_tensor("layers.1.feed_forward.w2.scale").shape == (64,)
        assert f.get_tensor("layers.0.attention_norm.weight").dtype == torch.float32
    assert "layers.0.attention.wq.weight" not in keys and "output.weight" in keys
    assert {f"layers.1.{n}.{t}" for n in LINEARS for t in ("qdata", "scale")} <= keys
    # the calibration statistics: abs-max only, no samples
    with safe_open(art / "calibration.safetensors", "pt") as f:
        assert not any(k.startswith("sample.") for k in f.keys()) and "layers.0.attention.wqkv_in" in f.keys()

    # Calibration's sample rows waited for pass 2 in the temporary directory; none is left in the artifact.
    assert sorted(p.name for p in art.iterdir()) == ["calibration.safetensors", "manifest.json", "rank0.safetensors",
                                                     "tokenizer.model"]
    r = m.resources
    assert r["wall_s"] > 0 and r["hwm_since"] in ("compile start", "process start") and r["peak_gpu_bytes"] is None
    if Path("/proc/self/status").exists():
        assert r["peak_rss_bytes"] >= r["peak_anon_bytes"] > 0 and r["peak_file_bytes"] > 0

    code, out, err = hsc("inspect", art, "--verify")
    assert code == 0, err
    assert "verified   3 files" in out and "quantized  int8" in out and "quant err  layer 1" in out
    assert "smoothing  alpha auto" in out
    assert "resources  wall" in out and "anonymous" in out and "file-backed" in out

    # A tampered calibration file is caught by --verify.
    bad = work.root / "tampered"
    import shutil
    shutil.copytree(art, bad)
    (bad / "calibration.safetensors").write_bytes(b"x" + (bad / "calibration.safetensors").read_bytes()[1:])
    code, _, err = hsc("inspect", bad, "--verify")
    assert code == 1 and "calibration.safetensors" in err


@pytest.mark.parametrize("precision", ["int8", "w8", "fp8"])
def test_quantized_run_is_close_to_fp32(hsc, work, precision):
    ref = _samples(_run(hsc, work, _compile(hsc, work, "gqa", "fp32")))
    res = _run(hsc, work, _compile(hsc, work, "gqa", precision))
    got = _samples(res)
    assert [s["index"] for s in got] == [s["index"] for s in ref] == list(range(N_RUN))
    d = [abs(a - b) for r, g in zip(ref, got) for a, b in zip(r["loglik"], g["loglik"])]
    d_tok = [abs(a - b) / n for r, g in zip(ref, got) for a, b, n in zip(r["loglik"], g["loglik"], r["cont_tokens"])]
    agree = sum(r["pred"] == g["pred"] for r, g in zip(ref, got)) / len(ref)
    mean_bound, tok_bound = BOUNDS[precision]
    assert sum(d) / len(d) < mean_bound, f"{precision}: mean |d loglik| {sum(d) / len(d):.4f}"
    assert sum(d_tok) / len(d_tok) < tok_bound
    assert agree >= 0.9
    results = json.loads((res / "results.json").read_text())
    assert results["precision"] == precision and results["n"] == N_RUN
    ids = set(load_manifest(_compile(hsc, work, "gqa", precision)).calibration["item_ids"])
    assert results["calibration_overlap"] == len(ids & set(range(N_RUN)))


def test_exclude_calibration(hsc, work):
    art = _compile(hsc, work, "gqa", "int8")
    ids = set(load_manifest(art).calibration["item_ids"])
    overlap = len(ids & set(range(N_RUN)))
    assert 0 < overlap < N_RUN  # 16 of 64 items drawn: some of the first 32 (the draw is seeded)
    res = _run(hsc, work, art, "--exclude-calibration")
    results = json.loads((res / "results.json").read_text())
    assert results["n"] == N_RUN - overlap and results["calibration_overlap"] == overlap
    assert not {s["index"] for s in _samples(res)} & ids
    # A float artifact has no calibration: nothing to report.
    fp32 = json.loads((_run(hsc, work, _compile(hsc, work, "gqa", "fp32")) / "results.json").read_text())
    assert fp32["calibration_overlap"] is None


def test_no_smooth_and_fixed_alpha_are_recorded(hsc, work):
    art = _compile(hsc, work, "mha", "int8", "cpu", "--no-smooth")
    assert load_manifest(art).smoothing is None
    art = _compile(hsc, work, "mha", "w8", "cpu", "--alpha", "0.8")
    assert load_manifest(art).smoothing == {"alpha": 0.8, "per_layer": [0.8, 0.8]}
    # build_model swaps in QuantLinear and keeps the stored dtypes
    model = build_model(art, load_manifest(art), "cpu")
    lin = model.layers[0].attention.wq
    assert type(lin).__name__ == "QuantLinear" and lin.qdata.dtype == torch.int8 and lin.scale.dtype == torch.float32
    assert model.output.weight.dtype == torch.float32


@pytest.mark.parametrize("model", ["gqa", "mha"])
def test_tp2_shards_of_quantized_weights_unshard_exactly(hsc, work, model):
    """Column-parallel qdata/scale split on dim 0; row-parallel qdata on dim 1, scale replicated."""
    tp1 = _compile(hsc, work, model, "int8")
    tp2 = _compile(hsc, work, model, "int8", "h200x2", "--tp", "2")
    m = load_manifest(tp2)
    assert (m.mapping.tp, m.compute_dtype) == (2, "bfloat16") and len(m.shards) == 2
    assert m.calibration["item_ids"] == load_manifest(tp1).calibration["item_ids"]
    ranks = [safe_open(tp2 / f"rank{r}.safetensors", "pt") for r in range(2)]
    with safe_open(tp1 / "rank0.safetensors", "pt") as ref:
        for i in range(2):
            for n in LINEARS:
                for t in ("qdata", "scale"):
                    name = f"layers.{i}.{n}.{t}"
                    parts = [f.get_tensor(name) for f in ranks]
                    if n in ("attention.wo", "feed_forward.w2") and t == "scale":
                        assert split_dim(name) is None and torch.equal(parts[0], parts[1])
                    else:
                        assert parts[0].shape != ref.get_tensor(name).shape
                    dim = split_dim(name)
                    whole = parts[0] if dim is None else torch.cat(parts, dim=dim)
                    assert whole.dtype == ref.get_tensor(name).dtype and torch.equal(whole, ref.get_tensor(name)), name
    # Each rank's file loads into its slice of the model.
    for r in range(2):
        build_model(tp2, m, "cpu", tp_rank=r)
    # The plan counts each rank file's bytes: int8 slices, their scales, the replicated bf16 rest.
    plan = make_plan(m.model, get_target("h200x2"), "int8", tp=2)
    for r in range(2):
        raw = (tp2 / f"rank{r}.safetensors").read_bytes()
        assert len(raw) - 8 - int.from_bytes(raw[:8], "little") == plan.rank_bytes


def test_split_dim_of_quantized_names():
    assert split_dim("layers.3.attention.wq.qdata") == 0 and split_dim("layers.3.attention.wq.scale") == 0
    assert split_dim("layers.3.feed_forward.w2.qdata") == 1 and split_dim("layers.3.feed_forward.w2.scale") is None
    assert split_dim("layers.3.ffn_norm.weight") is None and split_dim("output.weight") is None


LLAMA_30B = ModelArgs(dim=6656, n_layers=60, n_heads=52, multiple_of=256, vocab_size=32000)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_v100_refuses_fp8_and_int8(hsc, work, precision):
    with pytest.raises(HscError, match=r"compute capability 7\.0.*use --precision w8 or fp16"):
        make_plan(LLAMA_30B, get_target("v100x4"), precision)
    code, _, err = hsc("compile", work.root / "ckpt-gqa", "--target", "v100x4", "--precision", precision,
                       "-o", work.root / "never")
    assert code == 1 and "compute capability 7.0" in err and "w8" in err
    assert not (work.root / "never").exists()


def test_planner_quantized_choices():
    with pytest.raises(HscError, match=r"compute capability 8\.0.*int8 or w8 or bf16"):
        make_plan(LLAMA_30B, get_target("a100x4"), "fp8")
    assert make_plan(LLAMA_30B, get_target("a100x4"), "int8").compute == "bf16"
    plan = make_plan(LLAMA_30B, get_target("v100x4"), "w8")
    assert plan.precision == "w8" and plan.compute == "fp16" and plan.mapping.tp == 2  # fp16 needs TP=4
    assert make_plan(LLAMA_30B, get_target("h100x1"), "fp8").mapping.tp == 1
    # auto stays float: quantization is opt-in
    assert make_plan(LLAMA_30B, get_target("h200x4")).precision == "bf16"
    assert make_plan(LLAMA_30B, get_target("cpu")).precision == "fp32"
    # about 1 byte a parameter plus the bf16 embeddings and LM head
    q, f = weight_bytes(LLAMA_30B, "int8", "bf16"), weight_bytes(LLAMA_30B, "bf16")
    assert 0.5 * f < q < 0.52 * f


def test_fast_accum_is_an_fp8_option_recorded_in_the_scheme(hsc, work):
    code, _, err = hsc("compile", work.root / "ckpt-gqa", "--target", "cpu", "--precision", "int8",
                       "--fast-accum", "-o", work.root / "never-fa")
    assert code == 1 and "--fast-accum" in err and "int8" in err and not (work.root / "never-fa").exists()
    art = work.root / "fp8-fast"
    code, out, err = hsc("compile", work.root / "ckpt-gqa", "--target", "cpu", "--precision", "fp8", "--fast-accum",
                         "--calib-data", work.data, "--calib-items", N_CALIB, "--check-items", "4", "--device", "cpu",
                         "-o", art)
    assert code == 0, err
    assert "fast accumulation is not part of this check" in out  # the CPU emulates fp8 with fp32 sums
    assert load_manifest(art).quantization["fast_accumulation"] is True
    model = build_model(art, load_manifest(art), "cpu")
    assert model.layers[1].feed_forward.w2.scheme.fast_accumulation is True
    code, out, _ = hsc("inspect", art)
    assert code == 0 and "fp8 (scheme v1, fast accumulation)" in out


def test_compile_computes_in_fp32_whatever_the_process_tf32_setting():
    from toolchain.quantize import fp32_matmuls

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with fp32_matmuls():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_calibration_options_are_for_quantized_precisions_only(hsc, work):
    code, _, err = hsc("compile", work.root / "ckpt-gqa", "--target", "cpu", "--precision", "fp32",
                       "--calib-items", "8", "-o", work.root / "never2")
    assert code == 1 and "quantized" in err
    code, _, err = hsc("compile", work.root / "ckpt-gqa", "--target", "cpu", "--precision", "int8",
                       "--alpha", "2", "-o", work.root / "never2")
    assert code == 1 and "--alpha" in err


def _shard_digests(art: Path) -> dict[str, str]:
    return {s.file: s.sha256 for s in load_manifest(art).shards}


def test_reused_calibration_gives_what_a_full_compile_gives(hsc, work):
    """--calibration-from: no calibration pass; with another alpha and another precision, exactly the rank
    files that a full compile with them writes (the statistics depend on neither)."""
    first = _compile(hsc, work, "mha", "w8", "cpu", "--alpha", "0.8")
    fresh = _compile(hsc, work, "mha", "int8", "cpu", "--alpha", "0.5")
    out = work.root / "reused-int8-0.5"
    code, text, err = hsc("compile", work.root / "ckpt-mha", "--target", "cpu", "--precision", "int8",
                          "--alpha", "0.5", "--calib-data", work.data, "--calibration-from", first, "-o", out)
    assert code == 0, err
    assert f"calibration: reusing {first / 'calibration.safetensors'}" in text and "calibrating on" not in text
    assert _shard_digests(out) == _shard_digests(fresh)
    m, f = load_manifest(out), load_manifest(fresh)
    assert m.calibration["sha256"] == f.calibration["sha256"] == load_manifest(first).calibration["sha256"]
    assert m.calibration["item_ids"] == f.calibration["item_ids"] and m.calibration["seed"] == f.calibration["seed"]
    assert m.calibration["reused_from"] == str(first.resolve()) and f.calibration["reused_from"] is None
    assert m.smoothing == f.smoothing == {"alpha": 0.5, "per_layer": [0.5, 0.5]}
    # the check draws the same held-out items and finds the same; the per-linear report needs the sample
    # rows, which are not kept
    assert m.quant_report["check"] == f.quant_report["check"] and m.quant_report["check"]["items"] > 0
    assert m.quant_report["per_linear"] == {} and f.quant_report["per_linear"]
    code, shown, _ = hsc("inspect", out, "--verify")
    assert code == 0 and f"reused from {first.resolve()}" in shown and "no per-linear report" in shown


def test_reused_calibration_refusals(hsc, work, tmp_path):
    import shutil

    first = _compile(hsc, work, "mha", "w8", "cpu", "--alpha", "0.8")
    tampered = tmp_path / "tampered"
    shutil.copytree(first, tampered)
    calib = tampered / "calibration.safetensors"
    calib.write_bytes(calib.read_bytes()[:-1] + b"\x00")
    never = work.root / "never-reused"

    def refused(model, precision, *extra):
        code, _, err = hsc("compile", work.root / f"ckpt-{model}", "--target", "cpu", "--precision", precision,
                           "-o", never, *extra)
        assert code == 1 and len(err.splitlines()) == 1 and not never.exists(), err
        return err

    with_data = ("--calib-data", work.data)
    assert "give --alpha A (0..1) or --no-smooth" in refused("mha", "int8", "--calibration-from", first, *with_data)
    assert "leave out --calib-items" in refused("mha", "int8", "--calibration-from", first, "--alpha", "0.5",
                                                "--calib-items", "8", *with_data)
    fp32 = _compile(hsc, work, "mha", "fp32")
    assert "holds no calibration statistics" in refused("mha", "int8", "--calibration-from", fp32, "--alpha", "0.5",
                                                        *with_data)
    assert "sha256 does not match the manifest" in refused("mha", "int8", "--calibration-from", tampered,
                                                           "--alpha", "0.5", *with_data)
    err = refused("gqa", "int8", "--calibration-from", first, "--alpha", "0.5", *with_data)
    assert "was measured on another checkpoint" in err and str(first / "calibration.safetensors") in err
    err = refused("mha", "int8", "--calibration-from", first, "--alpha", "0.5")  # the default data, not the slice
    assert f"was calibrated on items of {work.data}" in err
    assert "apply to the quantized precisions" in refused("mha", "fp32", "--calibration-from", first, "--alpha", "0.5")


def test_calibration_split_decides_the_overlap_with_scored_items(hsc, work, tmp_path):
    """Calibrated on a train-split file: none of the scored validation items was a calibration item,
    whatever the ids. On a file of unknown split that is not the scored one: the overlap cannot be told."""
    import shutil

    def compile_on(data: Path) -> Path:
        art = tmp_path / f"int8-{data.stem}"
        code, out, err = hsc("compile", work.root / "ckpt-gqa", "--target", "cpu", "--precision", "int8",
                             "--calib-data", data, "--calib-items", N_CALIB, "--alpha", "0.8", "--check-items", "4",
                             "-o", art)
        assert code == 0, err
        return art

    def run_on_validation(art: Path, *extra) -> tuple[int, dict | None, str]:
        res = tmp_path / f"res-{art.name}{len(extra)}"
        code, _, err = hsc("run", art, "--data", work.data, "--limit", 8, "--output", res, "--device", "cpu",
                           "--batch-tokens", BATCH_TOKENS, *extra)
        return code, json.loads((res / "results.json").read_text()) if code == 0 else None, err

    train = tmp_path / "hellaswag_train64.txt"  # validation items under a train file's name: the name decides
    shutil.copyfile(work.data, train)
    art = compile_on(train)
    assert load_manifest(art).calibration["split"] == "train"
    assert "(train, seed 0" in hsc("inspect", art)[1]
    code, results, err = run_on_validation(art, "--exclude-calibration")
    assert code == 0, err
    assert (results["calibration_overlap"], results["calibration_split"], results["n"]) == (0, "train", 8)

    unknown = tmp_path / "items64.txt"
    shutil.copyfile(work.data, unknown)
    art = compile_on(unknown)
    assert load_manifest(art).calibration["split"] == "unknown"
    code, results, _ = run_on_validation(art)
    assert code == 0 and results["calibration_overlap"] is None and results["calibration_split"] == "unknown"
    code, _, err = run_on_validation(art, "--exclude-calibration")
    assert code == 1 and "split unknown" in err and len(err.splitlines()) == 1


def test_calib_data_datasets_prefers_the_train_split(monkeypatch, shared_data):
    import runtime.hellaswag as hs
    from runtime.errors import HscError
    from toolchain.quantize import QuantOptions, calibration_items

    one = load_six_line(shared_data)[:4]
    tok = SimpleNamespace(kind="sentencepiece", bos_id=1, eos_id=2)
    tok_dir, tok_file = shared_data.parent, "llama-tokenizer.model"
    monkeypatch.setattr(hs, "load_datasets", lambda split="validation": one)
    logged = []
    items, source, split, _ = calibration_items(tok_dir, tok, tok_file, QuantOptions(calib_data="datasets"),
                                                logged.append)
    assert (items, source, split, logged) == (one, "datasets:Rowan/hellaswag/train", "train", [])

    def no_train(split="validation"):
        if split == "train":
            raise HscError("datasets: Rowan/hellaswag (train split) is not available")
        return one

    monkeypatch.setattr(hs, "load_datasets", no_train)
    items, source, split, _ = calibration_items(tok_dir, tok, tok_file, QuantOptions(calib_data="datasets"),
                                                logged.append)
    assert (source, split) == ("datasets:Rowan/hellaswag/validation", "validation")
    assert logged and "no train split" in logged[0]
