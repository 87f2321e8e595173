"""A GGUF (llama.cpp's format) of the very weights a flashio Llama artifact holds, for the llama.cpp
peer rows of `flashio bench model --peer llama.cpp`.

    path = write_llama_gguf(Artifact("art"), Path("out/llama.f16.gguf"))   # reused when up to date

Written with the `gguf` package's GGUFWriter, tensor by tensor (a 7B model never sits in memory
whole), the way llama.cpp's convert_hf_to_gguf writes a Llama: matrices F16, norms F32, q/k rows
permuted per head (llama.cpp's LLM_ARCH_LLAMA rotates interleaved pairs, the Hugging Face layout
flashio keeps rotates halves). The FFN rows are written in the artifact's stored neuron order:
gate, up and down are permuted alike, so the FFN's output is unchanged. The vocabulary is
`tokenizer.ggml.model = "none"` with `llama.vocab_size` dummy tokens: the benchmark feeds token
ids, never text. `flashio.source_manifest_sha256` names the artifact the file was written from.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from flashio.errors import FlashError, MissingExtraError
from flashio.format import Artifact
from flashio.format.manifest import read_manifest_bytes

log = logging.getLogger(__name__)

WRITER_VERSION = 1  # bump when the file written for the same artifact changes
SOURCE_KEY = "flashio.source_manifest_sha256"
VERSION_KEY = "flashio.gguf_writer_version"
ARCH = "llama"
# flashio resident name (layer part) -> llama.cpp tensor name (layer part)
_LAYER_RESIDENT = {"attn_norm.weight": "attn_norm.weight", "attn.q.weight": "attn_q.weight",
                   "attn.k.weight": "attn_k.weight", "attn.v.weight": "attn_v.weight",
                   "attn.o.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight"}


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise MissingExtraError("--peer llama.cpp (writing the GGUF)", "bench", exc.name) from None
    return gguf


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: w [heads * head_dim, D], each head's two
    rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_digest(art: Artifact) -> str:
    """The artifact's identity: the sha256 of its manifest (which holds every file's sha256)."""
    return hashlib.sha256(read_manifest_bytes(art.path)).hexdigest()


def check_llama_artifact(art: Artifact) -> None:
    """What the GGUF writer supports: a float Llama artifact without biases or rope scaling beyond
    linear; otherwise FlashError naming what was found."""
    m, a = art.manifest, art.args
    where = f"--peer llama.cpp: artifact {art.path}"
    if m.architecture != "llama":
        raise FlashError(f"{where} is {m.architecture!r}; the llama.cpp peer writes Llama shapes only "
                         "(benchmark a llama artifact, e.g. `flashio synth --shape llama-2-7b`)")
    if m.quant is not None or m.resident_quant is not None:
        raise FlashError(f"{where} is quantized ({m.quant.scheme if m.quant else m.resident_quant.scheme}); "
                         "the peer compares the same float weights in F16: benchmark the unquantized artifact")
    if a.attention_bias or a.mlp_bias:
        raise FlashError(f"{where} has attention or FFN biases, which a llama.cpp Llama GGUF does not carry "
                         "as written here; benchmark a Llama without biases")
    if a.rope_type not in ("default", "linear"):
        raise FlashError(f"{where} uses rope_type {a.rope_type!r}; the GGUF writer supports default and linear")


def _layer_tensors(art: Artifact, resident, ffn, i: int) -> Iterator[tuple[str, np.ndarray]]:
    """Layer i's tensors in llama.cpp names and layouts (numpy, torch order [out, in])."""
    a, m = art.args, art.manifest
    L = m.ffn_layers[i]
    for k, name in _LAYER_RESIDENT.items():
        w = resident.get_tensor(f"layers.{i}.{k}")
        if k in ("attn.q.weight", "attn.k.weight"):  # fp32 holds fp16 and bf16 exactly
            heads = a.n_heads if k == "attn.q.weight" else a.n_kv_heads
            w = torch.from_numpy(permute_qk(w.float().numpy(), heads))
        yield f"blk.{i}.{name}", _cast(w, f"blk.{i}.{name}")
    rows = ffn.get_tensor(L.tensor)  # [N, W] bundles in stored order
    parts = {p: rows[:, s:e] for p, s, e in m.bundle_layout}
    gate = resident.get_tensor(L.gate_tensor) if m.gate_resident else parts["gate"]  # [N, D]
    yield f"blk.{i}.ffn_gate.weight", _cast(gate, "ffn_gate")
    yield f"blk.{i}.ffn_up.weight", _cast(parts["up"], "ffn_up")  # [N, D]
    yield f"blk.{i}.ffn_down.weight", _cast(parts["down"].t(), "ffn_down")  # [D, N]


def _cast(w: torch.Tensor, name: str) -> np.ndarray:
    """Matrices F16 (llama.cpp's F16 file type), vectors F32 (as llama.cpp's converter writes norms)."""
    if w.dim() == 1:
        return w.float().contiguous().numpy()
    out = w.to(torch.float16).contiguous()
    if not torch.isfinite(out).all():
        raise FlashError(f"--peer llama.cpp: {name} has values outside float16's range after conversion from "
                         f"{w.dtype}; an F16 GGUF cannot hold these weights")
    return out.numpy()


