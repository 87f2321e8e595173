"""Synthetic artifacts: real model shapes, random weights, for benchmarks at scale.

    flashio synth --shape opt-6.7b --out /data/opt-6.7b-synth          # ~13.6 GB, fp16
    flashio synth --shape opt-6.7b --scale 0.05 --out /tmp/smoke       # a few MB, seconds

    from flashio.synth import SHAPES, write_synthetic
    write_synthetic("opt-6.7b", "out/dir", scale=1.0, seed=0)

The weights come from a fake checkpoint that answers the Hugging Face tensor names with seeded
random tensors, so the architecture's own name tables (flashio.models) and the one artifact writer
(flashio.format) build the artifact exactly as they would from a real checkpoint. Predictors with
the paper's ranks are included (random: predicting about 10% of neurons active) so that predictor
compute is part of every sparse step; benchmarks replace their decisions by a trace
(flashio.trace), since random weights do not activate neurons realistically.
"""

from __future__ import annotations

import logging
import math
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flashio.dtypes import ITEMSIZE, TORCH_DTYPES
from flashio.errors import FlashError, FormatError
from flashio.format.writer import ModelSource, write_artifact
from flashio.models import get_architecture
from flashio.models.base import ConfigDims
from flashio.predictor import PredictorWeights
from flashio.sizes import format_size

log = logging.getLogger(__name__)

_DISK_MARGIN_BYTES = 1 << 30  # free space kept beyond the artifact (the writer's temporary files)
_PREDICTED_DENSITY_Z = 1.2816  # P(N(0, 1) > z) = 0.10: random predictors flag ~10% of neurons
_O_DIRECT_BLOCK_BYTES = 512  # a bundle should be whole blocks
_SHAPE_ITEMSIZE = 2  # scaled shapes keep fp16/bf16 bundles whole blocks


