"""HellaSwag scoring with lm-evaluation-harness's semantics.

Each item gives 4 requests (context, " " + ending). A request's log-likelihood is the sum, in
fp32 or better, of log p(token | everything before it) over the continuation tokens, where the
continuation tokens are lm-eval's: encode(context + continuation) minus the first
len(encode(context)) tokens (trailing spaces of the context move to the continuation first).

- acc: the ending with the highest summed log-likelihood is the prediction.
- acc_norm: the highest log-likelihood divided by len(ending) in characters, the ending without
  its leading space (lm-eval's `len(choice)`). This is not llm.c's per-token average.
BOS is a policy, recorded with the results: LLaMA's sentencepiece tokenizer prepends it,
SmolLM2's GGUF says not to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from runtime.errors import HscError, file_error
from runtime.hellaswag import Item
from runtime.tokenizer import Tokenizer


@dataclass(frozen=True)
class Request:
    item: int  # index into the item list being scored
    ending: int  # 0-3
    context: tuple[int, ...]  # BOS (if the policy says so) + context tokens
    continuation: tuple[int, ...]
    join_mismatch: bool  # a token spanned the context/continuation join; continuation encoded alone


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval moves the context's trailing whitespace to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def build_requests(items: list[Item], tok: Tokenizer, add_bos: bool) -> list[Request]:
    if add_bos and tok.bos_id is None:
        raise file_error(tok.path, "BOS requested but the tokenizer has no BOS token (try --no-bos)")
    prefix = (tok.bos_id,) if add_bos else ()
    pairs = [split_context(item.query, " " + ending) for item in items for ending in item.endings]
    # Each distinct context is encoded once; lm-eval encodes it per request, with the same result.
    contexts = sorted({c for c, _ in pairs})
    context_ids = dict(zip(contexts, tok.encode_batch(contexts)))
    wholes = tok.encode_batch([c + k for c, k in pairs])
    requests = []
    for n, ((ctx, cont), whole) in enumerate(zip(pairs, wholes)):
        ctx_ids = context_ids[ctx]
        clean = whole[: len(ctx_ids)] == ctx_ids and len(whole) > len(ctx_ids)
        cont_ids = whole[len(ctx_ids):] if clean else tok.encode(cont)
        if not prefix and not ctx_ids:
            raise HscError(f"item {items[n // 4].index}: empty context and no BOS: nothing to condition on")
        requests.append(Request(n // 4, n % 4, prefix + tuple(ctx_ids), tuple(cont_ids), not clean))
    return requests


def fits(req: Request, max_len: int) -> bool:
    """Whether the continuation alone fits the model's max_len positions (lm-eval asserts it does): the
    first continuation token needs one context token before it, the last predicts nothing."""
    return len(req.continuation) <= max_len


def fit_request(req: Request, max_len: int) -> Request:
    """lm-eval's rule for a request longer than the model's context (HFLM._loglikelihood_tokens): the
    model reads (context + continuation)[-(max_len + 1):][:-1], so the context loses tokens on the left
    and the continuation is kept whole. Both engines score the fitted request."""
    if not fits(req, max_len):
        raise ValueError(f"item {req.item} ending {req.ending}: {len(req.continuation)} continuation tokens, "
                         f"more than the model's {max_len} positions")
    keep = max_len + 1 - len(req.continuation)  # context tokens that still fit
    if len(req.context) <= keep:
        return req
    return replace(req, context=req.context[len(req.context) - keep:])


def drop_overlong(items: list[Item], requests: list[Request], max_len: int
                  ) -> tuple[list[Item], list[Request], list[int]]:
    """Items (and their 4 requests) without those having an ending whose tokens alone exceed max_len
    positions, which no left truncation can fit; and the source indices of the dropped items."""
    kept_items, kept_requests, dropped = [], [], []
    for k, item in enumerate(items):
        reqs = requests[4 * k: 4 * k + 4]
        if all(fits(r, max_len) for r in reqs):
            kept_items.append(item)
            kept_requests += reqs
        else:
            dropped.append(item.index)
    return kept_items, kept_requests, dropped


def request_tokens(req: Request, max_len: int) -> tuple[list[int], list[int], int]:
    """Model input, targets and where the targets start, of the request fitted to max_len (fit_request)."""
    req = fit_request(req, max_len)
    full = list(req.context + req.continuation)
    inputs, targets = full[:-1], full[1:]
    start = len(inputs) - len(req.continuation)
    return inputs, targets[start:], start


def scored_tokens(requests: list[Request]) -> int:
    """The unit in which both engines report throughput: the continuation tokens whose log-probs are
    summed (the same count whatever an engine forwards to get them, shared prefixes or not)."""
    return sum(len(r.continuation) for r in requests)


@torch.inference_mode()
def score_reference(model, requests: list[Request], device, batch_tokens: int = 16384,
                    progress=None, done=None, on_batch=None) -> list[float]:
    """The plain path: one forward per request (right-padded batches of similar length, causal
    attention, so padding never reaches a scored position). Returns the summed log-likelihood
    of each request's continuation, accumulated in float64. done, on_batch: as PackedScorer.score
    (batches skipped, each batch's (requests, logliks, greedy) reported); progress(n): n more scored tokens."""
    max_len = model.args.max_seq_len
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r].context + requests[r].continuation))
    out = [0.0] * len(requests)
    done = done or {}
    i, n_batch = 0, -1
    while i < len(order):
        longest = min(len(requests[order[i]].context) + len(requests[order[i]].continuation) - 1, max_len)
        batch = order[i:i + max(1, batch_tokens // longest)]
        i += len(batch)
        n_batch += 1
        if n_batch in done:
            for r, ll in zip(*done[n_batch][:2]):
                out[r] = ll
            continue
        tokens = torch.zeros(len(batch), longest, dtype=torch.long)
        rows, cols, targets, owner = [], [], [], []
        for b, r in enumerate(batch):
            inputs, tgt, start = request_tokens(requests[r], max_len)
            tokens[b, : len(inputs)] = torch.tensor(inputs)
            rows += [b] * len(tgt)
            cols += range(start, start + len(tgt))
            targets += tgt
            owner += [b] * len(tgt)
        hidden = model(tokens.to(device))[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logp, greedy = model.token_scores(hidden, torch.tensor(targets, device=device))
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, torch.tensor(owner), logp.double().cpu())
        misses = torch.zeros(len(batch)).index_add_(0, torch.tensor(owner), (~greedy).float().cpu())
        for b, r in enumerate(batch):
            out[r] = sums[b].item()
        if on_batch is not None:
            on_batch(n_batch, list(batch), [out[r] for r in batch], (misses == 0).tolist())
        if progress is not None:
            progress(len(targets))
    return out


@dataclass(frozen=True)
class Scores:
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    n: int


def mean_stderr(xs: list[float]) -> float:
    """lm-eval's stderr of a mean: sample standard deviation / sqrt(n)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def nonfinite_items(items: list[Item], logliks: list[float]) -> list[int]:
    """Indices of the items with a NaN or infinite log-likelihood: a broken model, never a score."""
    return [item.index for k, item in enumerate(items) if not all(map(math.isfinite, logliks[4 * k: 4 * k + 4]))]


def predictions(items: list[Item], logliks: list[float]) -> tuple[list[int], list[int]]:
    """(pred, pred_norm) per item; ties go to the first ending, as numpy's argmax does in lm-eval."""
    preds, preds_norm = [], []
    for k, item in enumerate(items):
        ll = logliks[4 * k: 4 * k + 4]
        norm = [ll[j] / len(item.endings[j]) for j in range(4)]
        preds.append(max(range(4), key=lambda j: (ll[j], -j)))
        preds_norm.append(max(range(4), key=lambda j: (norm[j], -j)))
    return preds, preds_norm


def compute_scores(items: list[Item], preds: list[int], preds_norm: list[int]) -> Scores:
    acc = [float(p == it.label) for p, it in zip(preds, items)]
    acc_norm = [float(p == it.label) for p, it in zip(preds_norm, items)]
    return Scores(sum(acc) / len(acc), mean_stderr(acc), sum(acc_norm) / len(acc_norm),
                  mean_stderr(acc_norm), len(items))
