"""The quantization check of `hsc compile` (fp8/int8/w8): the float model against the quantized
artifact on held-out HellaSwag items, and the `--max-drop` gate.

Pass 2 of a quantized compile (toolchain/quantize.py: quantized_stream) holds one layer at a time,
both as read (float) and as written (smoothed, quantized). The check keeps two hidden-state streams
for a slice of items on the compute device and advances both through each layer as it goes by,
exactly as calibration advances its one stream (toolchain/calibrate.py, whose packing and block
builder it reuses):

  float      the ORIGINAL (unsmoothed) float layer, fp32;
  quantized  a TransformerBlock whose seven linears are runtime.quant.QuantLinear, loaded with the
             artifact's own tensors (qdata/scale, smoothed norm weights, embeddings, final norm and
             LM head as written). It computes in fp32 on the CPU, which for a `cpu` target is what
             `hsc run` computes; on CUDA in the plan's compute dtype (bf16/fp16), the artifact's
             own arithmetic on a GPU, so there the drop includes that dtype's rounding too.

After the last layer both streams get the final norm and the LM head (fp32) at the positions that
predict ending tokens; per-ending log-likelihoods are summed in float64 and scored with
runtime/scoring.py's definitions (acc, acc_norm per character). The items are laid out as
runtime/packed.py packs them for scoring; the model is never whole in memory.

The items: `check_items` of the calibration source, a seeded draw among the items that were NOT
calibration items. Memory besides calibration's: two hidden-state copies of the slice
(256 HellaSwag items are about 40k positions with padding: 1.3 GB each at dim 8192 in fp32).
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from runtime.artifact import QUANT_BUFFERS
from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.hellaswag import Item
from runtime.model import RMSNorm, TransformerBlock, rope_tables
from runtime.packed import PAD_SLOT, attention_mask
from runtime.quant import swap_linears
from runtime.scoring import compute_scores, predictions
from toolchain.calibrate import _build_block, calibration_batches

BOOTSTRAP_RESAMPLES = 10_000


# ---- statistics ---------------------------------------------------------------------------------

def error_stats(err: float, power: float) -> dict:
    """Relative error sqrt(err / power) and SQNR 10 log10(power / err) dB (None when err is 0)."""
    rel = math.sqrt(err / max(power, 1e-300))
    sqnr = 10 * math.log10(power / err) if err > 0 and power > 0 else math.inf
    return {"rel_error": round(rel, 6), "sqnr_db": round(sqnr, 2) if math.isfinite(sqnr) else None}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs (one side right, the other
    wrong): under no difference each discordant pair goes either way with probability 1/2, so
    p = 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_interval(diffs: list[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` (one per item) over seeded resamples of the items
    with replacement. A resample is fully described by how often each distinct value was drawn, a
    multinomial draw, so this costs O(resamples) whatever the number of items."""
    values, counts = np.unique(np.asarray(diffs, dtype=np.float64), return_counts=True)
    n = len(diffs)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)  # [R, n_values]
    means = draws @ values / n
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


# ---- the items ----------------------------------------------------------------------------------

def draw_check_items(items: list[Item], exclude: set[int], n: int, seed: int) -> list[Item]:
    """n items whose index is not in `exclude` (the calibration items), a seeded draw, in source order."""
    pool = [it for it in items if it.index not in exclude]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return [pool[k] for k in order.sort().values.tolist()]


# ---- the two streams ----------------------------------------------------------------------------

def _quant_block(args: ModelArgs, tensors: dict[str, torch.Tensor], scheme, device, dtype) -> TransformerBlock:
    """A block with QuantLinear linears; float tensors cast to `dtype`, quantized buffers kept as
    stored (as runtime/artifact.py: build_model loads them)."""
    with torch.device("meta"):
        block = swap_linears(TransformerBlock(args, 1, None), scheme)
    block.load_state_dict({k: v.to(device) if k.endswith(QUANT_BUFFERS) else v.to(device=device, dtype=dtype)
                           for k, v in tensors.items()}, strict=True, assign=True)
    # The runtime's RoPE layout, so that this stream does hsc run's arithmetic and not only its
    # math: a different summation order in q.k moves activations by float rounding, and a moved
    # activation on an int8 rounding boundary moves a log-likelihood visibly.
    block.attention.use_half_split_rope()
    return block.eval()


