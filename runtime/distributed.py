"""Running one artifact as several processes: tensor-parallel groups x data-parallel replicas.

The artifact fixes the tensor-parallel degree `tp` (its rank files); the number of processes is the
launch's: any multiple of `tp`, one per GPU (or one per CPU process with `--device cpu`), each further
group of `tp` a data-parallel replica. The manifest's `Mapping(tp, dp)` is the plan for its target.
Ranks are laid out group by group: tensor-parallel group d holds the consecutive ranks
[d*tp, (d+1)*tp), so rank r has tp_rank = r % tp and dp_rank = r // tp. A rank loads only `rank{tp_rank}.safetensors`. Global rank 0 writes the results.

Processes come from torchrun (`python -m torch.distributed.run`, or `hsc run ART --nproc N`, which
re-launches itself under it); its environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR/PORT) is read with `init_method="env://"`. Backend: NCCL on CUDA, gloo on CPU.

Before any weight is read, the plan is compared with the machine (`check_machine`): too few GPUs,
too little memory per GPU, or a compute capability the precision cannot run on are refused with one
line; a GPU other than the one the artifact was planned for is a warning. This module reads only
the manifest (its `target_info`, written by the compiler): the runtime never imports `toolchain`.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from runtime.artifact import build_model, load_manifest
from runtime.config import Manifest
from runtime.errors import HscError
from runtime.errors import warn as _warn

GIB = 1 << 30

# What a GPU must support to run weights stored in a precision (fp8 is listed for the planner's
# future fp8 targets). fp32 and fp16 run on every GPU torch supports.
# The oldest GPU that runs each stored precision's arithmetic: bf16 and int8 (torch._int_mm) tensor
# cores from Ampere, e4m3 (torch._scaled_mm) from Ada/Hopper. A quantized artifact also needs what its
# compute dtype needs (an int8 artifact computes the rest in bf16 on the h200 targets).
PRECISION_MIN_CC: dict[str, tuple[int, int]] = {"bf16": (8, 0), "int8": (8, 0), "fp8": (8, 9)}
DTYPE_MIN_CC: dict[str, tuple[int, int]] = {"bfloat16": (8, 0)}


def required_cc(manifest: Manifest) -> tuple[tuple[int, int], str] | None:
    """(oldest compute capability that runs the artifact, what needs it), or None: any CUDA GPU."""
    wants = [(PRECISION_MIN_CC.get(manifest.precision), f"{manifest.precision} weights need")]
    if manifest.compute_dtype is not None:
        wants.append((DTYPE_MIN_CC.get(manifest.compute_dtype), f"{manifest.compute_dtype} compute needs"))
    wants = [(cc, why) for cc, why in wants if cc is not None]
    return max(wants) if wants else None

# Memory a rank needs beyond its weights file: the file's bytes * WEIGHT_OVERHEAD (allocator
# rounding, the fp32 LM-head copy of small models) + ACTIVATION_MARGIN (CUDA context, activations).
WEIGHT_OVERHEAD = 1.1
ACTIVATION_MARGIN_BYTES = 1 * GIB

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE")


@dataclass
class Dist:
    """Where this process sits in the plan. Single process: rank 0 of 1, no process group."""

    rank: int = 0
    world_size: int = 1
    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: object = None  # the tensor-parallel ProcessGroup; None when tp == 1
    device: torch.device = torch.device("cpu")
    is_writer: bool = True  # global rank 0 prints and writes results
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # "nccl" or "gloo" when a process group was created
    initialized: bool = False  # this module called init_process_group (teardown destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    """torchrun (or any env:// launcher) sets RANK and WORLD_SIZE for every worker."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise HscError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def _plan_text(manifest: Manifest) -> str:
    m = manifest.mapping
    return f"TP={m.tp} x DP={m.dp} = {m.world_size} process{'es' if m.world_size > 1 else ''}"


def _is_gpu_target(manifest: Manifest) -> bool:
    info = manifest.target_info
    if info is not None:
        return bool(info.get("n_gpus"))
    return manifest.target != "cpu"  # manifests written before target_info existed


def pick_device(name: str) -> torch.device:
    """The one place device names are validated."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HscError(f"--device {name}: no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise HscError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None


def command_with(command: str, **flags) -> str:
    """The user's `hsc ...` command line with each --flag set to the given value (replaced where the
    user gave it, else appended): a hint that keeps every flag already typed."""
    words = shlex.split(command)
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        words = [*_drop_flag(words, flag), flag, str(value)]
    return shlex.join(words)


def _run_command(artifact, command: str | None) -> str:
    return command if command is not None else shlex.join(["hsc", "run", str(artifact)])


def resolve_device(manifest: Manifest, device_name: str, artifact, local_rank: int = 0,
                   multi: bool = False, warn=_warn, command: str | None = None) -> torch.device:
    """auto: CUDA when present, else CPU -- but a GPU-target artifact refuses to fall back to the CPU
    silently: `--device cpu` runs it there on purpose (with a warning). With several processes
    (multi), `cuda`/`cuda:N` always mean this process's GPU, cuda:LOCAL_RANK. command: the user's
    command line, which the refusal's hint repeats with what it needs (--device cpu, --nproc N)."""
    if device_name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if _is_gpu_target(manifest):
            n = manifest.mapping.world_size
            needs = {"device": "cpu", **({"nproc": n} if n > 1 and not multi else {})}
            raise HscError(f"{artifact}: compiled for target {manifest.target} ({_plan_text(manifest)} on GPUs) "
                           f"but no CUDA device is available; to run it on the CPU anyway (slow): "
                           f"`{command_with(_run_command(artifact, command), **needs)}`")
        return torch.device("cpu")
    device = pick_device(device_name)
    if device.type == "cuda":
        return torch.device("cuda", local_rank if multi or device.index is None else device.index)
    if device.type == "cpu" and _is_gpu_target(manifest) and local_rank == 0:
        warn(f"{artifact}: compiled for target {manifest.target}; running it on the CPU as --device cpu "
             f"asks ({_plan_text(manifest)} as CPU processes, gloo; slow)")
    return device


