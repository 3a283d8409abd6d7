"""The quantization check of `hsc compile` and its `--max-drop` gate (toolchain/quant_check.py).

A tiny Meta checkpoint is compiled to int8 against the first 64 validation items (16 calibration
items, 24 check items drawn from the other 48). The check's two streams are captured where they
are compared (a spy on compare, as toolchain/quantize.py calls it) and held against independent computations: the float
one against the float64 reference loop (tests/reference.py), the quantized one against `hsc run` of
the artifact the same compile wrote.

A random model is at chance on HellaSwag, so a real drop cannot be provoked by a bad setting; the
gate tests relabel the check items with the float model's own acc_norm predictions ("oracle"
labels: float acc_norm = 100%), so that every disagreement of the quantized model is a lost item.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm

from runtime.artifact import load_manifest
from runtime.config import ModelArgs
from runtime.hellaswag import Item, load_six_line
from runtime.scoring import predictions
from tests import reference
from tests.tiny_meta import write_tiny_meta_checkpoint
from toolchain import quantize
from toolchain.compile import compile_checkpoint
from toolchain.quant_check import bootstrap_interval, compare, mcnemar_exact
from toolchain.quantize import QuantOptions

N_DATA, N_CALIB, N_CHECK = 64, 16, 24
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32)


def _write_six_line(path: Path, items: list[Item]) -> Path:
    with open(path, "w") as f:
        for it in items:
            f.write("\n".join([it.query, str(it.label), *it.endings]) + "\n")
    return path


@pytest.fixture(scope="module")
def checked(tmp_path_factory, shared_data):
    """An int8 compile with the check's inputs captured: items, float and quantized log-likelihoods."""
    root = tmp_path_factory.mktemp("check")
    data = _write_six_line(root / "hellaswag64.txt", load_six_line(shared_data)[:N_DATA])
    truth = write_tiny_meta_checkpoint(root / "ckpt", ARGS, 1, seed=11)
    seen = {}

    def spy(items, float_ll, quant_ll, **kw):
        seen.update(items=items, float_ll=float_ll, quant_ll=quant_ll)
        return real_compare(items, float_ll, quant_ll, **kw)

    real_compare = quantize.compare
    opts = QuantOptions(calib_data=str(data), calib_items=N_CALIB, check_items=N_CHECK, batch_tokens=2048)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "compare", spy)  # where finish_check looks it up
        compile_checkpoint(root / "ckpt", "cpu", "int8", root / "art", "test", quant=opts, log=lambda *a: None)
    return SimpleNamespace(root=root, data=data, truth=truth, art=root / "art", **seen)


def _oracle_data(checked) -> Path:
    """The 64 items with each check item's label set to the float model's acc_norm prediction."""
    path = checked.root / "oracle.txt"
    if not path.exists():
        _, float_norm = predictions(checked.items, checked.float_ll)
        relabel = {it.index: p for it, p in zip(checked.items, float_norm)}
        items = [dataclasses.replace(it, label=relabel.get(it.index, it.label))
                 for it in load_six_line(checked.data)]
        _write_six_line(path, items)
    return path


def test_check_is_recorded_on_held_out_items(checked):
    m = load_manifest(checked.art)
    c = m.quant_report["check"]
    assert c["items"] == N_CHECK and c["item_ids"] == [it.index for it in checked.items]
    assert c["item_ids"] == sorted(c["item_ids"]) and set(c["item_ids"]) <= set(range(N_DATA))
    assert not set(c["item_ids"]) & set(m.calibration["item_ids"])  # disjoint from calibration
    assert c["seed"] == 0 and c["source"] == str(checked.data.resolve())
    assert c["max_drop"] is None and c["passed"] is None
    assert c["quantized"] == "the artifact's tensors, computed in float32 on cpu"
    assert len(c["per_layer"]) == ARGS.n_layers and all(r["sqnr_db"] > 20 for r in c["per_layer"])
    assert c["bootstrap"] == {"resamples": 10_000, "seed": 0}
    assert c == {**c, **compare(checked.items, checked.float_ll, checked.quant_ll, max_drop=None)}


