"""The source checks: each mistake a user can make about the model fails first, with what to do."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from flashio.errors import UnsupportedArchitectureError  # noqa: E402
from flashio.models import architectures  # noqa: E402
from tasks.errors import InputError  # noqa: E402
from tasks.source import inspect_source  # noqa: E402

OPT_CONFIG = {"model_type": "opt", "vocab_size": 16, "hidden_size": 8, "ffn_dim": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "max_position_embeddings": 32, "activation_function": "relu",
              "torch_dtype": "float16"}


def checkpoint(tmp_path, config, *, weights=True, tokenizer=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    if weights:
        save_file({"model.decoder.embed_tokens.weight": torch.zeros(16, 8)}, str(tmp_path / "model.safetensors"))
    if tokenizer:
        (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def test_a_good_checkpoint_is_fingerprinted(tmp_path):
    src = inspect_source(str(checkpoint(tmp_path / "m", OPT_CONFIG)))
    assert (src.model_type, src.n_layers, src.dim, src.ffn_dim, src.gated) == ("opt", 1, 8, 32, False)
    assert src.config_dtype == "float16" and src.revision is None and src.name == "m"
    assert [n for n, _ in src.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    before = src.fingerprint
    (tmp_path / "m" / "tokenizer.json").write_text('{"changed": 1}')
    assert inspect_source(str(tmp_path / "m")).fingerprint != before
    assert inspect_source(str(tmp_path / "m"), hash_files=False).fingerprint == ""


@pytest.mark.parametrize("model", ["/no/such/model", "./no-such-model", "../x/y/z"])
def test_missing_model_path(model):
    with pytest.raises(InputError, match="does not exist"):
        inspect_source(model)


def test_hub_id_offline_says_so():
    with pytest.raises(InputError, match="could not be fetched from the Hugging Face hub"):
        inspect_source("no-such-org/no-such-model-flashio")


def test_unsupported_architecture(tmp_path):
    path = checkpoint(tmp_path / "gpt2", {"model_type": "gpt2", "vocab_size": 16})
    supported = ", ".join(sorted(architectures()))  # every family module of flashio.models
    assert {"llama", "mistral", "opt"} <= set(architectures())
    with pytest.raises(UnsupportedArchitectureError, match=f"'gpt2' is not supported by flashio; supported: {supported}"):
        inspect_source(str(path))


def test_unsupported_activation(tmp_path):
    path = checkpoint(tmp_path / "gelu", {**OPT_CONFIG, "activation_function": "gelu"})
    with pytest.raises(UnsupportedArchitectureError, match="activation_function='gelu'"):
        inspect_source(str(path))


def test_pickled_weights_only(tmp_path):
    path = checkpoint(tmp_path / "bin", OPT_CONFIG, weights=False)
    (path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InputError, match="pickled weights are not loaded"):
        inspect_source(str(path))


def test_missing_tokenizer(tmp_path):
    path = checkpoint(tmp_path / "notok", OPT_CONFIG, tokenizer=False)
    with pytest.raises(InputError, match="no tokenizer files"):
        inspect_source(str(path))


def test_a_file_instead_of_a_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(InputError, match="is a file"):
        inspect_source(str(f))
