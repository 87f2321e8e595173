"""Calibration matrices for GPTQ (flashio.gptq): per layer, H = sum of x x^T over the calibration
tokens of the FFN's input (D x D: up and gate rows) and of its down projection's input, the
neurons' activations (N x N: down rows); and, for the resident matrices, of the attention's input
(q, k and v rows), of its output projection's input, and of an untied LM head's input.

    hessians = CalibrationHessians(source, ids)          # ids: [S, L] calibration token rows
    h_in, h_act = hessians(i)                            # layer i, float32
    h_q = hessians.resident("layers.0.attn.q.weight")     # or None: no matrix for that name
    write_artifact(..., quantize="int4", hessians=hessians, resident_hessians=hessians.resident)

The source model runs through transformers with tasks.hooks' hooks. The matrices of every layer at
once can be large (a 7B model's are ~21 GB in float32), so they are accumulated for as many layers
at a time as `max_bytes` allows: the layers are asked for in order, and each pass over the
calibration rows fills the next group of layers (Gemma 3 270M: one pass, 420 MB).
"""

from __future__ import annotations

import logging
import re

import torch

from tasks.hooks import attention_modules, load_model, run_hooked
from tasks.source import SourceModel

log = logging.getLogger(__name__)

MAX_BYTES = 2 << 30  # float32 matrices held at once
# flashio names of the resident matrices whose inputs a layer's pass records: q, k, v share one
_RESIDENT = re.compile(r"^layers\.(\d+)\.attn\.([qkvo])\.weight$")


class CalibrationHessians:
    """layer -> (H of the FFN input [D, D], H of the down projection's input [N, N]), float32;
    `resident(name)`: H of a resident matrix's input (attention, the head: tied or not)."""

    def __init__(self, source: SourceModel, ids: torch.Tensor, *, max_bytes: int = MAX_BYTES,
                 batch_sequences: int = 8, threads: int | None = None, resident_inputs: bool = True):
        if ids.ndim != 2 or len(ids) == 0:
            raise ValueError(f"calibration rows: expected [S, L] token ids, got shape {tuple(ids.shape)}")
        self.source, self.ids = source, ids
        self.batch_sequences, self.threads = batch_sequences, threads
        self.resident_inputs = resident_inputs
        # + the attention's two: its input is D wide, its output projection's input about as wide
        per_layer = 4 * (source.dim**2 + source.ffn_dim**2) + (8 * source.dim**2 if resident_inputs else 0)
        self.layers_per_pass = max(1, min(source.n_layers, max_bytes // per_layer))
        self._held: dict[int, dict[str, torch.Tensor]] = {}
        self._head: torch.Tensor | None = None  # H of the LM head's input, from the first pass
        self.passes = 0

    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        held = self._layer(layer, "in")
        return held.pop("in"), held.pop("act")  # each layer is asked for once: its memory goes with it

    def resident(self, name: str) -> torch.Tensor | None:
        """H of the input of resident matrix `name` (flashio's name): layers.{i}.attn.{q,k,v,o}.weight
        or lm_head.weight (the head's input, also when the head is the tied token embeddings); None
        for any other name, or when resident_inputs is off. A layer's
        matrices stay until the next pass (ask for them after `self(i)`, before `self(i + 1)`, to
        need no pass of their own)."""
        if not self.resident_inputs:
            return None
        if name == "lm_head.weight":
            if self._head is None:
                self._fill(range(0, min(self.source.n_layers, self.layers_per_pass)))
            return self._head
        m = _RESIDENT.match(name)
        if m is None or not 0 <= int(m.group(1)) < self.source.n_layers:
            return None
        key = "o" if m.group(2) == "o" else "qkv"
        return self._layer(int(m.group(1)), key)[key]

    def _layer(self, layer: int, key: str) -> dict[str, torch.Tensor]:
        if not 0 <= layer < self.source.n_layers:
            raise IndexError(f"layer {layer} of a {self.source.n_layers}-layer model")
        if key not in self._held.get(layer, {}):
            self._fill(range(layer, min(self.source.n_layers, layer + self.layers_per_pass)))
        return self._held[layer]

    def _fill(self, layers: range) -> None:
        self._held.clear()
        s = self.source
        held = {i: {"in": torch.zeros(s.dim, s.dim), "act": torch.zeros(s.ffn_dim, s.ffn_dim)} for i in layers}

        def gram(i: int, key: str, x: torch.Tensor) -> None:
            if key not in held[i]:
                held[i][key] = torch.zeros(x.shape[-1], x.shape[-1])
            _add_gram(held[i][key], x)

        def gate(i: int):
            def hook(_module, inputs, _output):
                if i in held:
                    gram(i, "in", inputs[0])
            return hook

        def down(i: int):
            def hook(_module, inputs):
                if i in held:
                    gram(i, "act", inputs[0])
            return hook

        model = load_model(str(s.path), "float32", s.fingerprint)
        head = None
        if self.resident_inputs and self._head is None:
            head = torch.zeros(s.dim, s.dim)

        def more() -> list:
            if not self.resident_inputs:
                return []
            handles = []
            for i, mods in enumerate(attention_modules(model, s)):
                if i in held:
                    handles.append(mods["q"].register_forward_pre_hook(lambda _m, a, i=i: gram(i, "qkv", a[0])))
                    handles.append(mods["o"].register_forward_pre_hook(lambda _m, a, i=i: gram(i, "o", a[0])))
            if head is not None:  # the decoder's output (after its final norm) is the head's input
                def on_output(_module, _inputs, output):
                    _add_gram(head, output[0])
                handles.append(model.base_model.register_forward_hook(on_output))
            return handles

        run_hooked(model, s, self.ids, batch_sequences=self.batch_sequences, gate=gate, down=down,
                   threads=self.threads, more=more)
        self.passes += 1
        if head is not None:
            self._head = head
        log.info("GPTQ calibration matrices of layers %d-%d from %d rows of %d tokens (pass %d)",
                 layers.start, layers.stop - 1, *self.ids.shape, self.passes)
        self._held = held


def _add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += X^T X for the rows X of x [..., width] (tokens of every sequence), in float32."""
    x = x.reshape(-1, x.shape[-1]).float()
    h.addmm_(x.T, x)
