"""Next-token scoring of a model against a reference on the same rows, and a quantized
artifact's loss against its float weights.

    t = NextTokenTally()
    for row in ids:                                   # ids: [n, L]
        t.add(reference.forward(row), model.forward(row), row)
    ppl_ref, ppl = t.perplexities()                   # t.agree / t.n_tok: top-1 agreement

How every perplexity, top-1 and KL figure of the evaluation (tasks.evaluation) is counted: each
row on its own, its first token context only, the NLL of the other L-1 summed over all rows and
averaged per token; top-1 agreement and KL(reference || model) over all L positions of a row.
`QuantizationLoss` holds a quantized artifact's dense and sparse figures against the dense model
of its unquantized form (`check_reference` says whether a reference is that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flashio.format import Manifest
from tasks.errors import InputError


@dataclass(frozen=True)
class QuantizationLoss:
    """A quantized artifact against the float weights it was made from, on the main comparison's
    rows: dense float (the reference), dense quantized and sparse quantized; top-1 agreement and
    KL(float dense || x) of the quantized dense and of the sparse model."""

    scheme: str  # the bundle rows' ("int8" | "int4")
    group_size: int
    resident: str  # the resident matrices' scheme, "none" when they kept the float dtype
    tokens: int
    perplexity_float: float
    perplexity_quantized: float  # dense
    perplexity_sparse: float  # sparse quantized (= Comparison.perplexity_sparse)
    top1_quantized: float  # dense quantized vs dense float
    mean_kl_quantized: float
    top1_sparse: float  # sparse quantized vs dense float
    mean_kl_sparse: float

    @property
    def quantization_increase(self) -> float:
        """Relative perplexity increase of the dense model from quantization."""
        return self.perplexity_quantized / self.perplexity_float - 1.0

    @property
    def sparsity_increase(self) -> float:
        """Relative perplexity increase from sparsity, both quantized."""
        return self.perplexity_sparse / self.perplexity_quantized - 1.0

    @property
    def total_increase(self) -> float:
        """Both together: (1 + quantization) x (1 + sparsity) - 1."""
        return self.perplexity_sparse / self.perplexity_float - 1.0


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """NLL of ids[1:] given the logits of ids[:-1]: a row's first token is context only."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")  # [L-1]


def _next_token_nll_of(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """next_token_nll from the row's log-softmax [L, V] (cross_entropy's own first step: the same values)."""
    return -log_probs[:-1].gather(1, ids[1:, None])[:, 0]  # [L-1]


class NextTokenTally:
    """Running sums of a model's next-token predictions against a reference's on the same rows."""

    def __init__(self) -> None:
        self.nll_ref = self.nll = self.kl = self.agree = 0.0
        self.n_pred = self.n_tok = 0

    def add(self, ref: torch.Tensor, out: torch.Tensor, row: torch.Tensor) -> None:
        """ref, out: the logits of `row`, [L, V] each."""
        # one log-softmax per model for both the NLL and the KL: at Gemma 3's 262144 words each
        # pass over [L, V] costs ~2 ms per position
        lp_r, lp_o = F.log_softmax(ref.float(), -1), F.log_softmax(out.float(), -1)
        self.nll_ref += float(_next_token_nll_of(lp_r, row).sum())
        self.nll += float(_next_token_nll_of(lp_o, row).sum())
        self.kl += float((lp_r.exp() * (lp_r - lp_o)).sum())
        self.agree += float((ref.argmax(-1) == out.argmax(-1)).sum())
        self.n_pred += len(row) - 1
        self.n_tok += len(row)

    def perplexities(self) -> tuple[float, float]:
        """(reference, model): per-token mean NLL of the scored tokens, exponentiated."""
        return math.exp(self.nll_ref / self.n_pred), math.exp(self.nll / self.n_pred)


def quantization_loss(manifest: Manifest, tallies: tuple[NextTokenTally, NextTokenTally]) -> QuantizationLoss:
    """The quantized artifact's (its manifest's) dense and sparse figures against the float reference."""
    dense, sparse = tallies
    ppl_f, ppl_q = dense.perplexities()
    q, rq = manifest.quant, manifest.resident_quant
    return QuantizationLoss(scheme=q.scheme, group_size=q.group_size, resident=rq.scheme if rq else "none",
                            tokens=dense.n_tok, perplexity_float=ppl_f, perplexity_quantized=ppl_q,
                            perplexity_sparse=sparse.perplexities()[1], top1_quantized=dense.agree / dense.n_tok,
                            mean_kl_quantized=dense.kl / dense.n_tok, top1_sparse=sparse.agree / sparse.n_tok,
                            mean_kl_sparse=sparse.kl / sparse.n_tok)


def check_reference(manifest: Manifest, reference: Manifest) -> None:
    """The float reference must be an unquantized artifact of the same model as the quantized one."""
    if manifest.quant is None:
        raise InputError("a float reference was given for an artifact whose bundle rows are not quantized; "
                         "evaluate a quantized artifact against it, or pass no reference")
    same = (reference.architecture == manifest.architecture and reference.model_config == manifest.model_config
            and [L.n_neurons for L in reference.ffn_layers] == [L.n_neurons for L in manifest.ffn_layers])
    if reference.quant is not None or reference.resident_quant is not None or not same:
        raise InputError(f"the float reference ({reference.architecture}, {reference.n_layers} layers, "
                         f"{'quantized' if reference.quant or reference.resident_quant else reference.dtype}) is not "
                         f"the unquantized form of the evaluated artifact ({manifest.architecture}, "
                         f"{manifest.n_layers} layers): write it from the same source without quantize")
