import json
import os
import pickle

import pytest
import torch

from runtime.config import LAYER_TENSORS, ModelArgs
from runtime.errors import HscError
from tests.tiny_meta import TOKENIZER, write_checklist, write_tiny_meta_checkpoint
from toolchain.hashing import sha256_file
from toolchain.meta_source import MetaSource

# dim 64, 4 heads of 16; FFN int(2*256/3)=170 rounded up to 192.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, multiple_of=32)
GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)


def merged(src: MetaSource) -> dict[str, torch.Tensor]:
    out = dict(src.global_tensors())
    for i in range(src.args.n_layers):
        out.update({f"layers.{i}.{n}": t for n, t in src.layer_tensors(i).items()})
    return out


def assert_same(got: dict, truth: dict) -> None:
    assert set(got) == set(truth)
    for name, t in truth.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t), name


def open_error(path, **kw) -> str:
    with pytest.raises(HscError) as e:
        MetaSource(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("args", [ARGS, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_merge_equals_ground_truth(tmp_path, args, n_shards):
    truth = write_tiny_meta_checkpoint(tmp_path / "tiny", args, n_shards, seed=n_shards)
    with MetaSource(tmp_path / "tiny") as src:
        assert src.source_format == "meta" and src.model_name == "tiny"
        assert src.args == ModelArgs(**{**vars(args), "vocab_size": 32000})  # -1 resolved
        assert set(src.layer_tensors(0)) == set(LAYER_TENSORS)
        assert_same(merged(src), truth)
        tok = src.tokenizer
        assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == ("sentencepiece", 1, 2, True, 32000)
        assert tok.data == TOKENIZER.read_bytes()
        files = ["params.json", "tokenizer.model"] + [f"consolidated.{k:02d}.pth" for k in range(n_shards)]
        assert src.source_digests == {f: sha256_file(tmp_path / "tiny" / f) for f in files}


@pytest.mark.parametrize("n_shards", [2, 4])
def test_llama3_embedding_split_on_vocab(tmp_path, n_shards):
    truth = write_tiny_meta_checkpoint(tmp_path, GQA, n_shards, seed=7, embed_split_dim=0, dtype=torch.bfloat16)
    shard0 = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert shard0["tok_embeddings.weight"].shape == (32000 // n_shards, 64)
    with MetaSource(tmp_path) as src:
        assert_same(merged(src), truth)


def test_explicit_vocab_size_and_no_checklist(tmp_path):
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32, vocab_size=32000, rope_theta=500000.0)
    truth = write_tiny_meta_checkpoint(tmp_path, args, 2, seed=1, with_checklist=False)
    with MetaSource(tmp_path) as src:
        assert src.args.vocab_size == 32000 and src.args.rope_theta == 500000.0
        assert_same(merged(src), truth)


def test_vocab_size_disagreeing_with_tokenizer(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0, with_checklist=False)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": 32016}))
    msg = open_error(tmp_path)
    assert "params.json" in msg and "32016" in msg and "32000" in msg


def test_tokenizer_in_parent_dir_llama1_layout(tmp_path):
    truth = write_tiny_meta_checkpoint(tmp_path / "7B", ARGS, 1, seed=0)
    (tmp_path / "7B" / "tokenizer.model").rename(tmp_path / "tokenizer.model")
    with MetaSource(tmp_path / "7B") as src:
        assert src.tokenizer.vocab_size == 32000 and "tokenizer.model" in src.source_digests
        assert_same(merged(src), truth)


def test_missing_tokenizer_names_dir_and_explicit_path_works(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_tiny_meta_checkpoint(ckpt, ARGS, 1, seed=0)
    (ckpt / "tokenizer.model").rename(tmp_path / "elsewhere.model")
    msg = open_error(ckpt)
    assert str(ckpt) in msg and "tokenizer.model" in msg
    with MetaSource(ckpt, tokenizer_path=tmp_path / "elsewhere.model") as src:
        assert src.tokenizer.vocab_size == 32000


def test_missing_params_json(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0)
    (tmp_path / "params.json").unlink()
    assert str(tmp_path / "params.json") in open_error(tmp_path)


def test_truncated_shard(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 2, seed=0, with_checklist=False)
    shard = tmp_path / "consolidated.01.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = open_error(tmp_path)
    assert msg.startswith(f"{shard}: truncated or corrupt")


def test_empty_shard(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0, with_checklist=False)
    (tmp_path / "consolidated.00.pth").write_bytes(b"")
    assert open_error(tmp_path).startswith(f"{tmp_path / 'consolidated.00.pth'}: truncated or corrupt")


class RunsCode:
    """Unpickling this calls os.system: exactly what weights_only must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 2, seed=0, with_checklist=False)
    marker = tmp_path / "pwned"
    shard = tmp_path / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    torch.save({**sd, "rope.freqs": RunsCode(marker)}, shard)  # a real zip-format checkpoint
    msg = open_error(tmp_path)
    assert msg.startswith(f"{shard}: refused by weights_only") and "system" in msg
    assert not marker.exists()


def test_legacy_pickle_format_is_refused_without_unpickling(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0, with_checklist=False)
    marker = tmp_path / "pwned"
    shard = tmp_path / "consolidated.00.pth"
    shard.write_bytes(pickle.dumps({"x": RunsCode(marker)}, protocol=2))
    msg = open_error(tmp_path)
    assert msg.startswith(f"{shard}: legacy")
    assert not marker.exists()


def test_shards_with_mismatched_shapes(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 2, seed=0, with_checklist=False)
    shard = tmp_path / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    sd["layers.1.attention.wq.weight"] = torch.zeros(16, 64)  # shard 0 holds (32, 64)
    torch.save(sd, shard)
    msg = open_error(tmp_path)
    assert msg.startswith(f"{shard}: layers.1.attention.wq.weight is (16, 64) float32")
    assert "consolidated.00.pth has (32, 64)" in msg


def test_merged_shape_disagreeing_with_params(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 2, seed=0, with_checklist=False)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 2}))  # weights are MHA
    msg = open_error(tmp_path)
    assert "consolidated.00.pth" in msg and "layers.0.attention.wk.weight has shape (64, 64)" in msg
    assert "expected (32, 64)" in msg


@pytest.mark.parametrize("edit,problem", [
    (lambda sd: sd.pop("layers.0.feed_forward.w2.weight"), "missing tensor layers.0.feed_forward.w2.weight"),
    (lambda sd: sd.update({"layers.2.attention.wq.weight": torch.zeros(1)}), "unexpected key 'layers.2.attention.wq.weight' (params.json: n_layers=2)"),
    (lambda sd: sd.pop("rope.freqs"), None),  # not a weight: may be absent
])
def test_missing_and_unexpected_keys(tmp_path, edit, problem):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 2, seed=0, with_checklist=False)
    shard = tmp_path / "consolidated.01.pth"
    sd = torch.load(shard, weights_only=True)
    edit(sd)
    torch.save(sd, shard)
    if problem is None:
        MetaSource(tmp_path).close()
    else:
        assert open_error(tmp_path) == f"{shard}: {problem}"


def test_checklist_md5_mismatch_names_the_file(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 2, seed=0)
    shard = tmp_path / "consolidated.01.pth"
    data = bytearray(shard.read_bytes())
    data[-len(data) // 3] ^= 0xFF  # flip a byte: still loads, but is not what was published
    shard.write_bytes(bytes(data))
    msg = open_error(tmp_path)
    assert msg.startswith(f"{shard}: MD5") and "checklist.chk" in msg


def test_malformed_checklist(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0)
    (tmp_path / "checklist.chk").write_text("not-an-md5  params.json\n")
    assert open_error(tmp_path).startswith(f"{tmp_path / 'checklist.chk'}: line 1")


def test_checklist_listing_absent_file_is_ignored(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0, with_checklist=False)
    write_checklist(tmp_path, ["params.json", "consolidated.00.pth"])
    with (tmp_path / "checklist.chk").open("a") as f:
        f.write("0" * 32 + "  tokenizer_checklist.chk\n")
    MetaSource(tmp_path).close()


def test_missing_shard_number(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 4, seed=0)
    (tmp_path / "consolidated.01.pth").unlink()
    msg = open_error(tmp_path)
    assert msg.startswith(f"{tmp_path / 'consolidated.01.pth'}: missing") and "consolidated.03.pth" in msg


def test_no_shards(tmp_path):
    write_tiny_meta_checkpoint(tmp_path, ARGS, 1, seed=0)
    (tmp_path / "consolidated.00.pth").unlink()
    assert open_error(tmp_path).startswith(f"{tmp_path}: no consolidated")


def _mapped(path) -> list[str]:
    """Lines of /proc/self/maps that map a file under `path`."""
    return [line for line in open("/proc/self/maps") if str(path) in line]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_reads_leave_no_shard_mapped(tmp_path):
    """Pages read through a mapping stay in the process while it lives: a reader that kept its shards
    mapped would grow to the checkpoint's size over a compile. Every read opens the shards, copies out
    and unmaps them; the tensors it returned stay valid."""
    truth = write_tiny_meta_checkpoint(tmp_path / "ckpt", ARGS, 4, seed=3)
    with MetaSource(tmp_path / "ckpt") as src:
        assert _mapped(tmp_path / "ckpt") == []  # the layout check's mappings are gone too
        got = {}
        for i in range(ARGS.n_layers):
            got.update({f"layers.{i}.{n}": t for n, t in src.layer_tensors(i).items()})
            assert _mapped(tmp_path / "ckpt") == [], f"layer {i}"
        got.update(src.global_tensors())
        assert _mapped(tmp_path / "ckpt") == []
    assert_same(got, truth)  # replicated norms included: copies, not views of an unmapped shard
