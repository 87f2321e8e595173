"""Mistral (flashio/models/mistral.py) against transformers' MistralForCausalLM: a tiny model whose
sliding window (4) is shorter than the prompt (12), saved with save_pretrained; plus the test
factory, the pipeline's source check and synth, which know Mistral only through its module."""

from __future__ import annotations

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
from tests.unit.family_check import (  # noqa: E402
    PROMPT,
    WINDOW,
    assert_greedy_matches,
    assert_logits_match,
    relinked_checkpoint,
)


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


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle"])
def test_logits_match_transformers(tiny_mistral, mode):
    hf, _, art = tiny_mistral
    assert_logits_match(hf, art, mode)


def test_greedy_generation_matches_transformers(tiny_mistral):
    hf, _, art = tiny_mistral
    assert_greedy_matches(hf, art, PROMPT[:3], new_tokens=12)  # 15 positions: the window slides during decoding


def test_the_window_is_what_makes_it_mistral(tiny_mistral, tmp_path):
    """The same weights with full attention (sliding_window null) agree inside the first window
    and differ after it: the match above depends on the window."""
    _, path, art = tiny_mistral
    full_ckpt = relinked_checkpoint(path, tmp_path / "full", {"sliding_window": None})
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
