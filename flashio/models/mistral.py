"""Mistral (Jiang et al. 2023): Llama with sliding-window attention.

Everything but attention is Llama's (checkpoint names, SwiGLU FFN, rotary positions, grouped-query
heads), so this module reuses flashio.models.llama and adds one thing: a token attends only to
the last `sliding_window` positions, itself included (transformers' MistralForCausalLM). The KV
cache still keeps every position; only the attention reads are narrowed.
"""

from __future__ import annotations

import dataclasses

from flashio.errors import UnsupportedArchitectureError
from flashio.models import llama
from flashio.models.base import ConfigDims
from flashio.models.llama import FFN, checkpoint_shapes, read_checkpoint

MODEL_TYPES = ("mistral",)
__all__ = ["FFN", "MODEL_TYPES", "Model", "ModelArgs", "checkpoint_shapes", "hf_config", "read_checkpoint"]

# Mistral 7B's window (transformers' MistralConfig default)
DEFAULT_SLIDING_WINDOW = 4096


@dataclasses.dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    sliding_window: int | None = None  # None: full causal attention (Mistral v0.2 and later)

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UnsupportedArchitectureError(
                f"mistral config has sliding_window={self.sliding_window}; expected a positive number of "
                "positions, or null for full attention: fix config.json")

    @classmethod
    def from_hf(cls, c: dict) -> ModelArgs:
        return dataclasses.replace(super().from_hf(c), sliding_window=c.get("sliding_window"))


def hf_config(dims: ConfigDims, *, init_std: float = 0.02) -> dict:
    """Llama's config of these dimensions as a Mistral one, with Mistral 7B's window."""
    return {**llama.hf_config(dims, init_std=init_std), "model_type": "mistral",
            "sliding_window": DEFAULT_SLIDING_WINDOW}


class Model(llama.Model):
    """Llama's resident part whose attention reads the last `sliding_window` positions."""

    args: ModelArgs

    def _window(self, i: int) -> int | None:
        return self.args.sliding_window
