"""Qwen 2 / 2.5 (Yang et al. 2024): Llama with biases on the q, k and v projections.

Everything else is Llama's (checkpoint names, SwiGLU FFN, rotary positions, grouped-query heads),
so this module reuses flashio.models.llama. Qwen 2 configs also carry sliding-window fields
(`use_sliding_window`, `sliding_window`, `max_window_layers`, `layer_types`); released models
ship them disabled, and when enabled transformers' Qwen2ForCausalLM narrows the attention of the
layers whose `layer_types` entry is "sliding_attention" (those from `max_window_layers` on):
so does this module.
"""

from __future__ import annotations

import dataclasses

from flashio.errors import UnsupportedArchitectureError
from flashio.models import llama
from flashio.models.base import ConfigDims
from flashio.models.llama import FFN, read_checkpoint

MODEL_TYPES = ("qwen2",)
__all__ = ["FFN", "MODEL_TYPES", "Model", "ModelArgs", "checkpoint_shapes", "hf_config", "read_checkpoint"]

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    sliding_window: int | None = None  # None: every layer attends to every position (the usual case)
    layer_types: tuple[str, ...] = ()  # per layer, SLIDING or FULL; () when there is no window

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UnsupportedArchitectureError(
                f"qwen2 config has sliding_window={self.sliding_window} with use_sliding_window true; "
                "expected a positive number of positions: fix config.json")
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown or (self.layer_types and len(self.layer_types) != self.n_layers):
            raise UnsupportedArchitectureError(
                f"qwen2 config has layer_types {list(self.layer_types)}; expected {self.n_layers} entries "
                f"of {FULL!r} or {SLIDING!r}: fix config.json")

    @classmethod
    def from_hf(cls, c: dict) -> ModelArgs:
        # q/k/v carry biases in every Qwen 2 (o_proj none); read_checkpoint reads the ones present
        args = dataclasses.replace(super().from_hf(c), attention_bias=True)
        window = c.get("sliding_window") if c.get("use_sliding_window") else None
        if window is None:
            return args
        n = c["num_hidden_layers"]
        types = c.get("layer_types") or [SLIDING if i >= c.get("max_window_layers", 28) else FULL
                                         for i in range(n)]  # transformers' Qwen2Config default
        return dataclasses.replace(args, sliding_window=int(window), layer_types=tuple(types))


def hf_config(dims: ConfigDims, *, init_std: float = 0.02) -> dict:
    """Llama's config of these dimensions as a Qwen 2 one (window off, as released models ship)."""
    return {**llama.hf_config(dims, init_std=init_std), "model_type": "qwen2", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": dims.n_layers}


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Llama's tensors plus the q, k, v biases (no o_proj bias)."""
    out = llama.checkpoint_shapes(dataclasses.replace(args, attention_bias=False))
    kv = args.n_kv_heads * args.head_dim
    for i in range(args.n_layers):
        for x, n in (("q", args.n_heads * args.head_dim), ("k", kv), ("v", kv)):
            out[f"model.layers.{i}.self_attn.{x}_proj.bias"] = (n,)
    return out


class Model(llama.Model):
    """Llama's resident part (the biases are read by Llama's projections) with Qwen 2's optional
    per-layer window."""

    args: ModelArgs

    def _window(self, i: int) -> int | None:
        a = self.args
        return a.sliding_window if a.layer_types and a.layer_types[i] == SLIDING else None
