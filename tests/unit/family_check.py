"""What the family tests check on every architecture: a flashio artifact against the transformers
model it was written from (logits in one step and token by token, greedy generation), and
checkpoints that differ from a saved one in their config only.

    ref = assert_logits_match(hf, art, "dense")          # each test keeps its own model fixture
    assert_greedy_matches(hf, art, PROMPT[:3], new_tokens=12)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import flashio

WINDOW = 4
PROMPT = [1, 17, 101, 55, 9, 120, 33, 78, 12, 5, 99, 64]  # 12 tokens: 3 windows
ATOL = 1e-4  # fp32 artifacts against transformers' fp32 forward pass


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_logits_stepwise(model, ids) -> torch.Tensor:
    """transformers' own token-by-token decoding through its (sliding-window) KV cache."""
    out, past = [], None
    with torch.no_grad():
        for t in ids:
            r = model(torch.tensor([[t]]), cache=past, use_cache=True)
            past = r.past_key_values
            out.append(r.logits[0, -1].float())
    return torch.stack(out)


def assert_logits_match(hf, art, mode: str, prompt=PROMPT, *, stepwise_reference: bool = True) -> torch.Tensor:
    """flashio's logits of `prompt` [T, V], in one step and token by token through its KV cache, within
    ATOL of transformers' forward pass and (with `stepwise_reference`) of transformers' own
    token-by-token decoding. Returns transformers' logits."""
    ref = hf_logits(hf, prompt)
    with flashio.open(art, mode=mode) as model:
        whole = model.forward(prompt)  # the prompt in one step
        stepwise = model.forward(prompt, token_by_token=True)  # decoding through the KV cache
    assert whole.shape == ref.shape
    assert (whole - ref).abs().max().item() <= ATOL
    assert (stepwise - ref).abs().max().item() <= ATOL
    if stepwise_reference:
        assert (stepwise - hf_logits_stepwise(hf, prompt)).abs().max().item() <= ATOL
    return ref


def assert_greedy_matches(hf, art, prompt, *, new_tokens: int, mode: str = "dense"):
    """Greedy generation of exactly `new_tokens` tokens after `prompt` equals transformers'. Returns
    flashio's generation."""
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                           min_new_tokens=new_tokens)[0, len(prompt):].tolist()
    with flashio.open(art, mode=mode) as model:
        got = model.generate(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
    assert got.token_ids == want
    return got


def relinked_checkpoint(src: Path, dest: Path, config: dict, generation: dict | None = None) -> Path:
    """`dest`: `src`'s files as links, but config.json updated with `config` (and, when `src` has one,
    generation_config.json with `generation`)."""
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).symlink_to(f)
    for name, update in (("config.json", config), ("generation_config.json", generation)):
        if update is None or not (src / name).exists():
            continue
        (dest / name).unlink()
        (dest / name).write_text(json.dumps({**json.loads((src / name).read_text()), **update}))
    return dest
