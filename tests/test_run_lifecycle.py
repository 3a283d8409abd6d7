"""`hsc run` as a user lives it: interrupted and resumed, its output set, the verification record and
the compile cache. A tiny Meta checkpoint compiled for the CPU, scored on real HellaSwag items in
small batches (many batches, so a run can be stopped between them)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from runtime import artifact as artifact_mod
from runtime import compile_cache, outputs
from runtime.config import ModelArgs
from runtime.errors import HscError
from runtime.run import RunConfig, run
from tests.tiny_meta import write_tiny_meta_checkpoint
from toolchain.compile import compile_checkpoint

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 24
BATCH_TOKENS = 512  # ~15 batches of the 24 items: room to stop a run between them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("life")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32)
    write_tiny_meta_checkpoint(root / "ckpt", args, 1, seed=7)
    compile_checkpoint(root / "ckpt", "cpu", "fp32", root / "art", "test", log=lambda *_: None)
    return SimpleNamespace(root=root, art=root / "art", data=shared_data)


def cfg(tiny, out, **kw) -> RunConfig:
    kw = {"limit": N_ITEMS, "batch_tokens": BATCH_TOKENS, "device": "cpu", **kw}
    return RunConfig(tiny.art, str(tiny.data), output=out, **kw)


def quiet(*_):
    pass


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolchain.cli", "run", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def cli_args(tiny, out, *extra):
    return (tiny.art, "--data", tiny.data, "--limit", N_ITEMS, "--batch-tokens", BATCH_TOKENS, "--device", "cpu",
            "--output", out, *extra)


def journal_lines(out: Path) -> int:
    path = out / "journal" / "replica0-of-1.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


# ---------------------------------------------------------------- journal and resume


def test_kill_9_at_random_points_then_resume_gives_identical_samples(tiny, tmp_path):
    whole = tmp_path / "whole"
    assert cli(*cli_args(tiny, whole)).returncode == 0
    results = json.loads((whole / "results.json").read_text())
    assert results["resumed_batches"] == 0 and not (whole / "journal").exists()

    out = tmp_path / "killed"
    rng = random.Random(1234)
    stops = []
    for _ in range(2):
        # a seeded number of further batches to let through, then SIGKILL (no clean-up at all)
        target = journal_lines(out) + rng.randint(1, 4)
        proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "run", *map(str, cli_args(tiny, out, "--resume"))],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while journal_lines(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        stops.append(journal_lines(out) - 1)
        assert not (out / "results.json").exists(), "killed before it finished"
    assert 0 < stops[0] < stops[1]
    done = cli(*cli_args(tiny, out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["resumed_batches"] >= stops[1]
    assert samples(out) == samples(whole)  # every log-likelihood bit for bit


def test_resume_in_process_skips_what_is_journalled(tiny, tmp_path, monkeypatch):
    """A run stopped by Ctrl-C after 3 batches: one line with the hint, exit status 130 from the CLI;
    --resume scores only the rest and equals the uninterrupted run."""
    whole = tmp_path / "whole"
    run(cfg(tiny, whole), "test", echo=quiet)
    from runtime import journal as journal_mod

    out = tmp_path / "res"
    real = journal_mod.Journal.record

    def record_then_interrupt(self, batch, *result):
        real(self, batch, *result)
        if len(self.done) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(journal_mod.Journal, "record", record_then_interrupt)
    with pytest.raises(HscError) as e:
        run(cfg(tiny, out), "test", echo=quiet)
    assert e.value.exit_code == 130 and "--resume" in str(e.value)
    monkeypatch.setattr(journal_mod.Journal, "record", real)
    results = run(cfg(tiny, out, resume=True), "test", echo=quiet)
    assert results["resumed_batches"] == 3
    assert samples(out) == samples(whole)


def test_sigint_is_one_line_exit_130(tiny, tmp_path):
    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "run", *map(str, cli_args(tiny, out))], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while journal_lines(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("hsc:")]
    assert len(lines) == 1 and lines[0].startswith("hsc: interrupted") and "--resume" in lines[0], err
    assert "Traceback" not in err


def test_journal_from_other_settings_is_refused(tiny, tmp_path, monkeypatch):
    out = tmp_path / "res"
    from runtime import journal as journal_mod

    def stop_after_two(self, batch, *result):
        real(self, batch, *result)
        if len(self.done) == 2:
            raise KeyboardInterrupt

    real = journal_mod.Journal.record
    monkeypatch.setattr(journal_mod.Journal, "record", stop_after_two)
    with pytest.raises(HscError):
        run(cfg(tiny, out), "test", echo=quiet)
    monkeypatch.setattr(journal_mod.Journal, "record", real)
    for other in ({"limit": N_ITEMS - 1}, {"batch_tokens": 1024}, {"bos": False}):
        with pytest.raises(HscError) as e:
            run(cfg(tiny, out, resume=True, **other), "test", echo=quiet)
        assert "other settings" in str(e.value) and "\n" not in str(e.value)
    # without --resume, an unfinished journal is not silently dropped either
    with pytest.raises(HscError, match="--resume to continue"):
        run(cfg(tiny, out), "test", echo=quiet)


@pytest.mark.parametrize("tp, journals", [(1, ["replica0-of-2.jsonl", "replica1-of-2.jsonl"]),
                                          (2, ["replica0-of-1.jsonl"])])
def test_two_processes_journal_and_resume(tiny, tmp_path, monkeypatch, tp, journals):
    """Two CPU processes (gloo). DP=2: each replica journals its own batches. TP=2: rank 0 journals, rank 1
    learns from it which batches to skip. Stopped after two batches, the resumed run skips them and
    equals the uninterrupted one."""
    from runtime import journal as journal_mod
    from tests.test_tensor_parallel import run_ranks

    dp2 = tiny.root / f"art-h200x2-tp{tp}"
    if not dp2.exists():
        compile_checkpoint(tiny.root / "ckpt", "h200x2", "fp32", dp2, "test", tp=tp, log=lambda *_: None)
    options = {"limit": N_ITEMS, "batch_tokens": BATCH_TOKENS}
    whole = tmp_path / "whole"
    assert run_ranks(2, dp2, tiny.data, whole, **options) == ["ok"] * 2

    real = journal_mod.Journal.record

    def stop_after_two(self, batch, *result):
        real(self, batch, *result)
        if len(self.done) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(journal_mod.Journal, "record", stop_after_two)  # inherited by the forked ranks
    out = tmp_path / "res"
    assert all("--resume" in s for s in run_ranks(2, dp2, tiny.data, out, start_method="fork", **options))
    assert sorted(p.name for p in (out / "journal").iterdir()) == journals
    for name in journals:
        assert (out / "journal" / name).read_bytes().count(b"\n") == 3  # header + 2 batches
    monkeypatch.setattr(journal_mod.Journal, "record", real)
    assert run_ranks(2, dp2, tiny.data, tmp_path / "res", resume=True, **options) == ["ok"] * 2
    assert json.loads((out / "results.json").read_text())["resumed_batches"] == 2
    assert samples(out) == samples(whole)


# ---------------------------------------------------------------- the output set


def test_outputs_lm_eval_files_agree_and_no_overwrite(tiny, tmp_path):
    out = tmp_path / "res"
    results = run(cfg(tiny, out), "test", echo=quiet)
    mine = samples(out)
    lm_results = json.loads(next((out / "lm-eval").glob("results_*.json")).read_text())
    task = lm_results["results"]["hellaswag"]
    assert (task["acc,none"], task["acc_stderr,none"], task["acc_norm,none"], task["acc_norm_stderr,none"]) == \
           (results["acc"], results["acc_stderr"], results["acc_norm"], results["acc_norm_stderr"])
    assert lm_results["n-samples"]["hellaswag"] == {"original": 10042, "effective": N_ITEMS}
    assert {"config", "versions", "configs", "n-shot"} <= set(lm_results)
    lm_samples = [json.loads(line) for line in next((out / "lm-eval").glob("samples_hellaswag_*.jsonl")).open()]
    assert [s["doc_id"] for s in lm_samples] == list(range(N_ITEMS))
    for s, m in zip(lm_samples, mine):
        assert [float(r[0][0]) for r in s["resps"]] == m["loglik"]
        assert [r[0][1] for r in s["resps"]] == [str(g) for g in m["greedy"]] and all(isinstance(g, bool) for g in m["greedy"])
        assert [float(r[0]) for r in s["filtered_resps"]] == m["loglik"]
        assert s["acc"] == float(m["pred"] == m["label"]) and s["acc_norm"] == float(m["pred_norm"] == m["label"])
        assert s["target"] == str(m["label"]) and len(s["arguments"]) == 4
        assert s["arguments"]["gen_args_0"]["arg_0"] == s["doc"]["query"]
        assert s["prompt_hash"] == outputs.hash_string(s["doc"]["query"])
        assert s["target_hash"] == outputs.hash_string(s["target"])
        assert s["doc_hash"] == outputs.hash_string(json.dumps(s["doc"], indent=2, ensure_ascii=False))
    # results.json names the set it ends, and the environment
    listed = json.loads((out / "results.json").read_text())["files"]
    assert set(listed) == {"samples.jsonl", *(f"lm-eval/{p.name}" for p in (out / "lm-eval").iterdir())}
    env = results["environment"]
    assert env["torch"] == torch.__version__ and env["data_sha256"] == outputs.data_sha256(str(tiny.data))
    assert {"verify_s", "load_s", "warmup_s", "scoring_s", "write_s", "total_s"} <= set(results["timings"])

    # never replaced silently; --overwrite replaces the whole set
    before = (out / "results.json").read_bytes()
    with pytest.raises(HscError, match="--overwrite"):
        run(cfg(tiny, out), "test", echo=quiet)
    assert (out / "results.json").read_bytes() == before
    run(cfg(tiny, out, overwrite=True, limit=2), "test", echo=quiet)
    assert len(samples(out)) == 2 and len(list((out / "lm-eval").iterdir())) == 2


def test_limit_1_writes_valid_json(tiny, tmp_path, hsc):
    out = tmp_path / "res"
    code, stdout, err = hsc("run", tiny.art, "--data", tiny.data, "--limit", 1,
                            "--device", "cpu", "--output", out)
    assert code == 0, err
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert results["n"] == 1 and results["acc_stderr"] is None
    lm = next((out / "lm-eval").glob("results_*.json")).read_text()
    assert json.loads(lm, parse_constant=lambda c: pytest.fail(c))["results"]["hellaswag"]["acc_stderr,none"] is None
    assert "n/a" in stdout


def disk_full_at_call(real, n: int, under: Path | None = None):
    """`real`, except that its n-th call (counting those whose last argument is a path under `under`, if
    given) fails as a full disk does."""
    calls = []

    def wrapper(*args):
        if under is None or str(args[-1]).startswith(str(under)):
            calls.append(args)
            if len(calls) == n:
                raise OSError(28, "No space left on device")
        return real(*args)

    return wrapper


def test_oserror_while_writing_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    out = tmp_path / "res"
    real = os.replace
    monkeypatch.setattr(outputs.os, "replace", disk_full_at_call(real, 2, out))  # the set's second file
    with pytest.raises(HscError) as e:
        run(cfg(tiny, out), "test", echo=quiet)
    assert "No space left on device" in str(e.value) and "--resume" in str(e.value)
    assert not (out / "results.json").exists()
    assert not list(out.glob(".partial-*"))
    monkeypatch.setattr(outputs.os, "replace", real)
    # the journal survived: --resume writes the set without scoring again
    results = run(cfg(tiny, out, resume=True), "test", echo=quiet)
    assert results["resumed_batches"] > 0 and (out / "results.json").exists()


def test_oserror_while_journalling_is_one_line_and_resumable(tiny, tmp_path, monkeypatch):
    from runtime import journal as journal_mod

    out = tmp_path / "res"
    real = journal_mod._append
    monkeypatch.setattr(journal_mod, "_append", disk_full_at_call(real, 4))  # the header, two batches, then full
    with pytest.raises(HscError) as e:
        run(cfg(tiny, out), "test", echo=quiet)
    assert "No space left on device" in str(e.value) and "--resume" in str(e.value)
    monkeypatch.setattr(journal_mod, "_append", real)
    assert run(cfg(tiny, out, resume=True), "test", echo=quiet)["resumed_batches"] == 2


def test_a_second_run_into_a_held_directory_is_refused(tiny, tmp_path):
    out = tmp_path / "res"
    held = outputs.claim(out, "journal", resume=False, overwrite=False)
    try:
        with pytest.raises(HscError, match=f"pid {os.getpid()}"):
            run(cfg(tiny, out), "test", echo=quiet)
    finally:
        held.release()
    run(cfg(tiny, out), "test", echo=quiet)  # free again once the holder let go


def test_failed_run_leaves_no_directory(tiny, tmp_path):
    out = tmp_path / "res"
    with pytest.raises(HscError, match="no such HellaSwag file"):
        run(RunConfig(tiny.art, str(tmp_path / "missing.jsonl"), output=out, device="cpu"), "test", echo=quiet)
    assert not out.exists()


def test_no_progress_bar_in_a_log(tiny, tmp_path):
    """stderr is a pipe here, as in CI or under nohup: no tqdm bar (carriage returns); the plain lines a long
    step prints instead are tested in tests/test_progress.py."""
    proc = cli(*cli_args(tiny, tmp_path / "res"))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "it/s]" not in proc.stderr and "tok/s]" not in proc.stderr


# ---------------------------------------------------------------- the verification record


def _count_hashing(monkeypatch) -> list:
    hashed = []
    real = artifact_mod.sha256_of

    def counting(path):
        if Path(path).name != "manifest.json":  # hashed for its digest (the run's key), not checked
            hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(artifact_mod, "sha256_of", counting)
    return hashed


def test_verification_record_spares_hashing_and_catches_tampering(tiny, tmp_path, monkeypatch):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny.art, art)
    time.sleep(artifact_mod.RACY_NS / 1e9 + 0.05)  # older than the racy window: recordable
    m = artifact_mod.load_manifest(art)
    hashed = _count_hashing(monkeypatch)
    assert artifact_mod.verify_artifact(art, m, force=False) == ["rank0.safetensors", "tokenizer.model"]
    hashed.clear()
    assert artifact_mod.verify_artifact(art, m, force=False) == []  # recorded, unchanged: no hashing
    assert hashed == []
    assert artifact_mod.verify_artifact(art, m, force=True) == ["rank0.safetensors", "tokenizer.model"]  # --verify

    # same size, other bytes, mtime put back: the kernel moved ctime, so the record no longer vouches
    shard = art / "rank0.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = shard.stat()
    assert (st2.st_size, st2.st_mtime_ns, st2.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert st2.st_ctime_ns != st.st_ctime_ns  # what catches it
    with pytest.raises(HscError, match="sha256 does not match"):
        artifact_mod.verify_artifact(art, m, force=False)

    # a file replaced by an identical copy (new inode): hashed again, found good, recorded again
    shard.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 0xFF])))
    time.sleep(artifact_mod.RACY_NS / 1e9 + 0.05)
    hashed.clear()
    assert artifact_mod.verify_artifact(art, m, force=False) == ["rank0.safetensors"]
    copy = tmp_path / "copy"
    shutil.copy2(shard, copy)
    os.replace(copy, shard)
    time.sleep(artifact_mod.RACY_NS / 1e9 + 0.05)
    assert artifact_mod.verify_artifact(art, m, force=False) == ["rank0.safetensors"]


def test_run_reports_verification_and_verify_forces_it(tiny, tmp_path, monkeypatch):
    hashed = _count_hashing(monkeypatch)
    time.sleep(artifact_mod.RACY_NS / 1e9 + 0.05)
    run(cfg(tiny, tmp_path / "a", limit=2), "test", echo=quiet)
    hashed.clear()
    run(cfg(tiny, tmp_path / "b", limit=2), "test", echo=quiet)
    assert hashed == []  # the record of the first run (or an earlier test) vouches
    run(cfg(tiny, tmp_path / "c", limit=2, verify=True), "test", echo=quiet)
    assert sorted(hashed) == ["rank0.safetensors", "tokenizer.model"]


# ---------------------------------------------------------------- the compile cache


def test_compile_cache_key_changes_with_what_invalidates_it():
    cpu = torch.device("cpu")
    base = compile_cache.cache_key("a" * 64, cpu, {"layout": "rows", "batch_shape": [4, 448, 256]})
    assert base == compile_cache.cache_key("a" * 64, cpu, {"layout": "rows", "batch_shape": [4, 448, 256]})
    assert base != compile_cache.cache_key("b" * 64, cpu, {"layout": "rows", "batch_shape": [4, 448, 256]})
    assert base != compile_cache.cache_key("a" * 64, cpu, {"layout": "rows", "batch_shape": [4, 512, 256]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "__version__", "0.0.0")
        assert base != compile_cache.cache_key("a" * 64, cpu, {"layout": "rows", "batch_shape": [4, 448, 256]})
    gpu = SimpleNamespace(name="NVIDIA H200", major=9, minor=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "get_device_properties", lambda d: gpu)
        h200 = compile_cache.cache_key("a" * 64, torch.device("cuda", 0), {"layout": "flat"})
        gpu.name, gpu.major = "NVIDIA A100", 8
        assert h200 != compile_cache.cache_key("a" * 64, torch.device("cuda", 0), {"layout": "flat"})


def test_compile_cache_round_trip_hits_inductor_cache(tmp_path, monkeypatch):
    """What save() wrote, load() puts back: a fresh inductor cache directory, the same function compiled
    again, and inductor reports an FX-graph cache hit instead of compiling."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-1"))
    torch._dynamo.reset()
    torch.compiler.reset()
    fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 3 + 1, dynamic=False)
    fn(torch.randn(8, 16))
    art = tmp_path / "art"
    art.mkdir()
    written = compile_cache.save("k1", art)
    assert [p.name for p in written] == ["compile-k1.bin", "compile-k1.bin"]
    assert compile_cache.load("other", art) is None  # another key: nothing

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-2"))
    torch._dynamo.reset()
    counters.clear()
    assert compile_cache.load("k1", art) == "user cache"
    fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 3 + 1, dynamic=False)
    fn(torch.randn(8, 16))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0

    # from the artifact only (a fresh machine), and only if no one else can write it
    (Path(os.environ["HSC_CACHE_DIR"]) / "compile" / "compile-k1.bin").unlink()
    assert compile_cache.load("k1", art) == "artifact"
    os.chmod(art / "cache" / "compile-k1.bin", 0o666)
    assert compile_cache.load("k1", art) is None