def _cc(x) -> tuple[int, int] | None:
    return None if x is None else (int(x[0]), int(x[1]))


def _cc_text(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


# The torch build to install for a GPU whose compute capability the installed one has no kernels for:
# torch 2.12-2.14 ship CUDA 12.6 wheels for sm_50..sm_90 (Volta included) and CUDA 13.0 wheels for
# sm_75 and newer (docs/gpu-setup.md).
TORCH_VERSION = "2.13.0"


def torch_build_for(cc: tuple[int, int]) -> str:
    """The pip command that installs a torch build with kernels for compute capability `cc`."""
    build = "cu126" if cc < (7, 5) else "cu130"
    return f"pip install torch=={TORCH_VERSION} --index-url https://download.pytorch.org/whl/{build}"


def runs_on(cc: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list(): sm_XY machine code, compute_XY
    PTX) has kernels for a GPU of compute capability cc: sm_XY code runs on X.Y and later minors of
    the same major (arch-specific sm_XYa only on X.Y); compute_XY PTX is compiled for any cc >= X.Y."""
    for arch in arch_list:
        m = re.fullmatch(r"(sm|compute)_(\d+)([a-z]?)", arch)
        if m is None:
            continue
        built = divmod(int(m.group(2)), 10)
        if m.group(1) == "compute" and cc >= built:
            return True
        if m.group(1) == "sm" and (cc == built or (not m.group(3) and cc[0] == built[0] and cc[1] >= built[1])):
            return True
    return False


def check_machine(manifest: Manifest, device: torch.device, artifact, gpus_needed: int,
                  tp_rank: int | None = None, local_rank: int = 0, warn=_warn) -> None:
    """Compare the plan with the GPUs present, before any weight is read (CUDA only).

    gpus_needed: GPUs this node must hold (the ranks torchrun starts here, or the plan's world size
    for a single-node launch). Refuses with one line: too few GPUs, too little memory for the largest
    rank file, a compute capability below what the precision needs. Warns (once per node): a GPU
    other than the target's."""
    if device.type != "cuda":
        return
    present = torch.cuda.device_count()
    if gpus_needed > present:
        raise HscError(f"{artifact}: plan {_plan_text(manifest)} needs {gpus_needed} GPUs on this machine, "
                       f"{present} present")
    if gpus_needed == 1 and (device.index or 0) >= present:
        raise HscError(f"--device {device}: only {present} CUDA device(s) present")
    indices = [device.index or 0] if gpus_needed == 1 else list(range(gpus_needed))
    shards = [s for s in manifest.shards if tp_rank is None or s.tp_rank == tp_rank] or list(manifest.shards)
    shard = max(shards, key=lambda s: s.bytes)
    need = shard.bytes * WEIGHT_OVERHEAD + ACTIVATION_MARGIN_BYTES
    info = manifest.target_info or {}
    want = required_cc(manifest)
    target_gpu = str(info.get("gpu") or "")
    target_cc = _cc(info.get("compute_capability"))
    arch_list = torch.cuda.get_arch_list()  # empty: cannot tell (not a CUDA build)
    for i in indices:
        props = torch.cuda.get_device_properties(i)
        name, cc, total = props.name, (props.major, props.minor), props.total_memory
        if arch_list and not runs_on(cc, arch_list):
            raise HscError(f"torch {torch.__version__} has no kernels for GPU {i} ({name}, {_cc_text(cc)}): it was "
                           f"built for {' '.join(arch_list)}; install a build that has them: `{torch_build_for(cc)}` "
                           "(docs/gpu-setup.md)")
        if total < need:
            raise HscError(f"{artifact}: {shard.file} needs about {need / GIB:.1f} GiB per GPU "
                           f"({shard.bytes / GIB:.2f} GiB of weights x {WEIGHT_OVERHEAD} + "
                           f"{ACTIVATION_MARGIN_BYTES / GIB:.0f} GiB), GPU {i} ({name}) has {total / GIB:.1f} GiB")
        if want is not None and cc < want[0]:
            raise HscError(f"{artifact}: {want[1]} compute capability "
                           f"{_cc_text(want[0])} or newer; GPU {i} ({name}) is {_cc_text(cc)} "
                           f"(compile for this machine's target, e.g. --precision fp16 or w8)")
    if local_rank == 0 and target_gpu:
        props = torch.cuda.get_device_properties(indices[0])
        model_name = target_gpu.split()[0].upper()  # "H200 141GB" -> "H200"
        if model_name not in props.name.upper() or (target_cc and (props.major, props.minor) != target_cc):
            where = f"{_cc_text(target_cc)}, " if target_cc else ""
            warn(f"{artifact}: planned for {manifest.target} ({target_gpu}, {where}"
                 f"{info.get('mem_per_gpu_gib', '?')} GiB/GPU), running on {props.name} "
                 f"({_cc_text((props.major, props.minor))}, {props.total_memory / GIB:.0f} GiB); "
                 "the plan may not be the best one for this machine")


def _launch_hint(manifest: Manifest, artifact, command: str | None = None) -> str:
    n = manifest.mapping.world_size
    command = _run_command(artifact, command)
    torchrun = shlex.join(["torchrun", "--nproc-per-node", str(n), "-m", "toolchain.cli",
                           *shlex.split(command)[1:]])
    return (f"run `{command_with(command, nproc=n)}` (or `{torchrun}`; several machines: see "
            f"docs/distributed.md)")


def setup(manifest: Manifest, device_name: str = "auto", artifact=None, warn=_warn,
          command: str | None = None) -> Dist:
    """Check the launch against the plan and the machine, then join the process group (if any).

    Not under torchrun: one process, which the artifact must allow (TP=1). Under torchrun: WORLD_SIZE
    must be a multiple of TP; WORLD_SIZE / TP replicas. Every check runs before rendezvous and before
    any weight is read, and fails the same way on every rank, so nothing is left waiting."""
    artifact = artifact if artifact is not None else manifest.model_name
    m = manifest.mapping
    launched = under_torchrun()
    world = _env_int("WORLD_SIZE", 1) if launched else 1
    rank = _env_int("RANK", 0) if launched else 0
    local_rank = _env_int("LOCAL_RANK", 0) if launched else 0
    local_world = _env_int("LOCAL_WORLD_SIZE", world) if launched else 1
    if launched and world % m.tp:
        raise HscError(f"{artifact}: started as {world} process{'es' if world != 1 else ''}, not a multiple of its "
                       f"tensor-parallel degree TP={m.tp}: launch a multiple of {m.tp} "
                       f"(`--nproc-per-node` x `--nnodes`; its plan: {_plan_text(manifest)})")
    dp = world // m.tp  # the artifact fixes TP only: every further TP group is one more replica

    if launched and m.tp > 1 and local_world % m.tp and local_rank == 0:
        warn(f"{artifact}: {local_world} processes per machine do not hold whole TP={m.tp} groups, so "
             f"tensor-parallel all-reduces cross machines (slow); use --nproc-per-node a multiple of {m.tp}")
    device = resolve_device(manifest, device_name, artifact, local_rank, multi=world > 1, warn=warn,
                            command=command)
    gpus_needed = local_world if launched else m.tp
    check_machine(manifest, device, artifact, gpus_needed, tp_rank=rank % m.tp, local_rank=local_rank, warn=warn)
    if not launched and m.tp > 1:
        raise HscError(f"{artifact}: its tensor-parallel degree TP={m.tp} needs {m.tp} processes (or a multiple: "
                       f"data-parallel replicas; planned {_plan_text(manifest)}); "
                       + _launch_hint(manifest, artifact, command))

    d = Dist(rank=rank, world_size=world, tp=m.tp, dp=dp, tp_rank=rank % m.tp, dp_rank=rank // m.tp,
             device=device, is_writer=rank == 0, local_rank=local_rank, local_world_size=local_world)
    if world == 1:
        return d
    if device.type == "cpu":
        compile_in_process()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank, **kwargs)
        d.initialized = True
        atexit.register(teardown, d)  # also on an error path; run() tears down itself when it finishes
    d.backend = backend
    # new_group is collective: every rank creates every group, in the same order.
    if m.tp > 1:
        for g in range(dp):
            ranks = list(range(g * m.tp, (g + 1) * m.tp))
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                d.tp_group = group
    return d