def test_check_float_logliks_match_float64_reference(checked):
    """The float stream (one layer at a time, packed) against lm-eval's loop in float64."""
    full_args = dataclasses.replace(ARGS, vocab_size=32000)
    sp = spm.SentencePieceProcessor(model_file=str(checked.root / "ckpt" / "tokenizer.model"))
    W = reference.to_float64(checked.truth)
    want = [reference.loglikelihood(W, full_args, ctx, cont)
            for it in checked.items
            for ctx, cont in reference.lm_eval_requests(sp.EncodeAsIds, it.query, it.endings, bos=sp.bos_id())]
    worst = max(abs(a - b) for a, b in zip(checked.float_ll, want))
    assert len(want) == len(checked.float_ll) == 4 * N_CHECK and worst < 1e-4, worst


def test_check_quant_logliks_match_hsc_run_of_the_artifact(hsc, checked):
    """The quantized stream is what `hsc run` computes with the artifact (CPU, fp32)."""
    data = _write_six_line(checked.root / "check-items.txt", checked.items)
    code, _, err = hsc("run", checked.art, "--data", data, "--output", checked.root / "res", "--device", "cpu",
                       "--batch-tokens", "2048")
    assert code == 0, err
    samples = [json.loads(line) for line in (checked.root / "res" / "samples.jsonl").read_text().splitlines()]
    got = [ll for s in samples for ll in s["loglik"]]
    worst = max(abs(a - b) for a, b in zip(checked.quant_ll, got))
    assert len(got) == len(checked.quant_ll) and worst < 1e-4, worst
    # and the check saw a real difference between the two models, not the float one twice
    assert max(abs(a - b) for a, b in zip(checked.float_ll, checked.quant_ll)) > 1e-3


def test_mcnemar_exact_hand_computed():
    assert mcnemar_exact(0, 5) == 0.0625  # 2 * (1/2)^5
    assert mcnemar_exact(5, 0) == 0.0625
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert mcnemar_exact(2, 1) == 1.0  # 2 * (1 + 3) / 8, capped
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_bootstrap_interval_hand_computed():
    # Half the items lost (100), half even (0): a resample's mean is 100 X / 20 with X ~ Binomial(20, 1/2),
    # whose 2.5% and 97.5% quantiles are 6 and 14 (P(X <= 5) = 0.021, P(X <= 6) = 0.058).
    assert bootstrap_interval([100] * 10 + [0] * 10) == (30.0, 70.0)
    assert bootstrap_interval([0] * 50) == (0.0, 0.0)
    assert bootstrap_interval([100] * 7) == (100.0, 100.0)
    assert bootstrap_interval([100, 0, -100, 0] * 5, seed=3) == bootstrap_interval([100, 0, -100, 0] * 5, seed=3)


def test_compare_hand_computed():
    """4 items with endings of equal length (acc_norm orders as acc). Float right on 0, 1, 2;
    quantized right on 0 and 3: b = 2 items only float gets, c = 1 only quantized gets."""
    items = [Item(k, "q", ("aa", "bb", "cc", "dd"), label) for k, label in enumerate([0, 1, 2, 3])]
    onehot = lambda j, hi=0.0: [hi if e == j else -1.0 for e in range(4)]
    float_ll = onehot(0) + onehot(1) + onehot(2) + onehot(0)
    quant_ll = onehot(0, -0.5) + onehot(0) + onehot(0) + onehot(3)
    c = compare(items, float_ll, quant_ll, max_drop=20)
    assert c["float"] == {"acc": 0.75, "acc_norm": 0.75} and c["quant"] == {"acc": 0.5, "acc_norm": 0.5}
    assert c["acc_norm_drop_points"] == 25.0 and c["passed"] is False and c["max_drop"] == 20
    assert c["mcnemar"] == {"float_only_correct": 2, "quant_only_correct": 1, "p_two_sided": 1.0}
    assert c["agree_pred"] == c["agree_pred_norm"] == 0.25  # only item 0
    assert c["loglik_abs_diff"] == {"mean": (0.5 + 1 + 1 + 1 + 1 + 1 + 1) / 16, "max": 1.0}
    assert compare(items, float_ll, quant_ll, max_drop=25)["passed"] is True  # drop > X fails, = X passes


