"""Compiles that are killed, interrupted, run twice at once or run out of disk (docs/durability.md).

A real `hsc compile` runs as a child process that stops at a chosen point (tests/kill_at.py) and is
killed there; afterwards the output is either absent or a whole artifact (`inspect --verify`), and the
next compile to the same place cleans up what the killed one left and succeeds."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli_errors import (COMPILE, art_copy, artifact, assert_nothing_left, assert_one_line_error,  # noqa: F401
                                   ckpt_master, out_dir)
from toolchain import outdir
from toolchain.outdir import clear_leftovers, commit, lock_path, make_temp, output_lock

REPO = Path(__file__).resolve().parents[1]


def _start(point: str, mark: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.kill_at", point, str(mark), *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(mark: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None:
            pytest.fail(f"the compile ended (exit {proc.returncode}) before reaching its stop: {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the compile never reached its stop")
        time.sleep(0.05)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name) if out.parent.exists() else []


def _verified(hsc, out: Path) -> None:
    code, stdout, err = hsc("inspect", out, "--verify")
    assert code == 0 and "all sha256 match" in stdout, err


def _stop_and_signal(point, tmp_path, sig, *args) -> subprocess.CompletedProcess:
    mark = tmp_path / f"mark-{point}-{int(sig)}"
    proc = _start(point, mark, *args)
    _wait_for(mark, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("point", ["mid-shard", "before-commit"])
def test_sigterm_and_sigint_clean_up_like_each_other(hsc, ckpt_master, out_dir, tmp_path, point):
    for sig, code, word in ((signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")):
        done = _stop_and_signal(point, tmp_path, sig, "compile", ckpt_master, *COMPILE, "-o", out_dir)
        assert done.returncode == code, done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"hsc: {word}" and "Traceback" not in done.stderr
        assert_nothing_left(out_dir)
        assert _siblings(out_dir) == [], "the lock file and temporary directory are removed"


@pytest.mark.parametrize("point", ["mid-shard", "before-commit"])
def test_sigkill_leaves_what_the_next_compile_removes(hsc, ckpt_master, out_dir, tmp_path, point):
    done = _stop_and_signal(point, tmp_path, signal.SIGKILL, "compile", ckpt_master, *COMPILE, "-o", out_dir)
    assert done.returncode == -signal.SIGKILL
    assert not out_dir.exists()
    stale = [n for n in _siblings(out_dir) if n.startswith(f".{out_dir.name}.tmp-")]
    assert len(stale) == 1, _siblings(out_dir)
    code, stdout, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_dir)
    assert code == 0, err
    assert f"removed {out_dir.parent / stale[0]}" in stdout
    assert _siblings(out_dir) == []
    _verified(hsc, out_dir)


@pytest.mark.parametrize("point", ["mid-exchange", "mid-aside", "mid-shard", "before-commit"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_force_killed_mid_replacement_keeps_a_whole_artifact(hsc, ckpt_master, artifact, tmp_path, point, sig):
    out = tmp_path / "arts" / "tiny-cpu"
    out.parent.mkdir()
    shutil.copytree(artifact, out)
    done = _stop_and_signal(point, tmp_path, sig, "compile", ckpt_master, *COMPILE, "-o", out, "--force")
    assert done.returncode in (-signal.SIGKILL, 143), done.stderr
    if sig == signal.SIGKILL and point == "mid-aside":  # the old artifact is whole, under its set-aside name
        assert not out.exists() and any(".old-" in n for n in _siblings(out))
    else:
        _verified(hsc, out)  # the old artifact, or (swapped in before the kill) the new one
    # The next compile puts a set-aside artifact back, removes every leftover, and replaces it.
    code, stdout, err = hsc("compile", ckpt_master, *COMPILE, "-o", out, "--force")
    assert code == 0, err
    assert _siblings(out) == []
    _verified(hsc, out)


def test_second_compile_to_the_same_output_is_refused(hsc, ckpt_master, out_dir, tmp_path):
    mark = tmp_path / "mark"
    first = _start("mid-shard", mark, "compile", ckpt_master, *COMPILE, "-o", out_dir)
    try:
        _wait_for(mark, first)
        code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_dir, "--force")
        assert_one_line_error(code, out, err, out_dir, "another hsc is writing this artifact now")
        assert any(n.startswith(f".{out_dir.name}.tmp-") for n in _siblings(out_dir)), \
            "the refused compile must not touch the running one's temporary directory"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert _siblings(out_dir) == []


def test_lock_is_per_output_and_released(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with output_lock(a):
        with output_lock(b):  # another output: no conflict
            pass
        with pytest.raises(Exception, match="another hsc is writing this artifact now"):
            with output_lock(a):
                pass
        assert lock_path(a).exists()
    assert not lock_path(a).exists()
    with output_lock(a):  # released: free again
        pass


def test_a_lock_file_left_by_a_killed_writer_is_free(tmp_path):
    a = tmp_path / "a"
    lock_path(a).write_text("")
    with output_lock(a):
        pass


def test_enospc_while_writing_is_one_line_and_leaves_nothing(hsc, ckpt_master, out_dir, monkeypatch):
    from toolchain.safetensors_writer import StreamingSafetensorsWriter

    written = []

    def full_disk(self, data):
        written.append(len(data))
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._f.write(data)

    monkeypatch.setattr(StreamingSafetensorsWriter, "_write", full_disk)
    code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, out_dir, "No space left on device", "nothing was left behind")
    assert_nothing_left(out_dir)
    assert _siblings(out_dir) == []


def test_enospc_on_a_small_filesystem(hsc, ckpt_master, tmp_path):
    """A real full disk: a 4 MB tmpfs (the tiny artifact is 17 MB). Needs root's mount."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        out = mnt / "tiny-cpu"
        code, stdout, err = hsc("compile", ckpt_master, *COMPILE, "-o", out)
        assert_one_line_error(code, stdout, err, out, "No space left on device")
        assert sorted(os.listdir(mnt)) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_commit_replaces_atomically_with_and_without_exchange(tmp_path, monkeypatch):
    for exchange in (True, False):
        out = tmp_path / f"out-{exchange}"
        out.mkdir()
        (out / "f").write_text("old")
        if not exchange:
            monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
        tmp = make_temp(out)
        (tmp / "f").write_text("new")
        commit(tmp, out)
        assert (out / "f").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")) == []


