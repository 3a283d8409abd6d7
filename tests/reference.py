"""A float64 reference written independently of runtime/: Meta's LLaMA forward in plain torch
ops (complex-number RoPE as in Meta's llama/model.py), and lm-eval's scoring loop with one
forward per ending. The runtime is checked against this, never against itself."""

from __future__ import annotations

import torch

from runtime.config import ModelArgs


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def forward_logprobs(W: dict[str, torch.Tensor], args: ModelArgs, tokens: list[int],
                     rows: slice = slice(None)) -> torch.Tensor:
    """log-softmax over the vocabulary at positions `rows` of one sequence: [len(rows), vocab].
    W: the weights in float64 (see to_float64)."""
    T, H, KV, hd = len(tokens), args.n_heads, args.kv_heads, args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rot = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T, dtype=torch.float64), freqs))

    def rope(x):  # x [T, heads, hd]; pairs (2i, 2i+1) form one complex number
        xc = torch.view_as_complex(x.reshape(T, x.shape[1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[:, None, :]).reshape(T, x.shape[1], hd)

    h = W["tok_embeddings.weight"][torch.tensor(tokens)]
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = _rms(h, W[p + "attention_norm.weight"], args.norm_eps)
        q = rope((x @ W[p + "attention.wq.weight"].T).view(T, H, hd))
        k = rope((x @ W[p + "attention.wk.weight"].T).view(T, KV, hd))
        v = (x @ W[p + "attention.wv.weight"].T).view(T, KV, hd)
        k = k.repeat_interleave(H // KV, dim=1)  # Meta's repeat_kv
        v = v.repeat_interleave(H // KV, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + causal
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, H * hd)
        h = h + att @ W[p + "attention.wo.weight"].T
        x = _rms(h, W[p + "ffn_norm.weight"], args.norm_eps)
        a = x @ W[p + "feed_forward.w1.weight"].T
        h = h + ((a * torch.sigmoid(a)) * (x @ W[p + "feed_forward.w3.weight"].T)) @ W[p + "feed_forward.w2.weight"].T
    logits = _rms(h[rows], W["norm.weight"], args.norm_eps) @ W["output.weight"].T
    return logits.log_softmax(-1)


def to_float64(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in sd.items()}


def model_weights_float64(model) -> dict[str, torch.Tensor]:
    """A runtime Transformer's weights in float64 and in Meta's interleaved RoPE layout, which this
    reference computes with: the runtime permutes wq/wk rows to the half-split layout at load
    (Transformer.use_half_split_rope), and this undoes it."""
    from runtime.model import half_split_order

    W = {k: v.detach().cpu().double() for k, v in model.state_dict().items()}
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        if not attn.rope_interleaved:
            for name, heads in (("wq", attn.n_heads), ("wk", attn.n_kv_heads)):
                key = f"layers.{i}.attention.{name}.weight"
                W[key] = W[key][torch.argsort(half_split_order(heads, attn.head_dim))]
    return W


def loglikelihood(W, args, context: list[int], continuation: list[int]) -> float:
    """lm-eval's loglikelihood of one request: one forward over context + continuation[:-1],
    summing log p(continuation token) at the positions that predict them."""
    tokens = context + continuation
    start = len(context) - 1
    lp = forward_logprobs(W, args, tokens[:-1], slice(start, None))
    return float(sum(lp[j, t] for j, t in enumerate(continuation)))


def lm_eval_loglikelihood(W, args, context: list[int], continuation: list[int], max_length: int) -> float:
    """lm-eval's HFLM._loglikelihood_tokens for one request, written out plainly: the model reads
    (context + continuation)[-(max_length + 1):][:-1] from position 0, and the last len(continuation)
    positions of its output score the continuation (lm-eval asserts len(continuation) <= max_length)."""
    assert 0 < len(continuation) <= max_length
    inp = (context + continuation)[-(max_length + 1):][:-1]
    lp = forward_logprobs(W, args, inp, slice(len(inp) - len(continuation), len(inp)))
    return float(sum(lp[j, t] for j, t in enumerate(continuation)))


def lm_eval_requests(tokenize, query: str, endings, bos: int | None):
    """lm-eval's _encode_pair for each ending, written out plainly: (context ids, continuation ids)."""
    out = []
    for e in endings:
        ctx, cont = query, " " + e
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole, c = tokenize(ctx + cont), tokenize(ctx)
        out.append((([bos] if bos is not None else []) + c, whole[len(c):]))
    return out