def _tensor_plan(art: Artifact, has_head: bool) -> list[tuple[str, tuple[int, ...], type]]:
    """Every tensor's (name, numpy shape, dtype) in file order, before any data is read."""
    a = art.args
    q, kv, n = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, art.manifest.ffn_layers[0].n_neurons
    f16, f32 = np.float16, np.float32
    plan = [("token_embd.weight", (a.vocab_size, a.dim), f16)]
    for i in range(a.n_layers):
        plan += [(f"blk.{i}.attn_norm.weight", (a.dim,), f32), (f"blk.{i}.attn_q.weight", (q, a.dim), f16),
                 (f"blk.{i}.attn_k.weight", (kv, a.dim), f16), (f"blk.{i}.attn_v.weight", (kv, a.dim), f16),
                 (f"blk.{i}.attn_output.weight", (a.dim, q), f16), (f"blk.{i}.ffn_norm.weight", (a.dim,), f32),
                 (f"blk.{i}.ffn_gate.weight", (n, a.dim), f16), (f"blk.{i}.ffn_up.weight", (n, a.dim), f16),
                 (f"blk.{i}.ffn_down.weight", (a.dim, n), f16)]
    plan.append(("output_norm.weight", (a.dim,), f32))
    if has_head:
        plan.append(("output.weight", (a.vocab_size, a.dim), f16))
    return plan


def _add_metadata(w, art: Artifact, digest: str) -> None:
    a = art.args
    w.add_name(f"flashio {art.path.name}")
    w.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16
    w.add_vocab_size(a.vocab_size)
    w.add_context_length(a.max_positions)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(art.manifest.ffn_layers[0].n_neurons)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_dimension_count(a.head_dim)
    if a.head_dim != a.dim // a.n_heads:
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    if a.rope_type == "linear":
        gguf = _gguf()
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(a.rope_factor)
    w.add_tokenizer_model("none")  # llama.cpp adds vocab_size dummy tokens: the benchmark feeds ids
    w.add_string(SOURCE_KEY, digest)
    w.add_uint32(VERSION_KEY, WRITER_VERSION)


def gguf_is_current(path: Path, art: Artifact, digest: str | None = None) -> bool:
    """Whether `path` is this writer's GGUF of this artifact (then it is reused, not rewritten)."""
    if not path.is_file():
        return False
    gguf = _gguf()
    try:
        fields = gguf.GGUFReader(str(path)).fields
        got = {k: fields[k].contents() for k in (SOURCE_KEY, VERSION_KEY) if k in fields}
    except (ValueError, OSError, KeyError, IndexError) as exc:
        log.info("%s is not a readable GGUF (%s): rewriting it", path, exc)
        return False
    return got == {SOURCE_KEY: digest or source_digest(art), VERSION_KEY: WRITER_VERSION}


def write_llama_gguf(art: Artifact, path: Path, *, reuse: bool = True,
                     progress: Callable[[str], None] | None = None) -> Path:
    """Write (or reuse) the F16 GGUF of `art`'s weights at `path`; returns path. The file is
    written beside path, fsynced (so that the benchmark can evict its pages) and renamed."""
    from safetensors import safe_open

    gguf = _gguf()
    check_llama_artifact(art)
    digest = source_digest(art)
    if reuse and gguf_is_current(path, art, digest):
        log.info("reusing %s (written from this artifact)", path)
        return path
    m = art.manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with safe_open(str(art.file(m.resident_file)), "pt") as resident, \
            safe_open(str(art.file(m.ffn_file)), "pt") as ffn:
        has_head = "lm_head.weight" in set(resident.keys())
        plan = _tensor_plan(art, has_head)
        w = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            _add_metadata(w, art, digest)
            for name, shape, dtype in plan:
                w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            expected = iter(plan)

            def put(name: str, arr: np.ndarray) -> None:
                want, shape, dtype = next(expected)
                assert (name, arr.shape, arr.dtype) == (want, shape, np.dtype(dtype)), (name, arr.shape, want, shape)
                w.write_tensor_data(arr)

            put("token_embd.weight", _cast(resident.get_tensor("tok_embeddings.weight"), "token_embd"))
            for i in range(art.args.n_layers):
                for name, arr in _layer_tensors(art, resident, ffn, i):
                    put(name, arr)
                if progress:
                    progress(f"GGUF: layer {i + 1}/{art.args.n_layers} written")
            put("output_norm.weight", _cast(resident.get_tensor("norm.weight"), "output_norm"))
            if has_head:
                put("output.weight", _cast(resident.get_tensor("lm_head.weight"), "output"))
            assert next(expected, None) is None
            for f in w.fout or ():
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
        w.close()
    os.replace(tmp, path)
    log.info("wrote %s (%.2f GB)", path, path.stat().st_size / 1e9)
    return path
