"""The quantized precisions (fp8, int8, w8) of `hsc compile`: calibrate, smooth, quantize, check.

Two passes over the checkpoint, each one layer at a time: calibration (toolchain/calibrate.py)
records the abs-max of every linear's input on HellaSwag items; then each layer is smoothed
(SmoothQuant factors folded into the float weights, toolchain/smoothquant.py), its seven block
linears quantized per output channel (runtime/quant.py) and streamed to the artifact writer,
with a per-linear error report on the calibration sample rows. During the same pass held-out
items run through the float and the quantized layer (toolchain/quant_check.py); `--max-drop`
refuses the artifact when acc_norm on them drops by more than it allows.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.artifact import load_manifest, verify_file
from runtime.config import LAYER_TENSORS, PRECISION_DTYPES, ModelArgs, layer_shapes
from runtime.errors import HscError, file_error, warn
from runtime.hellaswag import Item, load_split
from runtime.quant import QuantLinear, quantize_weight, scheme_asdict
from runtime.tokenizer import Tokenizer
from toolchain.calibrate import CalibrationStats, calibrate, calibration_batches
from toolchain.hashing import combined_sha256
from toolchain.quant_check import QuantCheck, check_summary, compare, draw_check_items, enforce_max_drop, error_stats
from toolchain.shard import shard_shape
from toolchain.smoothquant import (DEFAULT_ALPHAS, POINT_LINEARS, choose_alpha,
                                   fake_quant_e4m3, fake_quant_int8, fake_quant_w8, point_widths, smooth_layer)
from toolchain.source import ModelSource, check_shape

# The seven block linears (Meta names, relative to `layers.{i}.`); quantized precisions store each as
# `<linear>.qdata` + `<linear>.scale` instead of `<linear>.weight`.
LINEAR_TENSORS = tuple(n for n in LAYER_TENSORS if not n.endswith("norm.weight"))
CALIBRATION_FILE = "calibration.safetensors"


@dataclass(frozen=True)
class QuantOptions:
    """How a quantized precision (fp8/int8/w8) is calibrated, smoothed and checked (`hsc compile --calib-*`,
    `--check-items`, `--max-drop`)."""

    calib_data: str | None = None  # as `hsc run --data`: None = the shared validation file
    calib_items: int = 512
    calib_seed: int = 0
    alpha: float | str = "auto"  # "auto": toolchain.smoothquant.choose_alpha per layer
    smooth: bool = True
    sample_rows: int = 512  # activation rows kept per point and layer, for the alpha search and the report
    batch_tokens: int = 8192
    device: str = "auto"  # where calibration, smoothing and quantization compute: auto = CUDA if present
    check_items: int = 256  # held-out items of the float-vs-quantized check (0: no check)
    max_drop: float | None = None  # acc_norm points the check may lose; more refuses the artifact
    fast_accum: bool = False  # fp8 only: Float8WeightFloat8Activation.fast_accumulation
    # An earlier artifact of the same checkpoint whose calibration statistics are reused: no calibration
    # pass. Its file keeps the abs-maxima but not the sample rows, so the alpha is given, not searched.
    calibration_from: Path | None = None

    def __post_init__(self):
        if self.check_items < 0:
            raise HscError(f"--check-items {self.check_items}: must be 0 (no check) or more")
        if self.max_drop is not None:
            if not self.max_drop >= 0:  # also refuses nan
                raise HscError(f"--max-drop {self.max_drop:g}: must be a number of acc_norm points, 0 or more")
            if self.check_items == 0:
                raise HscError("--max-drop needs the quantization check, which --check-items 0 turns off")


@contextlib.contextmanager
def fp32_matmuls():
    """fp32 products stay fp32 on the GPU while the compiler calibrates, smooths and checks. A process
    that switched TF32 on (hsc run does, for bf16) would otherwise move the activation maxima, and the
    scales and alphas chosen from them, by ~1e-3 relative, so that the artifact depended on it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compute_device(opts: QuantOptions) -> torch.device:
    """The device of the compiler's arithmetic (weights are still read and written on the host)."""
    from runtime.distributed import pick_device

    return pick_device(opts.device)