def compile_in_process() -> None:
    """CPU ranks: torch.compile builds its C++ kernels in the rank's own thread, not in inductor's
    compile-thread pool. The ranks already share the machine's cores, so a pool per rank only
    oversubscribes them; and a rank forked from a process that had compiled before inherits that pool
    without its threads (torch's at-fork hook resets only the process pool), so a kernel submitted to
    it never completes and the rank waits forever. TORCHINDUCTOR_COMPILE_THREADS, if set, wins."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


def teardown(d: Dist | None) -> None:
    if d is not None and d.initialized and dist.is_initialized():
        dist.destroy_process_group()
        d.initialized = False


def barrier(d: Dist) -> None:
    """Line the ranks up (before a clock is read on rank 0); a no-op for one process."""
    if d.distributed:
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        dist.barrier()


def agree_on_failure(d: Dist, error: HscError | None) -> None:
    """Collective: if any rank failed (e.g. its rank file is missing or tampered), every rank raises
    the first failing rank's one-line error, instead of the others waiting in a collective forever."""
    if not d.distributed:
        if error is not None:
            raise error
        return
    errors: list = [None] * d.world_size
    dist.all_gather_object(errors, None if error is None else str(error))
    for r, e in enumerate(errors):
        if e is not None:
            raise HscError(e if r == d.rank or d.world_size == 1 else f"rank {r}: {e}")


