"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly.

For a linear y = x W^T whose input x has a few huge channels, y = (x / s) (W diag(s))^T for any
positive s [in]. Dividing x by s is free when x comes out of something we can rescale offline:

  point               x is                         x / s folded into          W diag(s) into
  attention.wqkv_in   attention_norm(h)            attention_norm.weight     wq, wk, wv columns
  feed_forward.w13_in ffn_norm(h)                  ffn_norm.weight           w1, w3 columns
  feed_forward.w2_in  silu(w1 x) * (w3 x)          w3 rows                   w2 columns
  attention.wo_in     softmax(q k^T) v             wv rows                   wo columns

The last one is exact because attention mixes v linearly along time, per head dimension; under
GQA one kv head feeds n_rep query heads, so s must be the same for the query heads of a group (the
wv row it divides is shared): factors are computed per kv head from the group's maxima.

Everything here works on one layer's tensor dict under Meta's names (runtime.config.LAYER_TENSORS,
without the `layers.{i}.` prefix), returns new tensors and never mutates its inputs. Factors are
computed and folded in float64, then cast back to each tensor's dtype.

alpha is a per-model choice, recorded with the artifact: the paper's 0.5 suits OPT; LLaMA wants
0.8-0.9. `choose_alpha` measures it per layer on held-out activations (toolchain/calibrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from runtime.config import ModelArgs

# Smoothing points, named as calibration records them (after `layers.{i}.`).
WQKV_IN = "attention.wqkv_in"
WO_IN = "attention.wo_in"
W13_IN = "feed_forward.w13_in"
W2_IN = "feed_forward.w2_in"
POINTS = (WQKV_IN, WO_IN, W13_IN, W2_IN)


def point_widths(args: ModelArgs) -> dict[str, int]:
    """The activation width at each point: the input features of the linears that read it."""
    return {WQKV_IN: args.dim, WO_IN: args.n_heads * args.head_dim, W13_IN: args.dim, W2_IN: args.ffn_dim}

# The linears that read each point's activation.
POINT_LINEARS = {
    WQKV_IN: ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    WO_IN: ("attention.wo.weight",),
    W13_IN: ("feed_forward.w1.weight", "feed_forward.w3.weight"),
    W2_IN: ("feed_forward.w2.weight",),
}

DEFAULT_ALPHAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
S_MIN, S_MAX = 1e-5, 1e5  # factors are clamped into this range
_EPS = 1e-5  # maxima below this count as this (a dead channel must not give s = 0 or inf)


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] float64 = max|X_j|^alpha / max|W_:,j|^(1-alpha), the weight maximum taken over the
    rows of every given weight [out, in] (they share the input). A channel that was never active
    (absmax 0) or is not finite gets s = 1; the rest is clamped into [S_MIN, S_MAX]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().to(torch.float64).cpu()
    if not weights:
        raise ValueError("smoothing_factors needs at least one weight")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != a.shape[0]:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not read {a.shape[0]} input channels")
    # abs and max are exact in any float dtype: reduce where the weight lives, then widen [in].
    w_max = torch.stack([w.detach().abs().amax(dim=0).to(torch.float64).cpu() for w in weights]).amax(dim=0)
    s = a.clamp(min=_EPS).pow(alpha) / w_max.clamp(min=_EPS).pow(1.0 - alpha)
    usable = torch.isfinite(s) & torch.isfinite(a) & (a > 0)
    return torch.where(usable, s, torch.ones_like(s)).clamp(S_MIN, S_MAX)


def _group_view(n_heads: int, n_kv_heads: int, head_dim: int):
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    return n_kv_heads, n_heads // n_kv_heads, head_dim


