"""Mistral (flashio/models/mistral.py) against transformers' MistralForCausalLM: a tiny model whose
sliding window (4) is shorter than the prompt (12), saved with save_pretrained; plus the test
factory, the pipeline's source check and synth, which know Mistral only through its module."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flashio  # noqa: E402
from flashio.format import Artifact, write_artifact  # noqa: E402
from flashio.synth import Shape, write_synthetic  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402

WINDOW = 4
PROMPT = [1, 17, 101, 55, 9, 120, 33, 78, 12, 5, 99, 64]  # 12 tokens: 3 windows


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    """(transformers model, checkpoint dir, artifact dir)."""
    root = tmp_path_factory.mktemp("mistral")
    tok = build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=160)
    path = build_tiny_model("mistral", root / "ckpt", tok, hidden=64, ffn=192, layers=2, heads=4, kv_heads=2,
                            max_positions=64, config={"sliding_window": WINDOW})
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == WINDOW
    return hf, path, write_artifact(path, root / "art", dtype="float32")


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


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle"])
def test_logits_match_transformers(tiny_mistral, mode):
    hf, _, art = tiny_mistral
    ref = hf_logits(hf, PROMPT)
    with flashio.open(art, mode=mode) as model:
        whole = model.forward(PROMPT)  # the prompt in one step
        stepwise = model.forward(PROMPT, token_by_token=True)  # decoding through the KV cache
    assert whole.shape == ref.shape
    assert (whole - ref).abs().max().item() <= 1e-4
    assert (stepwise - ref).abs().max().item() <= 1e-4
    assert (stepwise - hf_logits_stepwise(hf, PROMPT)).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(tiny_mistral):
    hf, _, art = tiny_mistral
    with torch.no_grad():
        want = hf.generate(torch.tensor([PROMPT[:3]]), max_new_tokens=12, do_sample=False,
                           min_new_tokens=12)[0, 3:].tolist()
    with flashio.open(art, mode="dense") as model:
        got = model.generate(PROMPT[:3], max_new_tokens=12, stop_at_eos=False)
    assert got.token_ids == want  # 15 positions: the window slides during decoding


def test_the_window_is_what_makes_it_mistral(tiny_mistral, tmp_path):
    """The same weights with full attention (sliding_window null) agree inside the first window
    and differ after it: the match above depends on the window."""
    _, path, art = tiny_mistral
    full_ckpt = tmp_path / "full"
    full_ckpt.mkdir()
    for f in path.iterdir():
        (full_ckpt / f.name).symlink_to(f)
    config = json.loads((path / "config.json").read_text())
    (full_ckpt / "config.json").unlink()
    (full_ckpt / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    full_art = write_artifact(full_ckpt, tmp_path / "art", dtype="float32")
    assert Artifact(art).args.sliding_window == WINDOW and Artifact(full_art).args.sliding_window is None
    with flashio.open(art, mode="dense") as windowed, flashio.open(full_art, mode="dense") as full:
        a, b = windowed.forward(PROMPT), full.forward(PROMPT)
    assert (a[:WINDOW] - b[:WINDOW]).abs().max().item() <= 1e-5
    assert (a[WINDOW:] - b[WINDOW:]).abs().max().item() > 1e-3


def test_pipeline_source_check_knows_mistral(tiny_mistral):
    _, path, _ = tiny_mistral
    src = inspect_source(str(path), hash_files=False)
    assert (src.model_type, src.gated, src.n_layers, src.dim, src.ffn_dim) == ("mistral", True, 2, 64, 192)


def test_synthetic_mistral_artifact_runs(tmp_path):
    # Mistral 7B: 32 layers, d 4096, 14336 neurons, 32 heads over 8 key/value heads
    shape = Shape("mistral", 4096, 14336, 32, 32, 32000, 32768, ((256, 32),), n_kv_heads=8)
    art = write_synthetic(shape, tmp_path / "m", scale=0.04, seed=1)
    a = Artifact(art, verify=True)
    assert a.manifest.architecture == "mistral" and a.manifest.gated
    assert a.args.sliding_window == 4096 and a.args.n_heads % a.args.n_kv_heads == 0
    assert a.args.n_kv_heads < a.args.n_heads  # grouped-query attention kept when scaled
    with flashio.open(art, mode="dense") as model:
        logits = model.forward([3, 4, 5])
    assert torch.isfinite(logits).all() and logits.std() > 0