def quant_layout(shapes: dict[str, tuple[int, ...]], tp: int, dtype: torch.dtype, scheme):
    """As _layout, with each block linear's `.weight` replaced by `.qdata` (scheme dtype) and `.scale` (fp32)."""
    out = []
    for name, shape in shapes.items():
        if name.startswith("layers.") and name.split(".", 2)[2] in LINEAR_TENSORS:
            stem = name.removesuffix(".weight")
            out.append((f"{stem}.qdata", shard_shape(f"{stem}.qdata", shape, tp), scheme.weight_dtype))
            out.append((f"{stem}.scale", shard_shape(f"{stem}.scale", shape[:1], tp), torch.float32))
        else:
            out.append((name, shard_shape(name, shape, tp), dtype))
    return out


def check_quant_shapes(src: ModelSource, scheme, tp: int) -> None:
    """Every rank's slice of every block linear must suit the scheme's kernel."""
    for n, shape in layer_shapes(src.args).items():
        if n in LINEAR_TENSORS:
            out_f, in_f = shard_shape(f"layers.0.{n}", shape, tp)
            try:
                scheme.check_shape(in_f, out_f)
            except ValueError as e:
                raise HscError(f"{src.path}: cannot compile to {scheme.name} at TP={tp}: {n} is "
                               f"[{out_f}, {in_f}] per rank; {e}") from None


def _fake_quant_for(scheme_name: str):
    return {"fp8": fake_quant_e4m3, "int8": fake_quant_int8, "w8": fake_quant_w8}[scheme_name]


@torch.no_grad()
def _linear_report(x: torch.Tensor, s: torch.Tensor | None, w: torch.Tensor, qdata: torch.Tensor,
                   scale: torch.Tensor, scheme) -> dict:
    """Output error of a quantized linear vs the float (smoothed) one on calibration rows x [n, in]."""
    xs = x.double() / s.double().to(x.device) if s is not None else x.double()  # factors live on the host
    ref = xs @ w.double().T
    mod = QuantLinear(w.shape[1], w.shape[0], scheme)
    mod.qdata, mod.scale = qdata, scale
    err = (mod(xs.float()).double() - ref).pow(2).sum()
    return error_stats(float(err), float(ref.pow(2).sum()))


def quantized_stream(src: ModelSource, shapes, dtype, scheme, stats, opts: QuantOptions,
                     alphas: list, report: dict, log, check: QuantCheck | None = None):
    """(name, tensor) in quant_layout order, one layer in memory at a time: the layer is smoothed in
    fp32 (factors from the calibration maxima), its linears quantized, everything else cast to `dtype`.
    `check`, if given, is advanced through every layer, float and as written (QuantCheck)."""
    args = src.args
    device = compute_device(opts)
    reads = {n: p for p, names in POINT_LINEARS.items() for n in names}  # linear -> the point it reads
    glob = src.global_tensors()
    embed = glob.pop("tok_embeddings.weight")  # not kept through the layers: only norm and LM head are
    check_shape(src, "tok_embeddings.weight", embed, shapes["tok_embeddings.weight"])
    written = embed.to(dtype)
    if check is not None:
        check.embed(embed, written)
    yield "tok_embeddings.weight", written
    del embed, written
    for i in range(args.n_layers):
        raw = src.layer_tensors(i)
        for n in LAYER_TENSORS:
            check_shape(src, f"layers.{i}.{n}", raw[n], shapes[f"layers.{i}.{n}"])
        layer = {n: raw[n].to(device).float() for n in LAYER_TENSORS}
        del raw
        # smooth_layer returns a new dict: the check's float reference is unsmoothed (without a check,
        # the unsmoothed copy is let go as soon as the smoothed one exists: a layer in fp32 less to hold).
        original = layer if check is not None else None
        written = {}  # the block's state dict as the artifact holds it, for the check
        lstats = stats.layer(i)
        lstats = type(lstats)({p: t.to(device) for p, t in lstats.absmax.items()},
                              {p: t.to(device) for p, t in lstats.sample.items()})
        factors = {}
        if opts.smooth:
            if opts.alpha == "auto":
                alpha = choose_alpha(layer, lstats, args, candidates=(None, *DEFAULT_ALPHAS),
                                     fake_quant=_fake_quant_for(scheme.name)).alpha
            else:
                alpha = float(opts.alpha)
            if alpha is not None:
                layer, factors = smooth_layer(layer, lstats.absmax, alpha, args)
            alphas.append(alpha)
        for n in LAYER_TENSORS:
            full = f"layers.{i}.{n}"
            if n not in LINEAR_TENSORS:
                written[n] = layer[n].to(dtype)
                yield full, written[n].cpu()
                continue
            qdata, scale = quantize_weight(layer[n], scheme)
            linear = n.removesuffix(".weight")
            written[f"{linear}.qdata"], written[f"{linear}.scale"] = qdata, scale
            stem = f"layers.{i}.{linear}"
            point = reads[n]
            if point in lstats.sample:
                # factors[WO_IN] is over wo's input [n_heads*hd], as the wo_in sample rows are
                report[stem] = _linear_report(lstats.sample[point], factors.get(point), layer[n], qdata, scale,
                                              scheme)
            yield f"{stem}.qdata", qdata.cpu()
            yield f"{stem}.scale", scale.cpu()
        if check is not None:
            check.layer(original, written, scheme)
        stats.drop_layer(i)  # the samples of a written layer are no longer needed
        del layer, original, written, lstats, factors
        worst = min((r["sqnr_db"] for k, r in report.items() if k.startswith(f"layers.{i}.") and r["sqnr_db"]),
                    default=None)
        held_out = check.per_layer[-1]["sqnr_db"] if check is not None else None
        log(f"layer {i}: alpha {alphas[-1] if alphas else 'none'}"
            + (f", worst SQNR {worst:.1f} dB" if worst is not None else "")
            + (f", check hidden-state SQNR {held_out:.1f} dB" if held_out is not None else ""))
    for name in ("norm.weight", "output.weight"):
        check_shape(src, name, glob[name], shapes[name])
    norm, output = glob["norm.weight"].to(dtype), glob["output.weight"].to(dtype)
    if check is not None:
        check.finish(glob["norm.weight"], glob["output.weight"], norm, output)
    yield "norm.weight", norm
    yield "output.weight", output


