"""Open and validate an artifact directory.

    art = Artifact("artifacts/opt-125m")       # cheap checks: manifest, names, sizes, offsets
    art.verify()                                # sha256 of every file (reads everything)
    weights = art.load_resident()

Validation on open never trusts the manifest: file names must stay inside the directory, sizes
must match the files on disk, and every FFN layer's offsets are cross-checked against the
safetensors header of ffn.safetensors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from flashio.dtypes import SAFETENSORS_CODES
from flashio.errors import ChecksumError, FormatError
from flashio.format.ffnfile import read_safetensors_header
from flashio.format.manifest import (
    MANIFEST,
    UP_SKETCH_TENSOR,
    Manifest,
    check_files_on_disk,
    parse_manifest,
    read_manifest_bytes,
)
from flashio.format.resident import read_resident
from flashio.hashing import sha256_file
from flashio.models import get_architecture
from flashio.predictor import PredictorWeights
from flashio.quant import EMBEDDING_ROWS

log = logging.getLogger(__name__)


def model_args(arch, config: dict, where: str):
    """The architecture's ModelArgs from a config dict; any gap or nonsense is a FormatError."""
    try:
        args = arch.ModelArgs.from_hf(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise FormatError(f"{where}: model config is incomplete or malformed ({type(exc).__name__}: {exc})") from None
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        if f.type in ("int", int) and (not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > 1 << 31):
            raise FormatError(f"{where}: model config {f.name} = {v!r}, expected a positive integer")
    explicit_head_dim = "head_dim" in {f.name for f in dataclasses.fields(args)}
    if (not explicit_head_dim and args.dim % args.n_heads) or args.n_heads % args.n_kv_heads:
        raise FormatError(f"{where}: model config has dim {args.dim}, {args.n_heads} heads, "
                          f"{args.n_kv_heads} key/value heads: the heads must divide evenly")
    return args


class Artifact:
    """A validated artifact directory."""

    def __init__(self, path: str | Path, *, verify: bool = False):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        self.manifest: Manifest = parse_manifest(read_manifest_bytes(self.path))
        m = self.manifest
        self.arch = get_architecture(m.architecture)
        self.args = model_args(self.arch, m.model_config, str(mpath))
        if m.n_layers != self.args.n_layers:
            raise FormatError(f"{mpath}: {m.n_layers} FFN layers but the model config has {self.args.n_layers}")
        if m.gated != self.arch.FFN.gated:
            raise FormatError(f"{mpath}: gated={m.gated} but {m.architecture} FFNs are gated={self.arch.FFN.gated}")
        check_files_on_disk(self.path, m.files)
        self._check_ffn_header()
        self._check_resident()
        if verify:
            self.verify()

    def file(self, name: str) -> Path:
        return self.path / name

    def _check_ffn_header(self) -> None:
        m = self.manifest
        path = self.file(m.ffn_file)
        with open(path, "rb") as f:
            infos = read_safetensors_header(f, m.files[m.ffn_file].size_bytes, str(path))
        want_dtype = "U8" if m.quant is not None else SAFETENSORS_CODES[m.dtype]
        for i, L in enumerate(m.ffn_layers):
            info = infos.get(L.tensor)
            if info is None:
                raise FormatError(f"{path}: no tensor {L.tensor!r} (manifest ffn_layers[{i}])")
            found = (info.dtype, info.shape, info.start, info.end - info.start)
            want = (want_dtype, (L.n_neurons, L.bundle_width), L.offset_bytes, L.length_bytes)
            if found != want:
                raise FormatError(f"{path}: tensor {L.tensor!r} is (dtype, shape, offset, bytes) = {found}, "
                                  f"the manifest says {want}")

    def _check_resident(self) -> None:
        """Each layer's resident gate rows are in the resident file, [n_neurons, dim] in the manifest's
        dtype (quantized: int8, or int4 rows); each int8 matrix has fp16 scales, one per row, and each
        int4 matrix is uint8 rows of its record's width."""
        m = self.manifest
        path = self.file(m.resident_file)
        with open(path, "rb") as f:
            infos = read_safetensors_header(f, m.files[m.resident_file].size_bytes, str(path))
        scales = m.resident_quant.scales if m.resident_quant is not None else {}
        unlisted = sorted(k for k, info in infos.items() if info.dtype == "I8" and k not in scales)
        if unlisted:
            raise FormatError(f"{path}: {unlisted[:3]} are int8 codes that the manifest's resident_quant does not "
                              "list (their scales unknown); rebuild the artifact")
        for name, scale_name in scales.items():
            info, sinfo = infos.get(name), infos.get(scale_name)
            if (info is None or sinfo is None or info.dtype != "I8" or len(info.shape) != 2
                    or (sinfo.dtype, sinfo.shape) != ("F16", info.shape[:1])):
                found = [None if x is None else (x.dtype, x.shape) for x in (info, sinfo)]
                raise FormatError(f"{path}: quantized matrix {name!r} and its scales {scale_name!r} are (dtype, "
                                  f"shape) = {found}; expected int8 [out, in] and float16 [out]; rebuild the artifact")
        rows = m.resident_quant.rows if m.resident_quant is not None else {}
        for name, q in rows.items():  # [out, row_bytes] uint8, the record's layout
            info = infos.get(name)
            if info is None or info.dtype != "U8" or len(info.shape) != 2 or info.shape[1] != q.row_bytes:
                found = None if info is None else (info.dtype, info.shape)
                raise FormatError(f"{path}: {q.scheme} matrix {name!r} is (dtype, shape) = {found}; expected uint8 rows of "
                                  f"{q.row_bytes} bytes ([out, {q.row_bytes}]); rebuild the artifact")
        for i, L in enumerate(m.ffn_layers if m.gate_resident else ()):
            info = infos.get(L.gate_tensor)
            want = ("I8" if L.gate_tensor in scales else SAFETENSORS_CODES[m.dtype], (L.n_neurons, self.args.dim))
            if L.gate_tensor in rows:
                q = rows[L.gate_tensor]
                want = ("U8", (L.n_neurons, q.row_bytes if q.dim == self.args.dim else -1))  # rows of d_model inputs
            if info is None or (info.dtype, info.shape) != want:
                found = None if info is None else (info.dtype, info.shape)
                raise FormatError(f"{path}: gate rows {L.gate_tensor!r} of ffn_layers[{i}] are (dtype, shape) = "
                                  f"{found}, the manifest says {want}; rebuild the artifact")
        for i, L in enumerate(m.ffn_layers if m.up_sketch is not None else ()):
            name, want = UP_SKETCH_TENSOR.format(i), ("U8", (L.n_neurons, m.up_sketch.row_bytes))
            info = infos.get(name)
            if info is None or (info.dtype, info.shape) != want:
                found = None if info is None else (info.dtype, info.shape)
                raise FormatError(f"{path}: up sketch {name!r} is (dtype, shape) = {found}, the manifest says "
                                  f"{want}; rebuild the artifact")

    def resident_tensor_bytes(self, names: Iterable[str]) -> int:
        """The stored bytes of the named resident tensors (from the file's header)."""
        path = self.file(self.manifest.resident_file)
        with open(path, "rb") as f:
            infos = read_safetensors_header(f, self.manifest.files[self.manifest.resident_file].size_bytes, str(path))
        return sum(infos[n].end - infos[n].start for n in names if n in infos)

    def verify(self, names: Iterable[str] | None = None,
               progress: Callable[[str, int], None] | None = None) -> None:
        """Recompute sha256 of the named files (default: all) and compare with the manifest."""
        files = self.manifest.files
        for name in names if names is not None else files:
            got = sha256_file(self.file(name))
            if progress:
                progress(name, files[name].size_bytes)
            if got != files[name].sha256:
                raise ChecksumError(f"{self.file(name)}: sha256 is {got}, the manifest says "
                                    f"{files[name].sha256}; the file is corrupt or was modified")

    def load_resident(self, *, dtype: torch.dtype | None = None, verify: bool = True) -> dict[str, torch.Tensor]:
        """The resident tensors in private memory, floating ones in `dtype` (default: as stored);
        by default the file's sha256 is checked in the same single read (ChecksumError)."""
        m = self.manifest
        return read_resident(self.file(m.resident_file), dtype, m.files[m.resident_file].sha256 if verify else None)

    def _load(self, name: str, verify: bool) -> dict[str, torch.Tensor]:
        if verify:
            self.verify([name])
        try:
            return load_file(str(self.file(name)))
        except (SafetensorError, OSError) as exc:
            raise FormatError(f"{self.file(name)}: cannot be read as safetensors: {exc}") from None

    def load_predictors(self, *, verify: bool = True) -> list[PredictorWeights] | None:
        m = self.manifest
        if m.predictors_file is None or m.predictor_layers is None:
            return None
        t = self._load(m.predictors_file, verify)
        out = []
        for i, P in enumerate(m.predictor_layers):
            try:
                A, B, bias = t[f"layers.{i}.A"], t[f"layers.{i}.B"], t[f"layers.{i}.bias"]
            except KeyError as exc:
                raise FormatError(f"{self.file(m.predictors_file)}: missing tensor {exc.args[0]!r}") from None
            n = m.ffn_layers[i].n_neurons
            if A.shape != (P.rank, self.args.dim) or B.shape != (n, P.rank) or bias.shape != (n,):
                raise FormatError(f"{self.file(m.predictors_file)}: layer {i} predictor shapes A{tuple(A.shape)} "
                                  f"B{tuple(B.shape)} bias{tuple(bias.shape)} do not match rank {P.rank}, "
                                  f"dim {self.args.dim}, {n} neurons")
            out.append(PredictorWeights(A, B, bias, P.threshold))
        return out

    def tokenizer_path(self) -> Path | None:
        tok = self.manifest.tokenizer
        return self.file(tok["file"]) if tok else None

    def summary(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path), "architecture": m.architecture, "dtype": m.dtype,
            "layers": m.n_layers, "dim": self.args.dim, "ffn_neurons": m.ffn_layers[0].n_neurons,
            "bundle_bytes": m.row_bytes,
            "quantization": None if m.quant is None else m.quant.scheme,
            "quantization_group_size": None if m.quant is None else m.quant.group_size,
            "resident_quantization": None if m.resident_quant is None else m.resident_quant.scheme,
            "embedding_quantization": None if m.resident_quant is None or EMBEDDING_ROWS not in m.resident_quant.rows
            else m.resident_quant.rows[EMBEDDING_ROWS].scheme,
            "ffn_bytes": sum(L.length_bytes for L in m.ffn_layers),
            "resident_bytes": m.files[m.resident_file].size_bytes,
            "predictors": None if m.predictor_layers is None else [p.rank for p in m.predictor_layers],
            "tokenizer": m.tokenizer is not None,
            "gate_resident": m.gate_resident,
            "files": len(m.files),
        }
