"""`hsc run`: load an artifact, score HellaSwag, write results.json and samples.jsonl."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from runtime import distributed
from runtime.artifact import load_manifest, load_tokenizer, manifest_sha256
from runtime.errors import HscError
from runtime.hellaswag import load_items
from runtime.packed import FLAT_NEEDS_COMPILE, PackedScorer
from runtime.scoring import (build_requests, compute_scores, nonfinite_items, predictions, request_tokens,
                             score_reference)


@dataclass(frozen=True)
class RunConfig:
    artifact: Path
    data: str | None = None  # file, "datasets", or None: the shared validation file, else datasets
    limit: int | None = None  # score items [0, limit)
    output: Path | None = None  # default: results/<artifact name>
    bos: bool | None = None  # None: the tokenizer's own convention, from the manifest
    device: str = "auto"
    batch_tokens: int = 16384  # tokens per forward, padding included
    engine: str = "packed"  # "packed": shared context, fixed shapes; "reference": one forward per ending
    compile: bool | None = None  # torch.compile (+ CUDA graphs on GPUs); None: on CUDA only
    row_len: int | None = None  # packed rows; None: from the data and batch_tokens (PackedScorer)
    exclude_calibration: bool = False  # leave out the items a quantized artifact was calibrated on
    layout: str | None = None  # packed: "rows" or "flat"; None: runtime.packed.default_layout


# An engine, as run() drives it: prepare(requests, replica=(rank, count)) -> (work, positions of the items
# this data-parallel replica scores); warmup(work); tokens(work) -> tokens it computes; score(work,
# progress) -> log-likelihoods of those items' requests, 4 per item, in their order. A replica given no
# work idles (a short --limit on several replicas).


class ReferenceEngine:
    """lm-eval's loop: one forward per request (right-padded batches of similar length); a replica
    scores every count-th item."""

    layout = None
    batch_shape = None

    def __init__(self, model, cfg: RunConfig, device):
        self.model, self.cfg, self.device = model, cfg, device

    def prepare(self, requests, replica=(0, 1)):
        rank, count = replica
        mine = list(range(rank, len(requests) // 4, count))
        return [r for i in mine for r in requests[4 * i: 4 * i + 4]], mine

    def warmup(self, requests):
        if requests:
            score_reference(self.model, requests[:4], self.device, self.cfg.batch_tokens)

    def tokens(self, requests) -> int:
        return sum(len(request_tokens(r, self.model.args.max_seq_len)[0]) for r in requests)

    def score(self, requests, progress=None):
        return score_reference(self.model, requests, self.device, self.cfg.batch_tokens, progress=progress)


class PackedEngine:
    """The packed scorer (runtime/packed.py); a replica scores every count-th row of the whole set's
    packing, so it runs exactly the rows that one GPU runs, as many to a batch."""

    def __init__(self, scorer: PackedScorer):
        self.scorer, self.layout, self.batch_shape = scorer, scorer.layout, None
        self.held: list[int] = []  # positions of the items the prepared batches score

    def prepare(self, requests, replica=(0, 1)):
        batches = self.scorer.prepare(requests, replica=replica)
        if batches is None:
            return None, []
        self.batch_shape = list(batches.shape)  # [rows, row length, targets]
        self.held = batches.items_held()
        return batches, self.held

    def warmup(self, batches):
        if batches is not None:
            self.scorer.warmup(batches)

    def tokens(self, batches) -> int:
        return sum(batches.real_tokens) if batches is not None else 0

    def score(self, batches, progress=None):
        if batches is None:
            return []
        logliks = self.scorer.score(batches, progress=progress)
        return [logliks[4 * i + j] for i in self.held for j in range(4)]


def make_engine(model, cfg: RunConfig, device):
    if cfg.engine == "reference":
        return ReferenceEngine(model, cfg, device)
    if cfg.engine != "packed":
        raise HscError(f"--engine {cfg.engine}: choose packed or reference")
    compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    if cfg.layout == "flat" and not compile:
        raise HscError(FLAT_NEEDS_COMPILE)
    try:
        return PackedEngine(PackedScorer(model, device, cfg.row_len, cfg.batch_tokens, compile=compile,
                                         layout=cfg.layout))
    except ValueError as e:  # a row length the layout cannot use
        raise HscError(f"--row-len {cfg.row_len}: {e}") from None


def configure_backends(dtype: torch.dtype) -> None:
    """TF32 only where it is exact: in a bf16/fp16 model the one fp32 matmul is the LM head, whose
    operands are bf16/fp16 values (exactly representable in TF32) accumulated in fp32. An fp32
    model keeps full fp32 matmuls."""
    torch.backends.cuda.matmul.allow_tf32 = dtype != torch.float32


def calibrated_among_scored(calibration: dict | None, data_source: str) -> set[int] | None:
    """Indices of scored items that the artifact was calibrated on. hsc run scores validation items, by
    their index in the split: calibration on the same source or on validation items names them by the
    same index; calibration on the train or test split shares none. None: not quantized, or calibrated
    on a file whose split is unknown and which is not the scored one."""
    if not calibration:
        return None
    split = calibration.get("split")
    if calibration.get("source") == data_source or split == "validation":
        return set(calibration.get("item_ids", []))
    return set() if split in ("train", "test") else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(out: Path, results: dict, items, requests, logliks, preds, preds_norm) -> None:
    """results.json and samples.jsonl (one line per item, in item order)."""
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


def run(cfg: RunConfig, command: str, echo=print) -> dict:
    t_start = time.perf_counter()
    manifest = load_manifest(cfg.artifact)
    # One process per rank of the plan (TP x DP, runtime/distributed.py): the launch and the machine
    # are checked against the plan before any weight is read.
    d = distributed.setup(manifest, cfg.device, artifact=cfg.artifact)
    device = d.device
    items, data_source = load_items(cfg.data)
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise HscError(f"--limit {cfg.limit}: must be at least 1")
        items = items[: cfg.limit]
    # Quantized artifacts were calibrated on HellaSwag items (ids in the manifest): count how many of
    # the scored items were among them, or leave them out.
    calib_ids = calibrated_among_scored(manifest.calibration, data_source)
    calibration_overlap = None if calib_ids is None else sum(it.index in calib_ids for it in items)
    if cfg.exclude_calibration and manifest.calibration and calib_ids is None:
        raise HscError(f"{cfg.artifact}: calibrated on {manifest.calibration.get('source')} (split unknown), so "
                       f"which items of {data_source} it saw cannot be told; --exclude-calibration cannot work")
    if cfg.exclude_calibration and calib_ids:
        items = [it for it in items if it.index not in calib_ids]
        if not items:
            raise HscError(f"{cfg.artifact}: every selected item was a calibration item; nothing left to score")
    tok = load_tokenizer(cfg.artifact, manifest)
    add_bos = manifest.tokenizer.add_bos if cfg.bos is None else cfg.bos
    requests = build_requests(items, tok, add_bos)
    t_tokenized = time.perf_counter()

    model = distributed.build_rank_model(d, cfg.artifact, manifest)  # rank{tp_rank}.safetensors only
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distributed.barrier(d)  # every clock is read on rank 0 once all ranks got there
    t_loaded = time.perf_counter()

    configure_backends(model.output.weight.dtype)
    engine = make_engine(model, cfg, device)
    # Data parallel: each replica takes its share of the work (the ranks of a tensor-parallel group the
    # same share, so they run identical batches). Packed: every dp-th row of the whole set's packing, so
    # the replicas run exactly the rows one GPU would; the reference loop: every dp-th item.
    # Packing and gather indices are made here, before any clock that counts.
    prepared, mine = engine.prepare(requests, replica=(d.dp_rank, d.dp))
    t_prepared = time.perf_counter()
    # Warm-up: compilation, CUDA-graph capture, kernel selection, allocator growth.
    engine.warmup(prepared)
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier(d)
    t_warm = time.perf_counter()

    n_tokens = engine.tokens(prepared)
    with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="scoring",
              disable=None if d.is_writer else True) as bar:
        logliks = engine.score(prepared, progress=bar.update)
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier(d)
    t_scored = time.perf_counter()
    requests = [r for i in mine for r in requests[4 * i: 4 * i + 4]]
    # The writer (global rank 0) collects every replica's requests and log-likelihoods in item order.
    gathered = distributed.gather_replicas(d, items, mine, requests, logliks, n_tokens)
    if gathered is None:  # not the writer: only rank 0 prints and writes
        distributed.teardown(d)
        return {}
    items, requests, logliks, n_tokens = gathered
    bad = nonfinite_items(items, logliks)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise HscError(f"{cfg.artifact}: non-finite log-likelihoods (NaN or inf) for {len(bad)} of {len(items)} "
                       f"items ({shown}): the weights or the computation are broken; no results written")

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
        "calibration_overlap": calibration_overlap,  # scored-or-excluded items the artifact was calibrated on
        "calibration_split": manifest.calibration.get("split") if manifest.calibration else None,
        "calibration_excluded": bool(cfg.exclude_calibration and calibration_overlap),
        "join_mismatch_requests": sum(r.join_mismatch for r in requests),
        "tokens_forwarded": n_tokens,
        "engine": cfg.engine,
        "batch_shape": engine.batch_shape,  # packed: [rows, row length, targets]
        "layout": engine.layout,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": manifest.precision,
        "world_size": d.world_size, "tp": d.tp, "dp": d.dp, "backend": d.backend,
        "model": manifest.model_name,
        "artifact": str(Path(cfg.artifact).resolve()),
        "manifest_sha256": manifest_sha256(cfg.artifact),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "timings": {
            "tokenize_s": round(t_tokenized - t_start, 3),
            "load_s": round(t_loaded - t_tokenized, 3),
            "prepare_s": round(t_prepared - t_loaded, 3),
            "warmup_s": round(t_warm - t_prepared, 3),
            "scoring_s": round(t_scored - t_warm, 3),
            "total_s": round(t_scored - t_start, 3),
        },
        "command": command,
    }
    out = Path(cfg.output) if cfg.output else Path("results") / Path(cfg.artifact).resolve().name
    write_outputs(out, results, items, requests, logliks, preds, preds_norm)

    t = results["timings"]
    echo(f"hellaswag validation, n={scores.n}, {manifest.model_name} {manifest.precision} on {results['device']}, "
         f"BOS {'on' if add_bos else 'off'}")
    echo(f"  acc      = {100 * scores.acc:.2f} ± {100 * scores.acc_stderr:.2f}")
    echo(f"  acc_norm = {100 * scores.acc_norm:.2f} ± {100 * scores.acc_norm_stderr:.2f}  (lm-eval: per character)")
    echo(f"  time: load {t['load_s']:.1f} s, prepare {t['prepare_s']:.1f} s, warm-up {t['warmup_s']:.1f} s, scoring {t['scoring_s']:.1f} s "
         f"({n_tokens / max(t['scoring_s'], 1e-9):,.0f} tok/s), total {t['total_s']:.1f} s")
    echo(f"  wrote {out / 'results.json'} and {out / 'samples.jsonl'}")
    distributed.teardown(d)
    return results