def _token_logprobs(hidden: torch.Tensor, norm: RMSNorm, head_fp32: torch.Tensor, targets: torch.Tensor):
    """Final norm, then log p(target) with the LM head in fp32 (runtime/model.py: token_logprobs)."""
    logits = F.linear(norm(hidden).float(), head_fp32)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _norm(args: ModelArgs, weight: torch.Tensor, device, dtype) -> RMSNorm:
    norm = RMSNorm(args.dim, args.norm_eps)
    norm.load_state_dict({"weight": weight.to(device=device, dtype=dtype)}, assign=True)
    return norm


class QuantCheck:
    """The float and the quantized hidden states of the check items, advanced one layer at a time:
    embed(), then layer() once per layer in order, then finish(), which leaves the per-request
    log-likelihoods in float_ll and quant_ll."""

    def __init__(self, args: ModelArgs, items: list[Item], tokenizer, add_bos: bool, *, device, dtype,
                 batch_tokens: int, source: str = ""):
        self.args, self.items, self.source = args, items, source
        self.device, self.dtype = torch.device(device), dtype
        try:
            self.batches = calibration_batches(items, tokenizer, add_bos, batch_tokens, args.max_seq_len)
        except ValueError as e:
            raise HscError(f"quantization check: {e}") from None
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.cos, self.sin = cos.to(self.device), sin.to(self.device)
        self.float_h: list[torch.Tensor] = []  # [batch] -> [B, T, dim] fp32
        self.quant_h: list[torch.Tensor] = []  # [batch] -> [B, T, dim] in self.dtype
        self.per_layer: list[dict] = []  # quantized vs float hidden state after each layer
        self.float_ll: list[float] = []  # per request (4 per item, build_requests' order)
        self.quant_ll: list[float] = []

    @property
    def n_batches(self) -> int:
        return self.batches.tokens.shape[0]

    @torch.inference_mode()
    def embed(self, weight: torch.Tensor, written: torch.Tensor) -> None:
        """weight: the checkpoint's embeddings; written: the artifact's (in the compute dtype)."""
        self.float_h = [weight[t].to(device=self.device, dtype=torch.float32) for t in self.batches.tokens]
        self.quant_h = [written[t].to(device=self.device, dtype=self.dtype) for t in self.batches.tokens]

    @torch.inference_mode()
    def layer(self, float_layer: dict[str, torch.Tensor], quant_layer: dict[str, torch.Tensor], scheme) -> None:
        """float_layer: LAYER_TENSORS as read; quant_layer: the block's state dict as written
        (norm weights, `<linear>.qdata`, `<linear>.scale`, relative to the block)."""
        fblock = _build_block(self.args, float_layer, self.device, torch.float32)
        qblock = _quant_block(self.args, quant_layer, scheme, self.device, self.dtype)
        err = power = 0.0
        for b in range(self.n_batches):
            slot, end, pos = (t[b].to(self.device) for t in (self.batches.slot, self.batches.subtree_end,
                                                             self.batches.positions))
            cos, sin, mask = self.cos[pos], self.sin[pos], attention_mask(end)
            self.float_h[b] = fblock(self.float_h[b], cos, sin, mask)
            self.quant_h[b] = qblock(self.quant_h[b], cos, sin, mask)
            real = slot != PAD_SLOT  # padding is not part of any item
            f, q = self.float_h[b][real].double(), self.quant_h[b][real].double()
            err += float((q - f).pow(2).sum())
            power += float(f.pow(2).sum())
        self.per_layer.append(error_stats(err, power))

    @torch.inference_mode()
    def finish(self, norm: torch.Tensor, output: torch.Tensor, norm_written: torch.Tensor,
               output_written: torch.Tensor) -> None:
        """Final norm and LM head, as read and as written: fills float_ll and quant_ll and frees the
        hidden states. One stream at a time, so that one fp32 LM head is on the device at once."""
        self.float_ll = self._logliks(self.float_h, _norm(self.args, norm, self.device, torch.float32),
                                      output.to(device=self.device, dtype=torch.float32))
        self.float_h = []
        self.quant_ll = self._logliks(self.quant_h, _norm(self.args, norm_written, self.device, self.dtype),
                                      output_written.to(self.device).float())
        self.quant_h = []

    def _logliks(self, hidden: list[torch.Tensor], norm: RMSNorm, head_fp32: torch.Tensor) -> list[float]:
        """Per-request sums, in float64, of the target log-probs of one stream."""
        logps = []
        for b in range(self.n_batches):
            idx, ids = self.batches.target_index[b].to(self.device), self.batches.target_ids[b].to(self.device)
            logps.append(_token_logprobs(hidden[b].flatten(0, 1).index_select(0, idx), norm, head_fp32, ids))
        return self._request_sums(logps)

    def describe(self) -> str:
        return f"the artifact's tensors, computed in {str(self.dtype).removeprefix('torch.')} on {self.device}"

    def _request_sums(self, logps: list[torch.Tensor]) -> list[float]:
        """Sum each request's target log-probs (padding targets have request -1)."""
        logp = torch.stack(logps).double().cpu().flatten()
        owner = self.batches.target_request.flatten()
        keep = owner >= 0
        sums = torch.zeros(4 * len(self.items), dtype=torch.float64)
        return sums.index_add_(0, owner[keep], logp[keep]).tolist()


