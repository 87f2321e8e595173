"""`flashio bench model --peer llama.cpp`: the GGUF of an artifact's weights (flashio.bench.peer_gguf)
read back through tasks/gguf.py, the independent GGUF -> Hugging Face path, equals the source
checkpoint at F16 precision (the FFN rows in the artifact's stored neuron order, q/k un-permuted);
a missing llama_cpp is one line with the install command; and, where llama-cpp-python is
installed, llama.cpp's logits on that GGUF agree with flashio's dense mode on the same artifact."""

from __future__ import annotations

import builtins
import os

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402

from flashio.bench.peer import INSTALL_COMMAND, ROW_DRAM, ROW_LIMIT, check_peers, peer_targets  # noqa: E402
from flashio.bench.peer_gguf import SOURCE_KEY, write_llama_gguf  # noqa: E402
from flashio.cli import main  # noqa: E402
from flashio.errors import FlashError  # noqa: E402
from flashio.format import Artifact, write_artifact  # noqa: E402

TOKENS = [1, 17, 101, 55, 9, 120, 33, 78, 12, 5]


@pytest.fixture(scope="module")
def permuted_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama (grouped-query attention) written with a random neuron order per layer."""
    model, ckpt = tiny_llama
    n, layers = model.config.intermediate_size, model.config.num_hidden_layers
    orders = [np.random.default_rng(i).permutation(n) for i in range(layers)]
    return model, write_artifact(ckpt, tmp_path_factory.mktemp("peer") / "art", orders=orders), orders


@pytest.fixture(scope="module")
def gguf_file(permuted_llama, tmp_path_factory):
    return write_llama_gguf(Artifact(permuted_llama[1]), tmp_path_factory.mktemp("gguf") / "m.f16.gguf")


def test_gguf_round_trips_the_artifact_weights(permuted_llama, gguf_file, tmp_path):
    pytest.importorskip("tasks.gguf")
    from safetensors.torch import load_file

    from tasks.gguf import write_hf_checkpoint

    model, _, orders = permuted_llama
    reader = gguf.GGUFReader(str(gguf_file))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.attn_q.weight"] == "F16"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert reader.fields["tokenizer.ggml.model"].contents() == "none"
    assert reader.fields["llama.vocab_size"].contents() == 320
    hf = load_file(str(write_hf_checkpoint(gguf_file, tmp_path / "hf", dtype="float32", tokenizer=False)
                       / "model.safetensors"))
    src = model.state_dict()
    assert set(hf) == set(src)
    for name, want in src.items():
        got = hf[name]
        if ".mlp." in name:  # stored order: gate/up rows and down columns permuted alike
            order = torch.as_tensor(orders[int(name.split(".")[2])])
            got = torch.empty_like(got).index_copy_(1 if "down_proj" in name else 0, order, got)
        want = want.float() if want.dim() == 1 else want.half().float()  # F32 norms, F16 matrices
        assert torch.equal(got, want), name


def test_gguf_is_reused_until_the_artifact_changes(permuted_llama, gguf_file, tiny_llama, tmp_path):
    before = gguf_file.stat().st_mtime_ns
    assert write_llama_gguf(Artifact(permuted_llama[1]), gguf_file) == gguf_file
    assert gguf_file.stat().st_mtime_ns == before  # same artifact: not rewritten
    other = write_artifact(tiny_llama[1], tmp_path / "other")  # identity order: another manifest
    write_llama_gguf(Artifact(other), gguf_file.with_name("other.gguf"))
    a = gguf.GGUFReader(str(gguf_file)).fields[SOURCE_KEY].contents()
    b = gguf.GGUFReader(str(gguf_file.with_name("other.gguf"))).fields[SOURCE_KEY].contents()
    assert a != b


def test_peer_refuses_what_it_cannot_write(opt_artifact):
    with pytest.raises(FlashError, match=r"llama\.cpp peer writes Llama shapes only"):
        write_llama_gguf(Artifact(opt_artifact), opt_artifact.parent / "x.gguf")
    with pytest.raises(FlashError, match=r"unknown --peer vllm; supported: llama\.cpp"):
        check_peers(("vllm",), Artifact(opt_artifact))


def test_missing_llama_cpp_is_one_line_with_the_install_command(permuted_llama, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ModuleNotFoundError("No module named 'llama_cpp'", name="llama_cpp")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    rc = main(["bench", "model", str(permuted_llama[1]), "--out", str(tmp_path / "out"), "--peer", "llama.cpp",
               "--in-process"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert INSTALL_COMMAND in err and "-DGGML_AMX_TILE=OFF" in err and "-DGGML_NATIVE=OFF" in err
    assert not (tmp_path / "out" / "results.json").exists()  # refused before any row ran


def test_peer_targets_compare_the_rows():
    def row(name, ms):
        return {"name": name, "ok": True, "per_token": {"total_ms": ms}}

    t = peer_targets([row("+overlap", 100.0), row("dense", 500.0), row(ROW_DRAM, 450.0), row(ROW_LIMIT, 3000.0)])
    assert t["speedup_vs_llama_cpp_dram"] == {"value": 4.5, "target": 1.0, "met": True}
    assert t["speedup_vs_llama_cpp_mmap_limit"]["value"] == 30.0 and t["speedup_vs_llama_cpp_mmap_limit"]["met"]
    assert t["dense_vs_llama_cpp_dram"]["value"] == pytest.approx(500 / 450)
    assert t["dense_vs_llama_cpp_dram"]["met"] is True


def test_llama_cpp_agrees_with_flashio_dense(permuted_llama, gguf_file):
    pytest.importorskip("llama_cpp")
    import flashio
    from flashio.bench.peer_worker import run

    with flashio.open(permuted_llama[1], mode="dense", compute_dtype="float32") as m:
        ref = m.forward(TOKENS, token_by_token=True).float()  # [T, V]
    got = run({"gguf": str(gguf_file), "load_mode": "mmap", "threads": 1, "tokens": TOKENS, "logits": True})
    assert got["ok"] and len(got["steps"]) == len(TOKENS)
    peer = torch.tensor(got["logits"])  # [T, V]
    # F16 weights (and llama.cpp's F16 activations in the matmuls) against fp32 weights
    err = (peer - ref).abs().max().item() / ref.abs().max().item()
    top1 = (peer.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"llama.cpp vs flashio dense: max |diff| / max |logit| = {err:.2e}, top-1 agreement {top1:.3f}")
    assert err < 2e-2 and top1 >= 0.9
    assert any("CPU_Mapped" in line for line in got["log"]), got["log"]  # the weights stayed in the mapping


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a cgroup")
def test_bench_model_with_the_peer_rows(permuted_llama, tmp_path):
    pytest.importorskip("llama_cpp")
    from flashio.bench.model import ModelBenchOptions, run_model_bench

    opts = ModelBenchOptions(permuted_llama[1], tmp_path / "out", configs=("dense", "mmap"), baseline_tokens=2,
                             peers=("llama.cpp",), torch_threads=1, compute_threads=1, dram_limit=1 << 30,
                             run_bandwidth=False)
    res = run_model_bench(opts)
    rows = {r["name"]: r for r in res["configs"]}
    assert rows[ROW_LIMIT]["ok"] and rows[ROW_DRAM]["ok"], {n: r.get("error") for n, r in rows.items()}
    assert rows[ROW_LIMIT]["tokens"] == rows["dense"]["tokens"] == 2 and res["peer"]["threads"] == 1
    assert rows[ROW_LIMIT]["load_mode"] == "mmap" and rows[ROW_DRAM]["load_mode"] == "none"
    table = (tmp_path / "out" / "table.md").read_text()
    assert f"| {ROW_LIMIT} |" in table and f"| {ROW_DRAM} |" in table
