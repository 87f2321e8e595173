"""Gemma 3 text models (Gemma Team 2025), as transformers' Gemma3ForCausalLM (model_type
"gemma3_text": the 270M and 1B checkpoints, and what a "gemma3" GGUF becomes).

Llama's skeleton (rotary positions, grouped-query attention, a gated FFN) with Gemma's changes,
each matched against transformers:
- GeGLU: act(gate . x) * (up . x) with tanh-approximated GELU ("gelu_pytorch_tanh");
- RMSNorm multiplies by (1 + weight), computed in fp32 and cast at the end;
- four norms per layer: before and after attention, before and after the FFN; RMSNorms on the
  queries and keys of each head (before the rotation);
- embeddings multiplied by sqrt(hidden) rounded to the weight's dtype; tied head;
- local layers (layer_types "sliding_attention": 5 of every 6 by default) attend to the last
  `sliding_window` positions with rope base `rope_local_base_freq` (10k); global layers attend to
  everything with the global base (1M) and the config's rope scaling;
- attention scores scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- optional final logit softcapping: cap * tanh(logits / cap).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from flashio.checkpoint import HFCheckpoint
from flashio.errors import UnsupportedArchitectureError
from flashio.models import llama
from flashio.models.base import ConfigDims, FFNSpec, KVCache
from flashio.models.llama import base_fields, rope_fields
from flashio.quant import embedding

MODEL_TYPES = ("gemma3_text",)
FFN = FFNSpec(parts=("up", "gate", "down"), activation="gelu_pytorch_tanh",
              hook_path="model.layers.{i}.mlp.gate_proj")
SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' Gemma3TextConfig defaults, which configs and GGUF files leave out
SLIDING_WINDOW_PATTERN = 6  # every 6th layer is global
LOCAL_ROPE_THETA, GLOBAL_ROPE_THETA = 10_000.0, 1_000_000.0

LAYER_KEYS = {
    **{k: v for k, v in llama.LAYER_KEYS.items() if k != "ffn_norm.weight"},
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",  # the FFN's input norm, as in Llama
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "post_ffn_norm.weight": "post_feedforward_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",  # [Dh]
    "attn.k_norm.weight": "self_attn.k_norm.weight",  # [Dh]
}


def default_layer_types(n_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> list[str]:
    """Gemma 3's local:global interleaving (transformers' default when a config has no layer_types)."""
    return [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]


@dataclasses.dataclass(frozen=True)
class ModelArgs(llama.ModelArgs):
    """Llama's fields (rope_* describe the global layers) plus Gemma 3's."""

    sliding_window: int = 4096
    layer_types: tuple[str, ...] = ()  # per layer, SLIDING or FULL
    rope_local_theta: float = LOCAL_ROPE_THETA
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown or len(self.layer_types) != self.n_layers:
            raise UnsupportedArchitectureError(
                f"gemma3_text config has layer_types {list(self.layer_types)}; expected {self.n_layers} "
                f"entries of {FULL!r} or {SLIDING!r}: fix config.json")
        if self.sliding_window < 1 or self.query_pre_attn_scalar <= 0:
            raise UnsupportedArchitectureError(
                f"gemma3_text config has sliding_window={self.sliding_window}, query_pre_attn_scalar="
                f"{self.query_pre_attn_scalar}; expected positive values: fix config.json")

    @classmethod
    def from_hf(cls, c: dict) -> ModelArgs:
        act = c.get("hidden_activation") or c.get("hidden_act") or FFN.activation
        if act != FFN.activation:
            raise UnsupportedArchitectureError(
                f"gemma3_text with hidden_activation={act!r} is not supported (expected {FFN.activation!r})")
        for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if c.get(key):
                raise UnsupportedArchitectureError(
                    f"gemma3_text with {key}={c[key]!r} is not supported (Gemma 3 causal LMs have none): "
                    "flashio runs causal attention without score capping")
        # transformers >= 5: rope_parameters per layer type; older: rope_theta, rope_local_base_freq,
        # rope_scaling (which applies to the global layers only)
        params = c.get("rope_parameters") or {}
        global_rope = dict(params.get(FULL) or {})
        global_rope.update({k: v for k, v in (c.get("rope_scaling") or {}).items() if v is not None})
        local_rope = params.get(SLIDING) or {}
        if local_rope.get("rope_type", "default") != "default":
            raise UnsupportedArchitectureError(
                f"gemma3_text local rope_type {local_rope['rope_type']!r} is not supported (expected 'default')")
        n = c["num_hidden_layers"]
        types = c.get("layer_types") or default_layer_types(
            n, c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or SLIDING_WINDOW_PATTERN)
        cap = c.get("final_logit_softcapping")
        return cls(
            **{**base_fields(c), "tie_embeddings": bool(c.get("tie_word_embeddings", True))},
            **rope_fields("gemma3_text", global_rope, c.get("rope_theta", GLOBAL_ROPE_THETA)),
            sliding_window=int(c.get("sliding_window") or 4096), layer_types=tuple(types),
            rope_local_theta=float(local_rope.get("rope_theta", c.get("rope_local_base_freq", LOCAL_ROPE_THETA))),
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
            final_logit_softcapping=None if cap is None else float(cap),
        )


def hf_config(dims: ConfigDims, *, init_std: float = 0.02) -> dict:
    """A Gemma3TextConfig of these dimensions (Gemma 3's defaults otherwise: 5 local layers to 1
    global, windows of 512 positions as in the 270M and 1B models, tied head)."""
    head_dim = dims.dim // dims.n_heads
    return {"model_type": "gemma3_text", "vocab_size": dims.vocab_size, "hidden_size": dims.dim,
            "intermediate_size": dims.ffn_dim, "num_hidden_layers": dims.n_layers,
            "num_attention_heads": dims.n_heads, "num_key_value_heads": dims.n_kv_heads, "head_dim": head_dim,
            "max_position_embeddings": dims.max_positions, "hidden_activation": FFN.activation,
            "rms_norm_eps": 1e-6, "query_pre_attn_scalar": head_dim, "sliding_window": 512,
            "layer_types": default_layer_types(dims.n_layers),
            "rope_parameters": {FULL: {"rope_type": "default", "rope_theta": GLOBAL_ROPE_THETA},
                                SLIDING: {"rope_type": "default", "rope_theta": LOCAL_ROPE_THETA}},
            "initializer_range": init_std, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "tie_word_embeddings": True}


def read_checkpoint(ckpt: HFCheckpoint, args: ModelArgs):
    """Llama's table with Gemma's norms (the weights stay as stored: Model adds the 1)."""
    return llama.read_checkpoint(ckpt, args, layer_keys=LAYER_KEYS)


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Llama's tensors plus the FFN's pre/post norms and the q/k norms."""
    out = llama.checkpoint_shapes(args)
    for i in range(args.n_layers):
        lp = f"model.layers.{i}."
        out[lp + "pre_feedforward_layernorm.weight"] = out[lp + "post_feedforward_layernorm.weight"] = (args.dim,)
        out[lp + "self_attn.q_norm.weight"] = out[lp + "self_attn.k_norm.weight"] = (args.head_dim,)
    return out