@dataclass(frozen=True)
class Shape:
    """A model's shape as its Hugging Face config states it, plus the paper's predictor ranks.
    The family (`model_type`, a flashio.models architecture) turns it into a config and a list
    of tensors."""

    model_type: str
    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    max_positions: int
    predictor_ranks: tuple[tuple[int, int], ...]  # (rank, layers) runs, in layer order
    n_kv_heads: int | None = None  # grouped-query attention; None: n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def scaled(self, scale: float) -> Shape:
        """Widths and layers times `scale`, vocabulary and positions times scale**2 and scale (so
        that embeddings keep about their share of the weights); head width and heads per
        key/value head kept, d_model a multiple of 128 chosen so that fp16 bundles (2 or 3 rows
        of d_model) stay a multiple of 512 bytes, the O_DIRECT block."""
        if scale == 1.0:
            return self
        if not 0 < scale <= 1:
            raise FlashError(f"scale must be in (0, 1], got {scale}")

        def r128(x: float, k: int = 128) -> int:
            return max(k, round(x / k) * k)

        rows = len(get_architecture(self.model_type).FFN.parts)
        step = 128
        while (rows * step * _SHAPE_ITEMSIZE) % _O_DIRECT_BLOCK_BYTES:
            step += 128
        dim = r128(self.dim * scale, step)
        heads = dim // self.head_dim
        group = self.n_heads // self.kv_heads
        kv_heads = None if self.n_kv_heads is None else max(1, heads // group)
        while kv_heads is not None and heads % kv_heads:
            kv_heads -= 1
        layers = max(2, round(self.n_layers * scale))
        ranks, left = [], layers
        for rank, n in self.predictor_ranks:
            k = min(left, max(1, round(n * scale)))
            if k:
                ranks.append((max(8, round(rank * scale)), k))
                left -= k
        if left:
            ranks[-1] = (ranks[-1][0], ranks[-1][1] + left)
        return Shape(self.model_type, dim, r128(self.ffn_dim * scale), layers, heads,
                     max(256, round(self.vocab_size * scale**2)), max(128, round(self.max_positions * scale)),
                     tuple(ranks), kv_heads)

    def ranks(self) -> list[int]:
        return [r for r, n in self.predictor_ranks for _ in range(n)]

    def dims(self) -> ConfigDims:
        return ConfigDims(vocab_size=self.vocab_size, dim=self.dim, ffn_dim=self.ffn_dim, n_layers=self.n_layers,
                          n_heads=self.n_heads, n_kv_heads=self.kv_heads, max_positions=self.max_positions)

    def hf_config(self, dtype: str) -> dict:
        return {**get_architecture(self.model_type).hf_config(self.dims()), "torch_dtype": dtype}

    def checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of a Hugging Face checkpoint of this shape: name -> shape."""
        arch = get_architecture(self.model_type)
        return arch.checkpoint_shapes(arch.ModelArgs.from_hf(self.hf_config("float16")))


SHAPES: dict[str, Shape] = {
    # OPT-6.7B: predictor ranks 128 for the first 28 layers, 1024 for the last 4 (paper)
    "opt-6.7b": Shape("opt", 4096, 16384, 32, 32, 50272, 2048, ((128, 28), (1024, 4))),
    "opt-1.3b": Shape("opt", 2048, 8192, 24, 32, 50272, 2048, ((128, 20), (1024, 4))),
    # Llama 2 7B: rank 256, with 1024 on 4 middle layers (paper)
    "llama-2-7b": Shape("llama", 4096, 11008, 32, 32, 32000, 4096, ((256, 14), (1024, 4), (256, 14))),
}


class SyntheticCheckpoint:
    """Answers an architecture's `read_checkpoint` with seeded random tensors (HFCheckpoint's
    interface: config, has, get, prefix_for, tokenizer_files, file_paths), over the tensor names
    and shapes the family declares (`checkpoint_shapes`)."""

    def __init__(self, shape: Shape, dtype: str, seed: int):
        self.shape, self.dtype, self.seed = shape, TORCH_DTYPES[dtype], seed
        self.config = shape.hf_config(dtype)
        self.arch = get_architecture(shape.model_type)
        self.args = self.arch.ModelArgs.from_hf(self.config)
        self.shapes = self.arch.checkpoint_shapes(self.args)

    def has(self, key: str) -> bool:
        return key in self.shapes

    def prefix_for(self, candidates: tuple[str, ...], probe: str) -> str:
        for p in candidates:
            if p + probe in self.shapes:
                return p
        raise FormatError(f"synthetic {self.shape.model_type} checkpoint has no {probe!r} under any of {candidates}")

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise FormatError(f"synthetic {self.shape.model_type} checkpoint has no tensor {key!r}")
        shape = self.shapes[key]
        if key.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        fan_in = shape[-1]
        std = 0.02 if len(shape) == 1 or "embed" in key else 1.0 / math.sqrt(fan_in)
        out = torch.empty(shape, dtype=self.dtype)
        rows = max(1, (32 << 20) // (4 * fan_in))  # in 32 MB fp32 slices: a bounded peak
        flat = out.view(-1, fan_in)
        for a in range(0, flat.shape[0], rows):
            flat[a : a + rows] = torch.randn(min(rows, flat.shape[0] - a), fan_in, generator=gen) * std
        return out

    def tokenizer_files(self) -> list[Path]:
        return []

    def file_paths(self) -> list[Path]:
        return []


def random_predictors(shape: Shape, seed: int) -> list[PredictorWeights]:
    """Low-rank predictors of the paper's ranks whose logits are ~N(0, 1) with a bias that flags
    about 10% of neurons active at threshold 0.5."""
    gen = torch.Generator().manual_seed(seed + 7)
    out = []
    for rank in shape.ranks():
        A = torch.randn(rank, shape.dim, generator=gen) / math.sqrt(shape.dim)
        B = torch.randn(shape.ffn_dim, rank, generator=gen) / math.sqrt(rank)
        out.append(PredictorWeights(A, B, torch.full((shape.ffn_dim,), -_PREDICTED_DENSITY_Z), 0.5))
    return out


def artifact_bytes(shape: Shape, dtype: str, predictors: bool = True) -> int:
    """About how many bytes the artifact takes on disk: the checkpoint's tensors, the predictors
    and the int64 neuron orders."""
    d, n = shape.dim, shape.ffn_dim
    weights = sum(math.prod(s) for s in shape.checkpoint_shapes().values())
    pred = sum(r * (d + n) + n for r in shape.ranks()) if predictors else 0
    return (weights + pred) * ITEMSIZE[dtype] + shape.n_layers * n * 8


def write_synthetic(shape: str | Shape, out_dir: str | Path, *, scale: float = 1.0, seed: int = 0,
                    dtype: str = "float16", predictors: bool = True, overwrite: bool = False,
                    quantize: str | None = None, quantize_resident: str | None = None,
                    two_level_scales: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a random-weight artifact of `shape` (a SHAPES name or a Shape) and return its path.
    quantize: the writer's bundle-row scheme ('int8' | 'int4'; None: float rows); quantize_resident:
    the resident matrices' ('int8', the default with quantize, 'int4' or 'none'); two_level_scales:
    int4's (flashio.quant.RowQuant.sub_bits). Refuses when the filesystem lacks the space, before writing anything."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise FlashError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
        name, shape = shape, SHAPES[shape]
    else:
        name = "custom"
    if dtype not in TORCH_DTYPES:
        raise FlashError(f"dtype {dtype!r} is not one of {sorted(TORCH_DTYPES)}")
    shape = shape.scaled(scale)
    out_dir = Path(out_dir)
    need = artifact_bytes(shape, dtype, predictors)
    probe = out_dir.parent if not out_dir.exists() else out_dir
    probe.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(probe).free
    if free < need + _DISK_MARGIN_BYTES:
        raise FlashError(f"{probe} has {format_size(free)} free; the {name} artifact (scale {scale}, "
                         f"{dtype}) needs {format_size(need)} plus {format_size(_DISK_MARGIN_BYTES)} "
                         "of margin: free space, choose another --out, or use --scale")
    log.info("writing synthetic %s (scale %s, %s, ~%s) to %s", name, scale, dtype, format_size(need), out_dir)
    ckpt = SyntheticCheckpoint(shape, dtype, seed)
    resident, ffn = ckpt.arch.read_checkpoint(ckpt, ckpt.args)
    lineage = {"source": {"id": f"synthetic/{name}", "model_type": shape.model_type},
               "synthetic": {"shape": name, "scale": scale, "seed": seed, "dims": {
                   "dim": shape.dim, "ffn_dim": shape.ffn_dim, "n_layers": shape.n_layers,
                   "n_heads": shape.n_heads, "vocab_size": shape.vocab_size}}}
    source = ModelSource(shape.model_type, ckpt.config, shape.n_layers, resident, ffn, [], lineage)
    preds = random_predictors(shape, seed) if predictors else None
    return write_artifact(source, out_dir, dtype=dtype, predictors=preds, overwrite=overwrite, quantize=quantize,
                          quantize_resident=quantize_resident, two_level_scales=two_level_scales, progress=progress)
