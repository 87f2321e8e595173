"""Faults survived: a full disk while writing an artifact, and flash reads that fail or come back
short in the middle of generation."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import flashio
from flashio import storage
from flashio.errors import FlashReadError
from flashio.format import Artifact, write_artifact
from flashio.predictor import PredictorWeights


def test_disk_full_while_writing_leaves_no_artifact(tiny_opt, tmp_path, monkeypatch):
    """ENOSPC half-way through ffn.safetensors: the error surfaces, and neither the artifact nor
    a temporary directory is left that a later run could mistake for a complete one."""
    written = {"n": 0}

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            written["n"] += len(memoryview(data).cast("B"))
            if written["n"] > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    import builtins

    real_open = builtins.open

    def open_full(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return FullDisk(f) if "w" in mode and str(path).endswith("ffn.safetensors") else f

    monkeypatch.setattr(builtins, "open", open_full)
    with pytest.raises(OSError, match="No space left"):
        write_artifact(tiny_opt[1], tmp_path / "art")
    monkeypatch.setattr(builtins, "open", real_open)
    assert written["n"] > 100_000  # the failure happened mid-file
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def sparse_art(tiny_opt, tmp_path):
    torch.manual_seed(0)
    preds = [PredictorWeights(torch.randn(8, 64), torch.randn(256, 8), torch.zeros(256), 0.5) for _ in range(2)]
    return write_artifact(tiny_opt[1], tmp_path / "art", predictors=preds)


@pytest.mark.parametrize("mode", ["sparse", "naive"])
def test_ffn_file_truncated_during_generation(sparse_art, mode):
    with flashio.open(sparse_art, mode=mode, window=1) as model:
        stream = model.stream([2, 5, 7], max_new_tokens=40, stop_at_eos=False, temperature=1.0, seed=0)
        next(stream)
        with open(sparse_art / "ffn.safetensors", "r+b") as f:
            f.truncate(Artifact(sparse_art).manifest.ffn_layers[1].offset_bytes + 1024)
        with pytest.raises(FlashReadError, match=r"ffn\.safetensors"):
            for _ in stream:
                pass


def test_read_errors_during_generation_are_not_swallowed(sparse_art, monkeypatch):
    # the fault is injected into Python's preadv: the reads go through it, not the native loop (whose
    # errors tests/unit/test_storage.py covers); rows leave with the window, so later tokens read
    monkeypatch.setattr(storage, "NATIVE_READS", False)
    with flashio.open(sparse_art, mode="sparse", window=1, retain=False) as model:
        model.generate([2, 5, 7], max_new_tokens=3, stop_at_eos=False)

        def failing_preadv(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "preadv", failing_preadv)
        with pytest.raises(FlashReadError, match="Input/output error"):
            model.generate([2, 9, 11, 13], max_new_tokens=20, stop_at_eos=False, temperature=1.0, seed=1)
        monkeypatch.undo()
        # the failed step left no half-filled cache rows behind: a new call works and matches a fresh model
        again = model.generate([2, 9, 11], max_new_tokens=5, stop_at_eos=False).token_ids
    with flashio.open(sparse_art, mode="sparse", window=1) as fresh:
        assert fresh.generate([2, 9, 11], max_new_tokens=5, stop_at_eos=False).token_ids == again



@pytest.mark.parametrize("change", ["delete", "replace", "rewrite"])
def test_artifact_deleted_or_replaced_while_open(sparse_art, change):
    import os
    import shutil

    ffn = sparse_art / "ffn.safetensors"
    with flashio.open(sparse_art, mode="naive") as model:
        model.generate([2, 5], max_new_tokens=2, stop_at_eos=False)
        if change == "delete":
            ffn.unlink()
        elif change == "replace":  # a new file renamed over the old one (what writers do)
            shutil.copyfile(ffn, sparse_art / "new")
            os.replace(sparse_art / "new", ffn)
        else:
            with open(ffn, "r+b") as f:
                f.seek(0, 2)
                f.write(b"x")
        with pytest.raises(FlashReadError, match=r"deleted|replaced"):
            model.generate([2, 5], max_new_tokens=2, stop_at_eos=False)
