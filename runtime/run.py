"""`hsc run`: load an artifact, score HellaSwag, write results.json and samples.jsonl."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from runtime import compile_cache, distributed, outputs
from runtime.artifact import load_manifest, load_tokenizer, manifest_sha256, verify_artifact
from runtime.errors import HscError, Interrupted
from runtime.hellaswag import load_items
from runtime.journal import JOURNAL_DIR, journal_path, open_journal
from runtime.packed import FLAT_NEEDS_COMPILE, PackedScorer
from runtime.progress import Progress
from runtime.scoring import (build_requests, compute_scores, drop_overlong, nonfinite_items, predictions,
                             request_tokens, score_reference, scored_tokens)


@dataclass(frozen=True)
class RunConfig:
    artifact: Path
    data: str | None = None  # file, "datasets", or None: the shared validation file (an error if none is found)
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
    resume: bool = False  # continue the journalled run in `output` (runtime/journal.py)
    overwrite: bool = False  # replace an earlier run's results (or journal) in `output`
    verify: bool = False  # hash every file again, whatever the verification records say


# An engine, as run() drives it: prepare(requests, replica=(rank, count)) -> (work, positions of the items
# this data-parallel replica scores); warmup(work); tokens(work) -> tokens it computes; fingerprint(work)
# -> a digest of how the work is cut into batches (the journal's key); score(work, progress, done,
# on_batch) -> (log-likelihoods, is-greedy flags) of those items' requests, 4 per item, in their order,
# skipping the batches in `done` and reporting each new batch to on_batch. A replica given no work
# idles (a short --limit on several replicas).


class ReferenceEngine:
    """lm-eval's loop: one forward per request (right-padded batches of similar length); a replica
    scores every count-th item."""

    layout = None
    batch_shape = None
    compiled = False

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

    def fingerprint(self, requests) -> str:
        return _digest([(r.context, r.continuation) for r in requests])

    def score(self, requests, progress=None, done=None, on_batch=None):
        results, keep = _collect(done, on_batch)
        logliks = score_reference(self.model, requests, self.device, self.cfg.batch_tokens, progress=progress,
                                  done=done, on_batch=keep)
        return logliks, _greedy_of(results, range(len(requests)))


class PackedEngine:
    """The packed scorer (runtime/packed.py); a replica scores every count-th row of the whole set's
    packing, so it runs exactly the rows that one GPU runs, as many to a batch."""

    def __init__(self, scorer: PackedScorer):
        self.scorer, self.layout, self.batch_shape = scorer, scorer.layout, None
        self.compiled = scorer.compiled
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

    def fingerprint(self, batches) -> str | None:
        if batches is None:
            return None
        packing = hashlib.sha256(batches.target_request.numpy().tobytes()).hexdigest()
        return _digest([list(batches.shape), batches.real_tokens, packing])

    def score(self, batches, progress=None, done=None, on_batch=None):
        if batches is None:
            return [], []
        results, keep = _collect(done, on_batch)
        logliks = self.scorer.score(batches, progress=progress, done=done, on_batch=keep)
        order = [4 * i + j for i in self.held for j in range(4)]
        return [logliks[k] for k in order], _greedy_of(results, order)


def _collect(done, on_batch):
    """Every batch's (requests, logliks, greedy), those done before and those scored now (which are
    passed on to on_batch)."""
    results = dict(done or {})

    def keep(b, *result):
        results[b] = result
        if on_batch is not None:
            on_batch(b, *result)

    return results, keep


def _greedy_of(results: dict, requests) -> list:
    greedy = {r: g for reqs, _, flags in results.values() for r, g in zip(reqs, flags or [])}
    return [greedy.get(r) for r in requests]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


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
                                         layout=cfg.layout, greedy=True))
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


def select_items(cfg: RunConfig, manifest) -> tuple[list, str, int | None, int]:
    """The items to score, where they come from, how many the artifact was calibrated on, and how many
    the source holds."""
    items, data_source = load_items(cfg.data)
    n_source = len(items)
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
    return items, data_source, calibration_overlap, n_source


def claim_output(d, cfg: RunConfig) -> outputs.OutputDir | None:
    """The writer takes the output directory (lock, no silent overwrite) before any weight is read;
    every rank fails the same way if it cannot."""
    out = Path(cfg.output) if cfg.output else outputs.default_output(cfg.artifact)
    held, error = None, None
    if d.is_writer:
        try:
            held = outputs.claim(out, JOURNAL_DIR, cfg.resume, cfg.overwrite)
        except HscError as e:
            error = e
    distributed.agree_on_failure(d, error)
    return held


def journal_key(cfg: RunConfig, d, engine, work, manifest_sha: str, items, add_bos: bool) -> dict:
    """Everything that decides what a replica's batches hold and what they compute."""
    data = _digest([[it.index, it.query, list(it.endings), it.label] for it in items])
    key = {"artifact": manifest_sha, "data": data, "bos": add_bos, "limit": cfg.limit,
           "exclude_calibration": cfg.exclude_calibration, "engine": cfg.engine, "layout": engine.layout,
           "compile": engine.compiled, "batch_tokens": cfg.batch_tokens, "row_len": cfg.row_len,
           "batch_shape": engine.batch_shape, "device": d.device.type, "torch": torch.__version__,
           "tp": d.tp, "replica": [d.dp_rank, d.dp], "packing": engine.fingerprint(work)}
    return json.loads(json.dumps(key))  # as read back from the file: lists, not tuples


