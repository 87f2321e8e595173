"""Llama 3 details against transformers: rope scaling "llama3" and a list of eos ids in config.json
(Llama 3 ends a turn with either of two ids)."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flashio  # noqa: E402
from flashio.format import Artifact, write_artifact  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402
from tests.unit.family_check import PROMPT, assert_logits_match, relinked_checkpoint  # noqa: E402

# Llama 3.1's scaling with the original context shrunk to the tiny model's, so that it matters
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama3")
    tok = build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=160)
    path = build_tiny_model("llama", root / "ckpt", tok, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2,
                            max_positions=64, config={"rope_scaling": ROPE, "eos_token_id": [tok.eos_token_id, 3]})
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return hf, path, write_artifact(path, root / "art", dtype="float32")


def test_llama3_rope_scaling_matches_transformers(tiny_llama3):
    hf, _, art = tiny_llama3
    assert Artifact(art).args.rope_type == "llama3"
    assert_logits_match(hf, art, "dense")


def test_a_list_of_eos_ids_opens_and_stops_generation(tiny_llama3, tmp_path):
    """Greedy decoding stops at the first token that is any of the listed eos ids."""
    _, path, art = tiny_llama3
    with flashio.open(art, mode="dense") as model:
        free = model.generate(PROMPT[:3], max_new_tokens=6, stop_at_eos=False).token_ids
    # make the first greedy token not seen before it (after the first) an eos id, as <|eot_id|> beside
    # <|end_of_text|>
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    config = json.loads((path / "config.json").read_text())
    eos = {"eos_token_id": [config["eos_token_id"][0], free[k]]}
    ckpt = relinked_checkpoint(path, tmp_path / "ckpt", eos, eos)
    stopping = write_artifact(ckpt, tmp_path / "art", dtype="float32")
    with flashio.open(stopping, mode="dense") as model:
        got = model.generate(PROMPT[:3], max_new_tokens=6)
    assert got.finish_reason == "stop" and list(got.token_ids) in (free[:k], free[: k + 1])