@pytest.mark.slow  # two inductor compiles of the model on the CPU: minutes on 2 shared cores
def test_second_compiled_run_loads_the_compile_cache(tiny, tmp_path, monkeypatch):
    """hsc run --compile on the CPU twice, the second with an empty inductor cache directory and dynamo
    reset (as a fresh process would be): it loads the cache the first wrote, and inductor builds no graph."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-1"))
    torch._dynamo.reset()
    first = run(cfg(tiny, tmp_path / "a", limit=4, compile=True), "test", echo=quiet)
    assert first["compile_cache"]["source"] == "written" and first["compile_cache"]["fxgraph_cache_miss"] >= 1
    assert list((tiny.art / "cache").glob("compile-*.bin"))  # the artifact carries it too

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-2"))
    torch._dynamo.reset()
    counters.clear()
    second = run(cfg(tiny, tmp_path / "b", limit=4, compile=True), "test", echo=quiet)
    assert second["compile_cache"]["source"] == "user cache"
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1 and counters["inductor"]["fxgraph_cache_miss"] == 0
    assert second["compile_cache"]["fxgraph_cache_hit"] >= 1 and second["compile_cache"]["fxgraph_cache_miss"] == 0
    assert samples(tmp_path / "b") == samples(tmp_path / "a")
    # another artifact (another manifest sha256), the same shapes: its own key, no reuse
    import shutil

    other = tmp_path / "other-art"
    shutil.copytree(tiny.art, other, ignore=shutil.ignore_patterns("cache"))
    doc = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**doc, "model_name": "renamed"}))
    torch._dynamo.reset()
    third = run(RunConfig(other, str(tiny.data), limit=4, output=tmp_path / "c", device="cpu",
                          batch_tokens=BATCH_TOKENS, compile=True), "test", echo=quiet)
    assert third["compile_cache"]["source"] == "written"
    shutil.rmtree(tiny.art / "cache")
