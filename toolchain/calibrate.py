"""Calibration: per-input-channel activation maxima of every linear, from the float model.

The float model runs over HellaSwag items one layer at a time, as the compiler reads it: the tokens
are embedded once, then for each layer one TransformerBlock is built (on `meta`, its tensors
assigned on the device), every calibration batch goes through it, its inputs' statistics are
recorded by forward pre-hooks, and its outputs replace its inputs for the next layer. The model is
never whole in memory.

The tokens are laid out exactly as `hsc run` scores them (runtime/packed.py: each item's context
once, its 4 endings as branches, shared prefixes once, first-fit packed rows, the tree mask), so calibration
sees what scoring sees; labels are never read. Padding tokens are excluded from every statistic.

Recorded per layer i (one statistic per distinct input, not per linear):
  layers.{i}.attention.wqkv_in     attention_norm output, read by wq, wk, wv    [dim]
  layers.{i}.attention.wo_in       attention output, read by wo                 [n_heads*head_dim]
  layers.{i}.feed_forward.w13_in   ffn_norm output, read by w1, w3              [dim]
  layers.{i}.feed_forward.w2_in    silu(w1 x) * (w3 x), read by w2              [ffn_dim]
as fp32 abs-max over all calibration tokens (saved with the artifact: a new alpha needs no new
calibration), plus a seeded sample of up to `sample_rows` token rows of each, the same tokens at
every layer, for the alpha search (toolchain/smoothquant.py: choose_alpha).

Memory, besides one layer's weights:
- hidden states of every calibration position, on `device` in `dtype`, overwritten batch by
  batch: n_positions * dim * bytes(dtype) (512 HellaSwag items with LLaMA's tokenizer are about
  80k positions, padding included: 1.3 GB at dim 4096 in fp32, 2.6 GB at dim 8192);
- the samples: sample_rows * (3 * dim + ffn_dim) * bytes(sample_dtype) a layer (512 fp32 rows: 48 MB
  a layer at 7B, 77 MB at 30B, 109 MB at 70B; sample_rows=0 turns sampling off). Kept on the host
  for every layer they would add up (4.6 GB at 30B, 6.9 GB at 70B), though the compiler's second pass
  needs layer i's rows only at layer i; with `spill_dir` each layer's rows go to a file there as
  soon as the layer is done (one safetensors file a layer), `CalibrationStats.layer(i)` reads them
  back, and `drop_layer(i)` deletes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime.config import ModelArgs
from runtime.hellaswag import Item
from runtime.model import TransformerBlock, rope_tables
from runtime.packed import PAD_SLOT, Batches, PackedScorer, attention_mask
from runtime.progress import Progress
from runtime.scoring import build_requests
from toolchain.hashing import combined_sha256
from toolchain.smoothquant import POINTS, W2_IN, W13_IN, WO_IN, WQKV_IN, LayerStats, point_widths
from toolchain.source import ModelSource

FORMAT = "hsc-calibration"
FORMAT_VERSION = 1
_METADATA_KEY = "hsc_calibration"
_SAMPLE_PREFIX = "sample."

# The module whose input is each point's activation, relative to a TransformerBlock.
_HOOKED = {
    WQKV_IN: "attention.wq",
    WO_IN: "attention.wo",
    W13_IN: "feed_forward.w1",
    W2_IN: "feed_forward.w2",
}


@dataclass
class CalibrationStats:
    """What calibration measured and on what. Tensor keys: `layers.{i}.{point}` (POINTS)."""

    absmax: dict[str, torch.Tensor]  # [in] fp32, over all calibration tokens (padding excluded)
    item_indices: list[int]  # Item.index of the calibration items, in the order they were drawn
    split: str  # "validation", or the split of a --calib-data file
    seed: int
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # [n, in], same tokens every layer
    holdout_indices: list[int] = field(default_factory=list)  # items that gave the samples, if held out
    info: dict = field(default_factory=dict)  # data, model, add_bos, dtype, token counts, packing
    spill_dir: Path | None = None  # where calibrate(spill_dir=...) left each layer's samples (not in `samples`)

    def layer(self, i: int) -> LayerStats:
        """Layer i's statistics under the point names smoothquant uses."""
        pre = f"layers.{i}."
        return LayerStats({p: self.absmax[pre + p] for p in POINTS}, self.layer_samples(i))

    def layer_samples(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's sample rows by point, from memory or read back from the spill file."""
        pre = f"layers.{i}."
        found = {p: self.samples[pre + p] for p in POINTS if pre + p in self.samples}
        path = self.spill_path(i)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            found.update(load_file(str(path)))
        return found

    def spill_path(self, i: int) -> Path | None:
        return None if self.spill_dir is None else Path(self.spill_dir) / f"samples.layers.{i}.safetensors"

    def drop_layer(self, i: int) -> None:
        """Forget layer i's samples (the compiler is done with the layer)."""
        for p in POINTS:
            self.samples.pop(f"layers.{i}.{p}", None)
        path = self.spill_path(i)
        if path is not None:
            path.unlink(missing_ok=True)

    def all_samples(self) -> dict[str, torch.Tensor]:
        """Every layer's samples under `layers.{i}.{point}`, spilled ones read back."""
        n_layers = 1 + max((int(k.split(".")[1]) for k in self.absmax), default=-1)
        return {f"layers.{i}.{p}": t for i in range(n_layers) for p, t in self.layer_samples(i).items()}

    def metadata(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "split": self.split, "seed": self.seed,
                "item_indices": self.item_indices, "holdout_indices": self.holdout_indices, **self.info}

    def save(self, path, with_samples: bool = False) -> None:
        """safetensors with the metadata as JSON under one key. The samples (large, only for the
        alpha search) are left out unless asked for."""
        from safetensors.torch import save_file

        tensors = {k: v.float().contiguous() for k, v in self.absmax.items()}
        if with_samples:
            tensors.update({_SAMPLE_PREFIX + k: v.contiguous() for k, v in self.all_samples().items()})
        save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(self.metadata(), sort_keys=True)})

    @classmethod
    def load(cls, path) -> "CalibrationStats":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_METADATA_KEY)
            if raw is None:
                raise ValueError(f"{path}: not an hsc calibration file (no {_METADATA_KEY} metadata)")
            meta = json.loads(raw)
            if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{path}: calibration format {meta.get('format')!r} version "
                                 f"{meta.get('format_version')!r}; this hsc reads {FORMAT} {FORMAT_VERSION}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        samples = {k[len(_SAMPLE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_SAMPLE_PREFIX)}
        absmax = {k: v for k, v in tensors.items() if not k.startswith(_SAMPLE_PREFIX)}
        fixed = ("format", "format_version", "split", "seed", "item_indices", "holdout_indices")
        return cls(absmax, meta["item_indices"], meta["split"], meta["seed"], samples,
                   meta["holdout_indices"], {k: v for k, v in meta.items() if k not in fixed})