def open_replica_journal(d, out: Path, key: dict, resume: bool):
    """This replica's journal: its tensor-parallel rank 0 reads and appends; the other ranks of the
    group get the batches to skip from it (so they run exactly the same batches)."""
    journal, error = None, None
    try:
        journal = open_journal(journal_path(out, d.dp_rank, d.dp), key, resume, write=d.tp_rank == 0)
    except HscError as e:
        error = e
    distributed.agree_on_failure(d, error)
    if d.tp > 1:
        done = [sorted(journal.done) if d.tp_rank == 0 else None]
        torch.distributed.broadcast_object_list(done, src=d.dp_rank * d.tp, group=d.tp_group)
        if d.tp_rank:
            journal.done = {b: ([], [], []) for b in done[0]}
    return journal


def score_with_progress(engine, work, n_scored: int, show: bool, journal):
    """Score, journalling each batch; progress (runtime/progress.py) on the writer only."""
    with Progress(n_scored, "scoring", "scored tok", enabled=show) as bar:
        return engine.score(work, progress=bar.update, done=journal.done, on_batch=journal.record)


def _timed(fn, *args):
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def load_and_tokenize(d, cfg: RunConfig, manifest, items, tok, add_bos: bool):
    """Tokenize on a thread while this rank's files are verified and its weights read onto the device:
    (model, requests, seconds verifying, seconds tokenizing)."""
    with ThreadPoolExecutor(1) as pool:
        tokenized = pool.submit(_timed, build_requests, items, tok, add_bos)
        t = time.perf_counter()
        error = None
        try:
            # This rank's files only; a verification record spares the hashing of unchanged files.
            verify_artifact(cfg.artifact, manifest, tp_rank=d.tp_rank, force=cfg.verify)
        except HscError as e:
            error = e
        distributed.agree_on_failure(d, error)
        verify_s = time.perf_counter() - t
        model = distributed.build_rank_model(d, cfg.artifact, manifest, verify=False)
        requests, tokenize_s = tokenized.result()
    return model, requests, verify_s, tokenize_s


def warm_up(engine, work, cfg: RunConfig, d, manifest_sha: str) -> dict | None:
    """Compile (loading what an earlier run compiled, if its key matches) and warm up. None when not
    compiled, else {"source": where the compile cache came from, or "written" when this run made it,
    and inductor's FX-graph cache hits, misses and bypasses during the warm-up}."""
    from torch._dynamo.utils import counters

    key = None
    source = None
    before = dict(counters["inductor"])
    if engine.compiled:
        key = compile_cache.cache_key(manifest_sha, d.device, {
            "layout": engine.layout, "batch_shape": engine.batch_shape, "tp": d.tp, "hsc": outputs.hsc_version()})
        source = compile_cache.load(key, cfg.artifact)
    engine.warmup(work)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    if key is None:
        return None
    if source is None and d.is_writer:
        source = "written" if compile_cache.save(key, cfg.artifact) else None
    return {"source": source, **{f"fxgraph_cache_{k}": counters["inductor"][f"fxgraph_cache_{k}"] -
                                 before.get(f"fxgraph_cache_{k}", 0) for k in ("hit", "miss", "bypass")}}


