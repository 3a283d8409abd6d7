"""`hsc bench`: the runtime's speed at a model shape, with random weights built on the GPU.

Random weights of the exact shape cost the same FLOPs as the real model, so the LLaMA-30B speed
can be measured without its checkpoint. Items are the real HellaSwag validation items, tokenized
with the real LLaMA tokenizer; scoring runs the same engine as `hsc run`. `--baseline hf` runs
the loop lm-eval's HF backend runs (one request per ending, sorted, right-padded batches of 64,
full-vocabulary log-softmax) on a transformers model of the same shape, in the same process.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.hellaswag import Item
from runtime.model import Transformer, rope_tables
from runtime.packed import FLAT_NEEDS_COMPILE, PackedScorer
from runtime.quant import QuantScheme, scheme_for, swap_linears
from runtime.scoring import Request, build_requests

SHAPES = {
    "llama-30b": ModelArgs(dim=6656, n_layers=60, n_heads=52, vocab_size=32000, multiple_of=256),
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                              hidden_dim=1536, rope_theta=100000.0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Quantized precisions: the scheme of the seven block linears, everything else in bf16 (as the
# h200 targets compile them).
QUANTIZED = ("fp8", "int8", "w8")
PRECISIONS = (*DTYPES, *QUANTIZED)


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision in QUANTIZED else DTYPES[precision]


def random_model(args: ModelArgs, dtype: torch.dtype, device, seed: int = 0,
                 scheme: str | QuantScheme | None = None, tp: int = 1, tp_group=None) -> Transformer:
    """Weights ~ N(0, 1/fan_in), norms 1: activations stay O(1) through any depth. With a scheme,
    each block's linears are then quantized from those weights, one block at a time (so the
    float copy of only one block is alive next to the quantized model). With tp > 1, one rank's
    slice of the model (runtime/model.py), random on its own: for timing, not for scores."""
    with torch.device("meta"):
        model = Transformer(args, tp, tp_group).to(dtype)  # never materialised in fp32: 130 GB at 30B
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if scheme is not None:
        scheme = scheme_for(scheme) if isinstance(scheme, str) else scheme
        for block in model.layers:
            swap_linears(block, scheme)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    model.keep_fp32_head()
    return model.use_half_split_rope().eval()


def model_flops(args: ModelArgs, tokens: int, attended_keys: int, scored: int) -> float:
    """Matrix FLOPs the model needs: `tokens` through the body's linears, attention (q.k and p.v)
    over `attended_keys` keys in all, and the LM head at the `scored` positions. Work a layout
    spends beyond this (padding, masked-out blocks) is not counted."""
    kv = args.kv_heads * args.head_dim
    linear = 2 * (2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.ffn_dim)
    return args.n_layers * (linear * tokens + 4 * args.dim * attended_keys) + 2 * args.dim * args.vocab_size * scored


def gemm_product(precision: str, m: int, k: int, n: int, device, fast_accum: bool = False):
    """A function computing one [m, k] x [k, n] product with the kernel `precision` runs: a float
    matmul; torch._scaled_mm with row-wise scales (fp8, with fast_accum if the run uses it);
    torch._int_mm (int8); w8 runs float matmuls after dequantizing, so its product is bf16's."""
    a = torch.randn(m, k, device=device, dtype=compute_dtype(precision))
    b = torch.randn(n, k, device=device, dtype=compute_dtype(precision))
    if precision == "fp8":
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
        product = lambda: torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                           use_fast_accum=fast_accum)
    elif precision == "int8":
        a8, b8 = a.clamp(-127, 127).to(torch.int8), b.clamp(-127, 127).to(torch.int8)
        product = lambda: torch._int_mm(a8, b8.t())
    else:
        product = lambda: a @ b.t()
    return product


