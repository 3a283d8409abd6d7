"""Targets (the machines hsc compiles for) and the planner that maps a model onto one.

A plan is a storage precision plus a mapping: `tp` GPUs hold slices of every layer (tensor
parallelism) and `dp` such groups each score a share of the items (data parallelism).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from runtime.config import Mapping, ModelArgs, PRECISION_DTYPES, QUANTIZED_PRECISIONS, global_shapes, layer_shapes
from runtime.errors import HscError
from runtime.model import logits_chunk_rows
from runtime.run import RunConfig
from toolchain.shard import shard_shape, split_dim

GIB = 1 << 30
GB = 1e9


@dataclass(frozen=True)
class Target:
    name: str
    gpu: str  # "" for the CPU target
    compute_capability: tuple[int, int] | None
    n_gpus: int
    mem_per_gpu_gib: float
    tensor_core_dtypes: tuple[str, ...]  # what the matrix units run natively

    @property
    def is_gpu(self) -> bool:
        return self.n_gpus > 0


def _gpus(name, gpu, cc, counts, mem, dtypes):
    return {f"{name}x{n}": Target(f"{name}x{n}", gpu, cc, n, mem, dtypes) for n in counts}


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "", None, 0, 0.0, ("fp32", "bf16")),
    # sm_70: fp16 tensor cores only; no bf16, int8 or fp8 matrix units.
    **_gpus("v100", "V100 32GB", (7, 0), (4,), 32.0, ("fp16",)),
    **_gpus("a100", "A100 80GB", (8, 0), (1, 4), 80.0, ("bf16", "fp16", "int8")),
    **_gpus("h100", "H100 80GB", (9, 0), (1, 8), 80.0, ("bf16", "fp16", "fp8", "int8")),
    **_gpus("h200", "H200 141GB", (9, 0), (1, 2, 4), 141.0, ("bf16", "fp16", "fp8", "int8")),
}

# Weights may take this share of a GPU's memory; the rest is for activations, the CUDA context,
# compiled graphs and the allocator's slack.
WEIGHT_MEMORY_FRACTION = 0.80


def get_target(name: str) -> Target:
    """One of TARGETS, `auto` (this machine: machine_target) or a target spec (parse_target_spec)."""
    if name in TARGETS:
        return TARGETS[name]
    if name == "auto":
        return machine_target()
    return parse_target_spec(name)


@dataclass(frozen=True)
class Plan:
    precision: str
    mapping: Mapping
    explanation: str
    # Quantized precisions: the float precision of everything that is not a quantized block linear
    # (embeddings, norms, LM head) and of the compute. None for float precisions (= precision).
    compute: str | None = None
    rank_bytes: int = 0  # the tensors of one rank's file (rank_weight_bytes)
    activation_bytes: int = 0  # one rank's activations at `hsc run`'s batch shape (activation_bytes)


def _bytes_per_param(precision: str) -> int:
    return {"fp32": 4, "bf16": 2, "fp16": 2}[precision]


def _cc(target: Target) -> str:
    return ".".join(map(str, target.compute_capability))


def compute_precision(target: Target, precision: str) -> str:
    """The float precision a quantized artifact computes in: bf16 where the target has it, else fp16;
    fp32 on the CPU (the schemes' emulation). Float precisions compute in themselves."""
    if precision not in QUANTIZED_PRECISIONS:
        return precision
    if not target.is_gpu:
        return "fp32"
    return "bf16" if "bf16" in target.tensor_core_dtypes else "fp16"


def weight_bytes(args: ModelArgs, precision: str, compute: str | None = None) -> int:
    """Bytes of the stored weights. Quantized: 1 byte a block-linear parameter plus its fp32 row
    scales; embeddings, norms and the LM head in the compute precision."""
    if precision not in QUANTIZED_PRECISIONS:
        return args.n_params() * _bytes_per_param(precision)
    d, kv, f = args.dim, args.kv_heads * args.head_dim, args.ffn_dim
    linear = args.n_layers * (d * d * 2 + 2 * d * kv + 3 * d * f)
    rows = args.n_layers * (d + 2 * kv + d + 2 * f + d)  # one fp32 scale per output row
    return linear + 4 * rows + (args.n_params() - linear) * _bytes_per_param(compute or "fp32")


def rank_weight_bytes(args: ModelArgs, precision: str, compute: str | None, tp: int) -> int:
    """Bytes of the tensors one rank's file holds: its slices of the block linears plus the whole of
    every replicated tensor (embeddings, LM head, norms; toolchain/shard.py). Quantized block linears:
    1 byte a parameter plus one fp32 scale per output row of the slice; the rest in `compute`."""
    float_bytes = _bytes_per_param(compute or precision)
    layer = {f"layers.0.{n}": shape for n, shape in layer_shapes(args).items()}

    def tensor_bytes(name: str, shape: tuple[int, ...]) -> int:
        if precision not in QUANTIZED_PRECISIONS or split_dim(name) is None:
            return math.prod(shard_shape(name, shape, tp)) * float_bytes
        stem = name.removesuffix(".weight")
        qdata = math.prod(shard_shape(f"{stem}.qdata", shape, tp))
        return qdata + 4 * math.prod(shard_shape(f"{stem}.scale", shape[:1], tp))

    return (args.n_layers * sum(tensor_bytes(n, s) for n, s in layer.items())
            + sum(tensor_bytes(n, s) for n, s in global_shapes(args).items()))


def activation_bytes(args: ModelArgs, compute: str, tp: int, on_gpu: bool,
                     batch_tokens: int = RunConfig.batch_tokens) -> int:
    """One rank's largest live activations in a packed `hsc run` step of batch_tokens tokens: the
    residual stream, a normed copy and a block's output; q, k, v and their rotated copies (this
    rank's heads); the FFN's two products and their gated product; and the fp32 logits of the scored
    positions (about 3 in 4 tokens) with logsumexp's temporary of the same size -- chunked on the
    CPU (runtime/model.py: logits_chunk_rows)."""
    b = _bytes_per_param(compute)
    qkv = (args.n_heads + 2 * args.kv_heads) // tp * args.head_dim
    per_token = 3 * args.dim + 2 * qkv + 3 * args.ffn_dim // tp
    scored = 3 * batch_tokens // 4
    if not on_gpu:
        scored = min(scored, logits_chunk_rows(args.vocab_size))
    return batch_tokens * per_token * b + 2 * scored * args.vocab_size * 4


def _rank_text(weights: int, activations: int, tp: int) -> str:
    replicated = " (replicated embeddings/head/norms included)" if tp > 1 else ""
    return (f"{weights / GB:.2f} GB of weights{replicated} + "
            f"{activations / GB:.2f} GB of activations ({RunConfig.batch_tokens:,}-token batches)")


def choose_precision(target: Target, requested: str) -> str:
    known = ("auto", *PRECISION_DTYPES, *QUANTIZED_PRECISIONS)
    if requested not in known:
        raise HscError(f"unknown precision {requested!r}; choose {', '.join(known)}")
    if requested == "auto":
        # Float only: quantized artifacts need calibration and an accuracy check, so they are opt-in
        # (--precision fp8|int8|w8) until measured on GPUs.
        if not target.is_gpu:
            return "fp32"
        return "bf16" if "bf16" in target.tensor_core_dtypes else "fp16"
    if target.is_gpu and requested in ("fp8", "int8") and requested not in target.tensor_core_dtypes:
        float_alt = "bf16" if "bf16" in target.tensor_core_dtypes else "fp16"
        alts = [p for p in ("int8", "w8") if p != requested and (p == "w8" or p in target.tensor_core_dtypes)]
        raise HscError(f"target {target.name}: {target.gpu} (compute capability {_cc(target)}) has no "
                       f"{requested} tensor cores ({'sm_89+' if requested == 'fp8' else 'sm_80+'}); "
                       f"use --precision {' or '.join(alts + [float_alt])}")
    if target.is_gpu and requested == "bf16" and "bf16" not in target.tensor_core_dtypes:
        raise HscError(f"target {target.name}: {target.gpu} (compute capability {_cc(target)}) has no bf16; "
                       "use --precision fp16")
    return requested


def tp_divides(args: ModelArgs, tp: int) -> bool:
    """Whole heads per rank, never a split kv head, and an even FFN split."""
    return args.n_heads % tp == 0 and args.kv_heads % tp == 0 and args.ffn_dim % tp == 0


def make_plan(args: ModelArgs, target: Target, requested_precision: str = "auto",
              tp: int | None = None) -> Plan:
    """Smallest tensor-parallel degree whose weight slice fits a GPU; the rest of the GPUs become
    data-parallel replicas. `tp` forces a degree (it must divide the model and the GPU count)."""
    precision = choose_precision(target, requested_precision)
    compute = compute_precision(target, precision) if precision in QUANTIZED_PRECISIONS else None
    total_bytes = weight_bytes(args, precision, compute)
    what = f"{precision} ({compute} compute, embeddings/norms/head)" if compute else precision
    size = f"{args.n_params() / 1e9:.2f}B params, {what} = {total_bytes / GB:.1f} GB"
    if not target.is_gpu:
        if tp not in (None, 1):
            raise HscError(f"target cpu runs one process per replica; --tp {tp} needs a GPU target")
        held = rank_weight_bytes(args, precision, compute, 1)
        act = activation_bytes(args, compute or precision, 1, on_gpu=False)
        return Plan(precision, Mapping(1, 1), f"{size}; cpu: one process, TP=1, DP=1, holding "
                    f"{_rank_text(held, act, 1)}", compute, held, act)

    budget = target.mem_per_gpu_gib * GIB * WEIGHT_MEMORY_FRACTION
    candidates = [tp] if tp else [t for t in range(1, target.n_gpus + 1) if target.n_gpus % t == 0]
    for t in candidates:
        if target.n_gpus % t:
            raise HscError(f"--tp {t} does not divide the {target.n_gpus} GPUs of {target.name}")
        if not tp_divides(args, t):
            if tp:
                raise HscError(f"--tp {t} cannot split the model: {args.n_heads} heads, "
                               f"{args.kv_heads} kv heads, ffn {args.ffn_dim} must all divide by {t}")
            continue
        per_gpu = rank_weight_bytes(args, precision, compute, t)
        if per_gpu > budget:
            if tp:
                raise HscError(f"--tp {t}: {per_gpu / GB:.1f} GB of weights per GPU exceed "
                               f"{budget / GB:.1f} GB ({WEIGHT_MEMORY_FRACTION:.0%} of {target.gpu})")
            continue
        dp = target.n_gpus // t
        act = activation_bytes(args, compute or precision, t, on_gpu=True)
        why = "" if (compute or precision) != "fp16" or "bf16" in target.tensor_core_dtypes else \
            f" (fp16: sm_{''.join(map(str, target.compute_capability))} has no bf16)"
        return Plan(precision, Mapping(t, dp),
                    f"{size}{why}; {target.gpu} x{target.n_gpus}: TP={t} "
                    f"({(per_gpu + act) / GB:.1f} GB/GPU: {_rank_text(per_gpu, act, t)}; weights may use "
                    f"{budget / GB:.0f} GB), DP={dp}", compute, per_gpu, act)
    valid = [t for t in range(1, target.n_gpus + 1) if target.n_gpus % t == 0 and tp_divides(args, t)]
    raise HscError(f"target {target.name}: {size} does not fit: tensor-parallel degrees that divide "
                   f"{args.n_heads} heads/{args.kv_heads} kv heads and {target.n_gpus} GPUs are "
                   f"{valid or 'none'}, and none leaves the weights under {budget / GB:.1f} GB per GPU")


# ---- Any GPU box: target specs and `--target auto` ----------------------------------------------------------
#
# A spec names GPUs by family and count, `<family>[-<mem>gb]x<count>` (h100-80gbx2, a100-40gbx4, l40sx1,
# rtx4090x1), or by what the planner needs, `sm<major><minor>-<mem>gbx<count>` (sm89-48gbx2). The nine
# TARGETS above keep their names; a spec that describes one of them gives that target.

@dataclass(frozen=True)
class GPUFamily:
    gpu: str  # the name torch.cuda reports contains this (case-insensitive), e.g. "H100"
    compute_capability: tuple[int, int]
    mem_gib: tuple[float, ...]  # the memory sizes sold; the first is the default
    tensor_core_dtypes: tuple[str, ...]


def _dtypes_for(cc: tuple[int, int]) -> tuple[str, ...]:
    """What the matrix units run natively: fp8 from Ada/Hopper (sm_89), bf16 and int8 from Ampere (sm_80)."""
    if cc >= (8, 9):
        return ("bf16", "fp16", "fp8", "int8")
    if cc >= (8, 0):
        return ("bf16", "fp16", "int8")
    return ("fp16",)


def _family(gpu: str, cc: tuple[int, int], *mem: float) -> GPUFamily:
    return GPUFamily(gpu, cc, mem, _dtypes_for(cc))


GPU_FAMILIES: dict[str, GPUFamily] = {
    "v100": _family("V100", (7, 0), 32.0, 16.0),
    "t4": _family("T4", (7, 5), 16.0),
    "a100": _family("A100", (8, 0), 80.0, 40.0),
    "a10": _family("A10", (8, 6), 24.0),
    "a10g": _family("A10G", (8, 6), 24.0),
    "a40": _family("A40", (8, 6), 48.0),
    "a6000": _family("RTX A6000", (8, 6), 48.0),
    "rtx3090": _family("RTX 3090", (8, 6), 24.0),
    "l4": _family("L4", (8, 9), 24.0),
    "l40": _family("L40", (8, 9), 48.0),
    "l40s": _family("L40S", (8, 9), 48.0),
    "rtx4090": _family("RTX 4090", (8, 9), 24.0),
    "rtx6000ada": _family("RTX 6000 Ada", (8, 9), 48.0),
    "h100": _family("H100", (9, 0), 80.0, 94.0),
    "h200": _family("H200", (9, 0), 141.0),
}
MAX_GPUS = 64
_SPEC = re.compile(r"(?P<family>[a-z0-9]+?)(?:-(?P<mem>\d+(?:\.\d+)?)gb)?x(?P<n>\d+)")
_SM = re.compile(r"sm(?P<major>\d+)(?P<minor>\d)")


def parse_target_spec(spec: str) -> Target:
    m = _SPEC.fullmatch(spec.strip().lower())
    if m is None:
        raise HscError(f"unknown target {spec!r}; known targets: {', '.join(TARGETS)}, auto, or a spec "
                       f"<gpu>[-<mem>gb]x<count> (e.g. h100-80gbx2, l40sx1) with <gpu> one of "
                       f"{', '.join(GPU_FAMILIES)} or sm<XY> (e.g. sm89-48gbx2)")
    n, mem = int(m["n"]), m["mem"] and float(m["mem"])
    if not 1 <= n <= MAX_GPUS:
        raise HscError(f"target {spec!r}: {n} GPUs; choose 1..{MAX_GPUS}")
    if sm := _SM.fullmatch(m["family"]):
        if mem is None:
            raise HscError(f"target {spec!r}: a GPU named by compute capability needs its memory, e.g. {spec[:-len(m['n']) - 1]}-24gbx{n}")
        cc = (int(sm["major"]), int(sm["minor"]))
        return _gpu_target(spec.lower(), f"sm_{sm['major']}{sm['minor']} {mem:g}GB", cc, n, mem, _dtypes_for(cc))
    fam = GPU_FAMILIES.get(m["family"])
    if fam is None:
        raise HscError(f"target {spec!r}: unknown GPU {m['family']!r}; known: {', '.join(GPU_FAMILIES)}, "
                       f"or sm<XY>-<mem>gb (e.g. sm89-48gbx{n})")
    if mem is not None and mem not in fam.mem_gib:
        raise HscError(f"target {spec!r}: {fam.gpu} comes with {' or '.join(f'{g:g}' for g in fam.mem_gib)} GB; "
                       f"for another size use sm{''.join(map(str, fam.compute_capability))}-{mem:g}gbx{n}")
    mem = fam.mem_gib[0] if mem is None else mem
    return _gpu_target(spec.lower(), f"{fam.gpu} {mem:g}GB", fam.compute_capability, n, mem, fam.tensor_core_dtypes)


def _gpu_target(name: str, gpu: str, cc: tuple[int, int], n: int, mem: float, dtypes: tuple[str, ...]) -> Target:
    """A listed target when the spec describes one (h200-141gbx2 is h200x2), else a new one."""
    for t in TARGETS.values():
        if (t.gpu, t.n_gpus) == (gpu, n):
            return t
    return Target(name, gpu, cc, n, mem, dtypes)


def machine_target() -> Target:
    """`--target auto`: the GPUs torch.cuda sees on this machine (all of them; the smallest memory and
    capability when they differ), or the CPU when there is none."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return TARGETS["cpu"]
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    cc = min((p.major, p.minor) for p in props)
    mem_gib = min(p.total_memory for p in props) / GIB
    name = props[0].name
    n = len(props)
    fam = next((k for k, f in sorted(GPU_FAMILIES.items(), key=lambda kv: -len(kv[1].gpu))
                if f.gpu.upper() in name.upper() and f.compute_capability == cc), None)
    if fam is not None:
        # the family's nominal size (141 GB for an H200 that reports 139.8 GiB) when the card is one of them
        nominal = min(GPU_FAMILIES[fam].mem_gib, key=lambda g: abs(g - mem_gib))
        if abs(nominal - mem_gib) / nominal < 0.1:
            return parse_target_spec(f"{fam}-{nominal:g}gbx{n}")
    return Target(f"sm{cc[0]}{cc[1]}-{mem_gib:.0f}gbx{n}", f"{name} {mem_gib:.0f}GB", cc, n,
                  float(f"{mem_gib:.0f}"), _dtypes_for(cc))
