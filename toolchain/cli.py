"""The `hsc` command: compile, run, inspect.

User errors (HscError) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import click

from runtime.errors import HscError
from runtime.run import RunConfig
from toolchain.targets import TARGETS

RUN_DEFAULTS = RunConfig(artifact=Path("."))


def _command_line() -> str:
    return shlex.join(["hsc", *sys.argv[1:]])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hsc")
def cli():
    """hsc: compile LLaMA-family checkpoints and score HellaSwag with them."""


@cli.command("compile")
@click.argument("source")
@click.option("--target", required=True, help=f"one of: {', '.join(TARGETS)}")
@click.option("--precision", default="auto", show_default=True, help="auto, fp32, bf16 or fp16")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path),
              help="artifact directory [default: artifacts/<model>-<target>-<precision>]")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path),
              help="tokenizer.model for a Meta checkpoint that lacks one beside it")
@click.option("--tp", type=int, default=None, help="force a tensor-parallel degree (default: planned)")
@click.option("--force", is_flag=True, help="replace an existing artifact directory")
def compile_cmd(source, target, precision, out_dir, tokenizer_path, tp, force):
    """Compile SOURCE (a Meta checkpoint directory, a .gguf file, or `smollm2`) for TARGET."""
    from toolchain.compile import compile_checkpoint

    manifest, path = compile_checkpoint(source, target, precision, out_dir, _command_line(),
                                        tokenizer_path=tokenizer_path, tp=tp, force=force, log=click.echo)
    total = sum(s.bytes for s in manifest.shards)
    click.echo(f"wrote {path} ({len(manifest.shards)} shard(s), {total / 1e9:.2f} GB)")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--data", default=RUN_DEFAULTS.data,
              help="HellaSwag file (official jsonl, lm-eval jsonl, 6-line .txt[.bz2]) or `datasets` "
                   "[default: shared/data/hellaswag_val_full.txt.bz2 if found, else datasets]")
@click.option("--limit", type=int, default=RUN_DEFAULTS.limit, help="score only the first N items")
@click.option("--output", type=click.Path(path_type=Path), default=RUN_DEFAULTS.output,
              help="directory for results.json and samples.jsonl [default: results/<artifact>]")
@click.option("--bos/--no-bos", default=RUN_DEFAULTS.bos, help="override the tokenizer's BOS convention")
@click.option("--device", default=RUN_DEFAULTS.device, show_default=True, help="auto, cpu, cuda, cuda:N")
@click.option("--batch-tokens", type=int, default=RUN_DEFAULTS.batch_tokens, show_default=True)
def run_cmd(artifact, data, limit, output, bos, device, batch_tokens):
    """Score HellaSwag with a compiled ARTIFACT; print acc and acc_norm with standard errors."""
    from runtime.run import run

    run(RunConfig(artifact, data, limit, output, bos, device, batch_tokens), _command_line(), echo=click.echo)


@cli.command("inspect")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="recompute every sha256")
@click.option("--json", "as_json", is_flag=True, help="print the manifest (and verification) as JSON")
def inspect_cmd(artifact, verify, as_json):
    """Show what ARTIFACT holds; with --verify, check every file against the manifest."""
    from runtime.artifact import load_manifest, manifest_sha256, verify_artifact

    m = load_manifest(artifact)
    checked = verify_artifact(artifact, m) if verify else None
    if as_json:
        doc = {"manifest": dataclasses.asdict(m), "manifest_sha256": manifest_sha256(artifact)}
        if checked is not None:
            doc["verified"] = checked
        click.echo(json.dumps(doc, indent=2))
        return
    a = m.model
    click.echo(f"artifact   {artifact} (format v{m.format_version}, manifest sha256 {manifest_sha256(artifact)[:16]})")
    click.echo(f"model      {m.model_name}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
               f"({a.kv_heads} kv), ffn {a.ffn_dim}, vocab {a.vocab_size}, rope_theta {a.rope_theta:g}, "
               f"{a.n_params() / 1e9:.3f}B params")
    click.echo(f"target     {m.target}, precision {m.precision}")
    click.echo(f"mapping    tp={m.mapping.tp} dp={m.mapping.dp} world={m.mapping.world_size}")
    click.echo(f"plan       {m.plan}")
    for s in m.shards:
        counts = ", ".join(f"{n:,} {d}" for d, n in sorted(s.params_by_dtype.items()))
        click.echo(f"shard      {s.file}: tp rank {s.tp_rank}, {s.bytes / 1e6:,.1f} MB, {counts}, sha256 {s.sha256[:16]}")
    t = m.tokenizer
    click.echo(f"tokenizer  {t.file} ({t.kind}), bos {t.bos_id} eos {t.eos_id}, add_bos {t.add_bos}")
    p = m.provenance
    click.echo(f"source     {p.source_format} {p.source_path} (sha256 {p.source_sha256[:16]})")
    click.echo(f"built      {p.created_utc} by hsc {p.toolchain_version}: {p.command}")
    if checked is not None:
        click.echo(f"verified   {len(checked)} files: all sha256 match")


def main() -> None:
    try:
        cli(standalone_mode=False)
    except HscError as e:
        click.echo(f"hsc: error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("hsc: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("hsc: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
