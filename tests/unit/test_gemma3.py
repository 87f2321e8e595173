"""Gemma 3 (flashio/models/gemma3.py) against transformers' Gemma3ForCausalLM: a tiny model with
local layers whose window (4) is shorter than the prompt (12), a global layer with its own rope
base and linear rope scaling, query_pre_attn_scalar != head_dim, final logit softcapping and
random (1 + weight) norms, saved with save_pretrained."""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flashio  # noqa: E402
from flashio.errors import UnsupportedArchitectureError  # noqa: E402
from flashio.format import Artifact, write_artifact  # noqa: E402
from flashio.models import gemma3  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402
from tests.unit.family_check import PROMPT, WINDOW, assert_greedy_matches, assert_logits_match  # noqa: E402

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
CONFIG = {"sliding_window": WINDOW, "layer_types": LAYER_TYPES, "query_pre_attn_scalar": 24,
          "final_logit_softcapping": 3.0,
          "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """(transformers model, checkpoint dir, fp32 artifact dir)."""
    root = tmp_path_factory.mktemp("gemma3")
    tok = build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=160)
    path = build_tiny_model("gemma3_text", root / "ckpt", tok, hidden=64, ffn=192, layers=3, heads=4, kv_heads=2,
                            max_positions=64, config=CONFIG)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():  # norms start at 0 (a factor of 1 + 0): make each one count
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    hf.save_pretrained(str(path))
    assert type(hf).__name__ == "Gemma3ForCausalLM" and hf.config.layer_types == LAYER_TYPES
    return hf, path, write_artifact(path, root / "art", dtype="float32")


@pytest.mark.parametrize("mode", ["dense", "naive", "oracle"])
def test_logits_match_transformers(tiny_gemma, mode):
    hf, _, art = tiny_gemma
    ref = assert_logits_match(hf, art, mode)
    assert ref.abs().max() < 3.0 and ref.std() > 0.1  # the softcap is active, the logits are not flat


def test_greedy_generation_matches_transformers(tiny_gemma):
    hf, _, art = tiny_gemma
    assert_greedy_matches(hf, art, PROMPT[:3], new_tokens=12)


def test_config_is_read_as_transformers_reads_it(tiny_gemma):
    _, path, art = tiny_gemma
    args = Artifact(art).args
    assert args.layer_types == tuple(LAYER_TYPES) and args.sliding_window == WINDOW
    assert (args.rope_theta, args.rope_type, args.rope_factor, args.rope_local_theta) == (50000.0, "linear", 2.0, 100.0)
    assert args.query_pre_attn_scalar == 24 and args.final_logit_softcapping == 3.0 and args.tie_embeddings
    assert Artifact(art).manifest.activation == "gelu_pytorch_tanh"
    # the pre-5.0 spelling (hub config.json of google/gemma-3-270m): rope_theta, rope_local_base_freq,
    # a sliding_window_pattern instead of layer_types
    config = json.loads((path / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3, rope_scaling=None)
    a = gemma3.ModelArgs.from_hf(old)
    assert a.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    assert (a.rope_theta, a.rope_local_theta, a.rope_type) == (1e6, 1e4, "default")
    transformers_types = transformers.Gemma3TextConfig(**{**old, "model_type": None}).layer_types
    assert list(a.layer_types) == transformers_types
    with pytest.raises(UnsupportedArchitectureError, match="attn_logit_softcapping"):
        gemma3.ModelArgs.from_hf({**config, "attn_logit_softcapping": 50.0})


def test_the_embedding_scale_is_rounded_like_transformers():
    """bf16 weights: sqrt(640) = 25.298 becomes 25.25 before the multiplication."""
    dims = gemma3.ConfigDims(vocab_size=8, dim=640, ffn_dim=16, n_layers=1, n_heads=4, n_kv_heads=1,
                             max_positions=16)
    args = gemma3.ModelArgs.from_hf(gemma3.hf_config(dims))
    w = {"tok_embeddings.weight": torch.ones(8, 640, dtype=torch.bfloat16),
         "norm.weight": torch.zeros(640, dtype=torch.bfloat16)}
    model = gemma3.Model(args, w)
    assert model.embed(torch.tensor([3]), 0)[0, 0].item() == 25.25 != math.sqrt(640)


def test_pipeline_source_check_knows_gemma3(tiny_gemma):
    _, path, _ = tiny_gemma
    src = inspect_source(str(path), hash_files=False)
    assert (src.model_type, src.gated, src.n_layers, src.dim, src.ffn_dim) == ("gemma3_text", True, 3, 64, 192)


def test_quantized_token_embeddings_are_scaled_like_float_ones(tiny_gemma, tmp_path):
    """--quantize-resident int8: a token's row is its int8 codes times their group's fp16 scale
    (groups of 32, decoded here by hand), then times sqrt(hidden) as float rows are; the tied head
    multiplies by the same rows."""
    from safetensors.torch import load_file

    _, path, art = tiny_gemma
    q = write_artifact(path, tmp_path / "q", dtype="float32", quantize="int8")
    stored = load_file(str(Artifact(q).file(Artifact(q).manifest.resident_file)))
    tokens = torch.tensor(PROMPT)
    raw = stored["tok_embeddings.weight"][tokens]  # [T, 64 codes + 2 fp16 scales]
    assert raw.shape[1] == 64 + 2 * 2
    scale = raw[:, 64:].contiguous().view(torch.float16).float()  # [T, 2]
    rows = (raw[:, :64].contiguous().view(torch.int8).float().view(-1, 2, 32) * scale[..., None]).view(-1, 64)
    with flashio.open(q, mode="dense") as model, flashio.open(art, mode="dense") as ref:
        torch.testing.assert_close(model.model.embed(tokens, 0), rows * math.sqrt(64), rtol=1e-6, atol=1e-6)
        assert model.model.lm_head is model.model.tok
        got, want = model.forward(PROMPT), ref.forward(PROMPT)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
