"""`hsc run`: load an artifact, score HellaSwag, write results.json and samples.jsonl."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from runtime.artifact import build_model, load_manifest, load_tokenizer, manifest_sha256
from runtime.errors import HscError
from runtime.hellaswag import load_items
from runtime.scoring import build_requests, compute_scores, predictions, request_tokens, score_reference


@dataclass(frozen=True)
class RunConfig:
    artifact: Path
    data: str | None = None  # file, "datasets", or None: the shared validation file, else datasets
    limit: int | None = None  # score items [0, limit)
    output: Path | None = None  # default: results/<artifact name>
    bos: bool | None = None  # None: the tokenizer's own convention, from the manifest
    device: str = "auto"
    batch_tokens: int = 16384  # tokens per forward (padding included) in the reference path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HscError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def score_requests(model, requests, cfg: RunConfig, device, progress=None) -> list[float]:
    """The scoring engine: summed continuation log-likelihood per request, in request order."""
    return score_reference(model, requests, device, cfg.batch_tokens, progress=progress)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(cfg: RunConfig, command: str, echo=print) -> dict:
    t_start = time.perf_counter()
    manifest = load_manifest(cfg.artifact)
    if manifest.mapping.world_size > 1:
        raise HscError(f"{cfg.artifact}: plan {manifest.mapping} needs {manifest.mapping.world_size} "
                       "processes; tensor-parallel execution is not implemented yet")
    device = pick_device(cfg.device)
    items, data_source = load_items(cfg.data)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise HscError(f"--limit {cfg.limit}: must be at least 1")
        items = items[: cfg.limit]

    tok = load_tokenizer(cfg.artifact, manifest)
    add_bos = manifest.tokenizer.add_bos if cfg.bos is None else cfg.bos
    requests = build_requests(items, tok, add_bos)
    t_tokenized = time.perf_counter()

    model = build_model(cfg.artifact, manifest, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_loaded = time.perf_counter()

    # Warm-up: one small batch, so kernel selection and allocator growth stay out of scoring time.
    score_requests(model, requests[:4], cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_warm = time.perf_counter()

    n_tokens = sum(len(request_tokens(r, model.args.max_seq_len)[0]) for r in requests)
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="scoring", disable=None) as bar:
        logliks = score_requests(model, requests, cfg, device, progress=bar.update)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_scored = time.perf_counter()

    preds, preds_norm = predictions(items, logliks)
    scores = compute_scores(items, preds, preds_norm)
    results = {
        **asdict(scores),
        "task": "hellaswag",
        "split": "validation",
        "normalization": "acc_norm = argmax loglik / len(ending chars, no leading space) (lm-eval)",
        "bos": add_bos,
        "bos_policy": "tokenizer default" if cfg.bos is None else "command line",
        "data": data_source,
        "limit": cfg.limit,
        "join_mismatch_requests": sum(r.join_mismatch for r in requests),
        "tokens_forwarded": n_tokens,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": manifest.precision,
        "model": manifest.model_name,
        "artifact": str(Path(cfg.artifact).resolve()),
        "manifest_sha256": manifest_sha256(cfg.artifact),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "timings": {
            "tokenize_s": round(t_tokenized - t_start, 3),
            "load_s": round(t_loaded - t_tokenized, 3),
            "warmup_s": round(t_warm - t_loaded, 3),
            "scoring_s": round(t_scored - t_warm, 3),
            "total_s": round(t_scored - t_start, 3),
        },
        "command": command,
    }
    out = Path(cfg.output) if cfg.output else Path("results") / Path(cfg.artifact).resolve().name
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    lines = []
    for k, item in enumerate(items):
        reqs = requests[4 * k: 4 * k + 4]
        lines.append(json.dumps({
            "index": item.index, "label": item.label, "loglik": logliks[4 * k: 4 * k + 4],
            "cont_chars": [len(e) for e in item.endings], "cont_tokens": [len(r.continuation) for r in reqs],
            "pred": preds[k], "pred_norm": preds_norm[k]}))
    _write_atomic(out / "samples.jsonl", "\n".join(lines) + "\n")

    t = results["timings"]
    echo(f"hellaswag validation, n={scores.n}, {manifest.model_name} {manifest.precision} on {results['device']}, "
         f"BOS {'on' if add_bos else 'off'}")
    echo(f"  acc      = {100 * scores.acc:.2f} ± {100 * scores.acc_stderr:.2f}")
    echo(f"  acc_norm = {100 * scores.acc_norm:.2f} ± {100 * scores.acc_norm_stderr:.2f}  (lm-eval: per character)")
    echo(f"  time: load {t['load_s']:.1f} s, warm-up {t['warmup_s']:.1f} s, scoring {t['scoring_s']:.1f} s "
         f"({n_tokens / max(t['scoring_s'], 1e-9):,.0f} tok/s), total {t['total_s']:.1f} s")
    echo(f"  wrote {out / 'results.json'} and {out / 'samples.jsonl'}")
    return results
