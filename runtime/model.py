"""The one LLaMA model definition: RMSNorm, RoPE, GQA, SwiGLU.

RoPE: artifacts keep Meta's interleaved layout (pairs x[2i], x[2i+1]); the runtime permutes wq/wk
rows once at load to the half-split layout, which rotates faster (Transformer.use_half_split_rope).

Tensor names are Meta's (tok_embeddings, layers.N.attention.wq, ...), so an artifact's
state dict loads with strict=True. Under tensor parallelism (tp > 1) each rank holds a slice:
wq/wk/wv/w1/w3 split by output rows (whole heads; never a split kv head), wo/w2 by input
columns, and the partial results of wo and w2 are summed across ranks. Embeddings, norms and
the LM head are replicated on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from runtime.config import ModelArgs
from runtime.quant import QuantLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Meta does, then return to the compute dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, n_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n_positions, head_dim // 2] in fp32 (angles computed in fp64)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]): Meta's interleaved layout, which GGUF keeps too.
    x: [B, T, H, D]; cos/sin: [B, T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [B, T, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation for heads whose dims were permuted to [x0, x2, x4, ..., x1, x3, ...]: pair i
    is (x[i], x[i + D/2]). Contiguous halves instead of strided pairs: faster than apply_rope on a GPU
    (docs/benchmarks.md)."""
    xf = x.float()
    x0, x1 = xf.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).type_as(x)


def half_split_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order that takes wq/wk from Meta's interleaved RoPE layout to the half-split one, head by head."""
    within = torch.arange(head_dim).view(head_dim // 2, 2).t().reshape(-1)  # 0, 2, 4, ..., 1, 3, 5, ...
    return (torch.arange(n_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def _permute_rows(linear: nn.Module, order: torch.Tensor) -> None:
    """Reorder a linear's output rows: an nn.Linear's weight, or a QuantLinear's qdata and per-row
    scale. Exact: values only move."""
    names = ("weight",) if isinstance(linear, nn.Linear) else ("qdata", "scale")
    for name in names:
        t = getattr(linear, name)
        new = t.detach()[order.to(t.device)]
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
        setattr(linear, name, new)


def _bf16_on_cuda(t: torch.Tensor) -> bool:
    """Where the LM head runs as a bf16 product with fp32 output (Transformer.token_logprobs)."""
    return t.is_cuda and t.dtype == torch.bfloat16


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: int, tp_group):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads // tp, args.kv_heads // tp
        self.head_dim, self.tp_group = args.head_dim, tp_group
        self.rope_interleaved = True  # Meta's layout, as stored; see Transformer.use_half_split_rope
        d, hd = args.dim, args.head_dim
        self.wq = nn.Linear(d, self.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=False)

    @torch.no_grad()
    def use_half_split_rope(self) -> None:
        """Transformer.use_half_split_rope for this block's attention."""
        if self.rope_interleaved:
            _permute_rows(self.wq, half_split_order(self.n_heads, self.head_dim))
            _permute_rows(self.wk, half_split_order(self.n_kv_heads, self.head_dim))
            self.rope_interleaved = False

    def forward(self, x, cos, sin, attn_mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        rope = apply_rope if self.rope_interleaved else apply_rope_half
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        gqa = self.n_kv_heads != self.n_heads  # query head h reads kv head h // (n_heads / n_kv_heads)
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(attn_mask, BlockMask):  # block-sparse (runtime.packed's flat layout)
            out = flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=gqa)
        else:
            if gqa:  # the masked (memory-efficient) kernels want as many kv heads as query heads
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.wo(out.transpose(1, 2).reshape(B, T, -1))
        return _all_reduce(out, self.tp_group)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: int, tp_group):
        super().__init__()
        hidden = args.ffn_dim // tp
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.tp_group = tp_group

    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        if isinstance(self.w2, QuantLinear):  # quantizes silu(a) * b as it computes it
            out = self.w2.forward_swiglu(a, b)
        else:
            out = self.w2(F.silu(a) * b)
        return _all_reduce(out, self.tp_group)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, tp: int, tp_group):
        super().__init__()
        self.attention = Attention(args, tp, tp_group)
        self.feed_forward = FeedForward(args, tp, tp_group)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, attn_mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, attn_mask)
        return h + self.feed_forward(self.ffn_norm(h))

    # The same forward as a nested compile region: torch.compile traces and compiles it once and
    # stamps the result out for every layer, so compile time stops growing with depth (scores are
    # identical). The price: inductor cannot fuse across a block's edges (the residual add with the
    # next block's norm).
    # Outside torch.compile it is the plain forward.
    forward_region = torch.compiler.nested_compile_region(forward)