def calibration_items(tmp: Path, tok, tok_file: str, opts: QuantOptions,
                      log=print) -> tuple[list[Item], str, str, Tokenizer]:
    """The items of --calib-data (calibration and the check draw from them), their source, their split,
    and the artifact's tokenizer. `--calib-data datasets` takes the train split when datasets has it
    (HellaSwag's own data for calibration, none of it scored), else the validation split."""
    if opts.calib_data == "datasets":
        try:
            items, source, split = load_split("datasets", datasets_split="train")
        except HscError:
            log("calibration: datasets has no train split of Rowan/hellaswag here; using the validation split")
            items, source, split = load_split("datasets", datasets_split="validation")
    else:
        items, source, split = load_split(opts.calib_data, flag="--calib-data")
    return items, source, split, Tokenizer(tok.kind, tmp / tok_file, tok.bos_id, tok.eos_id)


# A quantized compile expected to run longer than this on the CPU says so, with its estimate, first.
SLOW_COMPILE_S = 120.0


def cpu_matmul_rate(dim: int, seconds: float = 0.3) -> float:
    """FLOP/s of an fp32 [1024, d] x [d, d] product on this machine's CPU, now (d = dim, at most 2048)."""
    d = min(dim, 2048)
    a, b = torch.randn(1024, d), torch.randn(d, d)
    a @ b
    n, start = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * 1024 * d * d * n / (time.perf_counter() - start)


def forward_seconds(args: ModelArgs, items: list[Item], tokenizer: Tokenizer, add_bos: bool, opts: QuantOptions,
                    rate: float) -> tuple[float, int]:
    """(seconds, tokens) of the block forwards a quantized compile makes at `rate` FLOP/s: 2 FLOPs per
    block parameter per token, over the calibration items once and the check items twice (float and
    quantized); the tokens per item as packed, from the first 32 items."""
    sample = items[:32]
    packed = calibration_batches(sample, tokenizer, add_bos, opts.batch_tokens, args.max_seq_len)
    per_item = sum(packed.real_tokens) / len(sample)
    n_calib = min(opts.calib_items, len(items))
    n_tokens = round(per_item * (n_calib + 2 * min(opts.check_items, len(items) - n_calib)))
    block_params = args.n_params() - 2 * args.vocab_size * args.dim - args.dim
    return 2 * block_params * n_tokens / rate, n_tokens


