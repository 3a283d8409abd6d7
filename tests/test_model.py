"""runtime.model against the float64 reference, on fresh random weights and inputs."""

import pytest
import torch

from runtime.config import ModelArgs, global_shapes, layer_shapes
from runtime.model import Transformer, apply_rope, apply_rope_half, half_split_order
from tests import reference


def random_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    shapes = {**global_shapes(args), **{f"layers.{i}.{n}": s for i in range(args.n_layers)
                                         for n, s in layer_shapes(args).items()}}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            sd[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return sd


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_forward_matches_float64_reference(n_kv_heads):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=32,
                     rope_theta=500.0, max_seq_len=64)
    sd = random_state_dict(args, seed=int(torch.randint(2**31, ())))
    model = Transformer(args)
    model.load_state_dict(sd)
    tokens = torch.randint(0, args.vocab_size, (3, 17))
    with torch.no_grad():
        hidden = model(tokens)
        N = tokens.shape[1] - 1
        got = model.token_logprobs(hidden[:, :-1].reshape(-1, args.dim), tokens[:, 1:].reshape(-1)).view(3, N)
    for b in range(3):
        ref = reference.forward_logprobs(reference.to_float64(sd), args, tokens[b].tolist())
        want = ref[:-1].gather(-1, tokens[b, 1:, None]).squeeze(-1)
        torch.testing.assert_close(got[b].double(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", [None, "int8", "fp8"])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_half_split_rope_changes_nothing(n_kv_heads, scheme):
    """The runtime's RoPE layout (rows of wq/wk permuted, halves rotated) against Meta's interleaved
    one on the same weights: equal up to fp32 rounding (only the order of a few sums changes)."""
    from runtime.quant import SCHEMES, swap_linears

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=32,
                     max_seq_len=64)
    sd = random_state_dict(args, seed=int(torch.randint(2**31, ())))
    models = []
    for _ in range(2):
        m = Transformer(args)
        m.load_state_dict(sd)
        if scheme:
            swap_linears(m, SCHEMES[scheme]())
        models.append(m.eval())
    models[1].use_half_split_rope()
    assert not models[1].layers[0].attention.rope_interleaved
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        a, b = models[0](tokens), models[1](tokens)
        again = models[1].use_half_split_rope()(tokens)  # a second call is a no-op, not a second permutation
    if scheme is None:
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    else:
        # Per-token activation quantization downstream of attention: a value that fp32 rounding (q.k
        # summed in another order) moves across a rounding tie lands one step away, and the change
        # spreads to later tokens; so the whole model agrees closely, not exactly (a wrong RoPE is ~100%).
        assert ((b - a).norm() / a.norm()) < 0.05  # worst of 240 seeds: 0.012 (fp8), 0.0011 (int8)
        # Where it is exact: the permuted projections with the half-split rotation are the original
        # rotated projections, permuted.
        x = torch.randn(2, 20, args.dim)
        pos = torch.arange(20).expand(2, 20)
        cos, sin = models[0].rope_cos[pos], models[0].rope_sin[pos]
        for proj, heads in (("wq", args.n_heads), ("wk", args.kv_heads)):
            order = half_split_order(heads, args.head_dim)
            with torch.no_grad():
                ref = apply_rope(getattr(models[0].layers[0].attention, proj)(x).unflatten(-1, (heads, -1)), cos, sin)
                got = apply_rope_half(getattr(models[1].layers[0].attention, proj)(x).unflatten(-1, (heads, -1)),
                                      cos, sin)
            assert torch.equal(got.flatten(-2), ref.flatten(-2)[..., order])
    torch.testing.assert_close(again, b, atol=0, rtol=0)


def test_tp_mismatch_refused():
    args = ModelArgs(dim=52 * 4, n_layers=1, n_heads=52, vocab_size=10)
    with pytest.raises(ValueError, match="tp=8"):
        Transformer(args, tp=8)


def test_token_logprobs_of_a_bf16_model_use_fp32_logits():
    """A bf16 model on the CPU keeps an fp32 copy of its head (made once) and its log-probs are those
    of the bf16 values in float64 arithmetic; an fp32 model keeps no copy."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=300, multiple_of=32)
    model = Transformer(args).to(torch.bfloat16)
    model.keep_fp32_head()
    assert model.head_fp32.dtype == torch.float32 and torch.equal(model.head_fp32, model.output.weight.float())
    hidden = torch.randn(7, 64).bfloat16()
    targets = torch.randint(0, 300, (7,))
    got = model.token_logprobs(hidden, targets)
    want = (hidden.double() @ model.output.weight.double().t()).log_softmax(-1)[torch.arange(7), targets]
    assert got.dtype == torch.float32 and torch.allclose(got.double(), want, atol=1e-5)
    fp32 = Transformer(args)
    fp32.keep_fp32_head()
    assert fp32.head_fp32 is None


def test_cpu_logits_come_in_bounded_chunks(monkeypatch):
    """The LM head on the CPU never holds more than logits_chunk_rows positions of logits at once
    (a 200-item SmolLM2 batch scores ~11k positions: 2.2 GB of fp32 logits unchunked), and the
    chunked log-probs are those of the float64 reference, and the same as one product's."""
    import runtime.model

    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=1000, multiple_of=32, max_seq_len=64)
    sd = random_state_dict(args, seed=int(torch.randint(2**31, ())))
    model = Transformer(args)
    model.load_state_dict(sd)
    hidden = torch.randn(1500, args.dim)
    targets = torch.randint(0, args.vocab_size, (1500,))
    assert runtime.model.logits_chunk_rows(49152) == 1365  # SmolLM2's vocabulary: 0.27 GB a product
    whole = model.token_logprobs(hidden, targets)  # 1500 x 1000 x 4 bytes: under 256 MiB, one product
    monkeypatch.setattr(runtime.model, "LOGITS_CHUNK_BYTES", 4 * args.vocab_size * 400)
    rows = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, *a: rows.append(x.shape[0]) or linear(x, w, *a))
    got = model.token_logprobs(hidden, targets)
    assert rows == [400, 400, 400, 300]
    torch.testing.assert_close(got, whole, atol=1e-6, rtol=0)
    logits = hidden.double() @ sd["output.weight"].double().t()
    want = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