def run(cfg: RunConfig, command: str, echo=print) -> dict:
    t_start = time.perf_counter()
    start_time = time.time()
    manifest = load_manifest(cfg.artifact)
    # One process per rank of the plan (TP x DP, runtime/distributed.py): the launch and the machine
    # are checked against the plan before any weight is read.
    d = distributed.setup(manifest, cfg.device, artifact=cfg.artifact, command=command)
    held = claim_output(d, cfg)
    out = Path(cfg.output) if cfg.output else outputs.default_output(cfg.artifact)
    try:
        return _run(cfg, command, echo, manifest, d, out, t_start, start_time)
    except BaseException as e:
        scored = _journalled(out)
        if held is not None and not scored:
            held.abandon()  # nothing scored: leave no directory this run made behind
        if isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"stopped; the batches scored so far are journalled in {out / JOURNAL_DIR}: run the "
                              "same command with --resume to continue" if scored else
                              "stopped before any batch was scored") from None
        raise
    finally:
        if held is not None:
            held.release()


def _journalled(out: Path) -> bool:
    """Whether any replica's journal holds a batch (more than its header line)."""
    for path in (out / JOURNAL_DIR).glob("*.jsonl"):
        with open(path, "rb") as f:
            if f.read().count(b"\n") > 1:
                return True
    return False


def _run(cfg: RunConfig, command: str, echo, manifest, d, out: Path, t_start: float, start_time: float) -> dict:
    device = d.device
    items, data_source, calibration_overlap, n_source = select_items(cfg, manifest)
    manifest_sha = manifest_sha256(cfg.artifact)
    tok = load_tokenizer(cfg.artifact, manifest)
    add_bos = manifest.tokenizer.add_bos if cfg.bos is None else cfg.bos
    t_read = time.perf_counter()

    model, requests, verify_s, tokenize_s = load_and_tokenize(d, cfg, manifest, items, tok, add_bos)
    # lm-eval's rule for long items: a context is cut on the left to fit the model (both engines,
    # scoring.fit_request); an item with an ending that alone exceeds the context is left out, and named.
    max_len = manifest.model.max_seq_len
    items, requests, too_long = drop_overlong(items, requests, max_len)
    if not items:
        raise HscError(f"{data_source}: every selected item has an ending longer than the model's {max_len}-token "
                       "context; nothing to score")
    truncated = sum(len(r.context) + len(r.continuation) > max_len + 1 for r in requests)
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
    journal = open_replica_journal(d, out, journal_key(cfg, d, engine, prepared, manifest_sha, items, add_bos),
                                   cfg.resume)
    t_prepared = time.perf_counter()
    # Warm-up: compilation (or the compile cache), CUDA-graph capture, kernel selection, allocator growth.
    if d.is_writer and engine.compiled:
        print("hsc: compiling the scoring step (torch.compile; from the compile cache when an earlier run left one)",
              file=sys.stderr, flush=True)
    compile_cache_source = warm_up(engine, prepared, cfg, d, manifest_sha)
    distributed.barrier(d)
    t_warm = time.perf_counter()

    n_tokens = engine.tokens(prepared)
    resumed = len(journal.done)
    mine_requests = [r for i in mine for r in requests[4 * i: 4 * i + 4]]
    logliks, greedy = score_with_progress(engine, prepared, scored_tokens(mine_requests), d.is_writer, journal)
    journal.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier(d)
    t_scored = time.perf_counter()
    requests = mine_requests
    # The writer (global rank 0) collects every replica's requests and log-likelihoods in item order.
    gathered = distributed.gather_replicas(d, items, mine, requests, logliks, n_tokens)
    greedy = gather_greedy(d, mine, greedy, len(items))
    if gathered is None:  # not the writer: only rank 0 prints and writes
        distributed.teardown(d)
        return {}
    items, requests, logliks, n_tokens = gathered
    bad = nonfinite_items(items, logliks)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)  # a resumed run would score the same values
        raise HscError(f"{cfg.artifact}: non-finite log-likelihoods (NaN or inf) for {len(bad)} of {len(items)} "
                       f"items ({shown}): the weights or the computation are broken; no results written")

    preds, preds_norm = predictions(items, logliks)
    n_scored = scored_tokens(requests)
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
        "max_seq_len": max_len,
        "truncated_requests": truncated,  # contexts cut on the left to fit max_seq_len (lm-eval's rule)
        "too_long_items": too_long,  # indices of items left out: an ending alone exceeds max_seq_len
        "tokens_forwarded": n_tokens,
        "scored_tokens": n_scored,  # the throughput's unit, the same for both engines
        "scored_tokens_per_s": round(n_scored / max(t_scored - t_warm, 1e-9), 1),
        "engine": cfg.engine,
        "batch_tokens": cfg.batch_tokens,
        "batch_shape": engine.batch_shape,  # packed: [rows, row length, targets]
        "layout": engine.layout,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": manifest.precision,
        "world_size": d.world_size, "tp": d.tp, "dp": d.dp, "backend": d.backend,
        "model": manifest.model_name,
        "artifact": str(Path(cfg.artifact).resolve()),
        "manifest_sha256": manifest_sha,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "resumed_batches": resumed,  # batches of the writer's replica taken from the journal
        "compile_cache": compile_cache_source,
        "start_time": start_time,
        "environment": outputs.environment(data_source),
        "timings": {
            "read_s": round(t_read - t_start, 3),  # manifest, data, tokenizer
            "tokenize_s": round(tokenize_s, 3),  # on a thread, during verification and loading
            "verify_s": round(verify_s, 3),
            "load_s": round(t_loaded - t_read - verify_s, 3),
            "prepare_s": round(t_prepared - t_loaded, 3),
            "warmup_s": round(t_warm - t_prepared, 3),
            "scoring_s": round(t_scored - t_warm, 3),
        },
        "command": command,
    }
    write_results(out, results, items, requests, logliks, greedy, preds, preds_norm, n_source, t_start)
    report(echo, results, out)
    distributed.teardown(d)
    return results


