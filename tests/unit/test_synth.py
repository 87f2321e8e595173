"""Synthetic artifacts: real shapes, random weights, written by the one artifact writer."""

from __future__ import annotations

import shutil

import pytest
import torch

import flashio
from flashio.cli import main
from flashio.errors import FlashError
from flashio.format import Artifact
from flashio.synth import SHAPES, artifact_bytes, write_synthetic


def test_full_shapes_are_the_published_ones():
    s = SHAPES["opt-6.7b"]
    assert (s.dim, s.ffn_dim, s.n_layers, s.n_heads, s.vocab_size) == (4096, 16384, 32, 32, 50272)
    assert s.ranks() == [128] * 28 + [1024] * 4
    # OPT-6.7B in fp16 is ~13.3 GB of weights; the artifact adds predictors (~0.3 GB)
    assert 13.3e9 < artifact_bytes(s, "float16") < 13.8e9
    assert SHAPES["llama-2-7b"].ranks().count(1024) == 4
    small = s.scaled(0.05)
    assert small.dim % 128 == 0 and small.head_dim == 128 and small.n_layers == 2
    assert len(small.ranks()) == small.n_layers


@pytest.mark.parametrize("shape", ["opt-6.7b", "llama-2-7b"])
def test_small_synthetic_artifact_runs(tmp_path, shape):
    art = write_synthetic(shape, tmp_path / shape, scale=0.04, seed=1)
    a = Artifact(art, verify=True)
    m = a.manifest
    assert m.dtype == "float16" and m.predictor_layers is not None
    assert m.lineage["synthetic"]["shape"] == shape
    assert (m.ffn_layers[0].bundle_width * m.itemsize) % 512 == 0  # whole O_DIRECT blocks
    with flashio.open(art, mode="dense") as dense, flashio.open(art, mode="sparse") as sparse:
        d = dense.forward([3, 4, 5])
        assert torch.isfinite(d).all() and d.std() > 0
        sparse.forward([3, 4, 5, 6], token_by_token=True)
        n = m.ffn_layers[0].n_neurons * m.n_layers
        density = sparse.stats[-1].neurons_active / n
        assert 0.03 < density < 0.25  # random predictors flag ~10% of the neurons
    # same seed, same weights
    again = write_synthetic(shape, tmp_path / "again", scale=0.04, seed=1)
    assert Artifact(again).manifest.files["ffn.safetensors"].sha256 == m.files["ffn.safetensors"].sha256


def test_refuses_without_disk_space(tmp_path, monkeypatch):
    real = shutil.disk_usage

    def tiny(path):
        return real(path)._replace(free=10 << 20)

    monkeypatch.setattr(shutil, "disk_usage", tiny)
    with pytest.raises(FlashError, match=r"free; the opt-6\.7b artifact"):
        write_synthetic("opt-6.7b", tmp_path / "big")
    assert not (tmp_path / "big").exists()
    with pytest.raises(FlashError, match="unknown shape"):
        write_synthetic("gpt-2", tmp_path / "x")


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["synth", "--shape", "opt-1.3b", "--scale", "0.05", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Artifact(out).manifest.architecture == "opt"
