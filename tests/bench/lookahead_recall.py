"""Recall of each layer's FFN active set predicted from the layer's input, before attention.

    .venv/bin/python tests/bench/lookahead_recall.py CHECKPOINT --tokens TOKENS \\
        [--key calibration] [--rows 8] [--seq-len 256] [--density 0.1 --density 0.25] [--json OUT]

(from the repository root). CHECKPOINT is a transformers causal LM directory (Llama, Qwen2, Mistral,
Gemma3ForCausalLM or pre-LN ReLU OPT), loaded in float32 on the CPU; TOKENS a safetensors file whose
tensor ``--key`` (default: its only tensor, else ``calibration``) holds int token rows [S, L].

Deja Vu-style lookahead: if layer i's active neurons can be told from the layer's input residual
x_pre, the reads of its FFN rows can start before its attention. For every decoder layer, x_ffn is
the FFN's real input (after its pre-norm) and x_la the same pre-norm applied to x_pre. A neuron's
score is |act(gate_proj(x))| for gated MLPs, fc1(x) for ReLU OPT. The true set of a token is the
top ceil(d*N) neurons by the score on x_ffn for each ``--density`` d (OPT: score > 0, its density
shown as ``dens``); the prediction is the top ceil(f*|true|) by the score on x_la, f in 1, 1.5, 2
(OPT also: score on x_la > 0, its density ``dens>0``). Recall = true neurons predicted / true
neurons, over all tokens; ``cos`` is the mean cosine similarity of x_la and x_ffn. A random
prediction of k neurons has recall k/N, e.g. f*d.

What that costs the runtime (FlashConfig.lookahead) is in the columns ``early``, ``late`` and
``extra``: each row's tokens run in order through two window caches per layer (flashio.cache,
window 5, rows kept past it, ``--capacity`` of the layer's neurons): one updated with the true
sets (the neurons read without lookahead: ``base``), one with the guess (f = 1) and then the true
set (FlashConfig.lookahead's two updates). early = reads the guess started before the attention,
late = reads left to the FFN, both over base; extra = (early + late) / base - 1, the reads the
wrong guesses add. The share of the reads that can hide behind the attention is 1 - late.
This is a script, not a pytest module.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flashio.cache import FillingWindowCache

FACTORS = (1.0, 1.5, 2.0)
# causal LM class -> (FFN input module of a decoder layer, the pre-norm whose output it takes)
MODELS = {
    "LlamaForCausalLM": ("mlp", "post_attention_layernorm"),
    "Qwen2ForCausalLM": ("mlp", "post_attention_layernorm"),
    "MistralForCausalLM": ("mlp", "post_attention_layernorm"),
    "Gemma3ForCausalLM": ("mlp", "pre_feedforward_layernorm"),
    "OPTForCausalLM": ("fc1", "final_layer_norm"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--key", default=None)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="truncate rows to this many tokens")
    ap.add_argument("--density", type=float, action="append", help="gated models; repeatable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--capacity", type=float, default=0.5, help="window cache rows, a fraction of the neurons")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tensors = load_file(args.tokens)
    key = args.key or (next(iter(tensors)) if len(tensors) == 1 else "calibration")
    rows = tensors[key][: args.rows, : args.seq_len].long()

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    name = type(model).__name__
    if name not in MODELS:
        raise SystemExit(f"{name} is not supported (only {', '.join(MODELS)})")
    ffn_attr, norm_attr = MODELS[name]
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if ffn_attr == "fc1" and not (layers[0].do_layer_norm_before
                                  and isinstance(layers[0].activation_fn, torch.nn.ReLU)):
        raise SystemExit("only pre-LN ReLU OPT models are supported")
    x_pre, x_ffn = capture(model, layers, ffn_attr, rows)

    table = []
    with torch.no_grad():
        for layer, pre, ffn in zip(layers, x_pre, x_ffn):
            x_la = getattr(layer, norm_attr)(pre)
            row = {"cos": torch.cosine_similarity(x_la, ffn, dim=-1).mean().item()}
            s_ffn, s_la = score(layer, ffn_attr, ffn), score(layer, ffn_attr, x_la)
            rank_la = s_la.argsort(-1, descending=True).argsort(-1)
            if ffn_attr == "fc1":
                true = s_ffn > 0
                row["dens"] = true.float().mean().item()
                row |= {f"f{f:g}": recall(true, rank_la < f_k(true, f)) for f in FACTORS}
                row[">0"] = recall(true, s_la > 0)
                row["dens>0"] = (s_la > 0).float().mean().item()
                row |= reads(true, rank_la < f_k(true, 1.0), rows.shape[1], args.capacity, "")
            else:
                rank_ffn = s_ffn.argsort(-1, descending=True).argsort(-1)
                for d in args.density or [0.1, 0.25, 0.5]:
                    true = rank_ffn < math.ceil(d * s_ffn.shape[-1])
                    row |= {f"d{d:g} f{f:g}": recall(true, rank_la < f_k(true, f)) for f in FACTORS}
                    row |= reads(true, rank_la < f_k(true, 1.0), rows.shape[1], args.capacity, f"d{d:g} ")
            table.append(row)

    mean = {c: sum(r[c] for r in table) / len(table) for c in table[0]}
    print(f"{name}, {len(layers)} layers; {rows.shape[0]} rows x {rows.shape[1]} tokens of {key!r}")
    print("layer " + " ".join(f"{c:>9s}" for c in mean))
    for label, row in [*((str(i), r) for i, r in enumerate(table)), ("mean", mean)]:
        print(f"{label:>5s} " + " ".join(f"{v:9.4f}" for v in row.values()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checkpoint": args.checkpoint, "model": name, "tokens": args.tokens,
                       "key": key, "rows": rows.shape[0], "seq_len": rows.shape[1],
                       "layers": table, "mean": mean}, fh, indent=1)


def capture(model, layers, ffn_attr: str, rows: torch.Tensor):
    """Per layer, all tokens' layer input and FFN input, each [tokens, hidden]."""
    x_pre: list[list[torch.Tensor]] = [[] for _ in layers]
    x_ffn: list[list[torch.Tensor]] = [[] for _ in layers]

    def keep(store: list[torch.Tensor], x: torch.Tensor) -> None:
        store.append(x.reshape(-1, x.shape[-1]))

    hooks = []
    for layer, pre, ffn in zip(layers, x_pre, x_ffn):
        hooks.append(layer.register_forward_pre_hook(
            lambda _m, a, kw, pre=pre: keep(pre, a[0] if a else kw["hidden_states"]), with_kwargs=True))
        hooks.append(getattr(layer, ffn_attr).register_forward_pre_hook(
            lambda _m, a, ffn=ffn: keep(ffn, a[0])))
    with torch.no_grad():
        for r in rows:
            model(r[None])
    for h in hooks:
        h.remove()
    return [torch.cat(p) for p in x_pre], [torch.cat(f) for f in x_ffn]


