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
    seed = int(torch.randint(2**31, ()))
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


@pytest.mark.parametrize("layout", ["rows", "flat"])
@pytest.mark.parametrize("scheme", [None, "int8"])
def test_block_regions_compile_gives_the_same_scores(scheme, layout):
    """One compiled block stamped out for every layer (--block-regions) scores exactly as the model
    compiled as one graph, float and quantized, in both layouts (CPU inductor)."""
    from runtime.bench import random_model

    seed = int(torch.randint(2**31, ()))
    requests = _items(random.Random(seed)) + (_many_items(random.Random(seed), 20) if layout == "flat" else [])
    model = random_model(ARGS, torch.float32, "cpu", seed=seed, scheme=scheme)
    shape = dict(row_len=64, rows_per_batch=2) if layout == "rows" else dict(batch_tokens=256)
    scores = []
    for regions in (False, True):
        torch._dynamo.reset()
        scorer = PackedScorer(model, "cpu", compile=True, block_regions=regions, layout=layout, **shape)
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


# The flat layout: one long tree per row, FlexAttention with a block mask derived from the tree.

def _many_items(rng: random.Random, n: int) -> list[Request]:
    """n items in a few families sharing context prefixes of several lengths (as HellaSwag's
    activity labels do), in shuffled order, so sorted runs and batch boundaries cut families."""
    tok = lambda k: tuple(rng.randrange(1, ARGS.vocab_size) for _ in range(k))
    families = [tok(rng.randrange(1, 9)) for _ in range(4)]
    requests = []
    for i in range(n):
        ctx = rng.choice(families) + tok(rng.randrange(1, 12))
        endings = [tok(rng.randrange(1, 6)) for _ in range(4)]
        requests += [Request(i, j, ctx, e, False) for j, e in enumerate(endings)]
    return requests


def test_flat_batches_hold_every_target_once_and_fewer_tokens():
    from runtime.packed import flat_segments

    requests = _many_items(random.Random(3), 40)
    segments, row_len = flat_segments(requests, batch_tokens=256)
    assert row_len % 128 == 0 and len(segments) > 1
    assert all(len(s.tokens) <= row_len for s in segments)
    owners = np.concatenate([s.target_request for s in segments])
    assert sorted(owners.tolist()) == sorted(i for i, r in enumerate(requests) for _ in r.continuation)
    assert sum(len(s.tokens) for s in segments) < sum(len(s.tokens) for s in make_segments(requests))


def _run_tree_sizes(requests, runs_of_items) -> list[int]:
    from runtime.packed import _items_of

    items = _items_of(requests)
    return [len(tree_segment([x for i in run for x in items[i]]).tokens) for run in runs_of_items]


@pytest.mark.parametrize("seed", range(4))
def test_filled_runs_place_every_item_once_within_the_limit(seed):
    """Next-fit in context order, then each tree's tail filled from the next items: every item in
    exactly one tree, no tree past the limit (the bound counts a filler whole, and an item taken out of
    order leaves its neighbours sharing the shorter prefix), and never more trees than next-fit."""
    from runtime.packed import _context_order, _filled_runs, _items_of, _sorted_runs

    requests = _many_items(random.Random(seed), 120)
    items = _items_of(requests)
    order, shared = _context_order(items)
    sizes = [len(tree_segment(items[i]).tokens) for i in order]
    for limit in (max(sizes), 96, 160, 400):
        if limit < max(sizes):
            continue
        runs = _filled_runs(sizes, shared, limit)
        assert sorted(k for run in runs for k in run) == list(range(len(sizes)))
        assert max(_run_tree_sizes(requests, [[order[k] for k in run] for run in runs])) <= limit
        assert len(runs) <= len(_sorted_runs(sizes, shared, limit))
    # A short item further on fills the room the next one in order does not fit, if it is in sight;
    # the largest that fits does.
    assert _filled_runs([6, 6, 5, 3], [0, 0, 0, 0], limit=10, lookahead=2) == [[0], [1, 3], [2]]
    assert _filled_runs([6, 6, 5, 3], [0, 0, 0, 0], limit=10, lookahead=3) == [[0, 3], [1], [2]]
    assert _filled_runs([6, 6, 3, 4], [0, 0, 0, 0], limit=10, lookahead=3) == [[0, 3], [1, 2]]
    # Item 2, taken out, shared 2 tokens with item 1 and 5 with item 3: so 1 and 3 share 2.
    assert _filled_runs([6, 6, 3, 6], [0, 0, 2, 5], limit=9, lookahead=3) == [[0, 2], [1], [3]]


