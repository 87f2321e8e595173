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

from flashio.errors import FlashError, FormatError
from flashio.format.manifest import DTYPES
from flashio.format.writer import TORCH_DTYPES, ModelSource, write_artifact
from flashio.models import get_architecture
from flashio.predictor import PredictorWeights
from flashio.sizes import format_size

log = logging.getLogger(__name__)

_DISK_MARGIN_BYTES = 1 << 30  # free space kept beyond the artifact (the writer's temporary files)
_PREDICTED_DENSITY_Z = 1.2816  # P(N(0, 1) > z) = 0.10: random predictors flag ~10% of neurons


@dataclass(frozen=True)
class Shape:
    """A model's shape as its Hugging Face config states it, plus the paper's predictor ranks."""

    model_type: str
    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    max_positions: int
    predictor_ranks: tuple[tuple[int, int], ...]  # (rank, layers) runs, in layer order

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def scaled(self, scale: float) -> Shape:
        """Widths and layers times `scale`, vocabulary and positions times scale**2 and scale (so
        that embeddings keep about their share of the weights); head width kept, d_model a
        multiple of 128 (256 when gated) so that fp16 bundles stay a multiple of 512 bytes, the
        O_DIRECT block."""
        if scale == 1.0:
            return self
        if not 0 < scale <= 1:
            raise FlashError(f"scale must be in (0, 1], got {scale}")

        def r128(x: float, k: int = 128) -> int:
            return max(k, round(x / k) * k)

        # gated bundles hold 3 rows of dim: 256-multiples keep 3 * dim * 2 bytes a 512-multiple
        dim = r128(self.dim * scale, 256 if self.model_type == "llama" else 128)
        layers = max(2, round(self.n_layers * scale))
        ranks, left = [], layers
        for rank, n in self.predictor_ranks:
            k = min(left, max(1, round(n * scale)))
            if k:
                ranks.append((max(8, round(rank * scale)), k))
                left -= k
        if left:
            ranks[-1] = (ranks[-1][0], ranks[-1][1] + left)
        return Shape(self.model_type, dim, r128(self.ffn_dim * scale), layers, dim // self.head_dim,
                     max(256, round(self.vocab_size * scale**2)), max(128, round(self.max_positions * scale)),
                     tuple(ranks))

    def ranks(self) -> list[int]:
        return [r for r, n in self.predictor_ranks for _ in range(n)]

    def hf_config(self, dtype: str) -> dict:
        c = {"model_type": self.model_type, "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
             "num_attention_heads": self.n_heads, "vocab_size": self.vocab_size,
             "max_position_embeddings": self.max_positions, "torch_dtype": dtype}
        if self.model_type == "opt":
            c.update(ffn_dim=self.ffn_dim, word_embed_proj_dim=self.dim, do_layer_norm_before=True,
                     activation_function="relu", enable_bias=True, bos_token_id=2, eos_token_id=2,
                     pad_token_id=1, tie_word_embeddings=True)
        else:
            c.update(intermediate_size=self.ffn_dim, num_key_value_heads=self.n_heads, hidden_act="silu",
                     rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=False)
        return c

    def hf_shape(self, key: str) -> tuple[int, ...]:
        """The shape of a Hugging Face tensor name of this model."""
        d, n, v = self.dim, self.ffn_dim, self.vocab_size
        leaf = key.rsplit(".", 2)
        name = ".".join(leaf[-2:])
        table = {"embed_tokens.weight": (v, d), "embed_positions.weight": (self.max_positions + 2, d),
                 "lm_head.weight": (v, d), "fc1.weight": (n, d), "fc1.bias": (n,), "fc2.weight": (d, n),
                 "up_proj.weight": (n, d), "gate_proj.weight": (n, d), "down_proj.weight": (d, n)}
        if name in table:
            return table[name]
        if key.endswith(("_proj.weight",)) and "self_attn" in key:
            return (d, d)
        if key.endswith((".bias", "norm.weight", "layernorm.weight", "layer_norm.weight")):
            return (d,)
        raise FormatError(f"synthetic {self.model_type} checkpoint has no tensor {key!r}")


SHAPES: dict[str, Shape] = {
    # OPT-6.7B: predictor ranks 128 for the first 28 layers, 1024 for the last 4 (paper)
    "opt-6.7b": Shape("opt", 4096, 16384, 32, 32, 50272, 2048, ((128, 28), (1024, 4))),
    "opt-1.3b": Shape("opt", 2048, 8192, 24, 32, 50272, 2048, ((128, 20), (1024, 4))),
    # Llama 2 7B: rank 256, with 1024 on 4 middle layers (paper)
    "llama-2-7b": Shape("llama", 4096, 11008, 32, 32, 32000, 4096, ((256, 14), (1024, 4), (256, 14))),
}


class SyntheticCheckpoint:
    """Answers an architecture's `read_checkpoint` with seeded random tensors (HFCheckpoint's
    interface: config, has, get, prefix_for, tokenizer_files, file_paths)."""

    def __init__(self, shape: Shape, dtype: str, seed: int):
        self.shape, self.dtype, self.seed = shape, TORCH_DTYPES[dtype], seed
        self.config = shape.hf_config(dtype)
        self.prefix = "model.decoder." if shape.model_type == "opt" else "model."

    def has(self, key: str) -> bool:
        return key.startswith(self.prefix) or key == "lm_head.weight"

    def prefix_for(self, candidates: tuple[str, ...], probe: str) -> str:
        return self.prefix

    def get(self, key: str) -> torch.Tensor:
        shape = self.shape.hf_shape(key)
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
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
    """About how many bytes the artifact takes on disk."""
    d, n, v, L = shape.dim, shape.ffn_dim, shape.vocab_size, shape.n_layers
    parts = 2 if shape.model_type == "opt" else 3
    ffn = L * n * parts * d
    attn = L * (4 * d * d + 6 * d)
    emb = v * d * (1 if shape.model_type == "opt" else 2) + (shape.max_positions + 2) * d
    pred = sum(r * (d + n) + n for r in shape.ranks()) if predictors else 0
    return (ffn + attn + emb + pred + L * n) * DTYPES[dtype] + L * n * 8  # + int64 neuron orders


def write_synthetic(shape: str | Shape, out_dir: str | Path, *, scale: float = 1.0, seed: int = 0,
                    dtype: str = "float16", predictors: bool = True, overwrite: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a random-weight artifact of `shape` (a SHAPES name or a Shape) and return its path.
    Refuses when the filesystem lacks the space, before writing anything."""
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
    arch = get_architecture(shape.model_type)
    args = arch.ModelArgs.from_hf(ckpt.config)
    resident, ffn = arch.read_checkpoint(ckpt, args)
    lineage = {"source": {"id": f"synthetic/{name}", "model_type": shape.model_type},
               "synthetic": {"shape": name, "scale": scale, "seed": seed, "dims": {
                   "dim": shape.dim, "ffn_dim": shape.ffn_dim, "n_layers": shape.n_layers,
                   "n_heads": shape.n_heads, "vocab_size": shape.vocab_size}}}
    source = ModelSource(shape.model_type, ckpt.config, shape.n_layers, resident, ffn, [], lineage)
    preds = random_predictors(shape, seed) if predictors else None
    return write_artifact(source, out_dir, dtype=dtype, predictors=preds, overwrite=overwrite,
                          progress=progress)
