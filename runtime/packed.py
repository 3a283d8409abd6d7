"""The fast scoring engine: shared-prefix packing, fixed shapes, LM head only where needed.

Each item becomes a prefix tree: its context once, then its 4 endings (without their last token,
which predicts nothing) as branches; endings that start alike share their first tokens, and items
whose contexts share a prefix (BOS, the activity label and opening words) share one tree. A token
attends to its ancestors in the tree and to itself, at its depth as position, so every ending sees
exactly what it would see in its own forward pass (lm-eval's loop), and every shared token is
computed once (one forward per ending would be 3.6 M tokens on HellaSwag).

Two layouts give every batch the same shape, so one compiled graph (and one CUDA graph) serves the
whole set; all packing, masks and gather indices are prepared before the timed loop:
- rows: trees (merged while their contexts share enough) packed first-fit into rows of `row_len`
  tokens, rows into batches of `rows_per_batch` (1.83 M tokens); attention is SDPA with a dense mask
  built on the device from one small per-token tensor (where each token's subtree ends). Runs on
  every backend, compiled or not.
- flat (CUDA, compiled): each row is one tree of up to 8,064 tokens, built from a run of
  context-sorted items, so prefixes shared by many items are computed once per tree (1.76 M tokens);
  two rows to a batch. The trees do not depend on the batch size, so neither do the scores; attention
  is FlexAttention with a block-sparse mask derived from the same tensor. docs/design.md has the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask

from runtime.scoring import Request, fit_request

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


def _items_of(requests: list[Request]) -> list[list[tuple[int, Request]]]:
    """Requests come 4 per item (build_requests' order) and share the item's context, unless it was
    cut on the left to fit the model (scoring.fit_request), by as much as each ending needs."""
    return [[(k + j, r) for j, r in enumerate(requests[k:k + 4])] for k in range(0, len(requests), 4)]


def _shared_context(group: list[tuple[int, Request]]) -> tuple[int, ...]:
    """The context tokens every request of an item starts with (all of it, unless it was cut)."""
    first = group[0][1].context
    return first[:min(_common_prefix(first, r.context) for _, r in group)]


def _context_order(items: list[list[tuple[int, Request]]]) -> tuple[list[int], list[int]]:
    """Items sorted by context, and how many context tokens each shares with the one before it.
    Sorted, an item's predecessor shares the most with it of all earlier items, so merging a run of
    sorted items saves exactly the sum of these counts (more only where identical contexts also have
    endings that start alike)."""
    contexts = [_shared_context(g) for g in items]
    context = lambda i: contexts[i]
    order = sorted(range(len(items)), key=context)
    shared = [0] + [_common_prefix(context(a), context(b)) for a, b in zip(order, order[1:])]
    return order, shared


def make_segments(requests: list[Request], share_prefixes: bool = True) -> list[Segment]:
    """Each item is one tree (context, then its endings, endings that start alike sharing their
    first tokens). With share_prefixes, items whose contexts share a prefix are merged into one tree."""
    items = _items_of(requests)
    alone = [tree_segment(g) for g in items]
    if not share_prefixes:
        return alone
    order, shared = _context_order(items)
    sizes = [len(alone[i].tokens) for i in order]
    runs = _sorted_runs(sizes, shared, MAX_SHARED_SEGMENT, min_shared=MIN_SHARED)
    return [_merged([order[k] for k in run], items, alone) for run in runs]


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
    # The flat layout's FlexAttention mask (tree_block_mask, on the device); None: dense SDPA masks.
    block_mask: tuple[torch.Tensor, ...] | None = None
    n_requests: int = 0  # all requests packed (a data-parallel replica's batches hold some of them)

    def attended_keys(self) -> int:
        """Keys the real tokens attend to, summed (a token at depth d reads d + 1): attention's
        work as the model needs it, whatever the layout computes."""
        return int(((self.positions + 1) * (self.slot != PAD_SLOT).to(self.positions.device)).sum())

    def items_held(self) -> list[int]:
        """Positions of the items whose requests these batches score (requests come 4 per item)."""
        owners = self.target_request[self.target_request >= 0]
        return sorted(set((owners // 4).tolist()))

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


# The flat layout (CUDA, compiled): each row is one tree of a run of items sorted by context, up to
# FLAT_TREE_TOKENS long. A prefix that many items share (the BOS token, an activity label and the words
# after it, a repeated context) is then computed once per tree instead of once per short row: on
# HellaSwag's validation set with LLaMA's tokenizer, 1.759 M tokens in 220 trees, 110 batches of
# [2 x 8,064], instead of 1.834 M in 114 batches of [36 x 448]. A dense mask over an 8k-token row would
# be 8k x 8k per row, so this layout runs FlexAttention with a block-sparse mask derived from the tree
# (tree_block_mask): queries in blocks of FLEX_Q_BLOCK tokens, keys in blocks of flex_kv_block(head_dim).
# A far ancestor (the shared BOS, an activity label) makes its whole key block read by every query
# block below it, so smaller key blocks waste less: on the full set's batches 128-key blocks read 1.33x
# the elements of [36 x 448] dense rows, 64-key blocks 0.90x.
FLEX_Q_BLOCK = 128

# The trees are cut from the data alone, never from the batch size: --batch-tokens only decides how
# many rows (trees) a batch holds. Each tree then sits at offset 0 of its row at every batch size, so
# FlexAttention splits every token's keys into the same blocks and sums them in the same order, and
# bf16 scores do not move with the budget (trees cut to the budget made predictions depend on it:
# docs/design.md).
# 8,064 = 63 x 128 query blocks: one tree fills an 8,192-token budget, two a 16,384 one, and a batch of
# two is 16,128 = 63 x 256 rows for the linears, where cuBLAS picks its faster 256-row tiles
# (docs/benchmarks.md).
FLAT_TREE_TOKENS = 8064
# How many of the next items in context order may fill the tail of a tree that the next one does not fit
# (a filler is counted at its whole size, as if it shared nothing with the tree): fewer trees than next-fit
# alone, so fewer batches.
FILL_LOOKAHEAD = 64


def flex_kv_block(head_dim: int) -> int:
    """64 for heads of 128 or more (LLaMA-30B: FlexAttention's kernel reads keys in tiles of 64
    there, and 64-key blocks read 0.68x the mask elements of 128-key ones); 128 for smaller heads,
    whose 16-bit kernel tiles are 128 keys wide (torch 2.11 refuses a mask block that is not a
    multiple of the tile: 64 failed for SmolLM2's heads of 64); 128 is a multiple of every tile width."""
    return 64 if head_dim >= 128 else 128


def _sorted_runs(sizes: list[int], shared: list[int], limit: int, min_shared: int = 0) -> list[list[int]]:
    """Next-fit over items in context order (positions in that order; sizes of their own trees,
    shared tokens with the predecessor from _context_order): an item joins the current tree if it
    shares at least min_shared tokens with its predecessor and the tree stays within `limit` at the
    item's size minus those tokens (an upper bound of what it adds); else it starts the next tree,
    where it pays its whole size again."""
    runs: list[list[int]] = []
    used = 0
    for k, (size, common) in enumerate(zip(sizes, shared)):
        if runs and common >= min_shared and used + size - common <= limit:
            runs[-1].append(k)
            used += size - common
        else:
            runs.append([k])
            used = size
    return runs


def _filled_runs(sizes: list[int], shared: list[int], limit: int, lookahead: int = FILL_LOOKAHEAD
                 ) -> list[list[int]]:
    """_sorted_runs's next-fit (min_shared 0), and then the room a tree has left is filled with the
    largest of the next `lookahead` items that fit there at their whole size, as long as one does. An
    item taken out of order leaves its neighbours adjacent: sorted, they share the shorter of the two
    prefixes they shared with it."""
    n = len(sizes)
    later, earlier = list(range(1, n + 1)), list(range(-1, n - 1))  # the unplaced items, a linked list
    common = list(shared)  # tokens shared with the unplaced item before it
    runs: list[list[int]] = []
    head = 0

    def take(k: int) -> None:
        nonlocal head
        before, after = earlier[k], later[k]
        if after < n:
            earlier[after] = before
            if k != head:  # a filler: its successor now follows its predecessor
                common[after] = min(common[after], common[k])
        if before >= 0:
            later[before] = after
        if k == head:
            head = after

    while head < n:
        run, used = [head], sizes[head]
        take(head)
        while head < n and used + sizes[head] - common[head] <= limit:
            run.append(head)
            used += sizes[head] - common[head]
            take(head)
        while True:
            best, k = None, head
            for _ in range(lookahead):
                if k >= n:
                    break
                if sizes[k] <= limit - used and (best is None or sizes[k] > sizes[best]):
                    best = k
                k = later[k]
            if best is None:
                break
            run.append(best)
            used += sizes[best]
            take(best)
        runs.append(run)
    return runs


def flat_segments(requests: list[Request], batch_tokens: int, row_len: int | None = None
                  ) -> tuple[list[Segment], int]:
    """One tree per row: runs of context-sorted items (_filled_runs), and the row length: row_len, or
    FLAT_TREE_TOKENS in whole query blocks, less where all items fit one shorter tree (then every
    budget cuts that tree) or where the budget is smaller (at least the longest item; then the trees,
    and bf16 scores, differ from larger budgets')."""
    items = _items_of(requests)
    order, shared = _context_order(items)
    sizes = [len(tree_segment(items[i]).tokens) for i in order]
    if row_len is None:
        whole = sum(sizes) - sum(shared[1:])  # all items in one tree, at most
        blocks = min(min(FLAT_TREE_TOKENS, batch_tokens) // FLEX_Q_BLOCK, math.ceil(whole / FLEX_Q_BLOCK))
        row_len = FLEX_Q_BLOCK * max(blocks, math.ceil(max(sizes) / FLEX_Q_BLOCK))
    if max(sizes) > row_len:
        raise ValueError(f"an item needs {max(sizes)} tokens, more than the row length {row_len}")
    runs = _filled_runs(sizes, shared, row_len)
    return [tree_segment([x for k in run for x in items[order[k]]]) for run in runs], row_len


def tree_block_mask(subtree_end: torch.Tensor, kv_block: int, q_block: int = FLEX_Q_BLOCK
                    ) -> tuple[torch.Tensor, ...]:
    """FlexAttention's block-sparse view of the tree mask j <= i < subtree_end[j], for subtree_end
    [n, B, T] (T a multiple of q_block, q_block a multiple of kv_block): (kv_num_blocks [n, B, 1, Q],
    kv_indices [n, B, 1, Q, K], full_kv_num_blocks, full_kv_indices), as BlockMask.from_kv_blocks
    takes them per batch. Key j is read by exactly the queries [j, subtree_end[j]). So a key block
    is read by a query block iff it starts at or before the query block's last token (and then, the
    blocks being aligned, all its keys are) and some key's subtree reaches past the query block's
    first token (max subtree_end > first); it is read in full iff it ends at or before the query
    block's first token and every key's subtree covers the whole query block. Blocks read in part
    evaluate the mask per element; the others are skipped."""
    n, B, T = subtree_end.shape
    if T % q_block or q_block % kv_block:
        raise ValueError(f"row length {T}: not a multiple of the query block {q_block}, or it of the key block {kv_block}")
    ends = subtree_end.view(n, B, T // kv_block, kv_block)
    reach, cover = ends.amax(-1)[:, :, None, :], ends.amin(-1)[:, :, None, :]  # [n, B, 1, K] per key block
    q_first = torch.arange(0, T, q_block, device=subtree_end.device)[:, None]  # [Q, 1]
    kv_first = torch.arange(0, T, kv_block, device=subtree_end.device)[None, :]  # [1, K]
    read = (kv_first < q_first + q_block) & (reach > q_first)
    full = (kv_first + kv_block <= q_first) & (cover >= q_first + q_block)
    parts = []
    for blocks in (read & ~full, full):
        # The listed blocks first, in order (a stable sort of "not listed"); the rest are never read.
        parts.append(blocks.sum(-1, dtype=torch.int32)[:, :, None])
        parts.append(torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, :, None])
    return tuple(parts)


def flex_block_mask(subtree_end: torch.Tensor, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices):
    """The BlockMask of one batch (subtree_end [B, T]) from its tree_block_mask parts; the partly
    read blocks evaluate the element mask j <= i < subtree_end[j]. Cheap: it only wraps the parts."""
    T = subtree_end.shape[-1]
    q_block, kv_block = T // kv_num_blocks.shape[-1], T // kv_indices.shape[-1]  # as tree_block_mask made them

    def in_tree(b, h, q, kv):
        return (kv <= q) & (q < subtree_end[b, kv])

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
                                    BLOCK_SIZE=(q_block, kv_block), mask_mod=in_tree, seq_lengths=(T, T))


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


def packed_step(model, tokens, positions, subtree_end, target_index, target_ids, *block_mask_parts,
                block_regions: bool = False, greedy: bool = False) -> torch.Tensor:
    """log p(target) [N] in fp32 for one packed batch (the function that gets compiled).
    block_mask_parts: the batch's tree_block_mask (flat layout; FlexAttention), else a dense mask.
    block_regions: compile one transformer block for all layers (Transformer.forward).
    greedy: [2, N], the log-probs and 1.0 where the target is the most likely token (lm-eval's is_greedy)."""
    if block_mask_parts:
        mask = flex_block_mask(subtree_end, *block_mask_parts)
    else:
        mask = attention_mask(subtree_end)
    hidden = model(tokens, positions, mask, block_regions=block_regions)  # [B, T, D]
    picked = hidden.flatten(0, 1).index_select(0, target_index)  # [N, D]
    if greedy:
        logp, is_greedy = model.token_scores(picked, target_ids)
        return torch.stack([logp, is_greedy.float()])
    return model.token_logprobs(picked, target_ids)


LAYOUTS = ("rows", "flat")
# Why hsc run and hsc bench refuse --layout flat without --compile (PackedScorer itself runs it eagerly
# on the small batches of the tests).
FLAT_NEEDS_COMPILE = ("--layout flat needs --compile: uncompiled FlexAttention materialises the whole "
                      "[heads, T, T] score matrix of every 8k-token row")


def default_layout(device, compile: bool) -> str:
    """flat where FlexAttention runs as a compiled kernel (CUDA, torch.compile); rows elsewhere:
    uncompiled FlexAttention materialises the whole [heads, T, T] score matrix, and on the CPU the
    dense-mask rows are the tested path."""
    return "flat" if compile and torch.device(device).type == "cuda" else "rows"


class PackedScorer:
    def __init__(self, model, device, row_len: int | None = None, batch_tokens: int = 16384,
                 rows_per_batch: int | None = None, compile: bool = False, block_regions: bool = False,
                 layout: str | None = None, greedy: bool = False):
        """row_len None: from the data and batch_tokens (choose_row_len; flat_segments);
        rows_per_batch None: batch_tokens // row_len. layout: "rows" (trees first-fit into short rows,
        dense SDPA masks) or "flat" (one long tree per row, FlexAttention); None: default_layout.
        block_regions (with compile): compile one transformer block and reuse it for every layer.
        greedy: also find whether each ending is the model's greedy continuation (score's on_batch)."""
        self.model, self.device = model, torch.device(device)
        self.layout = layout or default_layout(self.device, compile)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: choose one of {', '.join(LAYOUTS)}")
        if self.layout == "flat" and row_len is not None and row_len % FLEX_Q_BLOCK:
            raise ValueError(f"row length {row_len}: the flat layout needs a multiple of {FLEX_Q_BLOCK}")
        self.row_len, self.batch_tokens, self.rows_per_batch = row_len, batch_tokens, rows_per_batch
        step = lambda *a: packed_step(model, *a, block_regions=block_regions, greedy=greedy)
        # reduce-overhead = inductor kernels replayed through CUDA graphs: one fixed shape, so
        # one graph; without CUDA, plain inductor.
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.step = torch.compile(step, mode=mode, fullgraph=True, dynamic=False) if compile else step
        self.compiled = compile

    def prepare(self, requests: list[Request], like: Batches | None = None, replica: tuple[int, int] = (0, 1)
                ) -> Batches | None:
        """Pack `requests`; with `like`, into exactly the shape of earlier batches, so the
        compiled step (and its CUDA graph) is reused. replica (rank, count): of the rows that packing
        all of `requests` makes, only rows rank, rank + count, ... (data parallelism): every replica
        runs rows exactly as one GPU runs them, as many to a batch, so its scores are one GPU's (up to
        the LM head's rounding: a batch's target list is padded to what the replica's batches need).
        None where a replica gets no row (fewer rows than replicas)."""
        rank, count = replica
        n_targets = like.target_index.shape[1] if like is not None else None
        if self.model is not None:  # lm-eval's left truncation, as the reference loop applies it
            requests = [fit_request(r, self.model.args.max_seq_len) for r in requests]
        if self.layout == "flat":
            segments, self.row_len = flat_segments(requests, self.batch_tokens, self.row_len)
            rows = [[i] for i in range(len(segments))]
        else:
            segments = make_segments(requests)
            if self.row_len is None:
                self.row_len = choose_row_len(segments, self.batch_tokens)
            rows = _first_fit([len(s.tokens) for s in segments], self.row_len)
        if self.rows_per_batch is None:
            # Fewer rows than a batch holds make one batch: no graph to reuse, so no padding rows.
            self.rows_per_batch = min(max(1, self.batch_tokens // self.row_len), len(rows))
        rows = rows[rank::count]
        if not rows:
            return None
        batches = pack(segments, self.row_len, self.rows_per_batch, n_targets=n_targets, rows=rows)
        batches.n_requests = len(requests)
        for name in ("tokens", "positions", "subtree_end", "target_index", "target_ids"):
            setattr(batches, name, getattr(batches, name).to(self.device))
        if self.layout == "flat":
            # without a model (packing only, as the profiling scripts size batches): LLaMA-30B's heads
            head_dim = self.model.args.head_dim if self.model is not None else 128
            batches.block_mask = tree_block_mask(batches.subtree_end, flex_kv_block(head_dim))
        return batches

    @staticmethod
    def _step_args(batches: Batches, b: int) -> tuple[torch.Tensor, ...]:
        mask = tuple(part[b] for part in batches.block_mask) if batches.block_mask is not None else ()
        return (batches.tokens[b], batches.positions[b], batches.subtree_end[b], batches.target_index[b],
                batches.target_ids[b], *mask)

    @torch.inference_mode()
    def warmup(self, batches: Batches, steps: int = 3) -> None:
        """Compile, autotune and record the CUDA graph on the first batch (a graph is recorded on
        a later call than the first). Eager execution needs no warm-up."""
        for _ in range(steps if self.compiled else 0):
            self.step(*self._step_args(batches, 0))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def score(self, batches: Batches, progress=None, done=None, on_batch=None) -> list[float]:
        """The log-likelihood of every packed request, in order; NaN for those of items that another
        replica's rows hold (Batches.items_held). done: {batch: (requests, logliks)} of batches scored
        before (a resumed run's journal), which are skipped; on_batch(b, requests, logliks, greedy): called
        with each batch's results once they are on the host; greedy: per request, whether every token is
        the most likely one (None unless the scorer was made with greedy=True). progress(n): n more
        scored tokens. On a GPU each batch's results are collected (and on_batch called) while the next
        batch runs, so the device never waits for the host."""
        done = dict(done or {})
        pending, reported = [], 0
        n_batches = batches.tokens.shape[0]
        for b in range(n_batches):
            if b not in done:
                pending.append((b, _to_host(self.step(*self._step_args(batches, b)))))
            # a GPU batch waits until the next one is queued; a CPU batch is done when its step returns
            while pending and (len(pending) > 1 or pending[0][1][1] is None or b + 1 == n_batches):
                pb, (host, ready) = pending.pop(0)
                if ready is not None:
                    ready.synchronize()
                done[pb] = batch_logliks(batches, pb, host)
                if on_batch is not None:
                    on_batch(pb, *done[pb])
            collected = b + 1 - len(pending)
            if progress is not None and collected > reported:
                progress(int((batches.target_request[reported:collected] >= 0).sum()))
                reported = collected
        out = [math.nan] * batches.n_requests
        for requests, logliks, _ in done.values():
            for r, ll in zip(requests, logliks):
                out[r] = ll
        return out


def _to_host(out: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A step's output on its way to the host, and the event that says it arrived (None: already there).
    The copy is queued right behind the step, so the next CUDA-graph replay cannot overwrite it first."""
    if out.device.type != "cuda":
        return out.clone(), None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def batch_logliks(batches: Batches, b: int, out: torch.Tensor) -> tuple[list[int], list[float], list | None]:
    """The requests batch b scores, their log-likelihoods (their targets' log-probs summed in float64; a
    request's targets all sit in one row, so in one batch) and, for a greedy step's [2, N] output,
    whether all of each request's targets are greedy."""
    owner = batches.target_request[b]
    keep = owner >= 0
    requests, slot = torch.unique(owner[keep], return_inverse=True)
    out = out.double().cpu()
    logp = out[0] if out.dim() == 2 else out
    sums = torch.zeros(len(requests), dtype=torch.float64).index_add_(0, slot, logp[keep])
    greedy = None
    if out.dim() == 2:
        misses = torch.zeros(len(requests), dtype=torch.float64).index_add_(0, slot, 1.0 - out[1][keep])
        greedy = (misses == 0).tolist()
    return requests.tolist(), sums.tolist(), greedy
