"""The fast scoring engine: shared-prefix packing, fixed shapes, LM head only where needed.

Each item becomes a prefix tree: its context once, then its 4 endings (without their last token,
which predicts nothing) as branches; endings that start alike share their first tokens, and items
whose contexts share a prefix (same activity label and opening words) share one tree. A token
attends to its ancestors in the tree and to itself, at its depth as position, so every ending sees
exactly what it would see in its own forward pass (lm-eval's loop), and every shared token is
computed once instead of up to 4x (1.85 M -> 1.83 M tokens on HellaSwag; one forward per ending
would be 3.6 M).

Trees are laid out depth-first and packed first-fit into rows of `row_len` tokens, and rows into
batches of `rows_per_batch`: every batch has the same shape, so one compiled graph (and one CUDA
graph) serves the whole set. Attention uses SDPA with a mask built on the device from one small
per-token tensor (where each token's subtree ends); at row lengths of a few hundred tokens
attention is a few percent of the FLOPs of a 30B model, so a dense mask costs little and runs on
every backend. All packing and gather indices are prepared before the timed loop. (FlexAttention
with a block-sparse mask was faster in isolation but not inside the compiled step: docs/design.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from runtime.scoring import Request

PAD_SLOT = -1  # segment slot of padding tokens (each attends only to itself, so never an empty row)


@dataclass(frozen=True)
class Segment:
    """Requests that share prefixes, laid out as a prefix tree in depth-first order.

    Every token is a node of the tree; its children follow it. A token may attend to exactly its
    ancestors and itself, which in depth-first (pre-)order are the tokens j <= i whose subtree
    still contains i: j <= i < subtree_end[j]. Its position is its depth, as in its own forward."""

    tokens: np.ndarray  # [S] input ids
    positions: np.ndarray  # [S] depth in the tree = position in the request's own sequence
    subtree_end: np.ndarray  # [S] one past the last offset of each token's subtree
    target_offsets: np.ndarray  # [n_targets] offset within the segment whose hidden state predicts
    target_ids: np.ndarray  # [n_targets]
    target_request: np.ndarray  # [n_targets] index into the request list


def tree_segment(requests: list[tuple[int, Request]]) -> Segment:
    """One segment for (request index, request) pairs: the tree of their input sequences
    (context + continuation without its last token, which predicts nothing), each shared prefix
    stored once. The first continuation token is predicted by the last context token, the
    others by the continuation's own tokens."""
    children: list[dict[int, int]] = [{}]  # node 0: the empty root, not a token
    parent, token = [-1], [-1]
    paths = []
    for _, r in requests:
        node, path = 0, []
        for t in (*r.context, *r.continuation[:-1]):
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(children)
                children.append({})
                parent.append(node)
                token.append(t)
                children[node][t] = nxt
            node = nxt
            path.append(node)
        paths.append(path)
    n = len(children)
    pre = np.zeros(n, np.int64)  # offset of each node in depth-first order
    order, stack = [], list(reversed(children[0].values()))
    while stack:
        node = stack.pop()
        pre[node] = len(order)
        order.append(node)
        stack.extend(reversed(children[node].values()))  # first-inserted child first
    size = np.ones(n, np.int64)
    depth = np.zeros(n, np.int64)
    for node in order:  # parents come before children
        depth[node] = depth[parent[node]] + 1 if parent[node] > 0 else 0
    for node in reversed(order):
        if parent[node] > 0:
            size[parent[node]] += size[node]
    offs, tgts, owner = [], [], []
    for (idx, r), path in zip(requests, paths):
        c = len(r.context)
        offs += [pre[path[c - 1 + t]] for t in range(len(r.continuation))]
        tgts += list(r.continuation)
        owner += [idx] * len(r.continuation)
    order = np.array(order, np.int64)
    return Segment(np.array(token, np.int64)[order], depth[order], pre[order] + size[order],
                   np.array(offs, np.int64), np.array(tgts, np.int64), np.array(owner, np.int64))


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# Items whose contexts share at least MIN_SHARED tokens (sorted neighbours: the same activity label
# and opening words, or the same context) go into one segment, up to MAX_SHARED_SEGMENT tokens.
# Larger groups save a little more but pack worse into fixed rows; on HellaSwag's validation set
# with LLaMA's tokenizer these values give 1.834 M tokens instead of 1.852 M (one tree per item)
# and 114 batches of [36 x 448] (4,101 rows); MIN_SHARED = 10 gave 1.837 M tokens and 115 batches,
# and no (MIN_SHARED, MAX_SHARED_SEGMENT) in {3, 5, 7, 10} x {192, ..., 288} fewer than 114.
MIN_SHARED = 5
MAX_SHARED_SEGMENT = 224