def score(layer, ffn_attr: str, x: torch.Tensor) -> torch.Tensor:
    if ffn_attr == "fc1":
        return layer.fc1(x)
    mlp = layer.mlp
    return mlp.act_fn(mlp.gate_proj(x)).abs()


def f_k(true: torch.Tensor, f: float) -> torch.Tensor:
    """Per token, how many neurons a prediction f times the true set's size keeps: [tokens, 1]."""
    return torch.ceil(f * true.sum(-1, keepdim=True))


def reads(true: torch.Tensor, guess: torch.Tensor, seq_len: int, capacity: float, prefix: str) -> dict:
    """The window caches' reads (module docstring) for [tokens, N] masks, `seq_len` tokens a row."""
    n = true.shape[1]
    cap = max(1, int(capacity * n))
    base = early = late = 0
    for start in range(0, true.shape[0], seq_len):
        plain, ahead = (FillingWindowCache(torch.zeros(cap, 1), n, 5, retain=True) for _ in range(2))
        for t in range(start, start + seq_len):  # (a set past the capacity is cut, as the runtime does)
            ids, guessed = (np.flatnonzero(m[t].numpy())[:cap] for m in (true, guess))
            base += len(plain.update_fill(ids).missing)
            early += len(ahead.update_fill(guessed).missing)
            late += len(ahead.extend(ids).missing)
    base = max(base, 1)
    return {f"{prefix}early": early / base, f"{prefix}late": late / base, f"{prefix}extra": (early + late) / base - 1}


def recall(true: torch.Tensor, predicted: torch.Tensor) -> float:
    return (true & predicted).sum().item() / max(true.sum().item(), 1)


if __name__ == "__main__":
    main()
