"""Files named by files stay inside their directory (runtime/paths.py): a manifest or checklist that
names an absolute path, a `..` or a symlink out is refused in one line that tells nothing about the
outside file; FIFOs are refused before they are opened; strings from files are printed escaped."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest

from runtime.errors import HscError
from runtime.paths import confined, printable
from tests.test_cli_errors import (COMPILE, art_copy, artifact, assert_one_line_error, ckpt, ckpt_master,  # noqa: F401
                                   out_dir)
from tests.tiny_meta import write_checklist

SECRET = b"secret: the outside file's content\n"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside every artifact and checkpoint, which nothing may read."""
    path = tmp_path / "outside" / "secret.txt"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


@pytest.fixture(autouse=True)
def no_hang():
    """A FIFO opened by mistake blocks forever: fail the case instead."""
    def hung(signum, frame):
        raise TimeoutError("hsc blocked (opened a FIFO?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _edit_manifest(art: Path, edit) -> None:
    m = json.loads((art / "manifest.json").read_text())
    edit(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _reveals_nothing(line: str, outside: Path) -> None:
    size, digest = str(len(SECRET)), hashlib.sha256(SECRET).hexdigest()
    assert "bytes" not in line and size not in line.replace(str(outside), "")
    assert digest[:16] not in line and "sha256 does not match" not in line and "secret:" not in line


def _escapes(outside: Path, art: Path) -> dict[str, str]:
    rel = os.path.relpath(outside, art)
    assert rel.startswith("..")
    return {"absolute": str(outside), "dotdot": rel, "inner-dotdot": f"sub/../{rel}"}


@pytest.mark.parametrize("how", ["absolute", "dotdot", "inner-dotdot", "symlink"])
@pytest.mark.parametrize("field", ["shard", "tokenizer", "calibration"])
def test_manifest_paths_outside_the_artifact_are_refused(hsc, art_copy, outside, how, field):
    if how == "symlink":
        (art_copy / "link").symlink_to(outside)
        name = "link"
    else:
        name = _escapes(outside, art_copy)[how]
    size, digest = len(SECRET), hashlib.sha256(SECRET).hexdigest()

    def edit(m):
        if field == "shard":  # the outside file's sha256 (its size cannot pass the manifest's own checks)
            m["shards"][0].update(file=name, sha256=digest)
        elif field == "tokenizer":
            m["tokenizer"].update(file=name, sha256=digest)
        else:
            m["calibration"] = {"file": name, "sha256": digest, "bytes": size}

    _edit_manifest(art_copy, edit)
    for args in (("inspect", art_copy, "--verify"), ("inspect", art_copy), ("run", art_copy, "--limit", "1")):
        code, out, err = hsc(*args)
        line = assert_one_line_error(code, out, err, "outside the artifact", "refused")
        _reveals_nothing(line, outside)


def test_symlinks_inside_the_artifact_are_followed(hsc, art_copy):
    shard = json.loads((art_copy / "manifest.json").read_text())["shards"][0]["file"]
    (art_copy / "real").mkdir()
    os.rename(art_copy / shard, art_copy / "real" / shard)
    (art_copy / shard).symlink_to(Path("real") / shard)
    code, out, err = hsc("inspect", art_copy, "--verify")
    assert code == 0 and "all sha256 match" in out, err


def test_fifo_in_the_artifact_is_refused_before_it_is_opened(hsc, art_copy):
    shard = json.loads((art_copy / "manifest.json").read_text())["shards"][0]["file"]
    (art_copy / shard).unlink()
    os.mkfifo(art_copy / shard)
    code, out, err = hsc("inspect", art_copy, "--verify")
    assert_one_line_error(code, out, err, art_copy / shard, "not a regular file")


def test_manifest_itself_must_be_inside_and_regular(hsc, art_copy, outside):
    (art_copy / "manifest.json").unlink()
    (art_copy / "manifest.json").symlink_to(outside)
    code, out, err = hsc("inspect", art_copy)
    _reveals_nothing(assert_one_line_error(code, out, err, "outside the artifact"), outside)
    (art_copy / "manifest.json").unlink()
    os.mkfifo(art_copy / "manifest.json")
    code, out, err = hsc("inspect", art_copy)
    assert_one_line_error(code, out, err, "not a regular file")


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_checklist_entries_outside_the_checkpoint_are_refused(hsc, ckpt, outside, out_dir, how):
    name = _escapes(outside, ckpt)[how]
    write_checklist(ckpt, ["params.json"])
    with open(ckpt / "checklist.chk", "a") as f:  # a wrong MD5: the old reader printed the real one
        f.write(f"{'0' * 32}  {name}\n")
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    line = assert_one_line_error(code, out, err, "outside the checkpoint", "checklist.chk line 2")
    _reveals_nothing(line, outside)
    assert hashlib.md5(SECRET).hexdigest() not in line and not out_dir.exists()


def test_shard_symlinked_outside_the_checkpoint_is_refused(hsc, ckpt, outside, out_dir):
    (ckpt / "consolidated.01.pth").unlink()
    (ckpt / "consolidated.01.pth").symlink_to(outside)
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    _reveals_nothing(assert_one_line_error(code, out, err, "consolidated.01.pth", "outside the checkpoint"), outside)


@pytest.mark.parametrize("name", ["consolidated.00.pth", "params.json", "tokenizer.model", "checklist.chk"])
def test_fifo_in_the_checkpoint_is_refused(hsc, ckpt, out_dir, name):
    if (ckpt / name).exists():
        (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, ckpt / name, "not a regular file")


def test_fifo_gguf_is_refused(hsc, tmp_path, out_dir):
    os.mkfifo(tmp_path / "model.gguf")
    code, out, err = hsc("compile", tmp_path / "model.gguf", *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, "model.gguf", "not a regular file")


def test_confined_accepts_plain_names_and_refuses_the_rest(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    assert confined(tmp_path, "a/f") == tmp_path / "a" / "f"
    assert confined(tmp_path, "./a/f").resolve() == (tmp_path / "a" / "f").resolve()
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a\\..\\..\\x", "C:\\x", "a\0b"):
        with pytest.raises(HscError, match="refused"):
            confined(tmp_path, bad, must_exist=False)
    with pytest.raises(HscError, match="missing from the directory"):
        confined(tmp_path, "a/g")
    with pytest.raises(HscError, match="directory"):
        confined(tmp_path, "a")


ESC = "\x1b[2J\x1b]0;owned\x07\x9b31m\u202eevil\r\n"


def test_escape_sequences_from_files_are_printed_escaped(hsc, art_copy, shared_data, tmp_path):
    _edit_manifest(art_copy, lambda m: m.update(model_name="tiny" + ESC, plan="plan" + ESC))
    code, out, err = hsc("inspect", art_copy)
    assert code == 0, err
    assert "tiny\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\u202eevil\\x0d\\x0a" in out
    assert not any(c in out + err for c in "\x1b\x07\x9b\u202e\r")
    code, out, err = hsc("run", art_copy, "--data", shared_data, "--limit", "2", "--output", tmp_path / "res")
    assert code == 0, err
    assert "tiny\\x1b[2J" in out and not any(c in out for c in "\x1b\x07\x9b\u202e\r")
    # and in an error line, where a file's name comes from the manifest
    _edit_manifest(art_copy, lambda m: m["shards"][0].update(file="x" + ESC))
    code, out, err = hsc("inspect", art_copy, "--verify")
    assert_one_line_error(code, out, err, "x\\x1b[2J")
    assert not any(c in err for c in "\x1b\x07\x9b\u202e\r")


def test_printable_keeps_ordinary_text():
    assert printable("SmolLM2-135M · ± é 日本") == "SmolLM2-135M · ± é 日本"


def test_warnings_are_printed_escaped(capsys):
    from runtime.distributed import _warn

    _warn("planned for " + ESC)
    err = capsys.readouterr().err
    assert err.startswith("hsc: warning: planned for \\x1b[2J") and not any(c in err for c in "\x1b\x07\x9b\u202e\r")
