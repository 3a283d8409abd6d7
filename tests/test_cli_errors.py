"""CLI-level acceptance for bad input: every user mistake is one `hsc: error: ` line naming the file
and the problem, exit status != 0, no traceback, and a failed compile leaves no artifact behind.

One tiny artifact is compiled once for the module; cases that damage it work on a copy.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from runtime.config import ModelArgs
from runtime.errors import HscError
from tests.tiny_meta import write_tiny_meta_checkpoint
from toolchain.meta_source import MetaSource

# dim 64, 4 heads of 16, FFN 192, vocab 32000 from the tokenizer: ~4.2M params, 17 MB in fp32.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=32)
COMPILE = ("--target", "cpu", "--precision", "fp32")


# ---------------------------------------------------------------- helpers


def assert_one_line_error(code: int, out: str, err: str, *fragments) -> str:
    """Exit != 0, stderr is exactly one `hsc: error: ` line holding every fragment, no traceback."""
    assert code != 0, f"expected a failure, got exit 0\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("hsc: error: "), line
    for fragment in fragments:
        assert str(fragment) in line, f"{fragment!r} not in {line!r}"
    return line


def assert_nothing_left(out_dir: Path) -> None:
    """No artifact at -o, and no `.NAME.tmp-*` sibling that a half-written compile left behind."""
    assert not out_dir.exists(), f"{out_dir} was left behind: {sorted(os.listdir(out_dir))}"
    if out_dir.parent.exists():
        leftovers = sorted(p.name for p in out_dir.parent.glob(f".{out_dir.name}.tmp-*"))
        assert leftovers == [], f"temporary directories left in {out_dir.parent}: {leftovers}"


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class RunsCode:
    """Unpickling this calls os.system: exactly what weights_only must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt_master(tmp_path_factory) -> Path:
    """A tiny 2-shard Meta checkpoint (no checklist.chk, so cases may edit shards freely)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_tiny_meta_checkpoint(path, ARGS, 2, seed=0, with_checklist=False)
    return path


@pytest.fixture
def ckpt(ckpt_master, tmp_path) -> Path:
    """A private copy of the checkpoint for a case to damage."""
    return Path(shutil.copytree(ckpt_master, tmp_path / "tiny"))


@pytest.fixture(scope="module")
def artifact(ckpt_master, tmp_path_factory) -> Path:
    """Compiled once per module, through the real entry point (the `hsc` fixture is function-scoped)."""
    import sys

    from toolchain.cli import main

    art = tmp_path_factory.mktemp("art") / "tiny-cpu"
    argv = sys.argv
    sys.argv = ["hsc", "compile", str(ckpt_master), *COMPILE, "-o", str(art)]
    try:
        main()
    except SystemExit as e:
        pytest.fail(f"compiling the module's artifact failed with exit {e.code}")
    finally:
        sys.argv = argv
    assert (art / "manifest.json").is_file()
    return art


@pytest.fixture
def art_copy(artifact, tmp_path) -> Path:
    """A private copy of the artifact for a case to tamper with."""
    return Path(shutil.copytree(artifact, tmp_path / "art"))


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """The -o path of a compile, alone in its own parent so leftovers are easy to see."""
    return tmp_path / "out" / "tiny-cpu"


# ---------------------------------------------------------------- compile: bad checkpoints


def test_compile_missing_params_json(hsc, ckpt, out_dir):
    (ckpt / "params.json").unlink()
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, ckpt / "params.json", "missing")
    assert_nothing_left(out_dir)


def test_compile_truncated_shard(hsc, ckpt, out_dir):
    shard = ckpt / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, shard, "truncated or corrupt")
    assert_nothing_left(out_dir)


def test_compile_pickle_that_would_run_code_is_refused(hsc, ckpt, out_dir, tmp_path):
    marker = tmp_path / "pwned"
    shard = ckpt / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    torch.save({**sd, "rope.freqs": RunsCode(marker)}, shard)
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, shard, "refused by weights_only", "system")
    assert not marker.exists(), "the pickle's payload ran"
    assert_nothing_left(out_dir)


def test_compile_shards_with_mismatched_shapes(hsc, ckpt, out_dir):
    shard = ckpt / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd["layers.1.attention.wq.weight"] = torch.zeros(16, 64)  # shard 0 holds (32, 64)
    torch.save(sd, shard)
    code, out, err = hsc("compile", ckpt, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, shard, "layers.1.attention.wq.weight", "(16, 64)", "(32, 64)")
    assert_nothing_left(out_dir)


def test_compile_unknown_target(hsc, ckpt_master, out_dir):
    code, out, err = hsc("compile", ckpt_master, "--target", "tpu9000", "-o", out_dir)
    assert_one_line_error(code, out, err, "unknown target 'tpu9000'", "h200x1")
    assert_nothing_left(out_dir)


def test_compile_nonexistent_source(hsc, tmp_path, out_dir):
    missing = tmp_path / "no-such-checkpoint"
    code, out, err = hsc("compile", missing, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, missing, "no such file or directory")
    assert_nothing_left(out_dir)


def test_compile_failure_while_writing_leaves_nothing(hsc, ckpt_master, out_dir, monkeypatch):
    real = MetaSource.layer_tensors
    calls = []

    def fail_on_layer_1(self, i):
        calls.append(i)
        if i == 1:
            raise HscError(f"{self.path / 'consolidated.01.pth'}: read error in layer 1 (injected)")
        return real(self, i)

    monkeypatch.setattr(MetaSource, "layer_tensors", fail_on_layer_1)
    code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_dir)
    assert calls == [0, 1], "the failure must come after layer 0 was written"
    assert_one_line_error(code, out, err, ckpt_master / "consolidated.01.pth", "layer 1 (injected)")
    assert_nothing_left(out_dir)
    assert out_dir.parent.is_dir() and list(out_dir.parent.iterdir()) == []


def test_compile_refuses_existing_output_without_force(hsc, ckpt_master, tmp_path):
    out_dir = tmp_path / "out" / "tiny-cpu"
    out_dir.mkdir(parents=True)
    (out_dir / "precious.txt").write_text("do not touch\n")
    before = snapshot(out_dir)
    code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_dir)
    assert_one_line_error(code, out, err, out_dir, "already exists", "--force")
    assert snapshot(out_dir) == before
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["tiny-cpu"]  # no temporary sibling


def test_compile_force_replaces_existing_output(hsc, ckpt_master, tmp_path):
    out_dir = tmp_path / "out" / "tiny-cpu"
    out_dir.mkdir(parents=True)
    (out_dir / "stale.txt").write_text("old\n")
    code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_dir, "--force")
    assert code == 0, err
    assert "Traceback" not in out + err
    assert sorted(p.name for p in out_dir.iterdir()) == ["manifest.json", "rank0.safetensors", "tokenizer.model"]
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["tiny-cpu"]
    code, out, err = hsc("inspect", out_dir, "--verify")
    assert code == 0, err



@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_compile_output_path_is_a_file(hsc, ckpt_master, tmp_path, force):
    """--force replaces an artifact directory, never a plain file that happens to be in the way."""
    out_file = tmp_path / "out" / "notes.txt"
    out_file.parent.mkdir()
    out_file.write_text("mine\n")
    code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", out_file, *(["--force"] if force else []))
    assert_one_line_error(code, out, err, out_file, "not a directory")
    assert out_file.read_text() == "mine\n"
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["notes.txt"]


def test_compile_output_parent_is_a_file(hsc, ckpt_master, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine\n")
    code, out, err = hsc("compile", ckpt_master, *COMPILE, "-o", blocker / "art")
    assert_one_line_error(code, out, err, blocker, "cannot create the artifact directory")
    assert blocker.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


# ---------------------------------------------------------------- artifact: damaged or foreign


def test_tampered_shard_fails_verify_and_run(hsc, art_copy, shared_data, tmp_path):
    shard = art_copy / "rank0.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))

    code, out, err = hsc("inspect", art_copy, "--verify")
    assert_one_line_error(code, out, err, shard, "sha256 does not match")

    res = tmp_path / "res"
    code, out, err = hsc("run", art_copy, "--data", shared_data, "--limit", 4, "--output", res)
    assert_one_line_error(code, out, err, shard, "sha256 does not match")
    assert not res.exists()


def test_deleted_tokenizer(hsc, art_copy, shared_data, tmp_path):
    tok = art_copy / "tokenizer.model"
    tok.unlink()
    code, out, err = hsc("inspect", art_copy, "--verify")
    assert_one_line_error(code, out, err, tok, "missing")
    code, out, err = hsc("run", art_copy, "--data", shared_data, "--limit", 4, "--output", tmp_path / "res")
    assert_one_line_error(code, out, err, tok, "missing")


def test_unknown_manifest_format_version(hsc, art_copy, shared_data, tmp_path):
    manifest = art_copy / "manifest.json"
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "format_version": 99}))
    for args in (("inspect", art_copy), ("inspect", art_copy, "--verify", "--json"),
                 ("run", art_copy, "--data", shared_data, "--limit", 4, "--output", tmp_path / "res")):
        code, out, err = hsc(*args)
        line = assert_one_line_error(code, out, err, manifest, "format_version 99", "version 1")
        assert "reads version 1" in line  # says which version is supported
        assert out == ""


def test_directory_that_is_not_an_artifact(hsc, tmp_path, shared_data):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello\n")
    code, out, err = hsc("inspect", plain)
    assert_one_line_error(code, out, err, plain / "manifest.json", "not an hsc artifact")
    code, out, err = hsc("run", plain, "--data", shared_data, "--limit", 4, "--output", tmp_path / "res")
    assert_one_line_error(code, out, err, plain / "manifest.json", "not an hsc artifact")
    missing = tmp_path / "nowhere"
    code, out, err = hsc("inspect", missing, "--verify")
    assert_one_line_error(code, out, err, missing, "not an artifact directory")



def test_manifest_that_is_not_text(hsc, art_copy):
    manifest = art_copy / "manifest.json"
    manifest.write_bytes(b"\xff\xfe\x00garbage")
    code, out, err = hsc("inspect", art_copy)
    assert_one_line_error(code, out, err, manifest, "not valid JSON")


def test_run_flat_layout_with_a_row_length_off_its_blocks(hsc, artifact, shared_data, tmp_path):
    code, out, err = hsc("run", artifact, "--data", shared_data, "--limit", 4, "--layout", "flat",
                         "--compile", "--row-len", 300, "--output", tmp_path / "res")
    assert_one_line_error(code, out, err, "--row-len 300", "multiple of 128")
    assert not (tmp_path / "res").exists()
    # on the CPU the step is not compiled unless asked
    code, out, err = hsc("run", artifact, "--data", shared_data, "--limit", 4, "--layout", "flat",
                         "--output", tmp_path / "res")
    assert_one_line_error(code, out, err, "--layout flat needs --compile")


def test_run_with_unknown_device(hsc, artifact, shared_data, tmp_path):
    code, out, err = hsc("run", artifact, "--data", shared_data, "--limit", 4, "--device", "tpu",
                         "--output", tmp_path / "res")
    assert_one_line_error(code, out, err, "--device tpu", "not a device")


# ---------------------------------------------------------------- data: malformed HellaSwag

ITEM = ["Cooking: she cracks an egg into the bowl.", "0", "It breaks.", "It sings.", "It flies.", "It melts."]


def _run_data(hsc, artifact, data: Path, tmp_path):
    res = tmp_path / "res"
    code, out, err = hsc("run", artifact, "--data", data, "--limit", 4, "--output", res)
    assert not res.exists()
    return code, out, err


def test_six_line_file_with_bad_label(hsc, artifact, tmp_path):
    data = tmp_path / "bad_label.txt"
    bad = [*ITEM[:1], "7", *ITEM[2:]]
    data.write_text("\n".join(ITEM + bad) + "\n")  # the second item's label is on line 8
    code, out, err = _run_data(hsc, artifact, data, tmp_path)
    assert_one_line_error(code, out, err, f"{data}:8", "label 7", "0-3")


def test_six_line_file_with_three_endings(hsc, artifact, tmp_path):
    data = tmp_path / "three_endings.txt"
    data.write_text("\n".join(ITEM[:5] * 2) + "\n")  # 2 items of 5 lines: 10 lines
    code, out, err = _run_data(hsc, artifact, data, tmp_path)
    assert_one_line_error(code, out, err, data, "10 lines", "multiple of 6")


def test_jsonl_with_three_endings(hsc, artifact, tmp_path):
    data = tmp_path / "three_endings.jsonl"
    good = {"activity_label": "Cooking", "ctx_a": "She cracks an egg.", "ctx_b": "then she",
            "endings": ["stirs.", "sings.", "flies.", "melts."], "label": 0}
    bad = {**good, "endings": good["endings"][:3]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code, out, err = _run_data(hsc, artifact, data, tmp_path)
    assert_one_line_error(code, out, err, f"{data}:2", "expected 4 endings, found 3")


def test_missing_data_file(hsc, artifact, tmp_path):
    data = tmp_path / "no_such_hellaswag.jsonl"
    code, out, err = _run_data(hsc, artifact, data, tmp_path)
    assert_one_line_error(code, out, err, data, "no such HellaSwag file")



@pytest.mark.parametrize("name, content", [
    ("binary.txt", b"\xff\xfe not text\n0\na\nb\nc\nd\n"),
    ("binary.jsonl", b'{"query": "\xff\xfe"}\n'),
    ("corrupt.txt.bz2", b"this is not bzip2 data"),
    ("truncated.txt.bz2", bz2.compress(("\n".join(ITEM) + "\n").encode())[:20]),
])
def test_unreadable_data_file(hsc, artifact, tmp_path, name, content):
    data = tmp_path / name
    data.write_bytes(content)
    code, out, err = _run_data(hsc, artifact, data, tmp_path)
    assert_one_line_error(code, out, err, data, "cannot be read as")


# ---------------------------------------------------------------- positive checks


def test_inspect_prints_summary(hsc, artifact):
    code, out, err = hsc("inspect", artifact)
    assert code == 0, err
    assert err == ""
    heads = [line.split(None, 1)[0] for line in out.splitlines()]
    for head in ("artifact", "model", "target", "mapping", "plan", "shard", "tokenizer", "source", "built",
                 "resources"):
        assert head in heads, f"no {head!r} line in:\n{out}"
    text = {line.split(None, 1)[0]: line for line in out.splitlines()}
    assert "dim 64, 2 layers, 4 heads" in text["model"]
    assert "cpu, precision fp32" in text["target"]
    assert "tp=1 dp=1 world=1" in text["mapping"]
    assert "rank0.safetensors" in text["shard"]
    assert "meta" in text["source"] and "compile" in text["built"]  # provenance
    assert "wall" in text["resources"] and "peak host memory" in text["resources"]


def test_inspect_verify_json(hsc, artifact):
    code, out, err = hsc("inspect", artifact, "--verify", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["verified"] == ["rank0.safetensors", "tokenizer.model"]
    m = doc["manifest"]
    assert (m["format_version"], m["target"], m["precision"]) == (1, "cpu", "fp32")
    assert m["model"]["dim"] == 64 and m["model"]["n_layers"] == 2
    assert len(doc["manifest_sha256"]) == 64


def test_run_on_the_untouched_artifact_works(hsc, artifact, shared_data, tmp_path):
    """The control for the cases above: the same artifact and data do score."""
    code, out, err = hsc("run", artifact, "--data", shared_data, "--limit", 4, "--output", tmp_path / "res")
    assert code == 0, err
    assert json.loads((tmp_path / "res" / "results.json").read_text())["n"] == 4


def test_no_data_and_no_shared_file_says_where_it_looked(hsc, artifact, tmp_path, monkeypatch):
    """Outside the repository without --data: one line naming the file and where it was looked for, at
    once; `datasets` (which may retry the network for half a minute) is only used when asked for."""
    import runtime.hellaswag

    def no_network(*a, **k):
        raise AssertionError("went to datasets without --data datasets")

    monkeypatch.setattr(runtime.hellaswag, "load_datasets", no_network)
    monkeypatch.chdir(tmp_path)
    code, out, err = hsc("run", artifact, "--output", tmp_path / "res")
    assert_one_line_error(code, out, err, "shared/data/hellaswag_val_full.txt.bz2", str(tmp_path.resolve()))
    assert "--data FILE" in err and "--data datasets" in err
    assert not (tmp_path / "res").exists()


def test_data_from_datasets_is_announced(monkeypatch, capsys):
    import runtime.hellaswag

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: the import fails
    with pytest.raises(HscError, match="pass --data FILE"):
        runtime.hellaswag.load_split("datasets")
    assert "through `datasets`" in capsys.readouterr().err


def test_no_calib_data_and_no_shared_file_names_the_compile_flag(tmp_path, monkeypatch):
    from runtime.hellaswag import load_split

    monkeypatch.chdir(tmp_path)
    with pytest.raises(HscError, match="no --calib-data given .* pass --calib-data FILE"):
        load_split(None, flag="--calib-data")
