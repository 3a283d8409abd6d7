"""`hsc random-checkpoint`: random weights in Meta's layout, written one tensor at a time, read back by
MetaSource."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from runtime.config import ModelArgs, global_shapes, layer_shapes
from tests.tiny_meta import TOKENIZER
from toolchain.meta_source import MetaSource
from toolchain.random_checkpoint import SHARD_AXIS, _MadeAhead, random_slice, rank_shapes, save_streaming

# dim 64, 4 heads (2 kv), FFN 192; vocab from the tokenizer (32000).
TINY = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, multiple_of=32)


def _records(path: Path) -> dict[str, bytes]:
    """The zip records of a torch.save file, but for the per-save serialization id."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC32 matches its bytes
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("serialization_id")}


@pytest.fixture
def params(tmp_path) -> Path:
    path = tmp_path / "tiny-params.json"
    path.write_text(json.dumps(TINY.params_json()))
    return path


@pytest.mark.parametrize("ahead", [0, 2])
def test_streaming_save_writes_what_torch_save_writes(tmp_path, ahead):
    shapes = {"w": (48, 16), "norm": (16,), "e": (7, 3)}
    made = []

    def make(name):
        made.append(name)
        return torch.randn(shapes[name], generator=torch.Generator().manual_seed(len(name))).half()

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    waited = save_streaming(tmp_path / "a" / "s.pth", shapes, torch.float16, make, ahead=ahead)
    assert isinstance(waited, float) and waited >= 0.0  # the writer's wait for make, logged per shard
    # each tensor made once; in the dict's order when made on the writer's thread
    assert made == list(shapes) if ahead == 0 else sorted(made) == sorted(shapes)
    made.clear()
    torch.save({n: make(n) for n in shapes}, tmp_path / "b" / "s.pth")
    assert _records(tmp_path / "a" / "s.pth") == _records(tmp_path / "b" / "s.pth")
    with pytest.raises(ValueError, match="norm: made"):
        save_streaming(tmp_path / "a" / "t.pth", shapes, torch.float16,
                       lambda n: torch.zeros(shapes[n] if n != "norm" else (15,), dtype=torch.float16))


def test_tensors_made_ahead_come_back_by_name_and_errors_surface():
    """_MadeAhead: requests out of order, each name made once, and an error raised in a worker thread
    reaches the writer's thread."""
    calls = []

    def make(name):
        calls.append(name)
        if name == "bad":
            raise ValueError("bad tensor")
        return torch.full((2,), float(len(name)))

    made = _MadeAhead(make, ["a", "bb", "ccc", "dddd"], ahead=2)
    try:
        assert made("ccc").tolist() == [3.0, 3.0]  # not yet submitted: made on the spot
        assert made("a").tolist() == [1.0, 1.0] and made("bb").tolist() == [2.0, 2.0]
        assert made("dddd").tolist() == [4.0, 4.0]
    finally:
        made.close()
    assert sorted(calls) == ["a", "bb", "ccc", "dddd"]  # "ccc" is not drawn again when its turn comes
    made = _MadeAhead(make, ["bad", "a"], ahead=2)
    try:
        with pytest.raises(ValueError, match="bad tensor"):
            made("bad")
    finally:
        made.close()


def test_streaming_save_falls_back_to_torch_save(tmp_path, monkeypatch):
    """A torch whose private writer differs gets plain torch.save (one shard in memory), same records."""
    import toolchain.random_checkpoint as rc

    shapes = {"w": (8, 4), "n": (4,)}
    make = lambda name: torch.full(shapes[name], float(len(name)), dtype=torch.float16)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.setattr(rc, "_private_writer_available", lambda: False)
    calls, torch_save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda *a, **k: (calls.append(a[1]), torch_save(*a, **k)))
    assert save_streaming(tmp_path / "a" / "s.pth", shapes, torch.float16, make) is None  # no wait to report
    monkeypatch.undo()
    assert calls == [str(tmp_path / "a" / "s.pth")]
    assert rc._private_writer_available()  # this torch has the signature the streaming path expects
    save_streaming(tmp_path / "b" / "s.pth", shapes, torch.float16, make)
    assert _records(tmp_path / "a" / "s.pth") == _records(tmp_path / "b" / "s.pth")