def wo_smoothing_factors(act_absmax: torch.Tensor, wo: torch.Tensor, alpha: float, n_heads: int,
                         n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors for the wo input under GQA: (s_q [n_heads*hd] for wo's columns, s_kv
    [n_kv_heads*hd] for wv's rows). Query head h reads kv head h // n_rep; for each kv head and
    head-dim position the activation and weight maxima are taken over its n_rep query heads, so
    the factors of a group are identical by construction."""
    kv, rep, hd = _group_view(n_heads, n_kv_heads, act_absmax.shape[0] // n_heads)
    a = act_absmax.to(torch.float64).view(kv, rep, hd).amax(dim=1).reshape(kv * hd)  # [KV*hd]
    # wo [D, H*hd] -> max over its rows and the group's query heads: [KV*hd], as a one-row weight.
    w = wo.detach().abs().view(-1, kv, rep, hd).amax(dim=(0, 2)).reshape(1, kv * hd)
    s_kv = smoothing_factors(a, [w], alpha)
    return expand_kv(s_kv, n_heads, n_kv_heads), s_kv


def expand_kv(s_kv: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """[n_kv_heads*hd] -> [n_heads*hd]: each kv head's factors repeated for its n_rep query heads."""
    kv, rep, hd = _group_view(n_heads, n_kv_heads, s_kv.shape[0] // n_kv_heads)
    return s_kv.view(kv, 1, hd).expand(kv, rep, hd).reshape(kv * rep * hd)


def _scaled(t: torch.Tensor, s: torch.Tensor, dim: int | None, divide: bool) -> torch.Tensor:
    """t scaled along `dim` (None: a 1-D tensor) by s or 1/s, in float64, back in t's dtype."""
    s = s.to(torch.float64).to(t.device)
    if dim == 1:
        s = s[None, :]
    elif dim == 0 and t.dim() == 2:
        s = s[:, None]
    x = t.to(torch.float64)
    return (x / s if divide else x * s).to(t.dtype)


def _check(name: str, t: torch.Tensor, s: torch.Tensor, dim: int) -> None:
    if t.shape[dim] != s.shape[0]:
        raise ValueError(f"{name} has {t.shape[dim]} channels on axis {dim}; the factors have {s.shape[0]}")
    if not (torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError("smoothing factors must be finite and positive")


def _fold_norm_input(layer: dict, s: torch.Tensor, norm: str, point: str) -> dict:
    """norm weight /= s; the columns of the linears that read the normalised input *= s."""
    out = dict(layer)
    _check(norm, layer[norm], s, 0)
    out[norm] = _scaled(layer[norm], s, None, divide=True)
    for n in POINT_LINEARS[point]:
        _check(n, layer[n], s, 1)
        out[n] = _scaled(layer[n], s, 1, divide=False)
    return out


def fold_attention_input(layer: dict, s: torch.Tensor) -> dict:
    """(a) attention_norm.weight /= s; wq, wk, wv columns *= s."""
    return _fold_norm_input(layer, s, "attention_norm.weight", WQKV_IN)


def fold_ffn_input(layer: dict, s: torch.Tensor) -> dict:
    """(b) ffn_norm.weight /= s; w1, w3 columns *= s."""
    return _fold_norm_input(layer, s, "ffn_norm.weight", W13_IN)


def fold_w2_input(layer: dict, s: torch.Tensor) -> dict:
    """(c) w3 rows /= s; w2 columns *= s. Exact: w2 reads silu(w1 x) * (w3 x), linear in w3's rows."""
    out = dict(layer)
    _check("feed_forward.w3.weight", layer["feed_forward.w3.weight"], s, 0)
    _check("feed_forward.w2.weight", layer["feed_forward.w2.weight"], s, 1)
    out["feed_forward.w3.weight"] = _scaled(layer["feed_forward.w3.weight"], s, 0, divide=True)
    out["feed_forward.w2.weight"] = _scaled(layer["feed_forward.w2.weight"], s, 1, divide=False)
    return out


def fold_wo_input(layer: dict, s: torch.Tensor, n_heads: int, n_kv_heads: int) -> dict:
    """(d) wv rows /= s_kv; wo columns *= s. s [n_heads*hd] must be equal across the query heads
    of each kv group (wo_smoothing_factors gives such s; expand_kv makes one from s_kv)."""
    kv, rep, hd = _group_view(n_heads, n_kv_heads, s.shape[0] // n_heads)
    grouped = s.view(kv, rep, hd)
    if not torch.equal(grouped, grouped[:, :1].expand_as(grouped)):
        raise ValueError("wo factors differ between query heads that share a kv head")
    out = dict(layer)
    s_kv = grouped[:, 0].reshape(kv * hd)
    _check("attention.wv.weight", layer["attention.wv.weight"], s_kv, 0)
    _check("attention.wo.weight", layer["attention.wo.weight"], s, 1)
    out["attention.wv.weight"] = _scaled(layer["attention.wv.weight"], s_kv, 0, divide=True)
    out["attention.wo.weight"] = _scaled(layer["attention.wo.weight"], s, 1, divide=False)
    return out


def layer_factors(layer: dict, absmax: dict, alpha: float, args: ModelArgs,
                  points: Iterable[str] = POINTS) -> dict[str, torch.Tensor]:
    """Per-point factors (float64) from one layer's ORIGINAL weights and activation maxima
    (keys: POINTS). The wo point's factors are over wo's input [n_heads*hd], group-constrained.
    Weight maxima are read before any folding: row scalings by other points (wv by wo_in, w3 by
    w2_in) leave per-output-channel weight quantization unchanged, so they should not steer s."""
    out = {}
    for p in points:
        if p == WO_IN:
            out[p] = wo_smoothing_factors(absmax[p], layer["attention.wo.weight"], alpha,
                                          args.n_heads, args.kv_heads)[0]
        else:
            out[p] = smoothing_factors(absmax[p], [layer[n] for n in POINT_LINEARS[p]], alpha)
    return out


def fold_layer(layer: dict, factors: dict[str, torch.Tensor], args: ModelArgs) -> dict:
    """Apply the given per-point factors (any subset of POINTS). Returns a new dict."""
    out = dict(layer)
    for p, s in factors.items():
        if p == WQKV_IN:
            out = fold_attention_input(out, s)
        elif p == W13_IN:
            out = fold_ffn_input(out, s)
        elif p == W2_IN:
            out = fold_w2_input(out, s)
        elif p == WO_IN:
            out = fold_wo_input(out, s, args.n_heads, args.kv_heads)
        else:
            raise ValueError(f"unknown smoothing point {p!r}; expected one of {POINTS}")
    return out


def smooth_layer(layer: dict, absmax: dict, alpha: float, args: ModelArgs,
                 points: Iterable[str] = POINTS) -> tuple[dict, dict[str, torch.Tensor]]:
    """Smoothed copy of one layer and the factors used."""
    factors = layer_factors(layer, absmax, alpha, args, points)
    return fold_layer(layer, factors, args), factors


# ---- fake quantization and the alpha search -------------------------------------------------

def _absmax_scale(t: torch.Tensor, dim: int, qmax: float) -> torch.Tensor:
    return (t.abs().amax(dim=dim, keepdim=True) / qmax).clamp(min=1e-12)


def fake_quant_int8(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y = Q(x) Q(W)^T with symmetric int8: per output channel for W [out, in], per token for
    x [N, in] (dynamic, so no activation clipping), in float32."""
    w, x = w.float(), x.float()
    sw, sx = _absmax_scale(w, 1, 127.0), _absmax_scale(x, 1, 127.0)
    wq = (w / sw).round().clamp(-127, 127) * sw
    xq = (x / sx).round().clamp(-127, 127) * sx
    return xq @ wq.T


def fake_quant_w8(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 (per output channel), activations left in float: the w8 scheme's error."""
    w = w.float()
    sw = _absmax_scale(w, 1, 127.0)
    return x.float() @ ((w / sw).round().clamp(-127, 127) * sw).T


def fake_quant_e4m3(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """As fake_quant_int8 with float8 e4m3 (max 448) instead of int8."""
    w, x = w.float(), x.float()
    sw, sx = _absmax_scale(w, 1, 448.0), _absmax_scale(x, 1, 448.0)
    wq = (w / sw).to(torch.float8_e4m3fn).float() * sw
    xq = (x / sx).to(torch.float8_e4m3fn).float() * sx
    return xq @ wq.T


@dataclass
class LayerStats:
    """One layer's calibration data, keys POINTS: per-channel maxima over all calibration tokens
    and a sample of input rows [n, in] (for the alpha search)."""

    absmax: dict[str, torch.Tensor]
    sample: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AlphaChoice:
    alpha: float | None  # None: no smoothing measured best (only when None is a candidate)
    errors: dict  # candidate -> total error (sum over the 7 linears of relative squared error)
    per_linear: dict  # candidate -> {weight name: relative squared error}
    baseline: float  # total error without smoothing


def _nmse(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-300))


@torch.no_grad()
def quant_errors(layer: dict, stats: LayerStats, alpha: float | None, args: ModelArgs,
                 fake_quant: Callable = fake_quant_int8) -> dict[str, float]:
    """Relative squared output error of each linear of the layer, smoothed with alpha (None: not
    smoothed) and fake-quantized, on the sampled inputs. Errors are measured in the ORIGINAL
    output space: the smoothed wv and w3 produce outputs divided by the wo_in / w2_in factors,
    which the next linear multiplies back, so their outputs are scaled back before comparing.

    This is a per-linear proxy for the layer's output error: the sample holds token rows, not whole
    sequences, so attention (and the block output) cannot be recomputed from it."""
    if alpha is None:
        factors = {}
    else:
        factors = layer_factors(layer, stats.absmax, alpha, args, points=[p for p in POINTS if p in stats.sample])
    smoothed = fold_layer(layer, factors, args)
    out_scale = {}  # output rows of a linear divided by a downstream factor
    if WO_IN in factors:
        kv, rep, hd = _group_view(args.n_heads, args.kv_heads, args.head_dim)
        out_scale["attention.wv.weight"] = factors[WO_IN].view(kv, rep, hd)[:, 0].reshape(-1)
    if W2_IN in factors:
        out_scale["feed_forward.w3.weight"] = factors[W2_IN]
    errors = {}
    for p, x in stats.sample.items():
        x64 = x.to(torch.float64)
        s = factors.get(p)
        xs = x64 / s.to(x64.device) if s is not None else x64
        for n in POINT_LINEARS[p]:
            ref = x64 @ layer[n].to(torch.float64).to(x64.device).T
            y = fake_quant(smoothed[n].to(x64.device), xs).double()
            if n in out_scale:
                y = y * out_scale[n].to(y.device)
            errors[n] = _nmse(y, ref)
    return errors


def choose_alpha(layer: dict, stats: LayerStats, args: ModelArgs, candidates=DEFAULT_ALPHAS,
                 fake_quant: Callable = fake_quant_int8) -> AlphaChoice:
    """The candidate alpha (None = no smoothing, if listed) with the least total quantization
    error of the layer's linears on the sample (see quant_errors). Ties go to the first candidate."""
    if not stats.sample:
        raise ValueError("choose_alpha needs sampled activations (calibrate(..., sample_rows > 0))")
    per_linear = {a: quant_errors(layer, stats, a, args, fake_quant) for a in candidates}
    baseline_pl = per_linear[None] if None in per_linear else quant_errors(layer, stats, None, args, fake_quant)
    errors = {a: sum(e.values()) for a, e in per_linear.items()}
    best = min(candidates, key=lambda a: errors[a])
    return AlphaChoice(best, errors, per_linear, sum(baseline_pl.values()))