class Model(llama.Model):
    """The resident part of a Gemma 3 text model; the FFN is computed by the runtime's engine."""

    args: ModelArgs

    def __init__(self, args: ModelArgs, w: dict[str, torch.Tensor]):
        super().__init__(args, w)  # self.inv_freq: the global layers'
        local = dataclasses.replace(args, rope_theta=args.rope_local_theta, rope_type="default")
        self.inv_freq_local = llama.rope_inv_freq(local).to(self.norm_w.device)  # [Dh/2]
        self.scale = args.query_pre_attn_scalar**-0.5
        # transformers keeps sqrt(hidden) as an fp32 buffer and rounds it to the weight's dtype
        self.embed_scale = torch.tensor(math.sqrt(args.dim)).to(self.dtype)
        # (1 + weight) in fp32 of every norm, by weight: computed once instead of in each call (the
        # same values; two ops fewer in each of a layer's six norms)
        norms = [self.norm_w, *(t for lw in self.layers for k, t in lw.items() if k.endswith("norm.weight"))]
        self._norm_factors = {id(w): 1.0 + w.float() for w in norms}

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.args.norm_eps)
        return (xf * self._norm_factors[id(w)]).to(x.dtype)

    def _inv_freq(self, i: int) -> torch.Tensor:
        return self.inv_freq_local if self.args.layer_types[i] == SLIDING else self.inv_freq

    def _window(self, i: int) -> int | None:
        return self.args.sliding_window if self.args.layer_types[i] == SLIDING else None

    def _project(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super()._project(i, h)  # [T, H, Dh], [T, Hk, Dh] x2
        lw = self.layers[i]
        return self._rms(q, lw["attn.q_norm.weight"]), self._rms(k, lw["attn.k_norm.weight"]), v

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return embedding(self.tok, tokens, self.dtype) * self.embed_scale  # [T, D]

    def attention(self, i: int, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        lw = self.layers[i]
        o = self.self_attention(i, self._rms(x, lw["attn_norm.weight"]), kv, start)
        return x + self._rms(o, lw["post_attn_norm.weight"])

    def ffn_output(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.layers[i].get("ffn.down_bias")
        return x + self._rms(y if b is None else y + b, self.layers[i]["post_ffn_norm.weight"])

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().head(x)  # [T, V]
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