def make_segments(requests: list[Request], share_prefixes: bool = True) -> list[Segment]:
    """Requests come 4 per item (build_requests' order) and share the item's context; each item
    is one tree (context, then its endings, endings that start alike sharing their first
    tokens). With share_prefixes, items whose contexts share a prefix are merged into one tree."""
    items = []
    for k in range(0, len(requests), 4):
        group = [(k + j, r) for j, r in enumerate(requests[k:k + 4])]
        assert all(r.context == group[0][1].context for _, r in group), "an item's endings share its context"
        items.append(group)
    alone = [tree_segment(g) for g in items]
    if not share_prefixes:
        return alone
    solo = [len(s.tokens) for s in alone]
    order = sorted(range(len(items)), key=lambda i: items[i][0][1].context)
    segments, members, bound = [], [], 0
    for i in order:
        if members:
            shared = _common_prefix(items[members[-1]][0][1].context, items[i][0][1].context)
            # Sorted contexts: the previous one shares the most with this one, so this is an upper
            # bound of the merged tree's size.
            if shared >= MIN_SHARED and bound + solo[i] - shared <= MAX_SHARED_SEGMENT:
                members.append(i)
                bound += solo[i] - shared
                continue
            segments.append(_merged(members, items, alone))
        members, bound = [i], solo[i]
    if members:
        segments.append(_merged(members, items, alone))
    return segments


def _merged(members: list[int], items: list[list[tuple[int, Request]]], alone: list[Segment]) -> Segment:
    """The tree of several items; a lone item's tree is already built."""
    if len(members) == 1:
        return alone[members[0]]
    return tree_segment([x for m in members for x in items[m]])


@dataclass
class Batches:
    """All batches of one shape, stacked, ready to move to the device once."""

    tokens: torch.Tensor  # [n_batches, B, T]
    positions: torch.Tensor  # [n_batches, B, T]
    slot: torch.Tensor  # [n_batches, B, T] segment slot within its row, PAD_SLOT for padding
    subtree_end: torch.Tensor  # [n_batches, B, T] row offset one past each token's subtree
    target_index: torch.Tensor  # [n_batches, N] flat index into B*T
    target_ids: torch.Tensor  # [n_batches, N]
    target_request: torch.Tensor  # [n_batches, N] request index, -1 for padding targets
    real_tokens: list[int]  # non-padding tokens per batch (for tokens/s)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.tokens.shape[1:]) + (self.target_index.shape[1],)


