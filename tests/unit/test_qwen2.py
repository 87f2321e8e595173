"""Qwen 2 (flashio/models/qwen2.py) against transformers' Qwen2ForCausalLM: q/k/v biases, and the
sliding window that Qwen 2 configs can switch on for the layers from max_window_layers on."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flashio.format import Artifact, write_artifact  # noqa: E402
from flashio.models import qwen2  # noqa: E402
from tasks.source import inspect_source  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402
from tests.unit.family_check import PROMPT, WINDOW, assert_logits_match, hf_logits  # noqa: E402

VARIANTS = {
    "no-window": {},  # as Qwen 2 / 2.5 are released: use_sliding_window false
    "window": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},  # layer 1 slides
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-tok")
    return build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=160)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny_qwen(request, tokenizer, tmp_path_factory):
    """(variant, transformers model, checkpoint dir, fp32 artifact dir)."""
    root = tmp_path_factory.mktemp(f"qwen2-{request.param}")
    path = build_tiny_model("qwen2", root / "ckpt", tokenizer, hidden=64, ffn=192, layers=2, heads=4, kv_heads=2,
                            max_positions=64, config=VARIANTS[request.param])
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    return request.param, hf, path, write_artifact(path, root / "art", dtype="float32")


@pytest.mark.parametrize("mode", ["dense", "oracle"])
def test_logits_match_transformers(tiny_qwen, mode):
    _, hf, _, art = tiny_qwen
    assert_logits_match(hf, art, mode)


def test_biases_and_window_are_read(tiny_qwen):
    variant, hf, _, art = tiny_qwen
    args = Artifact(art).args
    assert args.attention_bias
    assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # the biases are not zero
    assert hf.model.layers[0].self_attn.o_proj.bias is None
    if variant == "window":
        assert (args.sliding_window, args.layer_types) == (WINDOW, ("full_attention", "sliding_attention"))
    else:
        assert args.sliding_window is None and args.layer_types == ()


def test_the_biases_matter(tiny_qwen):
    """Zeroing the q/k/v biases in the reference changes its logits: the match above covers them."""
    _, hf, _, _ = tiny_qwen
    ref = hf_logits(hf, PROMPT)
    saved = [(m, m.bias.clone()) for layer in hf.model.layers for m in
             (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)]
    try:
        with torch.no_grad():
            for m, _ in saved:
                m.bias.zero_()
        assert (hf_logits(hf, PROMPT) - ref).abs().max().item() > 1e-3
    finally:
        with torch.no_grad():
            for m, b in saved:
                m.bias.copy_(b)


def test_released_configs_keep_the_window_off():
    """Qwen2.5-0.5B's config.json: a window size, but use_sliding_window false."""
    c = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
         "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
         "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True,
         "bos_token_id": 151643, "eos_token_id": 151643}
    args = qwen2.ModelArgs.from_hf(c)
    assert args.sliding_window is None and args.attention_bias and args.tie_embeddings and args.head_dim == 64
    shapes = qwen2.checkpoint_shapes(args)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (128,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes and "lm_head.weight" not in shapes


def test_pipeline_source_check_knows_qwen2(tiny_qwen):
    _, _, path, _ = tiny_qwen
    src = inspect_source(str(path), hash_files=False)
    assert (src.model_type, src.gated, src.n_layers, src.dim, src.ffn_dim) == ("qwen2", True, 2, 64, 192)
