"""Calibration matrices for GPTQ (flashio.gptq): per layer, H = sum of x x^T over the calibration
tokens of the FFN's input (D x D: up and gate rows) and of its down projection's input, the
neurons' activations (N x N: down rows).

    hessians = CalibrationHessians(source, ids)          # ids: [S, L] calibration token rows
    h_in, h_act = hessians(i)                            # layer i, float32
    write_artifact(..., quantize="int4", hessians=hessians)

The source model runs through transformers with tasks.hooks' hooks. The matrices of every layer at
once can be large (a 7B model's are ~17 GB in float32), so they are accumulated for as many layers
at a time as `max_bytes` allows: the layers are asked for in order, and each pass over the
calibration rows fills the next group of layers (Gemma 3 270M: one pass, 331 MB).
"""

from __future__ import annotations

import logging

import torch

from tasks.hooks import load_model, run_hooked
from tasks.source import SourceModel

log = logging.getLogger(__name__)

MAX_BYTES = 2 << 30  # float32 matrices held at once


class CalibrationHessians:
    """layer -> (H of the FFN input [D, D], H of the down projection's input [N, N]), float32."""

    def __init__(self, source: SourceModel, ids: torch.Tensor, *, max_bytes: int = MAX_BYTES,
                 batch_sequences: int = 8, threads: int | None = None):
        if ids.ndim != 2 or len(ids) == 0:
            raise ValueError(f"calibration rows: expected [S, L] token ids, got shape {tuple(ids.shape)}")
        self.source, self.ids = source, ids
        self.batch_sequences, self.threads = batch_sequences, threads
        per_layer = 4 * (source.dim**2 + source.ffn_dim**2)
        self.layers_per_pass = max(1, min(source.n_layers, max_bytes // per_layer))
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.passes = 0

    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer < self.source.n_layers:
            raise IndexError(f"layer {layer} of a {self.source.n_layers}-layer model")
        if layer not in self._held:
            self._fill(range(layer, min(self.source.n_layers, layer + self.layers_per_pass)))
        return self._held.pop(layer)  # each layer is asked for once: its memory goes with it

    def _fill(self, layers: range) -> None:
        self._held.clear()
        s = self.source
        h_in = {i: torch.zeros(s.dim, s.dim) for i in layers}
        h_act = {i: torch.zeros(s.ffn_dim, s.ffn_dim) for i in layers}

        def gate(i: int):
            def hook(_module, inputs, _output):
                if i in h_in:
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    h_in[i].addmm_(x.T, x)
            return hook

        def down(i: int):
            def hook(_module, inputs):
                if i in h_act:
                    a = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    h_act[i].addmm_(a.T, a)
            return hook

        model = load_model(str(s.path), "float32", s.fingerprint)
        run_hooked(model, s, self.ids, batch_sequences=self.batch_sequences, gate=gate, down=down,
                   threads=self.threads)
        self.passes += 1
        log.info("GPTQ calibration matrices of layers %d-%d from %d rows of %d tokens (pass %d)",
                 layers.start, layers.stop - 1, *self.ids.shape, self.passes)
        self._held = {i: (h_in[i], h_act[i]) for i in layers}