def test_max_drop_refusal_writes_nothing(hsc, checked, monkeypatch):
    """Oracle labels (float acc_norm 100%) and weights negated after quantization: the quantized
    model disagrees with the float one, the drop exceeds --max-drop, and no directory is left."""
    real = quantize.quantize_weight
    monkeypatch.setattr(quantize, "quantize_weight", lambda w, scheme: (lambda q, s: (q, -s))(*real(w, scheme)))
    out = checked.root / "refused"
    code, stdout, err = hsc("compile", checked.root / "ckpt", "--target", "cpu", "--precision", "int8", "-o", out,
                            "--calib-data", _oracle_data(checked), "--calib-items", N_CALIB, "--check-items", N_CHECK,
                            "--max-drop", "5")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("hsc: error: quantization check failed: int8 loses more than "
                                                   "--max-drop 5 on 24 held-out items: acc_norm float 100.00 -> ")
    assert "95% bootstrap interval" in err and "McNemar p" in err and "no artifact written" in err
    assert "--max-drop 5: FAILED" in stdout
    assert not out.exists() and not list(checked.root.glob(".refused*"))


def test_max_drop_generous_passes_and_is_recorded(hsc, checked):
    out = checked.root / "passed"
    code, _, err = hsc("compile", checked.root / "ckpt", "--target", "cpu", "--precision", "int8", "-o", out,
                       "--calib-data", _oracle_data(checked), "--calib-items", N_CALIB, "--check-items", N_CHECK,
                       "--max-drop", "50")
    assert code == 0, err
    c = load_manifest(out).quant_report["check"]
    assert c["max_drop"] == 50 and c["passed"] is True and c["float"]["acc_norm"] == 1.0
    assert c["item_ids"] == [it.index for it in checked.items]  # labels play no part in the draw
    # against oracle labels the quantized acc_norm is its agreement with the float model
    assert c["quant"]["acc_norm"] == c["agree_pred_norm"]
    assert c["acc_norm_drop_points"] == pytest.approx(100 * (1 - c["agree_pred_norm"]))
    code, text, _ = hsc("inspect", out)
    assert code == 0 and "check      24 held-out items: acc_norm float 100.00 -> " in text
    assert "--max-drop 50: passed" in text


def test_max_drop_needs_a_quantized_precision_and_the_check(hsc, checked):
    ckpt, never = checked.root / "ckpt", checked.root / "never"
    code, _, err = hsc("compile", ckpt, "--target", "cpu", "--precision", "fp32", "--max-drop", "1", "-o", never)
    assert code == 1 and "--max-drop 1: the check compares a quantized artifact" in err and "not quantized" in err
    code, _, err = hsc("compile", ckpt, "--target", "cpu", "--precision", "int8", "--max-drop", "1",
                       "--check-items", "0", "-o", never)
    assert code == 1 and "--max-drop needs the quantization check, which --check-items 0 turns off" in err
    for bad in ("-1", "nan"):
        code, _, err = hsc("compile", ckpt, "--target", "cpu", "--precision", "int8", "--max-drop", bad, "-o", never)
        assert code == 1 and f"--max-drop {bad}: must be a number of acc_norm points" in err
    code, _, err = hsc("compile", ckpt, "--target", "cpu", "--precision", "int8", "--check-items", "-2", "-o", never)
    assert code == 1 and "--check-items -2" in err
    # every item calibrated: nothing is left to check against
    code, _, err = hsc("compile", ckpt, "--target", "cpu", "--precision", "w8", "--calib-data", checked.data,
                       "--calib-items", N_DATA, "--max-drop", "1", "-o", never)
    assert code == 1 and "no item of" in err and "left for the check" in err
    assert not never.exists() and not list(checked.root.glob(".never*"))


def test_check_items_0_turns_the_check_off(hsc, checked):
    out = checked.root / "unchecked"
    code, stdout, err = hsc("compile", checked.root / "ckpt", "--target", "cpu", "--precision", "w8", "-o", out,
                            "--calib-data", checked.data, "--calib-items", N_CALIB, "--check-items", "0")
    assert code == 0, err
    assert load_manifest(out).quant_report["check"] is None and "check:" not in stdout
    assert "check " not in hsc("inspect", out)[1]