def gemm_rate(precision: str, m: int, k: int, n: int, device, fast_accum: bool = False) -> float:
    """Measured FLOP/s of gemm_product (median of 20 calls after warm-up): a short burst, at the
    clocks of a GPU that has been idle."""
    product = gemm_product(precision, m, k, n, device, fast_accum)
    for _ in range(3):
        product()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        product()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * m * k * n / sorted(times)[len(times) // 2]


def sustained_gemm_rate(precision: str, m: int, k: int, n: int, device, fast_accum: bool = False,
                        seconds: float = 15.0, window_s: float = 0.5) -> float:
    """FLOP/s of gemm_product run back to back for `seconds`: the median over the second half of
    windows of about `window_s`. A scoring run of minutes may hold the GPU at its power limit, where
    the clocks can settle below those of a short burst (gemm_rate); this measures the product at the
    clocks such a run leaves the GPU at."""
    product = gemm_product(precision, m, k, n, device, fast_accum)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    product()
    sync()
    t0 = time.perf_counter()
    product()
    sync()
    per_window = max(1, round(window_s / max(time.perf_counter() - t0, 1e-9)))
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 2:
        t0 = time.perf_counter()
        for _ in range(per_window):
            product()
        sync()
        rates.append(per_window * 2 * m * k * n / (time.perf_counter() - t0))
    settled = sorted(rates[len(rates) // 2:])
    return settled[len(settled) // 2]


def hf_baseline(args: ModelArgs, dtype: torch.dtype, requests: list[Request], device, batch_size: int = 64) -> float:
    """Seconds for lm-eval's HF loop over `requests` with a transformers model of the same shape."""
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
                         rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    # lm-eval sorts by descending total length so that each batch pads little.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context + requests[i].continuation))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            batch = [requests[i] for i in order[s:s + batch_size]]
            seqs = [list(r.context + r.continuation)[:-1] for r in batch]
            T = max(map(len, seqs))
            inp = torch.zeros(len(seqs), T, dtype=torch.long)
            for b, x in enumerate(seqs):
                inp[b, :len(x)] = torch.tensor(x)
            logp = F.log_softmax(hf(inp.to(device)).logits.float(), dim=-1)  # [B, T, vocab]
            for b, r in enumerate(batch):
                n, L = len(r.continuation), len(seqs[b])
                cont = torch.tensor(r.continuation, device=device)
                logp[b, L - n:L].gather(-1, cont[:, None]).sum().item()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del hf
    torch.cuda.empty_cache()
    return seconds


@dataclass(frozen=True)
class BenchConfig:
    shape: str = "llama-30b"
    precision: str = "bf16"
    gpus: int = 1
    tp: int = 1  # tensor-parallel degree: gpus / tp data-parallel replicas of tp GPUs each
    layers: int | None = None  # fewer layers than the shape has, for quick checks
    limit: int | None = None  # items [0, limit); default all 10,042
    batch_tokens: int = 16384
    compile: bool = True
    fast_accum: bool = False  # fp8: torch._scaled_mm's use_fast_accum (Float8WeightFloat8Activation)
    layout: str | None = None  # packed batches, "rows" or "flat"; None: PackedScorer's default
    block_regions: bool = False  # compile one transformer block for all layers (PackedScorer)
    sustained_gemm_s: float = 15.0  # seconds of back-to-back products after scoring (0: not measured)
    baseline: str = "none"  # "hf": also time lm-eval's transformers loop
    baseline_items: int | None = None  # items for the baseline (and a same-items hsc timing); default all.
    # Fewer than all: every k-th item (baseline_sample), so that the sample has the set's mix of
    # short ActivityNet and long WikiHow items and its time scales to the full set.


@dataclass(frozen=True)
class WorkerResult:
    """What one GPU's worker process reports back (through a queue, so plain picklable values)."""

    rank: int
    scoring_s: float
    warmup_s: float
    tokens: int  # real (non-padding) tokens this rank scored
    attended_keys: int  # keys those tokens attend to, summed (Batches.attended_keys)
    layout: str  # PackedScorer.layout: "rows" or "flat"
    peak_memory: int  # bytes, torch.cuda.max_memory_allocated during scoring
    batch_shape: list[int] | None  # [rows, row_len, targets]; None: an idle replica (no row)
    same_items_s: float | None  # rank 0 with --baseline-items: hsc on exactly the baseline's items
    sustained_gemm: float | None  # rank 0: sustained_gemm_rate right after scoring, the GPU still hot


def baseline_sample(n_items: int, wanted: int | None) -> list[int]:
    """Item indices of the baseline: all, or `wanted` of them evenly spread over the set."""
    if not wanted or wanted >= n_items:
        return list(range(n_items))
    return [k * n_items // wanted for k in range(wanted)]


def _requests_of(requests: list[Request], item_indices: list[int]) -> list[Request]:
    return [r for k in item_indices for r in requests[4 * k: 4 * k + 4]]


def _worker(rank: int, cfg: BenchConfig, requests: list[Request], args: ModelArgs, port: int, queue):
    import os

    import torch.distributed as dist

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = None
    if cfg.gpus > 1:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.gpus,
                                device_id=device)
    replicas = cfg.gpus // cfg.tp
    if cfg.tp > 1:  # ranks [g*tp, (g+1)*tp) form replica g; every rank creates every group, as NCCL wants
        groups = [dist.new_group(list(range(g * cfg.tp, (g + 1) * cfg.tp))) for g in range(replicas)]
        group = groups[rank // cfg.tp]
    dtype = compute_dtype(cfg.precision)
    torch.backends.cuda.matmul.allow_tf32 = dtype != torch.float32
    scheme = scheme_for(cfg.precision, cfg.fast_accum) if cfg.precision in QUANTIZED else None
    model = random_model(args, dtype, device, seed=rank, scheme=scheme, tp=cfg.tp, tp_group=group)
    # Data parallel, as hsc run: every replica-th row of the whole set's packing; the ranks of one
    # replica pack the same rows, so their batches (and compiled shapes) are identical. A replica
    # without a row (a short --limit) idles.
    scorer = PackedScorer(model, device, None, cfg.batch_tokens, compile=cfg.compile,
                          block_regions=cfg.block_regions, layout=cfg.layout)
    batches = scorer.prepare(requests, replica=(rank // cfg.tp, replicas))
    t0 = time.perf_counter()
    if batches is not None:
        scorer.warmup(batches)
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats(device)
    if cfg.gpus > 1:
        dist.barrier()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if batches is not None:
        scorer.score(batches)
    torch.cuda.synchronize()
    if cfg.gpus > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    sustained = None
    if rank == 0 and cfg.sustained_gemm_s > 0:  # right after scoring: the GPU is at its working clocks
        sustained = sustained_gemm_rate(cfg.precision, cfg.batch_tokens, args.dim, args.ffn_dim, device,
                                        cfg.fast_accum, seconds=cfg.sustained_gemm_s)
    same_items_s = None
    if rank == 0 and cfg.baseline_items:  # hsc on exactly the baseline's items, same compiled graph
        sub = scorer.prepare(_requests_of(requests, baseline_sample(len(requests) // 4, cfg.baseline_items)),
                             like=batches)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        scorer.score(sub)
        torch.cuda.synchronize()
        same_items_s = time.perf_counter() - t1
    idle = batches is None
    queue.put(WorkerResult(rank, seconds, warm, 0 if idle else sum(batches.real_tokens),
                           0 if idle else batches.attended_keys(), scorer.layout,
                           torch.cuda.max_memory_allocated(device),
                           None if idle else list(batches.shape), same_items_s, sustained))
    if cfg.gpus > 1:
        dist.destroy_process_group()


def run_bench(cfg: BenchConfig, items: list[Item], tokenizer, echo=print) -> dict:
    import socket

    import torch.multiprocessing as mp

    args = SHAPES[cfg.shape]
    if cfg.tp < 1 or cfg.gpus % cfg.tp or args.n_heads % cfg.tp or args.kv_heads % cfg.tp or args.ffn_dim % cfg.tp:
        raise HscError(f"hsc bench --tp {cfg.tp}: must divide --gpus {cfg.gpus} and the shape's {args.n_heads} "
                       f"heads ({args.kv_heads} kv) and ffn {args.ffn_dim}")
    if cfg.fast_accum:
        try:
            scheme_for(cfg.precision, cfg.fast_accum)
        except ValueError as e:
            raise HscError(f"hsc bench {e}") from None
    if cfg.layout == "flat" and not cfg.compile:
        raise HscError(f"hsc bench {FLAT_NEEDS_COMPILE}")
    if cfg.tp > 1 and cfg.baseline != "none":
        raise HscError("hsc bench --baseline runs on one GPU; time it without --tp")
    if not torch.cuda.is_available() or torch.cuda.device_count() < cfg.gpus:
        raise HscError(f"hsc bench --gpus {cfg.gpus}: needs {cfg.gpus} CUDA device(s), "
                       f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    if cfg.layers:
        args = replace(args, n_layers=cfg.layers)
    items = items[: cfg.limit] if cfg.limit else items
    requests = build_requests(items, tokenizer, add_bos=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, cfg, requests, args, port, queue)) for r in range(cfg.gpus)]
    for p in procs:
        p.start()
    results = sorted((queue.get() for _ in procs), key=lambda r: r.rank)
    for p in procs:
        p.join()
    seconds = max(r.scoring_s for r in results)
    tokens = sum(r.tokens for r in results if r.rank % cfg.tp == 0)  # each replica's tokens once
    dtype = compute_dtype(cfg.precision)
    rate = gemm_rate(cfg.precision, cfg.batch_tokens, args.dim, args.ffn_dim, "cuda", cfg.fast_accum)
    n_targets = sum(len(r.continuation) for r in requests)
    keys = sum(r.attended_keys for r in results if r.rank % cfg.tp == 0)
    flops = model_flops(args, tokens, keys, n_targets)
    out = {
        "shape": cfg.shape, "layers": args.n_layers, "precision": cfg.precision, "gpus": cfg.gpus, "tp": cfg.tp,
        "fast_accum": cfg.fast_accum, "layout": results[0].layout, "block_regions": cfg.block_regions,
        "items": len(items), "tokens": tokens,
        "scoring_s": round(seconds, 3),
        "warmup_s": round(max(r.warmup_s for r in results), 1), "tokens_per_s": round(tokens / seconds),
        "batch_shape": results[0].batch_shape, "peak_gpu_memory_gb": round(max(r.peak_memory for r in results) / 1e9, 2),
        "gemm_tflops_measured": round(rate / 1e12, 1),
        "achieved_tflops": round(flops / seconds / 1e12, 1),
        "fraction_of_gemm_rate": round(flops / seconds / (rate * cfg.gpus), 3),  # per GPU
        "device": torch.cuda.get_device_name(0),
    }
    sustained = results[0].sustained_gemm
    if sustained is not None:  # the same product, back to back for cfg.sustained_gemm_s after scoring
        out["gemm_tflops_sustained"] = round(sustained / 1e12, 1)
        out["fraction_of_sustained_gemm_rate"] = round(flops / seconds / (sustained * cfg.gpus), 3)
    if cfg.baseline == "hf":
        # After the workers have exited, so their GPU memory is free for the transformers model.
        sample = baseline_sample(len(items), cfg.baseline_items)
        sampled = _requests_of(requests, sample)
        out["baseline_items"] = len(sample)
        out["baseline_hf_s"] = round(hf_baseline(args, dtype, sampled, torch.device("cuda", 0)), 2)
        same = results[0].same_items_s
        out["hsc_same_items_s"] = round(same, 3) if same is not None else out["scoring_s"]
        out["speedup_vs_hf"] = round(out["baseline_hf_s"] / out["hsc_same_items_s"], 2)
        if len(sample) < len(items):  # an estimate, labelled as one: the sample's time scaled by tokens
            n_tokens = lambda reqs: sum(len(r.context) + len(r.continuation) for r in reqs)
            share = n_tokens(sampled) / n_tokens(requests)
            out["baseline_hf_full_set_estimate_s"] = round(out["baseline_hf_s"] / share, 1)
    echo(" ".join(f"{k}={v}" for k, v in out.items()))
    return out
