"""Low-rank activation predictors (Deja Vu style, as in LLM in a flash section 3.1).

Per layer, `logits = (x @ A.T) @ B.T + bias` with A: [r, D] and B: [N, r]; neuron n is predicted
active when sigmoid(logits[n]) > threshold, i.e. logits[n] > `logit_threshold`. The runtime only
runs these weights; the pipeline trains them (tasks.predictors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flashio import kernels
from flashio.quant import KERNEL_LINEAR_DTYPES, linear


@dataclass(frozen=True)
class PredictorWeights:
    A: torch.Tensor  # [r, D]
    B: torch.Tensor  # [N, r]
    bias: torch.Tensor  # [N]
    threshold: float = 0.5  # probability

    def __post_init__(self) -> None:
        r, _ = self.A.shape
        assert self.B.shape[1] == r and self.bias.shape == (self.B.shape[0],), (self.A.shape, self.B.shape)
        assert 0.0 < self.threshold < 1.0, self.threshold

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def n_neurons(self) -> int:
        return self.B.shape[0]

    @property
    def logit_threshold(self) -> float:
        t = self.threshold
        return math.log(t / (1.0 - t))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, N]. One token: two matrix-vector products on the resident matrices' path
        # (flashio.quant.linear: on the CPU the native kernels, on their threads)
        if x.shape[0] == 1:
            return linear(linear(x, self.A), self.B, self.bias)
        return torch.addmm(self.bias, x @ self.A.T, self.B.T)

    def active(self, x: torch.Tensor) -> np.ndarray | None:
        """One token x [1, D]: the ids (ascending int64) of the neurons whose logits exceed
        `logit_threshold`, the same neurons as `logits` gives, in one native call (flashio.kernels'
        predict); None where `logits` would not take the kernels (then use it)."""
        A, B = self.A, self.B
        if not (x.numel() == x.shape[-1] and x.device.type == "cpu" and x.dtype == A.dtype == B.dtype == self.bias.dtype
                and A.dtype in KERNEL_LINEAR_DTYPES and A.is_contiguous() and B.is_contiguous()
                and self.bias.is_contiguous() and kernels.available() and torch.get_num_threads() <= kernels.threads()):
            return None
        return kernels.kernels().predict(A, B, self.bias, x, self.logit_threshold)

    def permuted(self, order: torch.Tensor) -> PredictorWeights:
        """The same predictor with output rows in stored order: row j predicts source neuron order[j]."""
        return PredictorWeights(self.A, self.B[order], self.bias[order], self.threshold)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None, *,
           copy: bool = False) -> PredictorWeights:
        """In `dtype` on `device` (default: where it is); copy=True always gives private tensors."""
        A, B, bias = (t.to(device=device, dtype=dtype, copy=copy) for t in (self.A, self.B, self.bias))
        return PredictorWeights(A, B, bias, self.threshold)