def warn_if_slow(args: ModelArgs, items: list[Item], tokenizer: Tokenizer, add_bos: bool, opts: QuantOptions,
                 device: torch.device, target: str, warn) -> float | None:
    """On the CPU, estimate the compile's forwards (forward_seconds at a rate measured now) and warn
    when they exceed SLOW_COMPILE_S; the estimate in seconds, or None on a GPU."""
    if device.type != "cpu":
        return None
    rate = cpu_matmul_rate(args.dim)
    seconds, n_tokens = forward_seconds(args, items, tokenizer, add_bos, opts, rate)
    if seconds > SLOW_COMPILE_S:
        warn(f"this quantized compile for {target} computes on the CPU: at least {seconds / 60:.0f} min here "
             f"(calibration and check forwards: ~{n_tokens:,} tokens through {args.n_layers} layers at a measured "
             f"{rate / 1e9:.0f} GFLOP/s); on a machine with a GPU, --device cuda takes a small part of that")
    return seconds


def calibrate_source(src: ModelSource, items: list[Item], source: str, split: str, tokenizer: Tokenizer,
                     add_bos: bool, opts: QuantOptions, log, spill_dir: Path | None = None,
                     target: str = "") -> CalibrationStats:
    """Pass 1 (toolchain/calibrate.py); spill_dir: where each layer's sample rows wait for pass 2."""
    n = min(opts.calib_items, len(items))
    device = compute_device(opts)
    try:
        warn_if_slow(src.args, items, tokenizer, add_bos, opts, device, target, warn)
    except ValueError as e:
        raise HscError(f"calibration: {e}") from None
    log(f"calibrating on {n} HellaSwag items of {source} ({split} split, seed {opts.calib_seed}) on {device}")
    try:
        stats = calibrate(src, items, tokenizer, add_bos, n_items=n, seed=opts.calib_seed, device=device,
                          split=split, data=source, sample_rows=opts.sample_rows,
                          batch_tokens=opts.batch_tokens, spill_dir=spill_dir)
    except ValueError as e:
        raise HscError(f"calibration: {e}") from None
    return stats


def reuse_calibration(src: ModelSource, opts: QuantOptions, source: str, add_bos: bool,
                      log) -> tuple[CalibrationStats, Path]:
    """The calibration statistics of an earlier artifact (`--calibration-from`), checked against this compile:
    the file must be the one its manifest names (sha256), measured on this checkpoint (its sha256), on the
    same HellaSwag source (item ids index it) and BOS convention, at this model's shapes."""
    artifact = Path(opts.calibration_from)
    if opts.smooth and opts.alpha == "auto":
        raise HscError(f"--calibration-from {artifact}: the alpha search needs calibration's sample rows, "
                       "which artifacts do not keep; give --alpha A (0..1) or --no-smooth")
    calib = load_manifest(artifact).calibration
    if not calib or not calib.get("file"):
        raise file_error(artifact, "holds no calibration statistics (only quantized artifacts do)")
    path = verify_file(artifact, calib["file"], calib.get("sha256"), calib.get("bytes"))  # as inspect --verify does
    try:
        stats = CalibrationStats.load(path)
    except ValueError as e:
        raise HscError(str(e)) from None
    info = stats.info
    this = combined_sha256(src.source_digests)
    if info.get("source_sha256") != this:
        raise file_error(path, f"was measured on another checkpoint (sha256 {str(info.get('source_sha256'))[:16]}); "
                               f"{src.path} is {this[:16]}")
    if info.get("data") != source:
        raise file_error(path, f"was calibrated on items of {info.get('data')}, this compile reads {source} "
                               f"(pass --calib-data {info.get('data')})")
    if info.get("add_bos") != add_bos:
        raise file_error(path, f"was calibrated with BOS {'on' if info.get('add_bos') else 'off'}, "
                               f"the tokenizer has it {'on' if add_bos else 'off'}")
    args = src.args
    want = {f"layers.{i}.{p}": (d,) for i in range(args.n_layers) for p, d in point_widths(args).items()}
    have = {k: tuple(v.shape) for k, v in stats.absmax.items()}
    if have != want:
        wrong = sorted(set(have.items()) ^ set(want.items()))[0][0]
        raise file_error(path, f"does not fit {src.model_name} ({args.n_layers} layers, dim {args.dim}): "
                               f"first mismatch at {wrong}")
    log(f"calibration: reusing {path} ({len(stats.item_indices)} items of {source}, seed {stats.seed}); "
        "no calibration pass")
    return stats, path


