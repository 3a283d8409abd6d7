"""The packed engine's prefix trees against the float64 reference (one forward per request).

Requests are built to hit every case of the tree layout: items whose contexts share a long prefix
(merged into one tree), identical contexts, endings that start alike, an ending that is a prefix
of another, one-token endings (no ending tokens in the tree at all), and an item that shares
nothing."""

import random

import numpy as np
import pytest
import torch

from runtime.config import ModelArgs
from runtime.model import Transformer
from runtime.packed import MIN_SHARED, PackedScorer, attention_mask, make_segments, pack, tree_segment
from runtime.scoring import Request
from tests import reference
from tests.test_model import random_state_dict

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=32,
                 rope_theta=500.0, max_seq_len=128)


def _items(rng: random.Random) -> list[Request]:
    tok = lambda n: tuple(rng.randrange(1, ARGS.vocab_size) for _ in range(n))
    shared = tok(MIN_SHARED + 3)
    contexts = [shared + tok(5), shared + tok(9), shared[:MIN_SHARED] + tok(4), tok(12), tok(12)]
    contexts.append(contexts[1])  # an identical context
    requests = []
    for i, ctx in enumerate(contexts):
        start = tok(2)
        endings = [start + tok(3), start + tok(1), tok(1), start]  # alike, prefix of another, one token
        rng.shuffle(endings)
        requests += [Request(i, j, ctx, e, False) for j, e in enumerate(endings)]
    return requests


def _reference(sd, requests) -> list[float]:
    w = reference.to_float64(sd)
    out = []
    for r in requests:
        seq = list(r.context + r.continuation)
        logp = reference.forward_logprobs(w, ARGS, seq)
        c = len(r.context)
        out.append(float(sum(logp[c - 1 + t, tok] for t, tok in enumerate(r.continuation))))
    return out


def test_trees_share_prefixes():
    requests = _items(random.Random(0))
    segments = make_segments(requests)
    alone = make_segments(requests, share_prefixes=False)
    assert len(segments) < len(alone) == len(requests) // 4
    # Every input token of every request is in some tree exactly once per distinct prefix of a tree.
    assert sum(len(s.tokens) for s in segments) < sum(len(s.tokens) for s in alone) < \
        sum(len(r.context) + len(r.continuation) - 1 for r in requests)
    for s in segments:
        n = len(s.tokens)
        assert (s.subtree_end > np.arange(n)).all() and (s.subtree_end <= n).all()
    # Each request's targets appear once in all.
    owners = np.concatenate([s.target_request for s in segments])
    assert sorted(owners.tolist()) == sorted(i for i, r in enumerate(requests) for _ in r.continuation)


def test_tree_mask_reads_exactly_the_request_prefix():
    """Follow each request's path in its tree: the positions a target's predicting token may attend
    to are exactly that request's earlier tokens, at their positions."""
    requests = _items(random.Random(1))
    for seg in make_segments(requests):
        end = torch.from_numpy(seg.subtree_end)[None]
        allowed = attention_mask(end)[0, 0]
        for t_off, t_req in zip(seg.target_offsets, seg.target_request):
            r = requests[t_req]
            seq = r.context + r.continuation[:-1]
            seen = allowed[t_off].nonzero().squeeze(1)
            depth = seg.positions[t_off]
            assert seg.positions[seen.numpy()].tolist() == list(range(depth + 1))
            assert seg.tokens[seen.numpy()].tolist() == list(seq[:depth + 1])


def test_padding_attends_only_to_itself():
    requests = _items(random.Random(2))
    b = pack(make_segments(requests), row_len=64, rows_per_batch=4)
    allowed = attention_mask(b.subtree_end[0])[:, 0]
    pad = b.slot[0] == -1
    assert pad.any()
    assert (allowed.sum(-1)[pad] == 1).all()
    assert allowed.diagonal(dim1=1, dim2=2).all()  # never an empty row


@pytest.mark.parametrize("share", [True, False])
def test_packed_matches_float64_reference(share, monkeypatch):
    seed = torch.seed() % 2**31
    rng = random.Random(seed)
    requests = _items(rng)
    sd = random_state_dict(ARGS, seed)
    model = Transformer(ARGS)
    model.load_state_dict(sd)
    model.eval()
    if not share:
        import runtime.packed as packed
        monkeypatch.setattr(packed, "make_segments", lambda reqs: make_segments(reqs, share_prefixes=False))
    scorer = PackedScorer(model, "cpu", row_len=64, rows_per_batch=2)
    got = scorer.score(scorer.prepare(requests))
    want = _reference(sd, requests)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_block_regions_compile_gives_the_same_scores(scheme):
    """One compiled block stamped out for every layer (--block-regions) scores exactly as the model
    compiled as one graph, float and quantized (CPU inductor)."""
    from runtime.bench import random_model

    seed = torch.seed() % 2**31
    requests = _items(random.Random(seed))
    model = random_model(ARGS, torch.float32, "cpu", seed=seed, scheme=scheme)
    scores = []
    for regions in (False, True):
        torch._dynamo.reset()
        scorer = PackedScorer(model, "cpu", row_len=64, rows_per_batch=2, compile=True, block_regions=regions)
        scores.append(scorer.score(scorer.prepare(requests)))
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-5, rtol=0, err_msg=f"seed {seed}")
    if scheme is None:  # and both are the float64 reference's
        want = _reference(reference.model_weights_float64(model), requests)
        np.testing.assert_allclose(scores[1], want, atol=1e-4, rtol=1e-5, err_msg=f"seed {seed}")


def test_single_request_tree_is_its_sequence():
    r = Request(0, 0, (5, 6, 7), (8, 9), False)
    seg = tree_segment([(0, r)])
    assert seg.tokens.tolist() == [5, 6, 7, 8]
    assert seg.positions.tolist() == [0, 1, 2, 3]
    assert seg.subtree_end.tolist() == [4, 4, 4, 4]
    assert seg.target_offsets.tolist() == [2, 3] and seg.target_ids.tolist() == [8, 9]