def calibration_batches(items: list[Item], tokenizer, add_bos: bool, batch_tokens: int,
                        max_seq_len: int) -> Batches:
    """The items packed as runtime/packed.py packs them for scoring (targets are not used). Eager
    packing: no compiled graph here, so a small set is not padded to a whole batch of rows (the
    per-token layout, all that calibration sees, is the same)."""
    batches = PackedScorer(None, "cpu", batch_tokens=batch_tokens).prepare(build_requests(items, tokenizer, add_bos))
    longest = int(batches.positions.max()) + 1
    if longest > max_seq_len:
        raise ValueError(f"an item needs {longest} positions, more than the model's {max_seq_len}")
    return batches


def _build_block(args: ModelArgs, tensors: dict[str, torch.Tensor], device, dtype) -> TransformerBlock:
    with torch.device("meta"):
        block = TransformerBlock(args, 1, None)
    block.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()},
                          strict=True, assign=True)
    return block.eval()


class _Recorder:
    """Forward pre-hooks on one block: running abs-max over real tokens, and the sampled rows."""

    def __init__(self, block: TransformerBlock, dim_of: dict[str, int], device, sample_dtype):
        self.absmax = {p: torch.zeros(dim_of[p], dtype=torch.float32, device=device) for p in POINTS}
        self.rows: dict[str, list[torch.Tensor]] = {p: [] for p in POINTS}
        self.real: torch.Tensor | None = None  # [B*T] bool: positions counted in the maxima
        self.pick: torch.Tensor | None = None  # [k] flat positions sampled from this batch
        self.sample_dtype = sample_dtype
        modules = dict(block.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._hook(p)) for p, name in _HOOKED.items()]

    def _hook(self, point: str):
        def hook(module, inputs):
            x = inputs[0].flatten(0, 1)  # [B*T, in]
            if self.real is not None:
                counted = x[self.real]
                if counted.shape[0]:
                    torch.maximum(self.absmax[point], counted.abs().amax(dim=0).float(), out=self.absmax[point])
            if self.pick is not None and self.pick.numel():
                self.rows[point].append(x[self.pick].to(device="cpu", dtype=self.sample_dtype))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _sample_plan(batches: Batches, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Seeded choice of n real positions among all batches: flat [B*T] indices per batch, sorted."""
    real = (batches.slot != PAD_SLOT).flatten(1)  # [n_batches, B*T]
    where = real.flatten().nonzero().squeeze(1)
    chosen = where[torch.randperm(len(where), generator=gen)[:n]].sort().values
    per_batch = real.shape[1]
    return [chosen[(chosen // per_batch) == b] % per_batch for b in range(real.shape[0])]


@torch.inference_mode()
def calibrate(src: ModelSource, items: list[Item], tokenizer, add_bos: bool, n_items: int = 512, seed: int = 0,
              device="cpu", dtype=torch.float32, *, split: str = "validation", data: str = "",
              sample_rows: int = 1024, sample_dtype=torch.float32, holdout_items: int = 0,
              batch_tokens: int = 8192, spill_dir: Path | None = None, progress=None) -> CalibrationStats:
    """Run the float model over `n_items` of `items` (a seeded permutation picks them) one layer
    at a time and record every linear input's per-channel abs-max (see the module docstring).

    holdout_items > 0: that many further items of the permutation are run too, but only give the
    samples, never the maxima, so the alpha search is measured on tokens the factors were not
    computed from. Otherwise the samples are drawn from the calibration tokens.
    `data` describes where the items came from (a path, "datasets:..."); `split` names the split.
    spill_dir: write each layer's samples to a file there instead of keeping them (module docstring).
    progress(layer, n_layers) is called after each layer; stderr shows every batch of every layer
    (runtime/progress.py)."""
    args = src.args
    device = torch.device(device)
    if n_items <= 0 or not items:
        raise ValueError("calibration needs at least one item")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=gen).tolist()
    chosen = [items[k] for k in order[:n_items]]
    held = [items[k] for k in order[len(chosen):len(chosen) + holdout_items]]
    if holdout_items and not held:
        raise ValueError("no items left over for the held-out sample")

    sets = [calibration_batches(chosen, tokenizer, add_bos, batch_tokens, args.max_seq_len)]
    if held:
        sets.append(calibration_batches(held, tokenizer, add_bos, batch_tokens, args.max_seq_len))
    sample_set = sets[-1]
    picks = _sample_plan(sample_set, sample_rows, gen) if sample_rows > 0 else None

    cos_table, sin_table = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
    cos_table, sin_table = cos_table.to(device), sin_table.to(device)
    embed = src.global_tensors()["tok_embeddings.weight"]  # the LM head and final norm are dropped here
    hidden = [[embed[bs.tokens[b]].to(device=device, dtype=dtype) for b in range(bs.tokens.shape[0])]
              for bs in sets]  # [set][batch] -> [B, T, dim]
    del embed

    dim_of = point_widths(args)
    absmax, samples = {}, {}
    n_rows = 0
    stats = CalibrationStats(absmax, [it.index for it in chosen], split, seed, samples, [it.index for it in held],
                             spill_dir=spill_dir)
    if spill_dir is not None:
        Path(spill_dir).mkdir(parents=True, exist_ok=True)
    bar = Progress(args.n_layers * sum(bs.tokens.shape[0] for bs in sets), "calibration", "layer-batches")
    for i in range(args.n_layers):
        block = _build_block(args, src.layer_tensors(i), device, dtype)
        rec = _Recorder(block, dim_of, device, sample_dtype)
        for s_i, bs in enumerate(sets):
            is_calib, is_sample = s_i == 0, bs is sample_set
            for b in range(bs.tokens.shape[0]):
                slot, end, pos = (bs.slot[b].to(device), bs.subtree_end[b].to(device), bs.positions[b].to(device))
                rec.real = (slot != PAD_SLOT).flatten() if is_calib else None
                rec.pick = picks[b].to(device) if (is_sample and picks is not None) else None
                hidden[s_i][b] = block(hidden[s_i][b], cos_table[pos], sin_table[pos], attention_mask(end))
                bar.update()
        rec.remove()
        rows = {p: torch.cat(rec.rows[p]) for p in POINTS if rec.rows[p]}
        for p in POINTS:
            absmax[f"layers.{i}.{p}"] = rec.absmax[p].cpu()
        n_rows = n_rows or max((r.shape[0] for r in rows.values()), default=0)
        if spill_dir is None:
            samples.update({f"layers.{i}.{p}": r for p, r in rows.items()})
        elif rows:
            from safetensors.torch import save_file

            save_file(rows, str(stats.spill_path(i)))
        del block, rec, rows
        if progress is not None:
            progress(i + 1, args.n_layers)
    bar.close()

    n_tokens = int((sets[0].slot != PAD_SLOT).sum())
    info = {
        "data": data,
        "model": src.model_name,
        "source_sha256": combined_sha256(src.source_digests) if getattr(src, "source_digests", None) else "",
        "add_bos": add_bos,
        "dtype": str(dtype).removeprefix("torch."),
        "n_tokens": n_tokens,  # real calibration tokens the maxima are over
        "n_positions": int(sets[0].slot.numel()),  # padding included
        "row_len": int(sets[0].tokens.shape[2]),
        "rows_per_batch": int(sets[0].tokens.shape[1]),
        "sample_rows": n_rows,
    }
    stats.info = info
    return stats