def test_round_trip_through_meta_source(hsc, tmp_path, params):
    out = tmp_path / "ckpt"
    code, text, err = hsc("random-checkpoint", "--shape", params, "--shards", 2, "--layers", 2, "--seed", 5,
                          "-o", out, "--tokenizer", TOKENIZER)
    assert code == 0, err
    assert "wrote" in text and "2 shard(s)" in text
    assert sorted(p.name for p in out.iterdir()) == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth",
                                                     "params.json", "tokenizer.model"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]
    params_out = json.loads((out / "params.json").read_text())
    assert params_out["vocab_size"] == -1 and params_out["n_layers"] == 2 and params_out["n_kv_heads"] == 2
    assert (out / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()

    args = ModelArgs(**{**vars(TINY), "n_layers": 2, "vocab_size": 32000})
    shapes = rank_shapes(args, 2)
    shard0 = torch.load(out / "consolidated.00.pth", weights_only=True)  # a plain torch.load (CRCs checked)
    assert list(shard0) == [*shapes, "rope.freqs"]  # Meta's order: embeddings, norm, output, layers
    assert shard0["tok_embeddings.weight"].shape == (32000, 32)  # LLaMA-1/2: split on the embedding dim
    assert shard0["layers.1.feed_forward.w2.weight"].shape == (64, 96)
    assert all(t.dtype == torch.float16 for t in shard0.values())

    with MetaSource(out) as src:  # also checks checklist.chk's MD5s
        assert src.args == args
        full = {**src.global_tensors(), **{f"layers.{i}.{n}": t for i in range(2)
                                            for n, t in src.layer_tensors(i).items()}}
    want = {**global_shapes(args), **{f"layers.{i}.{n}": s for i in range(2) for n, s in layer_shapes(args).items()}}
    assert {n: tuple(t.shape) for n, t in full.items()} == want
    for name, t in full.items():
        base = name.split(".", 2)[2] if name.startswith("layers.") else name
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
            continue
        # Each rank's slice is its own seeded draw, N(0, 1/fan_in) with the whole tensor's fan_in.
        fan_in = want[name][-1]
        slices = [random_slice(name, fan_in, shapes[name], 5, r, torch.float16) for r in range(2)]
        assert torch.equal(t, torch.cat(slices, dim=SHARD_AXIS[base])), name
        assert abs(t.float().std().item() * math.sqrt(fan_in) - 1) < 0.05, name
    assert not torch.equal(full["layers.0.attention.wq.weight"], full["layers.1.attention.wq.weight"])


def test_hf_layout_round_trip_through_hf_source(hsc, tmp_path, params):
    """--layout hf: config.json, safetensors files + index, tokenizer files; HFSource reads it back, each
    tensor its seeded draw (q/k un-permuted: a fixed row order of the same draw)."""
    from toolchain.hf_source import HFSource, unpermute_rope_rows

    out = tmp_path / "hf"
    code, text, err = hsc("random-checkpoint", "--layout", "hf", "--shape", params, "--shards", 3, "--layers", 2,
                          "--seed", 5, "-o", out, "--tokenizer", TOKENIZER)
    assert code == 0, err
    assert "wrote" in text and "3 file(s)" in text
    files = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json", *files])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    args = ModelArgs(**{**vars(TINY), "n_layers": 2, "vocab_size": 32000})
    with HFSource(out) as src:
        assert (src.args.dim, src.args.n_layers, src.args.kv_heads, src.args.ffn_dim, src.args.vocab_size) == \
            (args.dim, 2, 2, args.ffn_dim, 32000)
        assert src.tokenizer.add_bos is True and not src.tied
        layer = src.layer_tensors(1)
        glob = src.global_tensors()
    shapes = layer_shapes(args)
    wq = random_slice("layers.1.attention.wq.weight", 64, shapes["attention.wq.weight"], 5, 0, torch.float16)
    assert torch.equal(layer["attention.wq.weight"], unpermute_rope_rows(wq, 4))
    w2 = random_slice("layers.1.feed_forward.w2.weight", args.ffn_dim, shapes["feed_forward.w2.weight"], 5, 0, torch.float16)
    assert torch.equal(layer["feed_forward.w2.weight"], w2)
    assert torch.equal(glob["norm.weight"], torch.ones(64, dtype=torch.float16))
    assert glob["output.weight"].shape == (32000, 64)


def test_refusals_leave_nothing(hsc, tmp_path, params, monkeypatch):
    out = tmp_path / "ckpt"
    with monkeypatch.context() as m:  # a disk without room is found out before anything is written
        m.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
        code, _, err = hsc("random-checkpoint", "--shape", params, "-o", out, "--tokenizer", TOKENIZER)
        assert code == 1 and "0.0 GB free, the checkpoint needs" in err
    code, _, err = hsc("random-checkpoint", "--shape", params, "--shards", 3, "-o", out, "--tokenizer", TOKENIZER)
    assert code == 1 and "--shards 3" in err and "heads" in err  # 4 heads do not split 3 ways
    code, _, err = hsc("random-checkpoint", "--shape", "smollm2-135m", "-o", out, "--tokenizer", TOKENIZER)
    assert code == 1 and "smollm2-135m" in err
    code, _, err = hsc("random-checkpoint", "--shape", params, "--layers", 9, "-o", out, "--tokenizer", TOKENIZER)
    assert code == 1 and "--layers 9" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-params.json"]
    out.mkdir()
    code, _, err = hsc("random-checkpoint", "--shape", params, "-o", out, "--tokenizer", TOKENIZER)
    assert code == 1 and "already exists" in err
    code, _, err = hsc("random-checkpoint", "--shape", params, "--layers", 1, "-o", out, "--tokenizer", TOKENIZER,
                       "--force", "--no-checklist")
    assert code == 0, err
    assert not (out / "checklist.chk").exists() and (out / "consolidated.00.pth").is_file()