def choose_row_len(segments: list[Segment], batch_tokens: int, min_fill: float = 0.97) -> int:
    """The shortest row (a multiple of 64, from the longest item up to 4x it) whose first-fit
    packing fills at least `min_fill` of the batch tokens; else the best-filled one. Short rows
    waste padding when two items do not fit one row (384-token rows hold HellaSwag at 78%, 512 at
    99%); long rows cost attention, which a dense mask computes over the whole row."""
    longest = max(len(s.tokens) for s in segments)
    start = 64 * math.ceil(longest / 64)
    best, best_fill = start, 0.0
    total = sum(len(s.tokens) for s in segments)
    for row_len in range(start, 4 * start + 1, 64):
        rows_per_batch = max(1, batch_tokens // row_len)
        n_rows = len(_first_fit([len(s.tokens) for s in segments], row_len))
        fill = total / (math.ceil(n_rows / rows_per_batch) * rows_per_batch * row_len)
        if fill >= min_fill:
            return row_len
        if fill > best_fill:
            best, best_fill = row_len, fill
    return best


def _first_fit(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: long items first, each into the first row with room."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(row_len)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack(segments: list[Segment], row_len: int, rows_per_batch: int, target_multiple: int = 256,
         n_targets: int | None = None, rows: list[list[int]] | None = None) -> Batches:
    """n_targets: pad every batch's target list to exactly this many (to reuse a compiled shape).
    rows: the first-fit rows of these segments at row_len, if the caller has them already."""
    too_long = max(len(s.tokens) for s in segments)
    if too_long > row_len:
        raise ValueError(f"an item needs {too_long} tokens, more than the row length {row_len}")
    if rows is None:
        rows = _first_fit([len(s.tokens) for s in segments], row_len)
    n_batches = math.ceil(len(rows) / rows_per_batch)
    B, T = rows_per_batch, row_len
    shape = (n_batches, B, T)
    tokens = np.zeros(shape, np.int64)
    positions = np.zeros(shape, np.int64)  # padding stays at position 0: any position is in range
    slot = np.full(shape, PAD_SLOT, np.int64)
    # Padding tokens are their own subtree: they attend only to themselves (never an empty row).
    subtree_end = np.broadcast_to(np.arange(1, T + 1), shape).copy()
    t_index, t_ids, t_req = [[] for _ in range(n_batches)], [[] for _ in range(n_batches)], [[] for _ in range(n_batches)]
    real = [0] * n_batches
    for r, members in enumerate(rows):
        b, row = divmod(r, B)
        at = 0
        for s_i, i in enumerate(members):
            s = segments[i]
            n = len(s.tokens)
            tokens[b, row, at:at + n] = s.tokens
            positions[b, row, at:at + n] = s.positions
            slot[b, row, at:at + n] = s_i
            subtree_end[b, row, at:at + n] = at + s.subtree_end
            t_index[b].append(row * T + at + s.target_offsets)
            t_ids[b].append(s.target_ids)
            t_req[b].append(s.target_request)
            real[b] += n
            at += n
    most = max(sum(len(x) for x in t) for t in t_index)
    N = n_targets or target_multiple * math.ceil(most / target_multiple)
    if most > N:
        raise ValueError(f"a batch needs {most} targets, more than the fixed {N}")
    idx = np.zeros((n_batches, N), np.int64)
    ids = np.zeros((n_batches, N), np.int64)
    req = np.full((n_batches, N), -1, np.int64)
    for b in range(n_batches):
        if t_index[b]:
            flat = np.concatenate(t_index[b])
            idx[b, :len(flat)] = flat
            ids[b, :len(flat)] = np.concatenate(t_ids[b])
            req[b, :len(flat)] = np.concatenate(t_req[b])
    t = torch.from_numpy
    return Batches(t(tokens), t(positions), t(slot), t(subtree_end), t(idx), t(ids), t(req), real)


def attention_mask(subtree_end: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T] (True = may attend): query i may read key j iff j is i or an ancestor of i in
    its segment's tree, i.e. j <= i < subtree_end[j] (rows are depth-first). Built once per batch and
    shared by every layer. (An additive bf16 mask was no faster: docs/benchmarks.md.)"""
    T = subtree_end.shape[1]
    idx = torch.arange(T, device=subtree_end.device)
    allowed = (idx[None, None, :] <= idx[None, :, None]) & (idx[None, :, None] < subtree_end[:, None, :])
    return allowed[:, None]


def packed_step(model, tokens, positions, subtree_end, target_index, target_ids,
                block_regions: bool = False) -> torch.Tensor:
    """log p(target) [N] in fp32 for one packed batch (the function that gets compiled).
    block_regions: compile one transformer block for all layers (Transformer.forward)."""
    hidden = model(tokens, positions, attention_mask(subtree_end), block_regions=block_regions)  # [B, T, D]
    picked = hidden.flatten(0, 1).index_select(0, target_index)  # [N, D]
    return model.token_logprobs(picked, target_ids)


class PackedScorer:
    def __init__(self, model, device, row_len: int | None = None, batch_tokens: int = 16384,
                 rows_per_batch: int | None = None, compile: bool = False, block_regions: bool = False):
        """row_len None: from the data; rows_per_batch None: batch_tokens // row_len.
        block_regions (with compile): compile one transformer block and reuse it for every layer."""
        self.model, self.device = model, torch.device(device)
        self.row_len, self.batch_tokens, self.rows_per_batch = row_len, batch_tokens, rows_per_batch
        step = lambda *a: packed_step(model, *a, block_regions=block_regions)
        # reduce-overhead = inductor kernels replayed through CUDA graphs: one fixed shape, so
        # one graph; without CUDA, plain inductor.
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.step = torch.compile(step, mode=mode, fullgraph=True, dynamic=False) if compile else step
        self.compiled = compile

    def prepare(self, requests: list[Request], like: Batches | None = None) -> Batches:
        """Pack `requests`; with `like`, into exactly the shape of earlier batches, so the
        compiled step (and its CUDA graph) is reused."""
        segments = make_segments(requests)
        if self.row_len is None:
            self.row_len = choose_row_len(segments, self.batch_tokens)
        rows = _first_fit([len(s.tokens) for s in segments], self.row_len)
        if self.rows_per_batch is None:
            self.rows_per_batch = max(1, self.batch_tokens // self.row_len)
            if not self.compiled:  # eager: no graph to reuse, so do not pad a short run to a full batch
                self.rows_per_batch = min(self.rows_per_batch, len(rows))
        batches = pack(segments, self.row_len, self.rows_per_batch,
                       n_targets=like.target_index.shape[1] if like is not None else None, rows=rows)
        self.n_requests = len(requests)
        for name in ("tokens", "positions", "subtree_end", "target_index", "target_ids"):
            setattr(batches, name, getattr(batches, name).to(self.device))
        return batches

    @staticmethod
    def _step_args(batches: Batches, b: int) -> tuple[torch.Tensor, ...]:
        return (batches.tokens[b], batches.positions[b], batches.subtree_end[b], batches.target_index[b],
                batches.target_ids[b])

    @torch.inference_mode()
    def warmup(self, batches: Batches, steps: int = 3) -> None:
        """Compile, autotune and record the CUDA graph on the first batch (a graph is recorded on
        a later call than the first). Eager execution needs no warm-up."""
        for _ in range(steps if self.compiled else 0):
            self.step(*self._step_args(batches, 0))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def score(self, batches: Batches, progress=None, sync_every: int = 8) -> list[float]:
        n_requests = self.n_requests
        outputs, reported = [], 0
        n_batches = batches.tokens.shape[0]
        for b in range(n_batches):
            logp = self.step(*self._step_args(batches, b))
            outputs.append(logp.clone())  # CUDA-graph outputs are overwritten by the next replay
            if progress is not None and ((b + 1) % sync_every == 0 or b + 1 == n_batches):
                # Wait for the device now and then, so the live tokens/s is the device's, not the queue's.
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                progress(sum(batches.real_tokens[reported:b + 1]))
                reported = b + 1
        logp = torch.stack(outputs).double().cpu().flatten()
        owner = batches.target_request.flatten()
        keep = owner >= 0
        sums = torch.zeros(n_requests, dtype=torch.float64).index_add_(0, owner[keep], logp[keep])
        return sums.tolist()