def start_check(src: ModelSource, items: list[Item], source: str, tokenizer: Tokenizer, add_bos: bool,
                calibrated: list[int], dtype: torch.dtype, opts: QuantOptions, log) -> QuantCheck | None:
    """The check's items and streams (None: --check-items 0, or no item left after calibration).
    On the CPU the quantized path computes in fp32 (a GPU dtype would be slow and emulated there);
    on CUDA in the plan's compute dtype `dtype`, as the artifact runs."""
    if opts.check_items == 0:
        return None
    chosen = draw_check_items(items, set(calibrated), opts.check_items, opts.calib_seed)
    if not chosen:
        if opts.max_drop is not None:
            raise HscError(f"--max-drop: no item of {source} is left for the check after the {len(calibrated)} "
                           "calibration items (use fewer --calib-items)")
        log(f"check: skipped, every item of {source} was a calibration item")
        return None
    device = compute_device(opts)
    check_dtype = torch.float32 if device.type == "cpu" else dtype
    fewer = f" (of {opts.check_items} asked: no more left after calibration)" if len(chosen) < opts.check_items else ""
    log(f"check: {len(chosen)} held-out items{fewer} of {source} (seed {opts.calib_seed}, disjoint from calibration), "
        f"float fp32 vs quantized {str(check_dtype).removeprefix('torch.')} on {device}")
    if opts.fast_accum and device.type != "cuda":
        log(f"check: note: on {device} the fp8 products are emulated with fp32 sums; the GPU's fast accumulation "
            "is not part of this check (compile with --device cuda to include it)")
    return QuantCheck(src.args, chosen, tokenizer, add_bos, device=device, dtype=check_dtype,
                      batch_tokens=opts.batch_tokens, source=source)


def finish_check(check: QuantCheck | None, opts: QuantOptions, precision: str, log) -> dict | None:
    """Compare the two models on the check items, log it, and apply --max-drop (HscError: the caller
    has not renamed anything into place yet, so nothing is written)."""
    if check is None:
        return None
    result = {
        "items": len(check.items), "item_ids": [it.index for it in check.items], "source": check.source,
        "seed": opts.calib_seed, "reference": "original (unsmoothed) float model, fp32",
        "quantized": check.describe(),
        **compare(check.items, check.float_ll, check.quant_ll, max_drop=opts.max_drop, seed=opts.calib_seed),
        "per_layer": check.per_layer,  # quantized vs float hidden states after each layer (real tokens)
    }
    log(f"check: {check_summary(result)}")
    enforce_max_drop(result, precision)
    return result


def quant_manifest_fields(plan, scheme, stats, calib_source: str, opts: QuantOptions, alphas: list, report: dict,
                          calib_path: Path, add_bos: bool, check: dict | None = None) -> dict:
    """The manifest's quantization fields: scheme, calibration provenance, alphas, error report."""
    return dict(
        compute_dtype=PRECISION_DTYPES[plan.compute],
        quantization=scheme_asdict(scheme),
        calibration={
            "file": CALIBRATION_FILE, "sha256": hashlib.sha256(calib_path.read_bytes()).hexdigest(),
            "bytes": calib_path.stat().st_size, "source": calib_source, "split": stats.split,
            "item_ids": stats.item_indices, "seed": stats.seed, "n_items": len(stats.item_indices),
            "n_tokens": stats.info.get("n_tokens"), "add_bos": add_bos,
            "reused_from": str(Path(opts.calibration_from).resolve()) if opts.calibration_from else None,
        },
        smoothing={"alpha": opts.alpha, "per_layer": alphas} if opts.smooth else None,
        # per_linear is empty when the calibration was reused: its sample rows are not kept (the check
        # on held-out items still compares the whole model).
        quant_report={"reference": "float (smoothed) linear, fp64, on the calibration sample rows",
                      "sample_rows": stats.info.get("sample_rows") if report else 0, "per_linear": report,
                      "check": check},
    )