# ---- the comparison and the gate ----------------------------------------------------------------

def compare(items: list[Item], float_ll: list[float], quant_ll: list[float], *, max_drop: float | None,
            seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Accuracy of both models on the items, paired, and the --max-drop verdict (None: no gate).

    The drop is float acc_norm - quantized acc_norm in points (100 = every item). Pairing: an item
    the two models get equally right or wrong says nothing about the difference; the b items only
    the float model gets right and the c only the quantized one does decide it (drop = 100 (b - c) / n),
    hence McNemar's test on (b, c) and a bootstrap over items of the per-item difference."""
    n = len(items)
    f_pred, f_norm = predictions(items, float_ll)
    q_pred, q_norm = predictions(items, quant_ll)
    f_scores, q_scores = compute_scores(items, f_pred, f_norm), compute_scores(items, q_pred, q_norm)
    f_ok = [p == it.label for p, it in zip(f_norm, items)]
    q_ok = [p == it.label for p, it in zip(q_norm, items)]
    b = sum(f and not q for f, q in zip(f_ok, q_ok))
    c = sum(q and not f for f, q in zip(f_ok, q_ok))
    drop = 100 * (b - c) / n
    lo, hi = bootstrap_interval([100 * (int(f) - int(q)) for f, q in zip(f_ok, q_ok)], resamples, seed)
    d = [abs(x - y) for x, y in zip(float_ll, quant_ll)]
    return {
        "items": n,
        "float": {"acc": f_scores.acc, "acc_norm": f_scores.acc_norm},
        "quant": {"acc": q_scores.acc, "acc_norm": q_scores.acc_norm},
        "acc_norm_drop_points": round(drop, 4),
        "drop_ci95_points": [round(lo, 4), round(hi, 4)],
        "bootstrap": {"resamples": resamples, "seed": seed},
        "mcnemar": {"float_only_correct": b, "quant_only_correct": c, "p_two_sided": mcnemar_exact(b, c)},
        "agree_pred": sum(x == y for x, y in zip(f_pred, q_pred)) / n,
        "agree_pred_norm": sum(x == y for x, y in zip(f_norm, q_norm)) / n,
        "loglik_abs_diff": {"mean": sum(d) / len(d), "max": max(d)},
        "max_drop": max_drop,
        "passed": None if max_drop is None else drop <= max_drop,
    }


def _drop_text(check: dict) -> str:
    lo, hi = check["drop_ci95_points"]
    return (f"acc_norm float {100 * check['float']['acc_norm']:.2f} -> quantized {100 * check['quant']['acc_norm']:.2f}, "
            f"drop {check['acc_norm_drop_points']:.2f} points (95% bootstrap interval [{lo:.2f}, {hi:.2f}], "
            f"McNemar p {check['mcnemar']['p_two_sided']:.3g})")


def check_summary(check: dict) -> str:
    """One line for the compile log and `hsc inspect`."""
    if check.get("skipped"):
        return f"skipped: {check['skipped']}"
    gate = "no --max-drop" if check["max_drop"] is None else \
        f"--max-drop {check['max_drop']:g}: {'passed' if check['passed'] else 'FAILED'}"
    last = check["per_layer"][-1]["sqnr_db"] if check.get("per_layer") else None
    return (f"{check['items']} held-out items: {_drop_text(check)}; agree pred {check['agree_pred']:.1%}, "
            f"pred_norm {check['agree_pred_norm']:.1%}; |d loglik| mean {check['loglik_abs_diff']['mean']:.3g} "
            f"max {check['loglik_abs_diff']['max']:.3g}"
            + (f"; last layer SQNR {last} dB" if last is not None else "") + f"; {gate}")


def enforce_max_drop(check: dict, precision: str) -> None:
    """The gate: refuse (HscError, one line) when the point estimate of the drop exceeds --max-drop."""
    if check.get("passed") is False:
        raise HscError(f"quantization check failed: {precision} loses more than --max-drop {check['max_drop']:g} "
                       f"on {check['items']} held-out items: {_drop_text(check)}; no artifact written")
