"""Pieces shared by the architectures: the FFN weights a checkpoint yields, the KV cache and
attention.

Shapes: T tokens in this step, P tokens already in the KV cache, D model width, H heads,
Hk key/value heads, Dh head width, N FFN neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashio.errors import FlashError


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of T new queries over P+T keys.

    q: [H, T, Dh]; k, v: [Hk, P+T, Dh] (grouped-query when Hk < H: query head h reads key/value
    head h // (H / Hk), as transformers' repeat_kv). Returns [T, H*Dh].

    Written with two matmuls instead of scaled_dot_product_attention: at batch 1 and one query,
    torch's CPU SDPA costs 5-30x more than the arithmetic (measured: 3.9 ms vs 0.12 ms at 4 heads
    over 200 keys) and it would copy the strided KV cache views.
    """
    h, t, dh = q.shape
    hk, s_len, _ = k.shape
    g = h // hk
    qg = q.reshape(hk, g * t, dh)  # heads of one group are adjacent: [Hk, G*T, Dh]
    scores = torch.bmm(qg, k.transpose(1, 2)) * scale  # [Hk, G*T, S]
    if t > 1:
        q_pos = torch.arange(start, start + t, device=q.device)[:, None]
        k_pos = torch.arange(0, s_len, device=q.device)[None, :]
        future = (k_pos > q_pos).repeat(g, 1)  # [G*T, S]
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(probs, v)  # [Hk, G*T, Dh]
    return out.reshape(h, t, dh).transpose(0, 1).reshape(t, h * dh)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)