def gather_greedy(d, mine: list[int], greedy: list, n_items: int) -> list | None:
    """The is-greedy flags of every request in item order, on the writer (as gather_replicas does the
    log-likelihoods); None elsewhere."""
    parts = distributed.gather_to_writer(d, (mine, greedy) if d.tp_rank == 0 else None)
    if parts is None:
        return None
    full: list = [None] * (4 * n_items)
    for part in filter(None, parts):
        for k, pos in enumerate(part[0]):
            full[4 * pos: 4 * pos + 4] = part[1][4 * k: 4 * k + 4]
    return full


def write_results(out: Path, results: dict, items, requests, logliks, greedy, preds, preds_norm, n_source: int,
                  t_start: float) -> None:
    """The output set (runtime/outputs.py); the journal goes once the set is in place."""
    t = time.perf_counter()
    date = outputs.date_id(datetime.datetime.fromtimestamp(results["start_time"]))
    lm_results, lm_samples = outputs.lm_eval_names(date)
    files = {outputs.SAMPLES: outputs.samples_lines(items, requests, logliks, greedy, preds, preds_norm),
             lm_samples: outputs.lm_eval_samples(items, logliks, greedy, preds, preds_norm)}
    timings = results["timings"]
    timings["write_s"] = round(time.perf_counter() - t, 3)  # building the files; the rename is not counted
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    files[lm_results] = outputs.dumps(outputs.lm_eval_results(results, n_source), indent=2) + "\n"
    outputs.write_set(out, files, results)
    shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}"


def report(echo, results: dict, out: Path) -> None:
    t = results["timings"]
    echo(f"hellaswag validation, n={results['n']}, {results['model']} {results['precision']} on {results['device']}, "
         f"BOS {'on' if results['bos'] else 'off'}")
    echo(f"  acc      = {_pct(results['acc'])} ± {_pct(results['acc_stderr'])}")
    echo(f"  acc_norm = {_pct(results['acc_norm'])} ± {_pct(results['acc_norm_stderr'])}  (lm-eval: per character)")
    echo(f"  time: verify {t['verify_s']:.1f} s, load {t['load_s']:.1f} s, prepare {t['prepare_s']:.1f} s, "
         f"warm-up {t['warmup_s']:.1f} s, scoring {t['scoring_s']:.1f} s ({results['scored_tokens_per_s']:,.0f} scored "
         f"tokens/s), "
         f"writing {t['write_s']:.1f} s, total {t['total_s']:.1f} s")
    extra = []
    if results["resumed_batches"]:
        extra.append(f"resumed: {results['resumed_batches']} batches from the journal")
    cache = results["compile_cache"]
    if cache:
        extra.append(f"compile cache: {cache['source'] or 'none'} (inductor graphs: {cache['fxgraph_cache_hit']} "
                     f"from the cache, {cache['fxgraph_cache_miss']} compiled)")
    if extra:
        echo("  " + "; ".join(extra))
    too_long, truncated = results["too_long_items"], results["truncated_requests"]
    if too_long or truncated:
        echo(f"  long items: {truncated} request(s) cut on the left to the model's {results['max_seq_len']} tokens; "
             f"{len(too_long)} item(s) left out, an ending alone longer than that"
             + (f" (indices {', '.join(map(str, too_long[:10]))}{', ...' if len(too_long) > 10 else ''})"
                if too_long else ""))
    echo(f"  wrote {out / outputs.RESULTS}, {out / outputs.SAMPLES} and lm-eval's files in {out / outputs.LM_EVAL_DIR}")