def gather_to_writer(d: Dist, obj) -> list | None:
    """Every rank's `obj`, in rank order, on global rank 0 (None elsewhere)."""
    if not d.distributed:
        return [obj]
    out = [None] * d.world_size if d.is_writer else None
    dist.gather_object(obj, out, dst=0)
    return out


def build_rank_model(d: Dist, artifact, manifest: Manifest, **kwargs):
    """This rank's model: only rank{tp_rank}.safetensors is read (and its sha256 checked). If any rank
    fails to load its file, every rank raises that file's one-line error."""
    model, error = None, None
    try:
        model = build_model(artifact, manifest, d.device, tp_rank=d.tp_rank, tp_group=d.tp_group, **kwargs)
    except HscError as e:
        error = e
    agree_on_failure(d, error)
    return model


def gather_replicas(d: Dist, all_items: list, mine: list[int], requests: list, logliks: list[float],
                    n_tokens: int):
    """On the writer: (items, requests, logliks, n_tokens) of the whole run, in the original item order,
    from the tensor-parallel rank 0 of every replica (one process: its own, checked the same way: every
    item scored once). Elsewhere: None. Collective."""
    part = (mine, requests, logliks, n_tokens) if d.tp_rank == 0 else None
    parts = gather_to_writer(d, part)  # one process: [part]
    if not d.is_writer:
        return None
    n = len(all_items)
    full_requests: list = [None] * (4 * n)
    full_logliks: list = [None] * (4 * n)
    total_tokens = 0
    for part in parts:
        if part is None:
            continue
        positions, reqs, lls, toks = part
        for k, pos in enumerate(positions):
            full_requests[4 * pos: 4 * pos + 4] = reqs[4 * k: 4 * k + 4]
            full_logliks[4 * pos: 4 * pos + 4] = lls[4 * k: 4 * k + 4]
        total_tokens += toks
    missing = [i for i in range(n) if full_logliks[4 * i] is None]
    if missing or len(full_logliks) != 4 * n:
        raise HscError(f"{len(missing)} item(s) came back unscored (first: position {missing[:1]}): no replica "
                       f"scored a token of them")
    return all_items, full_requests, full_logliks, total_tokens


