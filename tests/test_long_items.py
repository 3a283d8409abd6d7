"""Items longer than the model's context: lm-eval's rule (the context cut on the left, the ending kept
whole) in both engines, which agree with each other and with the float64 reference; an item whose
ending alone is longer than the context is left out of `hsc run` and named in its results; the data
loader refuses oversized fields."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from runtime.config import ModelArgs
from runtime.hellaswag import MAX_FIELD_BYTES, Item, load_items
from runtime.model import Transformer
from runtime.packed import PackedScorer
from runtime.scoring import Request, drop_overlong, fit_request, score_reference
from tests import reference
from tests.test_cli_errors import COMPILE, art_copy, artifact, assert_one_line_error, ckpt_master  # noqa: F401
from tests.test_model import random_state_dict

L = 24  # the model's context: small, so that ordinary test items exceed it
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=32,
                 rope_theta=500.0, max_seq_len=L)


def _requests(rng: random.Random) -> list[Request]:
    """Items of every length class: short; context + ending just over the context (by one token); long
    contexts; endings of exactly L tokens (the longest lm-eval scores) and of L - 1; a long shared prefix
    across items (merged into one tree in the packed engine)."""
    tok = lambda n: tuple(rng.randrange(1, ARGS.vocab_size) for _ in range(n))
    shared = tok(12)
    cases = [
        (tok(5), [3, 1, 4, 2]),
        (tok(L - 2), [2, 3, 1, 2]),  # some just fit (L + 1 tokens), some are one or two over
        (tok(40), [2, 5, 1, 9]),
        (shared + tok(30), [L, 3, L - 1, 1]),
        (shared + tok(33), [4, L, 2, 6]),
        (tok(3), [L, L - 1, L, 1]),
        (tok(100), [1, 1, 1, 1]),
    ]
    requests = []
    for i, (ctx, lengths) in enumerate(cases):
        start = tok(2)  # endings that start alike share tree nodes when not cut differently
        requests += [Request(i, j, ctx, (start + tok(n))[:n], False) for j, n in enumerate(lengths)]
    return requests


def _model(seed: int):
    sd = random_state_dict(ARGS, seed)
    model = Transformer(ARGS)
    model.load_state_dict(sd)
    return model.eval(), reference.to_float64(sd)


def test_fit_request_is_lm_evals_left_truncation():
    r = Request(0, 0, tuple(range(1, 31)), (40, 41, 42), False)
    fitted = fit_request(r, 10)
    # lm-eval: (ctx + cont)[-(L + 1):][:-1] is the input, the continuation is scored whole
    assert list(fitted.context + fitted.continuation)[:-1] == list(r.context + r.continuation)[-11:][:-1]
    assert fitted.continuation == r.continuation and len(fitted.context) == 8
    assert fit_request(Request(0, 0, (1, 2), (3,), False), 10) is not None
    assert fit_request(Request(0, 0, (1, 2, 3), tuple(range(10)), False), 10).context == (3,)
    with pytest.raises(ValueError, match="11 continuation tokens, more than the model's 10"):
        fit_request(Request(0, 0, (1,), tuple(range(11)), False), 10)


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_both_engines_truncate_alike_and_match_lm_eval(layout):
    seed = int(torch.randint(2**31, ()))
    requests = _requests(random.Random(seed))
    model, W = _model(seed)
    want = [reference.lm_eval_loglikelihood(W, ARGS, list(r.context), list(r.continuation), L) for r in requests]
    ref = score_reference(model, requests, "cpu", batch_tokens=64)
    scorer = PackedScorer(model, "cpu", batch_tokens=256, layout=layout,
                          **({"row_len": 128} if layout == "rows" else {}))
    packed = scorer.score(scorer.prepare(requests))
    np.testing.assert_allclose(ref, want, atol=1e-4, rtol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(packed, want, atol=1e-4, rtol=1e-5, err_msg=f"seed {seed}")
    np.testing.assert_allclose(packed, ref, atol=2e-5, rtol=1e-6, err_msg=f"seed {seed}")


def test_both_engines_refuse_an_ending_longer_than_the_context():
    model, _ = _model(0)
    requests = [Request(0, j, (1, 2, 3), tuple(range(1, L + 2 - (j > 0))), False) for j in range(4)]
    with pytest.raises(ValueError, match="more than the model's"):
        score_reference(model, requests, "cpu")
    with pytest.raises(ValueError, match="more than the model's"):
        PackedScorer(model, "cpu").prepare(requests)


def test_drop_overlong_names_the_items_it_leaves_out():
    items = [Item(10 + k, "q", ("a", "b", "c", "d"), 0) for k in range(3)]
    long = tuple(range(L + 1))
    requests = [Request(k, j, (1,), long if (k, j) == (1, 2) else (5,), False) for k in range(3) for j in range(4)]
    kept, kept_requests, dropped = drop_overlong(items, requests, L)
    assert [it.index for it in kept] == [10, 12] and dropped == [11]
    assert kept_requests == requests[:4] + requests[8:]


def _write_items(path, items):
    path.write_text("".join(json.dumps({"query": q, "choices": e, "gold": 0}) + "\n" for q, e in items))


def test_run_reports_long_items_and_engines_agree(hsc, art_copy, tmp_path):
    """The tiny artifact with a 32-token context: contexts cut on the left, one item left out by name,
    the same log-likelihoods from both engines."""
    m = json.loads((art_copy / "manifest.json").read_text())
    m["model"]["max_seq_len"] = 32
    (art_copy / "manifest.json").write_text(json.dumps(m))
    words = "the quick brown fox jumps over the lazy dog while birds sing in tall green trees".split()
    text = lambda n, k=0: " ".join(words[(i + k) % len(words)] for i in range(n))
    data = tmp_path / "long.jsonl"
    _write_items(data, [("Cooking: " + text(10), [text(3), text(4, 1), text(2, 2), text(5, 3)]),
                        ("Sports: " + text(60), [text(3), text(6, 1), text(2, 2), text(8, 3)]),
                        ("Long: " + text(5), [text(3), text(80, 1), text(2, 2), text(5, 3)]),
                        ("Mixed: " + text(25), [text(20), text(2, 1), text(15, 2), text(1, 3)])])
    logliks = {}
    for engine in ("reference", "packed"):
        out = tmp_path / engine
        code, stdout, err = hsc("run", art_copy, "--data", data, "--engine", engine, "--output", out)
        assert code == 0, err
        results = json.loads((out / "results.json").read_text())
        assert results["too_long_items"] == [2] and results["n"] == 3 and results["max_seq_len"] == 32
        assert results["truncated_requests"] >= 4
        assert "1 item(s) left out" in stdout and "indices 2" in stdout
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert [s["index"] for s in samples] == [0, 1, 3]
        logliks[engine] = [x for s in samples for x in s["loglik"]]
    np.testing.assert_allclose(logliks["packed"], logliks["reference"], atol=1e-4, rtol=1e-5)


def test_run_with_every_item_too_long_is_one_line(hsc, art_copy, tmp_path):
    m = json.loads((art_copy / "manifest.json").read_text())
    m["model"]["max_seq_len"] = 8
    (art_copy / "manifest.json").write_text(json.dumps(m))
    data = tmp_path / "long.jsonl"
    _write_items(data, [("Q: a b", ["one two three four five six seven eight nine ten", "b", "c", "d"])])
    code, out, err = hsc("run", art_copy, "--data", data, "--output", tmp_path / "r")
    assert_one_line_error(code, out, err, "every selected item has an ending longer than the model's 8-token")


def test_loader_refuses_an_oversized_field(tmp_path):
    data = tmp_path / "huge.jsonl"
    _write_items(data, [("Q: a b", ["a", "b", "c", "d"]), ("Q: c", ["a", " ".join(["word"] * 20_000), "c", "d"])])
    with pytest.raises(Exception, match=rf"huge\.jsonl:2: choices\.1: a string of 99999 characters \(at most "
                                        rf"{MAX_FIELD_BYTES}\)"):
        load_items(str(data))
    _write_items(data, [("Q: a b", ["a", "x" * MAX_FIELD_BYTES, "c", "d"])])
    assert len(load_items(str(data))[0]) == 1
    _write_items(data, [("Q: a b", ["a", "日" * (MAX_FIELD_BYTES // 3 + 1), "c", "d"])])  # 3 bytes a character
    with pytest.raises(Exception, match=f"a context or ending of {MAX_FIELD_BYTES + 2:,} bytes"):
        load_items(str(data))
