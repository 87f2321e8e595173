"""OPT (Zhang et al. 2022): ReLU FFN with biases, learned positions, LayerNorm.

The FFN is exactly sparse: a neuron whose ReLU output is 0 contributes nothing, so skipping it
changes no bit of the math (only float summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashio.checkpoint import HFCheckpoint
from flashio.errors import UnsupportedArchitectureError
from flashio.models.base import (
    ConfigDims,
    FFNSpec,
    FFNWeights,
    KVCache,
    attend,
    head_linear,
    linear,
)
from flashio.quant import embedding

MODEL_TYPES = ("opt",)
FFN = FFNSpec(parts=("up", "down"), activation="relu", hook_path="model.decoder.layers.{i}.fc1")
# HF OPT learned position embeddings are offset by 2 (a fairseq legacy).
POSITION_OFFSET = 2


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_positions: int
    pre_norm: bool = True  # do_layer_norm_before
    final_norm: bool = True
    norm_affine: bool = True
    bias: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @classmethod
    def from_hf(cls, c: dict) -> ModelArgs:
        act = c.get("activation_function", "relu")
        if act != "relu":
            raise UnsupportedArchitectureError(
                f"OPT with activation_function={act!r} is not supported: flashio's OPT path needs "
                "'relu' (the FFN sparsity it exploits comes from ReLU)")
        if c.get("word_embed_proj_dim", c["hidden_size"]) != c["hidden_size"]:
            raise UnsupportedArchitectureError(
                f"OPT with word_embed_proj_dim={c['word_embed_proj_dim']} != hidden_size="
                f"{c['hidden_size']} (project_in/out, as in opt-350m) is not supported")
        pre = bool(c.get("do_layer_norm_before", True))
        return cls(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], ffn_dim=c["ffn_dim"],
            max_positions=c["max_position_embeddings"], pre_norm=pre,
            final_norm=pre and not c.get("_remove_final_layer_norm", False),
            norm_affine=bool(c.get("layer_norm_elementwise_affine", True)),
            bias=bool(c.get("enable_bias", True)),
            tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        )


def hf_config(dims: ConfigDims, *, init_std: float = 0.02) -> dict:
    """A Hugging Face config of these dimensions (transformers' OPTConfig defaults otherwise,
    dropout off); OPT has no grouped-query attention: n_kv_heads is not used."""
    return {"model_type": "opt", "vocab_size": dims.vocab_size, "hidden_size": dims.dim, "ffn_dim": dims.ffn_dim,
            "num_hidden_layers": dims.n_layers, "num_attention_heads": dims.n_heads,
            "max_position_embeddings": dims.max_positions, "word_embed_proj_dim": dims.dim,
            "do_layer_norm_before": True, "activation_function": "relu", "enable_bias": True,
            "init_std": init_std, "dropout": 0.0, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
            "tie_word_embeddings": True}


# flashio name -> HF name (after the 'model.decoder.' / 'decoder.' prefix); per layer under 'layers.{i}.'
_GLOBAL_KEYS = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "pos_embeddings.weight": "embed_positions.weight",
}
_NORM_KEYS = {"norm.weight": "final_layer_norm.weight", "norm.bias": "final_layer_norm.bias"}
_LAYER_WEIGHTS = {
    "attn_norm.weight": "self_attn_layer_norm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.out_proj.weight",
    "ffn_norm.weight": "final_layer_norm.weight",
}
_LAYER_BIASES = {
    "attn_norm.bias": "self_attn_layer_norm.bias",
    "attn.q.bias": "self_attn.q_proj.bias",
    "attn.k.bias": "self_attn.k_proj.bias",
    "attn.v.bias": "self_attn.v_proj.bias",
    "attn.o.bias": "self_attn.out_proj.bias",
    "ffn_norm.bias": "final_layer_norm.bias",
}


def read_checkpoint(ckpt: HFCheckpoint, args: ModelArgs):
    """Resident tensors (flashio names) and a function giving layer i's FFN weights."""
    p = ckpt.prefix_for(("model.decoder.", "decoder."), "embed_tokens.weight")
    resident = {k: ckpt.get(p + v) for k, v in _GLOBAL_KEYS.items()}
    if args.final_norm:
        resident.update({k: ckpt.get(p + v) for k, v in _NORM_KEYS.items() if ckpt.has(p + v)})
    if not args.tie_embeddings:
        resident["lm_head.weight"] = ckpt.get("lm_head.weight")
    for i in range(args.n_layers):
        lp = f"{p}layers.{i}."
        names = dict(_LAYER_WEIGHTS)
        if args.bias:
            names.update({k: v for k, v in _LAYER_BIASES.items() if "norm" not in k})
        if args.norm_affine:
            names.update({k: v for k, v in _LAYER_BIASES.items() if "norm" in k})
        else:
            names = {k: v for k, v in names.items() if "norm" not in k}
        for k, v in names.items():
            resident[f"layers.{i}.{k}"] = ckpt.get(lp + v)

    def ffn(i: int) -> FFNWeights:
        lp = f"{p}layers.{i}."
        return FFNWeights(
            up=ckpt.get(lp + "fc1.weight"),  # [N, D]
            down=ckpt.get(lp + "fc2.weight").t().contiguous(),  # [D, N] -> [N, D]
            up_bias=ckpt.get(lp + "fc1.bias") if args.bias else None,
            down_bias=ckpt.get(lp + "fc2.bias") if args.bias else None,
        )

    return resident, ffn


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face checkpoint of `args` (save_pretrained): name -> shape."""
    d, n, p = args.dim, args.ffn_dim, "model.decoder."
    out = {p + "embed_tokens.weight": (args.vocab_size, d),
           p + "embed_positions.weight": (args.max_positions + POSITION_OFFSET, d)}
    if args.final_norm and args.norm_affine:
        out.update({p + v: (d,) for v in _NORM_KEYS.values()})
    if not args.tie_embeddings:
        out["lm_head.weight"] = (args.vocab_size, d)
    names = {**_LAYER_WEIGHTS, **_LAYER_BIASES}
    for i in range(args.n_layers):
        for k, v in names.items():
            if ("norm" in k and not args.norm_affine) or (k.endswith(".bias") and "norm" not in k and not args.bias):
                continue
            out[f"{p}layers.{i}.{v}"] = (d,) if "norm" in k or k.endswith(".bias") else (d, d)
        lp = f"{p}layers.{i}."
        out.update({lp + "fc1.weight": (n, d), lp + "fc2.weight": (d, n)})
        if args.bias:
            out.update({lp + "fc1.bias": (n,), lp + "fc2.bias": (d,)})
    return out


class Model:
    """The resident part of OPT; the FFN is computed by the runtime's engine."""

    def __init__(self, args: ModelArgs, w: dict[str, torch.Tensor]):
        self.args = args
        self.tok = w["tok_embeddings.weight"]  # [V, D]
        self.pos = w["pos_embeddings.weight"]  # [max_pos + 2, D], float (the token embeddings may be quantized)
        self.lm_head = w.get("lm_head.weight", self.tok)
        self.norm = (w.get("norm.weight"), w.get("norm.bias")) if args.final_norm else None
        self.layers = [
            {k.split(".", 2)[2]: t for k, t in w.items() if k.startswith(f"layers.{i}.")}
            for i in range(args.n_layers)
        ]
        self.scale = args.head_dim**-0.5

    def _ln(self, x: torch.Tensor, lw: dict, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.args.dim,), lw.get(f"{name}.weight"), lw.get(f"{name}.bias"),
                            self.args.norm_eps)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        # tokens: [T] -> [T, D]
        pos = torch.arange(start, start + tokens.shape[0], device=self.pos.device) + POSITION_OFFSET
        return embedding(self.tok, tokens, self.pos.dtype) + self.pos[pos]

    def attention(self, i: int, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        a, lw = self.args, self.layers[i]
        h = self._ln(x, lw, "attn_norm") if a.pre_norm else x
        t = h.shape[0]
        q = linear(h, lw["attn.q.weight"], lw.get("attn.q.bias")).view(t, a.n_heads, a.head_dim)
        k = linear(h, lw["attn.k.weight"], lw.get("attn.k.bias")).view(t, a.n_heads, a.head_dim)
        v = linear(h, lw["attn.v.weight"], lw.get("attn.v.bias")).view(t, a.n_heads, a.head_dim)
        k_all, v_all = kv.update(i, k.transpose(0, 1), v.transpose(0, 1))
        o = attend(q.transpose(0, 1), k_all, v_all, start, self.scale)  # [T, D]
        x = x + linear(o, lw["attn.o.weight"], lw.get("attn.o.bias"))
        return x if a.pre_norm else self._ln(x, lw, "attn_norm")

    def ffn_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._ln(x, self.layers[i], "ffn_norm") if self.args.pre_norm else x

    def ffn_output(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.layers[i].get("ffn.down_bias")
        x = x + (y if b is None else y + b)
        return x if self.args.pre_norm else self._ln(x, self.layers[i], "ffn_norm")

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = F.layer_norm(x, (self.args.dim,), self.norm[0], self.norm[1], self.args.norm_eps)
        return head_linear(x, self.lm_head)  # [T, V]
