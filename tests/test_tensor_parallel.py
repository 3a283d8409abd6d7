"""Tensor-parallel (TP) and data-parallel (DP) runs on CPU processes (gloo) equal the one-process run.

Tiny Meta checkpoints (with and without GQA) are compiled once per module for GPU targets with a forced
TP degree in fp32 (exact enough to compare), and run as 2 or 4 CPU processes with `--device cpu`.
The correctness matrix forks its ranks from this process (torch is already imported, so a rank starts
in milliseconds) with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...), calling the same
`runtime.run.run` that `hsc run` calls; the launch paths themselves (`hsc run --nproc`, torchrun)
are checked end to end with real processes. GPUs are simulated by monkeypatching torch.cuda.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from runtime import distributed
from runtime.artifact import load_manifest
from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.run import RunConfig, run
from tests.processes import join_processes, run_process
from tests.tiny_meta import write_tiny_meta_checkpoint
from toolchain.compile import compile_checkpoint

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 24
# Per ending: |loglik(parallel) - loglik(TP=1)| <= TOL + TOL_REL * |loglik|. The split changes the order
# of the fp32 sums inside wo/w2 and so the rounding of each fp32 token log-prob (~1e-6 at -10); over
# ~40 tokens of a ~-430 ending that is ~1e-5 (measured worst over 8 seeds: 1.1e-5). A wrong shard
# or head mapping is off by O(1).
TOL, TOL_REL = 1e-5, 1e-7
BATCH_TOKENS = 2048  # small batches: the warm-up of 4 ranks on 2 cores stays short
GIB = 1 << 30
# dim 64 = 8 heads of 8; FFN 192. GQA: 4 kv heads (one per rank at TP=4); MHA: 8 kv heads.
MODELS = {
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=-1, multiple_of=32),
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=None, vocab_size=-1, multiple_of=32),
}
# name: (target, --tp, precision) -> the plan TP x DP
BUILDS = {
    "tp1": ("cpu", None, "fp32"),
    "tp4": ("h200x4", 4, "fp32"),  # TP=4, DP=1
    "tp2": ("h200x2", 2, "fp32"),  # TP=2, DP=1
    "tp2dp2": ("h200x4", 2, "fp32"),  # TP=2, DP=2
    "dp2": ("h200x2", 1, "fp32"),  # TP=1, DP=2
}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    """{model: {build: artifact}}, plus the one-process (TP=1) samples of each model."""
    root = tmp_path_factory.mktemp("tp")
    arts, ref = {}, {}
    for i, (name, args) in enumerate(MODELS.items()):
        write_tiny_meta_checkpoint(root / f"ckpt-{name}", args, 1, seed=1234 + i)
        arts[name] = {}
        for build, (target, tp, precision) in BUILDS.items():
            out = root / f"{name}-{build}"
            compile_checkpoint(root / f"ckpt-{name}", target, precision, out, "test", tp=tp, log=lambda *_: None)
            arts[name][build] = out
        res = root / f"res-{name}-tp1"
        run(RunConfig(arts[name]["tp1"], str(shared_data), N_ITEMS, res, device="cpu", batch_tokens=BATCH_TOKENS),
            "test", echo=lambda *_: None)
        ref[name] = read_samples(res)
    return SimpleNamespace(root=root, arts=arts, ref=ref, data=shared_data)


def read_samples(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "samples.jsonl").read_text().splitlines()]


def assert_same_samples(got: list[dict], want: list[dict]) -> float:
    """Same items in the same order, same predictions, log-likelihoods within tolerance; the worst
    gap as a fraction of the tolerance."""
    assert [s["index"] for s in got] == [s["index"] for s in want]
    worst = 0.0
    for g, w in zip(got, want):
        assert (g["pred"], g["pred_norm"], g["cont_tokens"], g["label"]) == \
               (w["pred"], w["pred_norm"], w["cont_tokens"], w["label"]), g["index"]
        worst = max(worst, max(abs(a - b) / (TOL + TOL_REL * abs(b)) for a, b in zip(g["loglik"], w["loglik"])))
    assert worst <= 1.0, f"max |loglik(parallel) - loglik(TP=1)| = {worst:.2f} x the tolerance"
    return worst


# ---------------------------------------------------------------- forked ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(local_rank: int, world: int, port: int, cfg: RunConfig, status_dir: Path) -> None:
    """One rank, as torchrun would start it: its environment, then `hsc run`'s own function."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    try:
        run(cfg, "test", echo=lambda *_: None)
        status = "ok"
    except HscError as e:
        status = f"error: {e}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (status_dir / f"rank{local_rank}").write_text(status)