def test_flat_trees_do_not_depend_on_the_batch_size(monkeypatch):
    """The flat layout's trees are cut at FLAT_TREE_TOKENS whatever --batch-tokens is, so every tree
    sits at the start of its own row at every budget: the rows of a larger budget are the smaller
    one's, only grouped several to a batch."""
    import runtime.packed as packed

    monkeypatch.setattr(packed, "FLAT_TREE_TOKENS", 256)
    requests = _items(random.Random(5)) + _many_items(random.Random(5), 60)
    rows = {}
    for budget in (256, 512, 1024, 1100):
        b = PackedScorer(None, "cpu", batch_tokens=budget, compile=True, layout="flat").prepare(requests)
        assert b.tokens.shape[1:] == (budget // 256, 256)
        real = b.slot.flatten(0, 1).ne(-1).any(-1)  # a short last batch is padded with empty rows
        rows[budget] = [t.flatten(0, 1)[real] for t in (b.tokens, b.positions, b.subtree_end)]
    assert len(rows[256][0]) > 2
    for budget in (512, 1024, 1100):
        for got, want in zip(rows[budget], rows[256]):
            assert torch.equal(got, want)
    # A budget below the tree length cuts smaller trees (at least the longest item).
    b = PackedScorer(None, "cpu", batch_tokens=128, compile=True, layout="flat").prepare(requests)
    assert b.tokens.shape[1:] == (1, 128)
    # Items that fit one shorter tree make one row of whole query blocks, at every budget.
    few = requests[:12]
    for budget in (512, 16384):
        b = PackedScorer(None, "cpu", batch_tokens=budget, compile=True, layout="flat").prepare(few)
        assert b.tokens.shape == (1, 1, 128) and b.real_tokens[0] > 32


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_replicas_run_the_rows_one_gpu_runs(layout):
    """Data parallelism deals whole rows: replica r of n packs rows r, r + n, ... of the one-GPU packing,
    as many to a batch, so each row (its trees, where they sit) and each score is the one GPU's; every
    item is held by exactly one replica, and its scores are NaN elsewhere."""
    seed = int(torch.randint(2**31, ()))
    requests = _items(random.Random(seed)) + _many_items(random.Random(seed), 80)
    model = Transformer(ARGS)
    model.load_state_dict(random_state_dict(ARGS, seed))
    model.eval().use_half_split_rope()
    shape = dict(row_len=256, batch_tokens=512) if layout == "rows" else dict(row_len=128, batch_tokens=256)
    scorer = lambda: PackedScorer(model, "cpu", layout=layout, **shape)
    one_scorer = scorer()
    one = one_scorer.prepare(requests)
    want = one_scorer.score(one)
    real_rows = lambda b: [t.flatten(0, 1)[b.slot.flatten(0, 1).ne(-1).any(-1)] for t in (b.tokens, b.positions, b.subtree_end)]
    n_rows = len(real_rows(one)[0])
    assert n_rows >= 4 and one.tokens.shape[1] == 2
    for count in (2, 3, n_rows + 1):
        held, got = [], np.full(len(requests), np.nan)
        for rank in range(count):
            part_scorer = scorer()
            part = part_scorer.prepare(requests, replica=(rank, count))
            if rank >= n_rows:  # more replicas than rows: the rest idle
                assert part is None
                continue
            assert part.shape[:2] == one.shape[:2]  # the targets' padding follows the replica's batches
            for its_rows, all_rows in zip(real_rows(part), real_rows(one)):
                assert torch.equal(its_rows, all_rows[rank::count])
            scores = np.array(part_scorer.score(part))
            mine = part.items_held()
            held += mine
            reqs = [4 * i + j for i in mine for j in range(4)]
            assert not np.isnan(scores[reqs]).any() and np.isnan(np.delete(scores, reqs)).all()
            got[reqs] = scores[reqs]
        assert sorted(held) == list(range(len(requests) // 4))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"seed {seed}")


@pytest.mark.parametrize("q_block,kv_block", [(128, 64), (128, 128), (64, 16)])
def test_tree_block_mask_is_the_dense_mask_in_blocks(q_block, kv_block):
    """Blocks listed as partly read are exactly those with some but not all elements allowed by
    the dense tree mask; blocks listed as fully read exactly those with all; padding included."""
    from runtime.packed import flat_segments, tree_block_mask

    rng = random.Random(4)
    # one long context: its early key blocks are read in full by the query blocks after them
    long = tuple(rng.randrange(1, ARGS.vocab_size) for _ in range(300))
    requests = _many_items(rng, 60) + [Request(60, j, long, (j + 1, j + 2), False) for j in range(4)]
    segments, T = flat_segments(requests, batch_tokens=512)
    b = pack(segments, T, 1, rows=[[i] for i in range(len(segments))])
    parts = tree_block_mask(b.subtree_end, kv_block, q_block)
    assert parts[0].sum() > 0 and parts[2].sum() > 0  # blocks read in part and in full
    nq, nk = T // q_block, T // kv_block
    for n in range(b.subtree_end.shape[0]):
        dense = attention_mask(b.subtree_end[n])[0, 0].view(nq, q_block, nk, kv_block).transpose(1, 2)
        some, every = dense.any(-1).any(-1), dense.all(-1).all(-1)
        for (num, idx), want in ((parts[0:2], some & ~every), (parts[2:4], every)):
            got = torch.zeros(nq, nk, dtype=torch.bool)
            for q in range(nq):
                got[q, idx[n, 0, 0, q, :num[n, 0, 0, q]].long()] = True
            assert torch.equal(got, want)
            assert (num[n, 0, 0] == want.sum(-1)).all()


def test_tree_block_mask_full_up_to_the_last_token():
    """A tree of exactly one row: every context key's subtree ends at the row's end, so the key
    blocks before the last query block are read in full by it (the boundary of `cover`)."""
    from runtime.packed import flat_segments, tree_block_mask

    context = tuple(range(1, 251))
    segments, T = flat_segments([Request(0, j, context, (7,) * 7, False) for j in range(4)], batch_tokens=256)
    assert T == 256 and len(segments[0].tokens) == 256
    b = pack(segments, T, 1, rows=[[0]])
    kv_num, kv_idx, full_num, full_idx = (t[0, 0, 0] for t in tree_block_mask(b.subtree_end, 64, 128))
    assert full_num.tolist() == [0, 2] and sorted(full_idx[1, :2].tolist()) == [0, 1]
    assert kv_num.tolist() == [2, 2]  # the diagonal blocks: causal, read in part


@pytest.mark.parametrize("kv_block", [64, 128])
@pytest.mark.parametrize("compile", [False, True])
def test_flat_layout_matches_float64_reference(compile, kv_block, monkeypatch):
    import runtime.packed as packed

    monkeypatch.setattr(packed, "flex_kv_block", lambda head_dim: kv_block)
    seed = int(torch.randint(2**31, ()))
    requests = _items(random.Random(seed)) + _many_items(random.Random(seed), 30)
    sd = random_state_dict(ARGS, seed)
    model = Transformer(ARGS)
    model.load_state_dict(sd)
    # The runtime's RoPE layout (artifacts load so); CPU inductor's FlexAttention template cannot
    # read a query that is a view of the interleaved rotation's 5-d result (torch 2.13).
    model.eval().use_half_split_rope()
    torch._dynamo.reset()
    scorer = PackedScorer(model, "cpu", row_len=128, batch_tokens=256, compile=compile, layout="flat")
    batches = scorer.prepare(requests)
    assert batches.tokens.shape[0] > 1 and batches.tokens.shape[1] == 2  # batches of two trees (rows)
    assert batches.block_mask[1].shape[-1] == batches.tokens.shape[-1] // kv_block
    got = scorer.score(batches)
    want = _reference(sd, requests)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5, err_msg=f"seed {seed}")


def test_flex_key_blocks_are_a_multiple_of_the_kernel_tiles():
    from runtime.packed import flex_kv_block

    # 64 where it was measured (head 128); 128, a multiple of every tile width, for smaller heads,
    # where FlexAttention's 16-bit kernel reads 128 keys at a time (64 failed for SmolLM2's head of 64).
    assert flex_kv_block(128) == 64 and flex_kv_block(64) == flex_kv_block(32) == 128


def test_flat_layout_refuses_a_row_length_off_the_block():
    with pytest.raises(ValueError, match="multiple of 128"):
        PackedScorer(None, "cpu", row_len=200, layout="flat")