# The most fp32 logits the CPU holds at once (token_logprobs); logsumexp makes one more of that size.
LOGITS_CHUNK_BYTES = 256 << 20


def logits_chunk_rows(vocab_size: int) -> int:
    """Scored positions per LM-head product on the CPU."""
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, tp: int = 1, tp_group=None):
        super().__init__()
        if args.n_heads % tp or args.kv_heads % tp or args.ffn_dim % tp:
            raise ValueError(f"tp={tp} does not divide heads/kv-heads/ffn of {args}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, tp, tp_group) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # fp32 copy of a bf16/fp16 LM head, made once at load (0.85 GB at 30B) rather than per batch;
        # not needed for bf16 on CUDA (token_logprobs).
        self.head_fp32: torch.Tensor | None = None

    def keep_fp32_head(self) -> None:
        """Make the fp32 head copy where token_logprobs will need it: a low-precision head that
        cannot run as a bf16 product with fp32 output (CPU, fp16)."""
        w = self.output.weight
        if w.dtype != torch.float32 and not _bf16_on_cuda(w):
            self.head_fp32 = w.float()

    @torch.no_grad()
    def use_half_split_rope(self) -> "Transformer":
        """Permute every head's wq and wk rows to the half-split RoPE layout and rotate halves
        instead of interleaved pairs (faster, apply_rope_half). q and k move by the same
        permutation, so every attention score q.k, and so the model's output, is unchanged."""
        for layer in self.layers:
            layer.attention.use_half_split_rope()
        return self

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, block_regions: bool = False) -> torch.Tensor:
        """Final-norm hidden states [B, T, dim] (the LM head is applied by the scorer, only
        where a log-prob is needed). tokens/positions: [B, T]; attn_mask: bool [B, 1, T, T]
        (True = may attend), a FlexAttention BlockMask, or None for plain causal attention.
        block_regions: under torch.compile, compile one block and reuse it for every layer
        (TransformerBlock.forward_region)."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer.forward_region(h, cos, sin, attn_mask) if block_regions else layer(h, cos, sin, attn_mask)
        return self.norm(h)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] for hidden states [N, dim] (products summed in fp32), so that close
        answers are not flipped by low-precision logits."""
        w = self.output.weight
        if _bf16_on_cuda(hidden) and _bf16_on_cuda(w):
            # bf16 products summed into fp32 logits: bf16 values are exact in fp32 (and in TF32), so
            # this is the fp32 product of the same numbers, at bf16 speed and without an fp32 copy of
            # the head.
            return torch.mm(hidden, w.t(), out_dtype=torch.float32)
        w = self.head_fp32 if self.head_fp32 is not None else w.float()
        return F.linear(hidden.float(), w)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target | prefix) for hidden states [N, dim] and targets [N], in fp32:
        logit[target] - logsumexp(logits)."""
        return self._by_chunks(lambda h, t: _target_logprobs(self.head_logits(h), t), hidden, targets)

    def token_scores(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """token_logprobs, and whether each target is the most likely token (lm-eval's is_greedy: the
        argmax, ties to the lowest id, equals the target)."""
        def scores(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.head_logits(h)
            return _target_logprobs(logits, t), logits.argmax(-1) == t

        return self._by_chunks(scores, hidden, targets)

    def _by_chunks(self, fn, hidden: torch.Tensor, targets: torch.Tensor):
        """fn(hidden, targets), on the CPU in chunks of logits_chunk_rows positions: a batch's ~11k
        positions x a 49k vocabulary would be 2.2 GB of logits, twice over inside logsumexp; each row's
        figures are the same either way."""
        rows = logits_chunk_rows(self.args.vocab_size)
        if hidden.device.type != "cpu" or hidden.shape[0] <= rows:
            return fn(hidden, targets)
        parts = [fn(h, t) for h, t in zip(hidden.split(rows), targets.split(rows))]
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