def test_clear_leftovers_restores_a_set_aside_artifact_and_spares_others(tmp_path):
    out = tmp_path / "art"
    aside = tmp_path / ".art.old-abcd1234"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    stale = tmp_path / ".art.tmp-zz__9911"
    stale.mkdir()
    other = tmp_path / ".art2.tmp-abcdefgh"  # another output's: not ours to remove
    other.mkdir()
    log = []
    clear_leftovers(out, log.append)
    assert (out / "manifest.json").exists() and not aside.exists() and not stale.exists() and other.exists()
    assert len(log) == 2


# A child that starts hsc as `python -m toolchain.cli --help` and touches MARKER when its import of torch
# begins: the test interrupts it then, not after a guessed delay that a busy machine would outrun.
_IMPORT_MARKER = """
import importlib.abc, pathlib, runpy, sys
MARKER = pathlib.Path(sys.argv[1])
class Marker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            MARKER.touch()
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Marker())
sys.argv = ["hsc", "--help"]
runpy.run_module("toolchain.cli", run_name="__main__")
"""


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    """SIGINT while torch is being imported: exit 130, `hsc: interrupted`, no traceback."""
    marker = tmp_path / "importing-torch"
    proc = subprocess.Popen([sys.executable, "-c", _IMPORT_MARKER, str(marker)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert marker.exists(), "the child never began importing torch"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "hsc: interrupted", err