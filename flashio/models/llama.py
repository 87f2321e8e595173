"""Llama family: RMSNorm, rotary positions, SwiGLU FFN, grouped-query attention.

The SwiGLU FFN is not exactly sparse: "active" means |silu(gate . x)| above a per-layer threshold
calibrated at conversion (training-free, as in CATS/TEAL); the artifact's manifest records it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashio import kernels
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

MODEL_TYPES = ("llama",)
FFN = FFNSpec(parts=("up", "gate", "down"), activation="silu", hook_path="model.layers.{i}.mlp.gate_proj")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_positions: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False

    @classmethod
    def from_hf(cls, c: dict) -> ModelArgs:
        family = c.get("model_type", "llama")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(
                f"{family} with hidden_act={act!r} is not supported (expected 'silu')")
        # transformers >= 5 nests rope settings in rope_parameters; older configs use rope_theta/rope_scaling
        rope = dict(c.get("rope_parameters") or {})
        rope.update({k: v for k, v in (c.get("rope_scaling") or {}).items() if v is not None})
        return cls(**base_fields(c), **rope_fields(family, rope, c.get("rope_theta", 10000.0)))


def base_fields(c: dict) -> dict:
    """The ModelArgs fields every Llama-like config spells the same way (all but the rope)."""
    heads = c["num_attention_heads"]
    return dict(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=heads, n_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        ffn_dim=c["intermediate_size"], max_positions=c["max_position_embeddings"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def rope_fields(family: str, rope: dict, theta: float) -> dict:
    """The rope_* ModelArgs fields from one rope parameter dict (rope_type, factor...); `theta`
    where the dict has no rope_theta."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise UnsupportedArchitectureError(
            f"{family} rope_type {rope_type!r} is not supported; supported: default, linear, llama3")
    return dict(
        rope_theta=float(rope.get("rope_theta", theta)), rope_type=rope_type,
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(rope.get("original_max_position_embeddings", 8192)),
    )


def hf_config(dims: ConfigDims, *, init_std: float = 0.02) -> dict:
    """A Hugging Face config of these dimensions (transformers' LlamaConfig defaults otherwise)."""
    return {"model_type": "llama", "vocab_size": dims.vocab_size, "hidden_size": dims.dim,
            "intermediate_size": dims.ffn_dim, "num_hidden_layers": dims.n_layers,
            "num_attention_heads": dims.n_heads, "num_key_value_heads": dims.n_kv_heads,
            "max_position_embeddings": dims.max_positions, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "initializer_range": init_std, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False}


LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_ATTN_BIAS_KEYS = {f"attn.{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkvo"}


