"""Pieces shared by the architectures: what a family declares about its FFN (FFNSpec), the
dimensions its configs are built from (ConfigDims), the FFN weights a checkpoint yields, the KV
cache and attention.

Shapes: T tokens in this step, P tokens already in the KV cache, D model width, H heads,
Hk key/value heads, Dh head width, N FFN neurons.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashio import kernels
from flashio.errors import FlashError
from flashio.quant import QuantizedRows, QuantizedWeight
from flashio.quant import linear as quant_linear

# vocabulary rows per matmul of a head over several positions (head_linear)
HEAD_CHUNK_ROWS = 1024

# activation name (as the manifest records it; transformers' ACT2FN names) -> function
ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh")}
FFN_PARTS = (("up", "down"), ("up", "gate", "down"))


@dataclass(frozen=True)
class FFNSpec:
    """A family's FFN as the writer, the runtime and the pipeline see it.

    parts: the per-neuron rows of a bundle, in stored order ("gate" present: a gated FFN,
        act(gate . x) * (up . x)).
    activation: applied to the first projection (up, or gate when gated); "relu" makes the FFN
        exactly sparse (an inactive neuron's output is exactly 0).
    hook_path: attribute path, in the transformers CausalLM of the family, of the module whose
        input is the FFN input and whose output goes through `activation` to decide which
        neurons are active; `{i}` is the layer. A path instead of a function keeps
        transformers out of flashio (DESIGN.md section 1).
    """

    parts: tuple[str, ...]
    activation: str
    hook_path: str

    def __post_init__(self) -> None:
        if self.parts not in FFN_PARTS:
            raise FlashError(f"FFN parts {self.parts} are not one of {FFN_PARTS}")
        if self.activation not in ACTIVATIONS:
            raise FlashError(f"FFN activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if "{i}" not in self.hook_path:
            raise FlashError(f"FFN hook path {self.hook_path!r} has no '{{i}}' for the layer index")

    @property
    def gated(self) -> bool:
        return "gate" in self.parts

    @property
    def exactly_sparse(self) -> bool:
        """Whether "active" is exact (output > 0) or needs a calibrated threshold."""
        return self.activation == "relu"

    def hook_paths(self, n_layers: int) -> list[str]:
        return [self.hook_path.format(i=i) for i in range(n_layers)]

    def magnitude(self, first: torch.Tensor) -> torch.Tensor:
        """|act(first)| of the hooked projection's output: a neuron is active where this exceeds
        the layer's threshold (0 for ReLU, where it equals output > 0)."""
        return ACTIVATIONS[self.activation](first).abs()


@dataclass(frozen=True)
class ConfigDims:
    """The dimensions a family's `hf_config` builds a Hugging Face config from (synthetic shapes,
    tiny test models). Families without grouped-query attention ignore n_kv_heads."""

    vocab_size: int
    dim: int
    ffn_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    max_positions: int

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise FlashError(f"dims {self}: dim must be a multiple of n_heads")


@dataclass(frozen=True)
class FFNWeights:
    """One layer's FFN, per neuron, as the writer bundles it. Row i of each matrix is neuron i."""

    up: torch.Tensor  # [N, D]  column i of the up projection (HF fc1 / up_proj weight row i)
    down: torch.Tensor  # [N, D]  row i of the down projection (HF fc2 / down_proj weight column i)
    gate: torch.Tensor | None = None  # [N, D]  gated FFNs only
    up_bias: torch.Tensor | None = None  # [N]
    gate_bias: torch.Tensor | None = None  # [N]
    down_bias: torch.Tensor | None = None  # [D]

    def __post_init__(self) -> None:
        n, d = self.up.shape
        assert self.down.shape == (n, d), (self.up.shape, self.down.shape)
        assert self.gate is None or self.gate.shape == (n, d)


class KVCache:
    """Per-layer keys and values of the tokens seen so far, grown by doubling (no per-token
    allocation in steady state)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", initial_len: int = 256):
        self.n_kv_heads, self.head_dim, self.max_len = n_kv_heads, head_dim, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = min(initial_len, max_len)
        self.k = [self._empty(self.capacity) for _ in range(n_layers)]  # [Hk, cap, Dh]
        self.v = [self._empty(self.capacity) for _ in range(n_layers)]
        self.length = 0  # P: tokens committed by completed steps

    def _empty(self, n: int) -> torch.Tensor:
        return torch.empty(self.n_kv_heads, n, self.head_dim, dtype=self.dtype, device=self.device)

    def nbytes(self) -> int:
        return 2 * len(self.k) * self.capacity * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    def reserve(self, total: int) -> None:
        if total > self.max_len:
            raise FlashError(
                f"context of {total} tokens exceeds the model's maximum of {self.max_len}: "
                "shorten the prompt or max_new_tokens"
            )
        if total <= self.capacity:
            return
        new_cap = min(self.max_len, max(total, 2 * self.capacity))
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = self._empty(new_cap)
                new[:, : self.length] = old[:, : self.length]
                cache[i] = new
        self.capacity = new_cap

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [Hk, T, Dh] of this step; returns [Hk, P+T, Dh] views of everything so far."""
        t = k.shape[1]
        end = self.length + t
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        self.length = 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float,
           window: int | None = None) -> torch.Tensor:
    """Causal attention of T new queries over P+T keys.

    q: [H, T, Dh]; k, v: [Hk, P+T, Dh] (grouped-query when Hk < H: query head h reads key/value
    head h // (H / Hk), as transformers' repeat_kv). Returns [T, H*Dh].
    window: sliding-window attention (Mistral): the query at position p reads only the keys at
    positions p - window + 1 .. p (transformers' `kv_idx > q_idx - sliding_window`); keys older
    than the first query's window are not even multiplied.

    Written with two matmuls instead of scaled_dot_product_attention: at batch 1 and one query,
    torch's CPU SDPA costs 5-30x more than the arithmetic (measured: 3.9 ms vs 0.12 ms at 4 heads
    over 200 keys) and it would copy the strided KV cache views.
    """
    h, t, dh = q.shape
    first = max(0, start + 1 - window) if window is not None else 0  # oldest key any query reads
    k, v = k[:, first:], v[:, first:]
    hk, s_len, _ = k.shape
    if (t == 1 and k.device.type == "cpu" and k.dtype in kernels.DTYPE_CODES and v.dtype == k.dtype
            and k.stride(2) == 1 and v.stride(2) == 1 and kernels.available()):
        # flashio.kernels' one-query attention: one call instead of ~8 torch ops, whose float16
        # bmm is slow on the CPU (Llama-2-7B's 32 heads over 51 keys: 240 us against ~20)
        return kernels.kernels().attend1(q[:, 0], k, v, scale).to(q.dtype).view(1, h * dh)
    g = h // hk
    qg = q.reshape(hk, g * t, dh)  # heads of one group are adjacent: [Hk, G*T, Dh]
    scores = torch.bmm(qg, k.transpose(1, 2)) * scale  # [Hk, G*T, S]
    if t > 1:  # one query (decoding) reads every key it was given
        q_pos = torch.arange(start, start + t, device=q.device)[:, None]
        k_pos = torch.arange(first, first + s_len, device=q.device)[None, :]
        hidden = k_pos > q_pos  # [T, S] the future
        if window is not None:
            hidden |= k_pos <= q_pos - window  # outside the window
        scores = scores.masked_fill(hidden.repeat(g, 1), float("-inf"))  # [G*T, S]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs, v)  # [Hk, G*T, Dh]
    return out.reshape(h, t, dh).transpose(0, 1).reshape(t, h * dh)


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight | QuantizedRows,
           b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a resident matrix may be quantized (flashio.quant.QuantizedWeight, QuantizedRows)."""
    return quant_linear(x, w, b)


def head_linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight | QuantizedRows) -> torch.Tensor:
    """The output head x: [T, D] -> logits [T, V] of w: [V, D], as `linear`. On the CPU a float
    head over several positions is multiplied HEAD_CHUNK_ROWS vocabulary rows at a time into one
    output, whose chunk stays in cache: on Gemma 3 270M's 262144 x 640 fp32 head (1 thread), 413
    ms for 64 positions against 684 for one F.linear, the same values bit for bit."""
    if isinstance(w, (QuantizedWeight, QuantizedRows)) or x.device.type != "cpu" or x.shape[0] == 1 or w.dtype != x.dtype:
        return linear(x, w)
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)  # [T, V]
    for a in range(0, w.shape[0], HEAD_CHUNK_ROWS):
        torch.mm(x, w[a : a + HEAD_CHUNK_ROWS].t(), out=out[:, a : a + HEAD_CHUNK_ROWS])
    return out
