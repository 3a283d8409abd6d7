"""hsc compile --dry-run: the plan and the files, with sizes, before any weight is read; nothing written."""

import json
import re

import pytest

from runtime.config import ModelArgs
from tests.tiny_hf import write_tiny_hf_checkpoint
from tests.tiny_meta import write_tiny_meta_checkpoint

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)


@pytest.mark.parametrize("kind", ["meta", "hf"])
@pytest.mark.parametrize("target, precision, tp", [("cpu", "fp32", None), ("h200x2", "bf16", 2), ("l40sx1", "w8", None)])
def test_dry_run_prints_what_the_compile_writes(tmp_path, hsc, monkeypatch, kind, target, precision, tp):
    ckpt = tmp_path / "ck"
    if kind == "meta":
        write_tiny_meta_checkpoint(ckpt, ARGS, 2, seed=0)
    else:
        write_tiny_hf_checkpoint(ckpt, ARGS, seed=0, n_files=2)
    options = ["--target", target, "--precision", precision, *(["--tp", tp] if tp else []), "-o", tmp_path / "art"]
    with monkeypatch.context() as m:
        _block_reads(m)
        code, out, err = hsc("compile", ckpt, *options, "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.tmp-*"))
    lines = out.splitlines()
    assert lines[0].startswith("plan: ") and lines[1].startswith(f"dry run: would write {tmp_path / 'art'} for target {target}")
    said = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(r"^  (rank\d\.safetensors)  [\d.]+ GB \(([\d,]+) bytes",
                                                                 out, re.M)}

    extra = ["--calib-items", "4", "--check-items", "0", "--alpha", "0.5"] if precision == "w8" else []
    code, out2, err = hsc("compile", ckpt, *options, *extra)
    assert code == 0, err
    assert out2.splitlines()[0] == lines[0]  # the same plan
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert sorted(said) == sorted(s["file"] for s in manifest["shards"])
    for s in manifest["shards"]:  # tensor bytes; the file adds its header (< 100 kB here)
        assert 0 < s["bytes"] - said[s["file"]] < 100_000, (s, said)
    assert f"  {manifest['tokenizer']['file']}  " in out


def _block_reads(m):
    """Reading a weight, or hashing a file (which reads every weight), fails the test."""
    import toolchain.hashing
    import toolchain.hf_source
    import toolchain.meta_source

    def boom(*a, **k):
        raise AssertionError("a dry run read weights")

    for cls in (toolchain.meta_source.MetaSource, toolchain.hf_source.HFSource):
        for name in ("global_tensors", "layer_tensors", "_read"):
            m.setattr(cls, name, boom)
    m.setattr(toolchain.hashing, "file_digests", boom)
    m.setattr(toolchain.hf_source, "sha256_file", boom)
    m.setattr(toolchain.meta_source, "file_digests", boom)


def test_dry_run_of_an_existing_output_says_so(tmp_path, hsc):
    write_tiny_hf_checkpoint(tmp_path / "ck", ARGS, seed=0)
    (tmp_path / "art").mkdir()
    code, out, err = hsc("compile", tmp_path / "ck", "--target", "cpu", "-o", tmp_path / "art", "--dry-run")
    assert code == 0 and "(exists: --force replaces it)" in out
