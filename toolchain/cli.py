"""The `hsc` command: compile, run, inspect.

User errors (HscError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import sys

try:  # Ctrl-C while torch is imported: one line and 130, as at any later moment (main)
    import dataclasses
    import json
    import shlex
    import signal
    from pathlib import Path

    import click

    from runtime.bench import PRECISIONS as BENCH_PRECISIONS
    from runtime.errors import HscError, Interrupted
    from runtime.packed import LAYOUTS
    from runtime.paths import printable
    from runtime.run import RunConfig
    from toolchain.resources import summary as resources_summary
    from toolchain.targets import TARGETS
except KeyboardInterrupt:
    sys.stderr.write("hsc: interrupted\n")
    sys.exit(130)

RUN_DEFAULTS = RunConfig(artifact=Path("."))


def _command_line() -> str:
    return shlex.join(["hsc", *sys.argv[1:]])


def _echo(line: str) -> None:
    """Print a line that holds strings read from files (a model name, a path a manifest gives) with their
    control characters escaped: a terminal escape sequence in a file is shown, never acted on."""
    click.echo(printable(line))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hsc")
def cli():
    """hsc: compile LLaMA-family checkpoints and score HellaSwag with them."""


@cli.command("compile")
@click.argument("source")
@click.option("--target", required=True,
              help=f"one of: {', '.join(TARGETS)}; auto (this machine's GPUs, or the CPU); or a spec "
                   "<gpu>[-<mem>gb]x<count>, e.g. h100-80gbx2, a100-40gbx4, l40sx1, sm89-48gbx2 (docs/distributed.md)")
@click.option("--precision", default="auto", show_default=True,
              help="auto (float: bf16/fp16/fp32 per target), fp32, bf16, fp16, or quantized: fp8 (sm_89+), "
                   "int8 (sm_80+), w8 (int8 weights, any GPU and cpu)")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path),
              help="artifact directory [default: artifacts/<model>-<target>-<precision>]")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path),
              help="tokenizer.model (or a GGUF's tokenizer.json) for a Meta checkpoint that lacks one beside it, "
                   "or in place of a GGUF's embedded tokenizer")
@click.option("--tp", type=int, default=None, help="force a tensor-parallel degree (default: planned)")
@click.option("--force", is_flag=True, help="replace an existing artifact directory")
@click.option("--dry-run", is_flag=True,
              help="print the plan and the files it would write, with sizes, from the checkpoint's metadata alone "
                   "(no weight is read, nothing is written)")
@click.option("--calib-data", default=None,
              help="quantized precisions: HellaSwag items to calibrate on, as hsc run --data [default: as hsc run]")
@click.option("--calib-items", type=int, default=None, help="quantized: calibration items [default: 512]")
@click.option("--calib-seed", type=int, default=None, help="quantized: seed of the item draw [default: 0]")
@click.option("--alpha", default=None,
              help="quantized: SmoothQuant migration strength, auto (searched per layer) or 0..1 [default: auto]")
@click.option("--no-smooth", is_flag=True, help="quantized: no SmoothQuant scaling")
@click.option("--device", default=None,
              help="quantized: where calibration and quantization compute, auto, cpu, cuda, cuda:N [default: auto]")
@click.option("--check-items", type=int, default=None,
              help="quantized: held-out items on which the float and the quantized model are compared "
                   "(0: no check) [default: 256]")
@click.option("--max-drop", type=float, default=None,
              help="quantized: refuse to write the artifact if acc_norm on the check items drops by more than "
                   "X points (docs/quantization.md)")
@click.option("--fast-accum", is_flag=True,
              help="fp8: torch._scaled_mm's fast accumulation, faster with fewer accumulator bits "
                   "(docs/quantization.md)")
@click.option("--calibration-from", type=click.Path(path_type=Path), default=None,
              help="quantized: reuse the calibration statistics of an earlier quantized artifact of the same "
                   "checkpoint (no calibration pass); needs --alpha A or --no-smooth")
def compile_cmd(source, target, precision, out_dir, tokenizer_path, tp, force, dry_run, calib_data, calib_items,
                calib_seed, alpha, no_smooth, device, check_items, max_drop, fast_accum, calibration_from):
    """Compile SOURCE (a Meta or Hugging Face checkpoint directory, a .gguf file, or `smollm2`) for TARGET."""
    from runtime.quant import scheme_for
    from toolchain.compile import QuantOptions, compile_checkpoint

    quant = None
    given = (calib_data, calib_items, calib_seed, alpha, device, check_items, max_drop, calibration_from)
    if fast_accum:  # refused here for every precision but fp8, auto included (it never picks fp8)
        try:
            scheme_for(precision, fast_accum)
        except ValueError as e:
            raise HscError(str(e)) from None
    if any(v is not None for v in given) or no_smooth or precision in ("fp8", "int8", "w8"):
        if calib_items is not None and calib_items < 1:
            raise HscError(f"--calib-items {calib_items}: must be at least 1")
        if alpha is not None and alpha != "auto":
            try:
                alpha_v = float(alpha)
            except ValueError:
                alpha_v = -1.0
            if not 0.0 <= alpha_v <= 1.0:
                raise HscError(f"--alpha {alpha}: choose auto or a number in [0, 1]")
            alpha = alpha_v
        if no_smooth and alpha is not None:
            raise HscError("--alpha and --no-smooth exclude each other")
        if calibration_from is not None and (calib_items is not None or calib_seed is not None):
            raise HscError(f"--calibration-from {calibration_from} reuses that artifact's calibration items and "
                           "seed; leave out --calib-items and --calib-seed")
        d = QuantOptions()
        quant = QuantOptions(calib_data=calib_data, calib_items=d.calib_items if calib_items is None else calib_items,
                             calib_seed=d.calib_seed if calib_seed is None else calib_seed,
                             alpha=d.alpha if alpha is None else alpha, smooth=not no_smooth,
                             device=d.device if device is None else device,
                             check_items=d.check_items if check_items is None else check_items, max_drop=max_drop,
                             fast_accum=fast_accum, calibration_from=calibration_from)
    manifest, path = compile_checkpoint(source, target, precision, out_dir, _command_line(),
                                        tokenizer_path=tokenizer_path, tp=tp, force=force, log=_echo,
                                        quant=quant, dry_run=dry_run)
    if manifest is None:  # --dry-run: planned_files said it all
        return
    total = sum(s.bytes for s in manifest.shards)
    _echo(f"wrote {path} ({len(manifest.shards)} shard(s), {total / 1e9:.2f} GB)")
    _echo(f"compile: {resources_summary(manifest.resources)}")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", default=RUN_DEFAULTS.data,
              help="HellaSwag file (official jsonl, lm-eval jsonl, 6-line .txt[.bz2]) or `datasets` "
                   "[default: shared/data/hellaswag_val_full.txt.bz2 in or beside the working directory or a folder above]")
@click.option("--limit", type=int, default=RUN_DEFAULTS.limit, help="score only the first N items")
@click.option("--output", type=click.Path(path_type=Path), default=RUN_DEFAULTS.output,
              help="directory for results.json, samples.jsonl and lm-eval's files; an earlier run's results there "
                   "are never replaced without --overwrite [default: results/<artifact>]")
@click.option("--bos/--no-bos", default=RUN_DEFAULTS.bos, help="override the tokenizer's BOS convention")
@click.option("--device", default=RUN_DEFAULTS.device, show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--batch-tokens", type=int, default=RUN_DEFAULTS.batch_tokens, show_default=True,
              help="tokens per forward pass, padding included")
@click.option("--engine", type=click.Choice(["packed", "reference"]), default=RUN_DEFAULTS.engine,
              show_default=True, help="packed: shared context, fixed shapes; reference: lm-eval's loop")
@click.option("--compile/--no-compile", "compile_", default=RUN_DEFAULTS.compile,
              help="torch.compile + CUDA graphs [default: on for CUDA]")
@click.option("--row-len", type=int, default=RUN_DEFAULTS.row_len,
              help="packed row length; flat: the longest tree, a multiple of 128 [default: rows, from the data "
                   "and --batch-tokens; flat, 8064 or less]")
@click.option("--layout", type=click.Choice(LAYOUTS), default=RUN_DEFAULTS.layout,
              help="packed batches: rows (trees in short rows, dense masks) or flat (one long tree per row, "
                   "FlexAttention) [default: flat on CUDA with --compile, else rows]")
@click.option("--nproc", type=int, default=None,
              help="run as N processes on this machine under torchrun (N = the plan's TP x DP; docs/distributed.md)")
@click.option("--exclude-calibration", is_flag=True,
              help="quantized artifacts: leave out the items the compiler calibrated on (ids from the manifest)")
@click.option("--resume", is_flag=True,
              help="continue the interrupted run journalled in --output (same settings), scoring only what is left")
@click.option("--overwrite", is_flag=True, help="replace the results (or journal) of an earlier run in --output")
@click.option("--verify", is_flag=True,
              help="hash every file of the artifact again, even those verified before and unchanged since")
def run_cmd(artifact, data, limit, output, bos, device, batch_tokens, engine, compile_, row_len, layout, nproc,
            exclude_calibration, resume, overwrite, verify):
    """Score HellaSwag with a compiled ARTIFACT; print acc and acc_norm with standard errors."""
    from runtime.run import run

    if nproc is not None:  # re-launch this same command under torchrun, without --nproc
        from runtime.distributed import launch

        rc = launch(artifact, nproc, sys.argv[1:])
        if rc is not None:
            if rc:
                raise HscError(f"{artifact}: the {nproc}-process run failed (torchrun exit status {rc}); "
                               "the failing rank's error is above")
            return

    run(RunConfig(artifact, data, limit, output, bos, device, batch_tokens, engine, compile_, row_len,
                  exclude_calibration, layout, resume, overwrite, verify),
        _command_line(), echo=_echo)


@cli.command("bench")
@click.option("--shape", type=click.Choice(["llama-30b", "llama-7b", "smollm2-135m"]), default="llama-30b",
              show_default=True)
@click.option("--precision", type=click.Choice(BENCH_PRECISIONS), default="bf16",
              show_default=True, help="fp8/int8/w8: the seven block linears quantized, the rest bf16")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs: --gpus/--tp data-parallel replicas")
@click.option("--tp", type=int, default=1, show_default=True,
              help="tensor-parallel degree of each replica (the v100x4 plan is --gpus 4 --tp 4)")
@click.option("--layers", type=int, default=None, help="use fewer layers than the shape has")
@click.option("--limit", type=int, default=None, help="score only the first N items")
@click.option("--batch-tokens", type=int, default=16384, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True)
@click.option("--fast-accum", is_flag=True,
              help="fp8: torch._scaled_mm's fast accumulation (fewer accumulator bits, docs/quantization.md)")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help="as for hsc run [default: flat with --compile, else rows]")
@click.option("--block-regions/--no-block-regions", default=False, show_default=True,
              help="compile one transformer block and reuse it for every layer (warm-up flat in depth)")
@click.option("--baseline", type=click.Choice(["none", "hf"]), default="none", show_default=True,
              help="hf: also time lm-eval's transformers loop on the same shape")
@click.option("--baseline-items", type=int, default=None,
              help="items for the baseline, evenly spread over the set [default: all]")
@click.option("--data", default=None, help="HellaSwag source, as for hsc run")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="LLaMA tokenizer.model [default: shared/data/llama-tokenizer.model]")
@click.option("--sustained-gemm-s", type=float, default=15.0, show_default=True,
              help="seconds of back-to-back products after scoring, for the GEMM rate a long run holds (0: skip)")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="write bench.json here")
def bench_cmd(shape, precision, gpus, tp, layers, limit, batch_tokens, compile_, fast_accum, layout, block_regions,
              baseline, baseline_items, data, tokenizer_path, sustained_gemm_s, output):
    """Time the runtime at a model shape with random weights on the GPU(s), over real HellaSwag tokens."""
    from runtime.bench import BenchConfig, run_bench
    from runtime.hellaswag import load_items
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer("sentencepiece", _llama_tokenizer(tokenizer_path), None, None)
    items, _ = load_items(data)
    cfg = BenchConfig(shape=shape, precision=precision, gpus=gpus, tp=tp, layers=layers, limit=limit,
                      batch_tokens=batch_tokens, compile=compile_, fast_accum=fast_accum, layout=layout,
                      block_regions=block_regions, baseline=baseline, baseline_items=baseline_items,
                      sustained_gemm_s=sustained_gemm_s)
    result = run_bench(cfg, items, tok, echo=click.echo)
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "bench.json").write_text(json.dumps({**result, "command": _command_line()}, indent=2) + "\n")


def _llama_tokenizer(path: Path | None) -> Path:
    """`path`, or the LLaMA tokenizer kept beside the shared HellaSwag file (shared/data/llama-tokenizer.model)."""
    from runtime.hellaswag import find_shared_file

    if path is None:
        shared = find_shared_file()
        path = shared.parent / "llama-tokenizer.model" if shared else None
    if path is None or not Path(path).is_file():
        raise HscError(f"{path or 'llama-tokenizer.model'}: LLaMA tokenizer not found (pass --tokenizer)")
    return Path(path)


@cli.command("random-checkpoint")
@click.option("--shape", default="llama-30b", show_default=True,
              help="llama-30b, llama-7b, or the path of a Meta params.json")
@click.option("--layout", type=click.Choice(["meta", "hf"]), default="meta", show_default=True,
              help="meta: params.json + consolidated.NN.pth; hf: Hugging Face's config.json + "
                   "model-0000k-of-0000n.safetensors + index")
@click.option("--shards", type=int, default=None,
              help="meta: model-parallel shards, consolidated.00..NN.pth [default: Meta's: llama-30b 4, llama-7b 1, "
                   "a params.json 1]; hf: safetensors files [default: 5 GB each]")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="checkpoint directory to create")
@click.option("--layers", type=int, default=None, help="use fewer layers than the shape has")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path), default=None,
              help="tokenizer.model to copy in [default: shared/data/llama-tokenizer.model]")
@click.option("--checklist/--no-checklist", default=True, show_default=True,
              help="write checklist.chk (MD5 of params.json and every shard, as Meta ships)")
@click.option("--force", is_flag=True, help="replace an existing directory")
def random_checkpoint_cmd(layout, shape, shards, out_dir, layers, seed, tokenizer_path, checklist, force):
    """Write random fp16 weights of a LLaMA shape in Meta's (or Hugging Face's) checkpoint layout, for
    measuring the compiler."""
    from toolchain.random_checkpoint import (META_SHARDS, resolve_shape, write_random_checkpoint,
                                             write_random_hf_checkpoint)

    args = resolve_shape(shape)
    if layers is not None:
        if not 1 <= layers <= args.n_layers:
            raise HscError(f"--layers {layers}: choose 1..{args.n_layers}")
        args = dataclasses.replace(args, n_layers=layers)
    tok = _llama_tokenizer(tokenizer_path)
    if layout == "hf":
        path = write_random_hf_checkpoint(out_dir, args, tok, shards, seed=seed, force=force, log=click.echo)
        files = list(path.glob("model-*.safetensors"))
        click.echo(f"wrote {path} ({len(files)} file(s), {sum(f.stat().st_size for f in files) / 1e9:.2f} GB)")
        return
    n = META_SHARDS.get(shape, 1) if shards is None else shards
    path = write_random_checkpoint(out_dir, args, n, tok, seed=seed, checklist=checklist, force=force,
                                   log=click.echo)
    total = sum(f.stat().st_size for f in path.glob("consolidated.*.pth"))
    click.echo(f"wrote {path} ({n} shard(s), {total / 1e9:.2f} GB)")


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="recompute every sha256")
@click.option("--json", "as_json", is_flag=True, help="print the manifest (and verification) as JSON")
def inspect_cmd(artifact, verify, as_json):
    """Show what ARTIFACT holds; with --verify, check every file against the manifest."""
    from runtime.artifact import load_manifest, manifest_sha256, verify_artifact
    from toolchain.quant_check import check_summary

    m = load_manifest(artifact)
    checked = verify_artifact(artifact, m) if verify else None
    if as_json:
        doc = {"manifest": dataclasses.asdict(m), "manifest_sha256": manifest_sha256(artifact)}
        if checked is not None:
            doc["verified"] = checked
        click.echo(json.dumps(doc, indent=2))  # json escapes every control character
        return
    a = m.model
    _echo(f"artifact   {artifact} (format v{m.format_version}, manifest sha256 {manifest_sha256(artifact)[:16]})")
    _echo(f"model      {m.model_name}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
               f"({a.kv_heads} kv), ffn {a.ffn_dim}, vocab {a.vocab_size}, rope_theta {a.rope_theta:g}, "
               f"{a.n_params() / 1e9:.3f}B params")
    _echo(f"target     {m.target}, precision {m.precision}")
    _echo(f"mapping    tp={m.mapping.tp} dp={m.mapping.dp} world={m.mapping.world_size}")
    _echo(f"plan       {m.plan}")
    for s in m.shards:
        counts = ", ".join(f"{n:,} {d}" for d, n in sorted(s.params_by_dtype.items()))
        _echo(f"shard      {s.file}: tp rank {s.tp_rank}, {s.bytes / 1e6:,.1f} MB, {counts}, sha256 {s.sha256[:16]}")
    t = m.tokenizer
    _echo(f"tokenizer  {t.file} ({t.kind}), bos {t.bos_id} eos {t.eos_id}, add_bos {t.add_bos}")
    if m.quantization is not None:
        q = m.quantization
        fast = ", fast accumulation" if q.get("fast_accumulation") else ""
        _echo(f"quantized  {q.get('name')} (scheme v{q.get('version')}{fast}), block linears; "
                   f"embeddings/norms/LM head and compute in {m.compute_dtype}")
    if m.calibration is not None:
        c = m.calibration
        _echo(f"calibrated {c.get('n_items')} items of {c.get('source')} ({c.get('split')}, seed {c.get('seed')}, "
                   f"{c.get('n_tokens')} tokens); statistics in {c.get('file')}"
                   + (f", reused from {c['reused_from']}" if c.get("reused_from") else ""))
    if m.quantization is not None:
        sm = m.smoothing
        if sm is None:
            _echo("smoothing  none (--no-smooth)")
        else:
            per = ", ".join("none" if a is None else f"{a:g}" for a in sm.get("per_layer", []))
            _echo(f"smoothing  alpha {sm.get('alpha')}: per layer [{per}]")
    if m.quant_report and not m.quant_report.get("per_linear") and (m.calibration or {}).get("reused_from"):
        _echo("quant err  no per-linear report (calibration reused: its sample rows are not kept)")
    if m.quant_report and m.quant_report.get("per_linear"):
        per_layer: dict = {}
        for name, r in m.quant_report["per_linear"].items():
            per_layer.setdefault(int(name.split(".")[1]), []).append((name.split(".", 2)[2], r))
        for i, rows in sorted(per_layer.items()):
            cells = "  ".join(f"{n.split('.')[-1]} {r['sqnr_db'] if r['sqnr_db'] is not None else 'inf'} dB"
                              for n, r in rows)
            worst = max(r["rel_error"] for _, r in rows)
            _echo(f"quant err  layer {i}: SQNR {cells}; max rel error {worst:.4f}")
    if m.quant_report and m.quant_report.get("check"):
        _echo(f"check      {check_summary(m.quant_report['check'])}")
    p = m.provenance
    _echo(f"source     {p.source_format} {p.source_path} (sha256 {p.source_sha256[:16]})")
    _echo(f"built      {p.created_utc} by hsc {p.toolchain_version}: {p.command}")
    if m.resources is not None:
        _echo(f"resources  {resources_summary(m.resources)}")
    if checked is not None:
        _echo(f"verified   {len(checked)} files: all sha256 match")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up runs
    (a compile's temporary directory is removed) before hsc exits."""


def _terminate(signum, frame):
    raise Terminated()


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _main()
    except (KeyboardInterrupt, Terminated):  # a second one, while the first was being reported
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main() -> None:
    try:
        cli(standalone_mode=False)
    except Interrupted as e:
        click.echo(f"hsc: interrupted: {printable(e)}", err=True)
        sys.exit(e.exit_code)
    except HscError as e:
        click.echo(f"hsc: error: {printable(e)}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("hsc: interrupted", err=True)  # click turns Ctrl-C into Abort
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("hsc: interrupted", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("hsc: terminated", err=True)
        sys.exit(143)
    except OSError as e:  # the machine's fault, not the input's (a full disk, a vanished mount): one line
        where = f"{e.filename}: " if e.filename else ""
        click.echo(f"hsc: error: {printable(where)}{e.strerror or printable(e)}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