def read_checkpoint(ckpt: HFCheckpoint, args: ModelArgs, *, layer_keys: dict[str, str] = LAYER_KEYS):
    """Resident tensors (flashio names) and a function giving layer i's FFN weights.
    layer_keys: flashio name -> checkpoint name of each layer's resident tensors (a family with
    more norms extends LAYER_KEYS)."""
    p = ckpt.prefix_for(("model.", ""), "embed_tokens.weight")
    resident = {"tok_embeddings.weight": ckpt.get(p + "embed_tokens.weight"),
                "norm.weight": ckpt.get(p + "norm.weight")}
    if not args.tie_embeddings:
        resident["lm_head.weight"] = ckpt.get("lm_head.weight")
    for i in range(args.n_layers):
        lp = f"{p}layers.{i}."
        for k, v in layer_keys.items():
            resident[f"layers.{i}.{k}"] = ckpt.get(lp + v)
        if args.attention_bias:
            for k, v in _ATTN_BIAS_KEYS.items():
                if ckpt.has(lp + v):
                    resident[f"layers.{i}.{k}"] = ckpt.get(lp + v)

    def ffn(i: int) -> FFNWeights:
        lp = f"{p}layers.{i}.mlp."
        bias = (lambda n: ckpt.get(lp + n)) if args.mlp_bias else (lambda n: None)
        return FFNWeights(
            up=ckpt.get(lp + "up_proj.weight"),  # [N, D]
            gate=ckpt.get(lp + "gate_proj.weight"),  # [N, D]
            down=ckpt.get(lp + "down_proj.weight").t().contiguous(),  # [D, N] -> [N, D]
            up_bias=bias("up_proj.bias"), gate_bias=bias("gate_proj.bias"),
            down_bias=bias("down_proj.bias"),
        )

    return resident, ffn


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face checkpoint of `args` (save_pretrained): name -> shape."""
    d, n, q, kv = args.dim, args.ffn_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    out = {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,)}
    if not args.tie_embeddings:
        out["lm_head.weight"] = (args.vocab_size, d)
    attn = {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q)}
    mlp = {"gate": (n, d), "up": (n, d), "down": (d, n)}
    for i in range(args.n_layers):
        lp = f"model.layers.{i}."
        out[lp + "input_layernorm.weight"] = out[lp + "post_attention_layernorm.weight"] = (d,)
        for x, shape in attn.items():
            out[f"{lp}self_attn.{x}_proj.weight"] = shape
            if args.attention_bias:
                out[f"{lp}self_attn.{x}_proj.bias"] = shape[:1]
        for x, shape in mlp.items():
            out[f"{lp}mlp.{x}_proj.weight"] = shape
            if args.mlp_bias:
                out[f"{lp}mlp.{x}_proj.bias"] = shape[:1]
    return out


def rope_inv_freq(a: ModelArgs) -> torch.Tensor:
    inv = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float64) / a.head_dim))
    if a.rope_type == "linear":
        inv = inv / a.rope_factor
    elif a.rope_type == "llama3":
        old = a.rope_original_max_positions
        low_wl, high_wl = old / a.rope_low_freq_factor, old / a.rope_high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / a.rope_factor, inv)
        smooth = (old / wl - a.rope_low_freq_factor) / (a.rope_high_freq_factor - a.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / a.rope_factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_table(inv_freq: torch.Tensor, start: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, Dh] of positions start .. start+T-1 (fp32 angles; cos/sin in `dtype`, as transformers)."""
    pos = torch.arange(start, start + t, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(pos, inv_freq)  # [T, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, Dh] rotated by a rope_table's cos, sin: [T, Dh]."""
    return x * cos + _rotate_half(x) * sin


class Model:
    """The resident part of a Llama model; the FFN is computed by the runtime's engine."""

    def __init__(self, args: ModelArgs, w: dict[str, torch.Tensor]):
        self.args = args
        self.tok = w["tok_embeddings.weight"]  # [V, D]
        self.lm_head = w.get("lm_head.weight", self.tok)
        self.norm_w = w["norm.weight"]
        self.dtype = self.norm_w.dtype  # of the computation (the embeddings may be quantized)
        self.layers = [
            {k.split(".", 2)[2]: t for k, t in w.items() if k.startswith(f"layers.{i}.")}
            for i in range(args.n_layers)
        ]
        self.inv_freq = rope_inv_freq(args).to(self.norm_w.device)  # [Dh/2]
        self.scale = args.head_dim**-0.5
        # the step's rope tables, by frequencies and dtype: computed once per step instead of
        # twice per layer (q and k), ~7 small ops each; they depend only on the key and (start, T)
        self._rope_step: tuple[int, int] = (-1, 0)
        self._rope_tables: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in kernels.DTYPE_CODES and x.is_contiguous()
                and w.is_contiguous() and kernels.available()):
            # one native call instead of seven ops, each slow after a layer's products have
            # streamed through the caches (a Llama-2-7B token's ~90 norms, +lookahead: 12.4 -> 6.4 ms)
            return kernels.kernels().rms(x, w, self.args.norm_eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.args.norm_eps)
        return w * xf.to(x.dtype)

    def _inv_freq(self, i: int) -> torch.Tensor:
        """Layer i's rotary frequencies [Dh/2] (every Llama layer has the same; Gemma's do not)."""
        return self.inv_freq

    def _rope(self, i: int, x: torch.Tensor, start: int) -> torch.Tensor:
        # x: [H, T, Dh] of layer i
        inv, t = self._inv_freq(i), x.shape[1]
        if self._rope_step != (start, t):
            self._rope_step, self._rope_tables = (start, t), {}
        key = (id(inv), x.dtype)
        table = self._rope_tables.get(key)
        if table is None:
            table = self._rope_tables[key] = rope_table(inv, start, t, x.dtype)
        if t == 1 and x.device.type == "cpu" and x.dtype in kernels.DTYPE_CODES and kernels.available():
            # decoding: one native call instead of six ops (x: [H, 1, Dh], a view of [1, H, Dh])
            rows = x.reshape(-1, x.shape[-1])
            return kernels.kernels().rope(rows.contiguous(), table[0][0], table[1][0]).view(x.shape)
        return apply_rope(x, *table)

    def embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        return embedding(self.tok, tokens, self.dtype)  # [T, D]

    def attention(self, i: int, x: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        return x + self.self_attention(i, self._rms(x, self.layers[i]["attn_norm.weight"]), kv, start)

    def self_attention(self, i: int, h: torch.Tensor, kv: KVCache, start: int) -> torch.Tensor:
        """Layer i's attention of the normed input h: [T, D] -> [T, D] (after o_proj)."""
        lw = self.layers[i]
        q, k, v = self._project(i, h)
        q = self._rope(i, q.transpose(0, 1), start)
        k = self._rope(i, k.transpose(0, 1), start)
        k_all, v_all = kv.update(i, k, v.transpose(0, 1))
        o = attend(q, k_all, v_all, start, self.scale, window=self._window(i))  # [T, H*Dh]
        return linear(o, lw["attn.o.weight"], lw.get("attn.o.bias"))

    def _project(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q: [T, H, Dh], k and v: [T, Hk, Dh] of the normed input h: [T, D]."""
        a, lw = self.args, self.layers[i]
        t = h.shape[0]
        q = linear(h, lw["attn.q.weight"], lw.get("attn.q.bias")).view(t, a.n_heads, a.head_dim)
        k = linear(h, lw["attn.k.weight"], lw.get("attn.k.bias")).view(t, a.n_kv_heads, a.head_dim)
        v = linear(h, lw["attn.v.weight"], lw.get("attn.v.bias")).view(t, a.n_kv_heads, a.head_dim)
        return q, k, v

    def _window(self, i: int) -> int | None:
        """Layer i's sliding window (None: every cached position; variants narrow it: Mistral's)."""
        return None

    def ffn_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._rms(x, self.layers[i]["ffn_norm.weight"])

    def ffn_output(self, i: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.layers[i].get("ffn.down_bias")
        return x + (y if b is None else y + b)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return head_linear(self._rms(x, self.norm_w), self.lm_head)  # [T, V]
