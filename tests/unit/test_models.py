"""Every family module of flashio.models against transformers: its declaration (checkpoint names
and shapes, the FFN's hook, its HF config) describes the real model of that family."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402

from flashio.checkpoint import HFCheckpoint  # noqa: E402
from flashio.errors import FlashError, UnsupportedArchitectureError  # noqa: E402
from flashio.models import REQUIRED, architectures, get_architecture  # noqa: E402
from flashio.models.base import ConfigDims, FFNSpec, attend  # noqa: E402
from tasks.testing import build_tiny_model, build_tokenizer, write_corpus  # noqa: E402

FAMILIES = sorted(architectures())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return build_tokenizer(write_corpus(root / "text", n_files=2, lines_per_file=20), root / "tok", vocab_size=128)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tokenizer, tmp_path_factory):
    """(model_type, its module, the saved checkpoint, the transformers model)."""
    family = request.param
    path = build_tiny_model(family, tmp_path_factory.mktemp(family) / "ckpt", tokenizer, hidden=32, ffn=48,
                            layers=2, heads=4, kv_heads=2, max_positions=64)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    return family, get_architecture(family), HFCheckpoint(path), model


def test_registry_finds_every_family_module():
    assert {"opt", "llama", "mistral", "qwen2", "gemma3_text"} <= set(FAMILIES)
    for model_type, module in architectures().items():
        assert model_type in module.MODEL_TYPES
        assert all(hasattr(module, name) for name in REQUIRED), module.__name__
        assert isinstance(module.FFN, FFNSpec)
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt2' is not supported by flashio; supported: gemma3_text, "
                                                           r"llama, .*opt.*one module in flashio/models"):
        get_architecture("gpt2")


def test_checkpoint_shapes_are_the_real_checkpoint(tiny):
    """What synth fakes (`checkpoint_shapes`) is exactly what save_pretrained writes."""
    _, arch, ckpt, _ = tiny
    args = arch.ModelArgs.from_hf(ckpt.config)
    real = {k: tuple(ckpt.get(k).shape) for k in ckpt.keys()}  # noqa: SIM118 - no __iter__
    assert arch.checkpoint_shapes(args) == real


def test_hf_config_round_trips_its_dims(tiny):
    family, arch, _, _ = tiny
    dims = ConfigDims(vocab_size=100, dim=64, ffn_dim=96, n_layers=3, n_heads=8, n_kv_heads=2, max_positions=40)
    config = arch.hf_config(dims)
    assert config["model_type"] == family
    args = arch.ModelArgs.from_hf(config)
    assert (args.vocab_size, args.dim, args.ffn_dim, args.n_layers, args.n_heads, args.max_positions) == \
        (100, 64, 96, 3, 8, 40)
    assert args.n_kv_heads in (2, 8)  # 8: a family without grouped-query attention
    # transformers accepts it as a config of the family
    hf = transformers.AutoConfig.for_model(**config)
    assert hf.model_type == family and hf.hidden_size == 64


def test_hook_is_the_ffn_first_projection(tiny):
    """The declared hook is, per layer, a transformers module whose weight is the FFN part that
    decides activity (gate when gated, else up) as read_checkpoint maps it, fed [.., D] rows.
    (That its input is the runtime's FFN input: tests/unit/test_tasks_activations.py.)"""
    _, arch, ckpt, model = tiny
    args = arch.ModelArgs.from_hf(ckpt.config)
    _, ffn = arch.read_checkpoint(ckpt, args)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = [model.get_submodule(p) for p in arch.FFN.hook_paths(args.n_layers)]

    def record(i: int):
        def hook(_module, inputs, output) -> None:  # returns None: the output is left as it is
            seen[i] = (inputs[0], output)

        return hook

    handles = [m.register_forward_hook(record(i)) for i, m in enumerate(modules)]
    with torch.no_grad():
        model(torch.tensor([[3, 9, 27, 81, 17]]))
    for h in handles:
        h.remove()
    assert sorted(seen) == list(range(args.n_layers))
    for i, m in enumerate(modules):
        w = ffn(i)
        first, first_bias = (w.gate, w.gate_bias) if arch.FFN.gated else (w.up, w.up_bias)
        assert torch.equal(m.weight, first)
        assert (m.bias is None) == (first_bias is None) and (m.bias is None or torch.equal(m.bias, first_bias))
        x, out = seen[i]
        assert x.shape[-1] == args.dim and out.shape[-1] == args.ffn_dim and x.numel() // args.dim == 5
        torch.testing.assert_close(out.reshape(-1, args.ffn_dim), F.linear(x.reshape(-1, args.dim), first, first_bias))


def test_ffn_spec_is_validated():
    with pytest.raises(FlashError, match="parts"):
        FFNSpec(parts=("gate", "down"), activation="relu", hook_path="m.{i}.fc1")
    with pytest.raises(FlashError, match="activation"):
        FFNSpec(parts=("up", "down"), activation="gelu", hook_path="m.{i}.fc1")
    with pytest.raises(FlashError, match="no '\\{i\\}'"):
        FFNSpec(parts=("up", "down"), activation="relu", hook_path="m.fc1")
    relu = FFNSpec(parts=("up", "down"), activation="relu", hook_path="m.{i}.fc1")
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert relu.exactly_sparse and not relu.gated and relu.hook_paths(2) == ["m.0.fc1", "m.1.fc1"]
    assert torch.equal(relu.magnitude(x) > 0, x > 0)


def test_sliding_window_attention_masks_old_keys():
    """attend(window=w) equals attention with an explicit band mask, in one step and when the
    queries start after the first keys (a KV cache)."""
    torch.manual_seed(0)
    h, hk, dh, s, w = 4, 2, 8, 10, 3
    q, k, v = torch.randn(h, s, dh), torch.randn(hk, s, dh), torch.randn(hk, s, dh)
    pos = torch.arange(s)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - w)  # [Tq, S]
    kk, vv = k.repeat_interleave(h // hk, 0), v.repeat_interleave(h // hk, 0)
    scores = (q @ kk.transpose(1, 2)) * 0.5
    want = (torch.softmax(scores.masked_fill(~band, float("-inf")), -1) @ vv).transpose(0, 1).reshape(s, h * dh)
    torch.testing.assert_close(attend(q, k, v, 0, 0.5, window=w), want)
    for start in (1, 5, 9):  # the last queries over every key so far
        got = attend(q[:, start:], k, v, start, 0.5, window=w)
        torch.testing.assert_close(got, want[start:])
    full = attend(q, k, v, 0, 0.5)
    assert not torch.allclose(full[w:], want[w:])  # the window changes the result