def run_ranks(world: int, artifact: Path, data: Path, out: Path, limit: int = N_ITEMS, start_method: str = "spawn",
              **options) -> list[str]:
    """Run `artifact` as `world` CPU ranks (gloo); each rank's status: "ok" or "error: ...".
    options: more RunConfig fields. start_method "fork" only for a test whose ranks must inherit a patch:
    a fork of this multi-threaded process can inherit a lock another thread holds."""
    status_dir = out.with_name(out.name + "-status")
    status_dir.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(artifact, str(data), limit, out, device="cpu", **{"batch_tokens": BATCH_TOKENS, **options})
    context = mp.start_processes(_rank_main, args=(world, _free_port(), cfg, status_dir), nprocs=world,
                                 join=False, start_method=start_method)
    join_processes(context, f"{world} ranks running {artifact.name}")
    return [(status_dir / f"rank{r}").read_text() for r in range(world)]


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    """In-process cases run as a plain single process whatever launched pytest."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------- compile: the per-rank files


def test_v100x4_writes_four_fp16_rank_files(built, hsc, tmp_path):
    art = tmp_path / "v100"
    code, out, err = hsc("compile", built.root / "ckpt-gqa", "--target", "v100x4", "--tp", "4", "-o", art)
    assert code == 0, err
    assert "TP=4" in out and "no bf16" in out
    m = load_manifest(art)
    assert m.precision == "fp16" and (m.mapping.tp, m.mapping.dp) == (4, 1)
    assert [s.file for s in m.shards] == [f"rank{r}.safetensors" for r in range(4)]
    assert m.target_info == {"gpu": "V100 32GB", "compute_capability": [7, 0], "n_gpus": 4, "mem_per_gpu_gib": 32.0}
    for r in range(4):
        with safe_open(art / f"rank{r}.safetensors", "pt") as f:
            assert f.get_slice("layers.0.attention.wq.weight").get_shape() == [64 // 4, 64]  # 2 of 8 heads
            assert f.get_slice("layers.0.attention.wk.weight").get_shape() == [8, 64]  # 1 of 4 kv heads
            assert f.get_slice("layers.0.attention.wo.weight").get_shape() == [64, 16]
            assert f.get_slice("layers.0.feed_forward.w2.weight").get_shape() == [64, 192 // 4]
            assert f.get_slice("output.weight").get_shape() == [32000, 64]  # replicated
            assert f.get_tensor("norm.weight").dtype == torch.float16
    assert hsc("inspect", art, "--verify")[0] == 0


# ---------------------------------------------------------------- parallel == one process


@pytest.mark.parametrize("model, build, world", [
    ("gqa", "tp4", 4), ("mha", "tp4", 4), ("gqa", "tp2", 2), ("gqa", "tp2dp2", 4), ("mha", "tp2dp2", 4),
    ("gqa", "dp2", 2)])
def test_parallel_run_matches_one_process(built, tmp_path, model, build, world):
    art = built.arts[model][build]
    assert load_manifest(art).mapping.world_size == world
    out = tmp_path / "res"
    assert run_ranks(world, art, built.data, out) == ["ok"] * world
    assert sorted(os.listdir(out)) == [".lock", "lm-eval", "results.json", "samples.jsonl"]  # by rank 0
    assert_same_samples(read_samples(out), built.ref[model])
    results = json.loads((out / "results.json").read_text())
    m = load_manifest(art).mapping
    assert (results["world_size"], results["tp"], results["dp"], results["backend"]) == (world, m.tp, m.dp, "gloo")
    assert results["n"] == N_ITEMS and results["tokens_forwarded"] > 0


def test_parallel_flat_layout_matches_one_process(built, tmp_path):
    """The flat layout (CUDA's default: one long tree per row, FlexAttention), compiled, with its
    all-reduces inside the compiled step: TP=2 x DP=2 equals the one-process run (rows layout). Trees of
    384 tokens make 6 rows of the 24 items, 3 for each replica."""
    out = tmp_path / "res"
    assert run_ranks(4, built.arts["gqa"]["tp2dp2"], built.data, out, layout="flat", compile=True,
                     row_len=384) == ["ok"] * 4
    assert json.loads((out / "results.json").read_text())["layout"] == "flat"
    assert_same_samples(read_samples(out), built.ref["gqa"])


def test_nproc_relaunches_under_torchrun(built, tmp_path):
    """The real thing: `hsc run ART --nproc 2` -> torchrun -> 2 processes of `python -m toolchain.cli run`."""
    out = tmp_path / "res"
    proc = run_process([sys.executable, "-m", "toolchain.cli", "run", built.arts["mha"]["tp2"], "--data",
                        built.data, "--limit", N_ITEMS, "--output", out, "--device", "cpu", "--nproc", "2"],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("acc_norm") == 1  # only rank 0 prints
    assert "running it on the CPU as --device cpu asks" in proc.stderr
    assert_same_samples(read_samples(out), built.ref["mha"])
    results = json.loads((out / "results.json").read_text())
    assert (results["world_size"], results["tp"], results["dp"]) == (2, 2, 1)
    assert "--nproc" not in results["command"]


def test_torchrun_command_line():
    argv = ["run", "ART", "--nproc", "4", "--limit", "8", "--nproc=4"]
    cmd = distributed.torchrun_command(4, argv)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                       "-m", "toolchain.cli", "run", "ART", "--limit", "8"]


# ---------------------------------------------------------------- refusals


def test_tp_that_does_not_split_the_model_is_refused_at_compile(built, hsc, tmp_path):
    code, _, err = hsc("compile", built.root / "ckpt-gqa", "--target", "h200x4", "--tp", "3", "-o", tmp_path / "a")
    assert code == 1 and "--tp 3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists()
    # 2 kv heads cannot be split 4 ways (a kv head is never split).
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=-1, multiple_of=32)
    write_tiny_meta_checkpoint(tmp_path / "kv2", args, 1, seed=0)
    code, _, err = hsc("compile", tmp_path / "kv2", "--target", "h200x4", "--tp", "4", "-o", tmp_path / "b")
    assert code == 1 and "cannot split the model" in err and "2 kv heads" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_ranks_not_a_multiple_of_tp_are_refused_under_torchrun(built, tmp_path):
    art = built.arts["gqa"]["tp2"]
    proc = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                        "-m", "toolchain.cli", "run", art, "--data", built.data, "--limit", "8",
                        "--output", tmp_path / "res", "--device", "cpu"],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hsc: error: ")]
    assert errors, proc.stderr
    assert all(str(art) in e and "started as 3 processes, not a multiple of its tensor-parallel degree TP=2" in e
               for e in errors), errors
    assert not (tmp_path / "res").exists()


def test_launch_mismatches_are_refused_in_process(built, hsc, tmp_path):
    art = built.arts["gqa"]["tp2dp2"]
    # Not launched: the one-line error gives the exact command.
    code, _, err = hsc("run", art, "--device", "cpu", "--data", built.data, "--limit", 8)
    assert code == 1 and len(err.splitlines()) == 2  # the --device cpu warning, then the error
    assert f"`hsc run {art} --device cpu --data {built.data} --limit 8 --nproc 4`" in err  # the user's flags kept
    assert f"`torchrun --nproc-per-node 4 -m toolchain.cli run {art} --device cpu --data {built.data} --limit 8`" in err
    # --nproc that is not a multiple of TP: refused before anything is launched.
    code, _, err = hsc("run", art, "--device", "cpu", "--nproc", "3", "--limit", "3")
    assert code == 1 and "--nproc 3 is not a multiple of its tensor-parallel degree TP=2" in err
    assert "use --nproc 2, 4, 6" in err and len(err.splitlines()) == 1
    assert f"`hsc run {art} --device cpu --limit 3 --nproc 4`" in err
    # A GPU-target artifact does not fall back to the CPU silently.
    code, _, err = hsc("run", art)
    assert code == 1 and "no CUDA device" in err and "--device cpu" in err


@pytest.mark.parametrize("nproc", [1, 2])
def test_tp1_artifact_runs_with_any_nproc(built, tmp_path, nproc):
    """The artifact fixes TP only: a TP=1 artifact compiled for the CPU (plan DP=1) runs as 1 process or as
    2 data-parallel replicas (`hsc run --nproc 2`, torchrun, gloo) with the one-process run's results."""
    out = tmp_path / "res"
    proc = run_process([sys.executable, "-m", "toolchain.cli", "run", built.arts["gqa"]["tp1"], "--data", built.data,
                        "--limit", N_ITEMS, "--output", out, "--device", "cpu", "--batch-tokens", BATCH_TOKENS,
                        "--nproc", nproc], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert (results["world_size"], results["tp"], results["dp"]) == (nproc, 1, nproc)
    assert_same_samples(read_samples(out), built.ref["gqa"])


def test_a_dp_plan_runs_as_one_process(built, tmp_path):
    """An artifact planned for two replicas (h200x2, TP=1 x DP=2) runs as one process too."""
    out = tmp_path / "res"
    run(RunConfig(built.arts["gqa"]["dp2"], str(built.data), N_ITEMS, out, device="cpu", batch_tokens=BATCH_TOKENS),
        "test", echo=lambda *_: None)
    assert json.loads((out / "results.json").read_text())["dp"] == 1
    assert_same_samples(read_samples(out), built.ref["gqa"])


def test_nproc_refused_when_the_gpus_lack_memory(built, hsc, monkeypatch, no_weights_read):
    """--nproc checks the machine before launching: one line, no torchrun."""
    fake_gpus(monkeypatch, 2, "NVIDIA H200", (9, 0), 0.5)
    monkeypatch.setattr(distributed.subprocess, "call", lambda *a, **k: pytest.fail("launched torchrun"))
    code, _, err = hsc("run", built.arts["gqa"]["tp2"], "--nproc", "2")
    assert code == 1 and len(err.splitlines()) == 1 and "needs about" in err and "GPU 0" in err


def test_a_gpu_artifact_on_the_cpu_takes_one_round(built, hsc, monkeypatch, tmp_path):
    """A v100x4 artifact run on a machine without a GPU: the hint is the user's own command with
    --device cpu and --nproc 4 added, and that command is accepted (launched, here recorded)."""
    art = tmp_path / "v100"
    compile_checkpoint(built.root / "ckpt-gqa", "v100x4", "auto", art, "test", tp=4, log=lambda *_: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = hsc("run", art, "--data", built.data, "--limit", 8, "--batch-tokens", 1024)
    assert code == 1 and len(err.splitlines()) == 1
    hint = err.split("`")[1]
    assert hint == f"hsc run {art} --data {built.data} --limit 8 --batch-tokens 1024 --device cpu --nproc 4"
    launched = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    code, _, err = hsc(*shlex.split(hint)[1:])
    assert code == 0, err
    assert launched[0][1:] == distributed.torchrun_command(4, shlex.split(hint)[1:])[1:]


@pytest.mark.parametrize("engine", ["packed", "reference"])
def test_a_replica_without_work_idles(built, tmp_path, engine):
    """One item, two replicas: the second gets no row (no item) and idles; the run is the one item's."""
    out = tmp_path / "res"
    assert run_ranks(4, built.arts["gqa"]["tp2dp2"], built.data, out, limit=1, engine=engine) == ["ok"] * 4
    assert_same_samples(read_samples(out), built.ref["gqa"][:1])


@pytest.mark.parametrize("damage", ["missing", "tampered"])
def test_damaged_rank_file_fails_every_rank_naming_the_file(built, tmp_path, damage):
    art = Path(shutil.copytree(built.arts["mha"]["tp2"], tmp_path / "art"))
    victim = art / "rank1.safetensors"
    if damage == "missing":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0x01  # same size, one bit flipped in the last tensor
        victim.write_bytes(bytes(data))
    statuses = run_ranks(2, art, built.data, tmp_path / "res", limit=4)
    want = "missing from the artifact" if damage == "missing" else "sha256 does not match"
    for s in statuses:
        assert s.startswith("error: ") and str(victim) in s and want in s, statuses
    assert not (tmp_path / "res").exists()


# ---------------------------------------------------------------- plan vs machine (simulated GPUs)


def fake_gpus(monkeypatch, n: int, name: str, cc: tuple[int, int], mem_gib: float) -> None:
    props = SimpleNamespace(name=name, major=cc[0], minor=cc[1], total_memory=int(mem_gib * GIB))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    def get_props(i):
        if not 0 <= int(getattr(i, "index", i) or 0) < n:
            raise AssertionError(f"no GPU {i}")
        return props

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_props)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Every refusal must come before a weight file is opened."""
    import runtime.artifact

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the plan was checked against the machine")

    monkeypatch.setattr(runtime.artifact, "load_rank_weights", refuse)


@pytest.fixture(scope="module")
def bf16_art(built):
    """One process on one H200: bf16 (needs sm_80)."""
    out = built.root / "gqa-h200x1"
    compile_checkpoint(built.root / "ckpt-gqa", "h200x1", "auto", out, "test", log=lambda *_: None)
    return out


def test_more_gpus_than_present_is_refused(built, hsc, monkeypatch, no_weights_read):
    fake_gpus(monkeypatch, 1, "NVIDIA H200", (9, 0), 141)
    art = built.arts["gqa"]["tp2"]
    code, _, err = hsc("run", art, "--data", built.data, "--limit", 8)
    assert code == 1 and len(err.splitlines()) == 1
    assert str(art) in err and "needs 2 GPUs on this machine, 1 present" in err


def test_too_little_gpu_memory_is_refused(bf16_art, built, hsc, monkeypatch, no_weights_read):
    fake_gpus(monkeypatch, 1, "NVIDIA H200", (9, 0), 0.5)
    code, _, err = hsc("run", bf16_art, "--data", built.data, "--limit", 8)
    assert code == 1 and len(err.splitlines()) == 1
    assert "rank0.safetensors needs about" in err and "has 0.5 GiB" in err


def test_compute_capability_below_the_precision_is_refused(bf16_art, built, hsc, monkeypatch, no_weights_read):
    fake_gpus(monkeypatch, 1, "Tesla V100-SXM2-32GB", (7, 0), 32)
    code, _, err = hsc("run", bf16_art, "--data", built.data, "--limit", 8)
    assert code == 1
    assert "bf16 weights need compute capability sm_80" in err and "sm_70" in err
    assert [line for line in err.splitlines() if line.startswith("hsc: error: ")] == err.splitlines()[-1:]


@pytest.mark.parametrize("precision, compute, gpu_cc, refused", [
    ("int8", "bfloat16", (7, 5), "int8 weights need compute capability sm_80"),
    ("fp8", "bfloat16", (8, 0), "fp8 weights need compute capability sm_89"),
    ("w8", "bfloat16", (7, 0), "bfloat16 compute needs compute capability sm_80"),
    ("w8", "float16", (7, 0), None),
    ("fp16", None, (7, 0), None),
])
def test_required_compute_capability(bf16_art, monkeypatch, precision, compute, gpu_cc, refused):
    """The stored precision and the compute dtype each set a floor; the higher one is checked."""
    import dataclasses

    m = dataclasses.replace(load_manifest(bf16_art), precision=precision, compute_dtype=compute)
    fake_gpus(monkeypatch, 1, "Some GPU", gpu_cc, 141)
    if refused is None:
        distributed.check_machine(m, torch.device("cuda", 0), bf16_art, 1, warn=lambda *_: None)
    else:
        with pytest.raises(HscError, match=refused):
            distributed.check_machine(m, torch.device("cuda", 0), bf16_art, 1, warn=lambda *_: None)


def test_other_gpu_than_the_target_warns_and_continues(built, tmp_path, monkeypatch):
    """A v100x4 artifact (fp16, TP=4) on four H200s: one warning line, no refusal."""
    art = tmp_path / "v100"
    compile_checkpoint(built.root / "ckpt-gqa", "v100x4", "auto", art, "test", tp=4, log=lambda *_: None)
    fake_gpus(monkeypatch, 4, "NVIDIA H200", (9, 0), 141)
    warnings = []
    m = load_manifest(art)
    distributed.check_machine(m, torch.device("cuda", 0), art, 4, warn=warnings.append)
    assert len(warnings) == 1 and "V100 32GB" in warnings[0] and "NVIDIA H200" in warnings[0]
    # The same GPU as the target: silent. Fewer than 4 of them: refused.
    fake_gpus(monkeypatch, 4, "Tesla V100-SXM2-32GB", (7, 0), 32)
    distributed.check_machine(m, torch.device("cuda", 0), art, 4, warn=warnings.append)
    assert len(warnings) == 1
    fake_gpus(monkeypatch, 2, "Tesla V100-SXM2-32GB", (7, 0), 32)
    with pytest.raises(HscError, match="needs 4 GPUs on this machine, 2 present"):
        distributed.check_machine(m, torch.device("cuda", 0), art, 4, warn=warnings.append)


def test_manifest_without_target_info_or_resources_still_loads(built, tmp_path):
    art = Path(shutil.copytree(built.arts["gqa"]["tp1"], tmp_path / "old"))
    raw = json.loads((art / "manifest.json").read_text())
    del raw["target_info"], raw["resources"]
    (art / "manifest.json").write_text(json.dumps(raw))
    m = load_manifest(art)
    assert m.target_info is None and m.resources is None


# ---------------------------------------------------------------- on real GPUs (device machine: -m gpu)


def _hsc_run(built, art, out, *extra) -> list[dict]:
    """`hsc run` of the first N_ITEMS items as a separate process (as a user runs it); its samples."""
    proc = run_process([sys.executable, "-m", "toolchain.cli", "run", art, "--data", built.data,
                        "--limit", N_ITEMS, "--output", out, *extra], timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return read_samples(out)


@pytest.fixture(scope="module")
def one_gpu_samples(built, tmp_path_factory) -> list[dict]:
    """TP=1 on one GPU: run once, for every parallel layout compared with it."""
    return _hsc_run(built, built.arts["gqa"]["tp1"], tmp_path_factory.mktemp("one-gpu"), "--device", "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("build, nproc, tp, dp", [("tp2", 2, 2, 1), ("dp2", 2, 1, 2), ("tp4", 4, 4, 1),
                                                  ("tp2dp2", 4, 2, 2)])
def test_parallel_runs_over_nccl_match_one_gpu(built, tmp_path, request, build, nproc, tp, dp):
    """fp32 on N GPUs (NCCL; compiled with CUDA graphs, as `hsc run` picks it) against TP=1 on one GPU:
    the same items in the same order, log-likelihoods within 1e-3."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    one = request.getfixturevalue("one_gpu_samples")  # only once a layout that fits the machine needs it
    many = _hsc_run(built, built.arts["gqa"][build], tmp_path / "many", "--nproc", str(nproc))
    assert [s["index"] for s in many] == [s["index"] for s in one]
    assert max(abs(a - b) for g, w in zip(many, one) for a, b in zip(g["loglik"], w["loglik"])) < 1e-3
    results = json.loads((tmp_path / "many" / "results.json").read_text())
    assert (results["backend"], results["tp"], results["dp"]) == ("nccl", tp, dp)


@pytest.mark.parametrize("cc, arch_list, runs", [
    ((7, 0), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"], False),  # V100, cu130
    ((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], True),  # V100, cu126
    ((8, 6), ["sm_80", "sm_90"], True),  # sm_80 code runs on later minors of major 8
    ((8, 9), ["sm_75", "sm_90a"], False),  # arch-specific code: only on 9.0
    ((9, 0), ["sm_90a"], True),
    ((10, 3), ["sm_75", "compute_90"], True),  # PTX: compiled for any newer GPU
    ((8, 0), ["compute_90"], False),
])
def test_kernels_for_the_gpu(cc, arch_list, runs):
    assert distributed.runs_on(cc, arch_list) == runs


def test_a_torch_build_without_kernels_for_the_gpu_is_refused(built, hsc, monkeypatch, no_weights_read):
    """A V100 under a torch built without sm_70 (CUDA 13): one line naming the build to install."""
    art = built.root / "gqa-v100x4"
    compile_checkpoint(built.root / "ckpt-gqa", "v100x4", "fp16", art, "test", tp=4, log=lambda *_: None)
    fake_gpus(monkeypatch, 4, "Tesla V100-SXM2-32GB", (7, 0), 32)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda *_: None)
    code, _, err = hsc("run", art, "--data", built.data, "--limit", 8)
    assert code == 1 and len(err.splitlines()) == 1
    assert "has no kernels for GPU 0 (Tesla V100-SXM2-32GB, sm_70)" in err
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in err
