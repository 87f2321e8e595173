"""The flashio command, called as a user would (through main(argv))."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from flashio import cli
from flashio.cli import main
from flashio.commands import (
    add_open_options,
    default_torch_threads,
    run_config,
    torch_threads_option,
)


def test_pack_inspect_run(tiny_opt, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["pack", str(tiny_opt[1]), str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "opt float32, 2 layers" in text and "verified" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ffn_neurons"] == 256
    assert main(["run", str(out), "--prompt", "def add(a, b):", "--max-new-tokens", "5", "--mode", "oracle"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def add(a, b):")
    assert "tok/s" in captured.err and "MB read/token" in captured.err and "I/O" in captured.err
    assert main(["run", str(out), "--prompt", "x", "--max-new-tokens", "3", "--mode", "naive", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["per_token"]["bytes_read"] == 2 * 256 * 512
    assert main(["inspect", str(out)]) == 0
    assert "quantized" not in capsys.readouterr().out  # a float artifact has no quantization line


def test_inspect_names_the_quantization(tiny_opt, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["pack", str(tiny_opt[1]), str(out), "--dtype", "float32", "--quantize", "int4",
                 "--quantize-resident", "int4"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert ("quantized    : FFN rows int4 (groups of 32), resident matrices int4, token embeddings int8"
            in capsys.readouterr().out)
    assert main(["inspect", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["quantization"], s["resident_quantization"], s["embedding_quantization"]) == ("int4", "int4", "int8")


def test_errors_are_one_line(opt_artifact, capsys):
    assert main(["run", str(opt_artifact), "--prompt", "x", "--mode", "sparse"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flashio run: error:") and "predictors" in err[0]
    assert main(["run", str(opt_artifact), "--prompt", "x", "--dram-budget", "lots"]) == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", str(opt_artifact), "--prompt", "x", "--mode", "dense", "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "CUDA is not available on this machine" in err[0]


def test_command_from_missing_extra_says_what_to_install(monkeypatch, capsys):
    class BrokenEntryPoint:
        name = "convert"

        def load(self):
            raise ModuleNotFoundError("No module named 'prefect'", name="prefect")

    monkeypatch.setattr(cli, "_entry_points", lambda: [BrokenEntryPoint()])
    assert main(["convert", "some/model"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'flashio[pipeline]'" in err and "prefect" in err and "Traceback" not in err


def test_console_script_is_declared():
    try:
        eps = metadata.entry_points(group="console_scripts")
    except metadata.PackageNotFoundError:  # pragma: no cover
        pytest.skip("flashio is not installed")
    if not any(ep.name == "flashio" for ep in eps):
        pytest.skip("flashio is not installed as a distribution (run `make test`)")
    assert any(ep.value == "flashio.cli:main" for ep in eps if ep.name == "flashio")


def test_help_runs_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "flashio.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for command in ("run", "inspect", "pack"):
        assert command in r.stdout


def test_the_commands_default_to_the_best_configuration(monkeypatch):
    """`flashio run/chat/serve` with no flags: sparse, reads overlapped with compute, the cost
    model's read plan, and one core left to the flash readers (torch threads = CPUs - 1)."""
    import argparse

    p = argparse.ArgumentParser()
    add_open_options(p)
    cfg = run_config(p.parse_args(["art"]))
    assert cfg.mode == "sparse" and cfg.overlap and cfg.threads is None and cfg.max_gap is None
    assert cfg.torch_threads == default_torch_threads()
    assert cfg.compute == "window" and cfg.preload and cfg.retain and cfg.lookahead
    other = run_config(p.parse_args(["art", "--compute", "active", "--no-preload", "--no-lookahead"]))
    assert other.compute == "active" and not other.preload and not other.lookahead
    assert run_config(p.parse_args(["art", "--torch-threads", "3"])).torch_threads == 3
    assert cfg.compute_threads is None and run_config(p.parse_args(["art", "--compute-threads", "2"])).compute_threads == 2
    assert run_config(p.parse_args(["art", "--torch-threads", "0"])).torch_threads is None  # torch's own
    assert [default_torch_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert default_torch_threads() == 2 and torch_threads_option(None) == 2


SWALLOWING_COMMAND = """
import atexit, sys, time
from flashio import cli
cli.TERM_GRACE_S = float(sys.argv[2])
atexit.register(lambda: open(sys.argv[1], "w").write("cleaned up"))
with cli._sigterm_exits():
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        try:  # as code that catches every exception: the SIGTERM's SystemExit is swallowed here
            time.sleep(0.01)
        except BaseException:
            pass
    print("ran to its end", flush=True)
print("went on after the command", flush=True)
"""


@pytest.mark.parametrize("grace, runs", [(0.5, 60.0), (60.0, 3.0)], ids=["stuck past the grace", "ends first"])
def test_sigterm_ends_a_command_that_swallows_its_exception(tmp_path, grace, runs):
    """A SIGTERM whose SystemExit is caught on its way still ends the command with status 143 and
    its atexit handlers run: after TERM_GRACE_S where the command would run on, at its end where
    it gets there first."""
    import signal
    import time

    marker = tmp_path / "atexit"
    proc = subprocess.Popen([sys.executable, "-c", SWALLOWING_COMMAND, str(marker), str(grace), str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert time.monotonic() - t0 < 20
    assert "went on after the command" not in out
    assert ("ran to its end" in out) == (runs < grace)
    assert marker.read_text() == "cleaned up"