# ---- `hsc run ART --nproc N`: re-launch the same command under torchrun -------------------------------------

def _drop_flag(argv: list[str], flag: str) -> list[str]:
    """argv without `flag VALUE` and `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def strip_nproc(argv: list[str]) -> list[str]:
    return _drop_flag(argv, "--nproc")


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The single-node torchrun line that `hsc run --nproc N` runs (argv: the hsc arguments)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "toolchain.cli", *strip_nproc(argv)]


def _device_option(argv: list[str]) -> str:
    """The value of `--device` in an `hsc run` command line (default auto)."""
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "auto"


def launch(artifact, nproc: int, argv: list[str]) -> int | None:
    """Run `hsc run` as `nproc` local processes under torchrun: nproc / TP data-parallel replicas of the
    artifact's TP group. The exit status, or None when the current process should just run (nproc 1)."""
    if nproc < 1:
        raise HscError(f"--nproc {nproc}: must be at least 1")
    if under_torchrun():
        raise HscError("--nproc launches torchrun itself; under torchrun leave it out")
    manifest = load_manifest(Path(artifact))
    tp = manifest.mapping.tp
    if nproc % tp:
        raise HscError(f"{artifact}: --nproc {nproc} is not a multiple of its tensor-parallel degree TP={tp}: use "
                       f"--nproc {', '.join(str(tp * k) for k in (1, 2, 3))}, ... (planned: {_plan_text(manifest)}): "
                       f"`{command_with(shlex.join(['hsc', *argv]), nproc=manifest.mapping.world_size)}`")
    if nproc == 1:
        return None
    device = _device_option(argv)
    if device != "cpu" and torch.cuda.is_available():  # the ranks would each refuse; say it once, before launching
        check_machine(manifest, torch.device("cuda", 0), artifact, nproc)
    cmd = torchrun_command(nproc, argv)
    print(f"hsc: launching {nproc} processes: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)
