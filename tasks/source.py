"""The source model: find the checkpoint, check that flashio supports it, fingerprint its files.

    src = inspect_source("tasks/demo/opt-stdlib")          # a local directory
    src = inspect_source("facebook/opt-125m", revision="main")  # a hub id (cached or downloadable)
    src.fingerprint                                          # sha256 over config, weights, tokenizer

This is the pipeline's first step and it is cheap: everything a user can get wrong about the
model (a path that does not exist, pickled weights, an architecture flashio cannot run, a
missing tokenizer) fails here, before any tensor is computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from flashio.checkpoint import HFCheckpoint
from flashio.errors import FormatError, UnsupportedArchitectureError
from flashio.hashing import sha256_file
from flashio.model_card import source_license
from flashio.models import get_architecture
from tasks.errors import InputError
from tasks.gguf import gguf_checkpoint, is_gguf_source

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
# What a conversion needs from a hub repository (no pickles, no other frameworks' weights).
# README.md for the licence in its front matter; LICENSE/NOTICE/USE_POLICY travel with the artifact.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "*.jinja", "README.md",
                "LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*", "license*", "notice*"]


@dataclass(frozen=True)
class SourceModel:
    """A checked source checkpoint and the content hashes of its files."""

    ref: str  # what the user gave: a hub id or a path
    path: Path  # the local checkpoint directory
    revision: str | None  # the hub commit the snapshot came from; None for a local directory
    model_type: str
    n_layers: int
    dim: int
    ffn_dim: int
    gated: bool
    max_positions: int
    config_dtype: str  # the checkpoint's own dtype (config.json), e.g. "float16"
    files: tuple[tuple[str, str], ...]  # (file name, sha256) of config, weights, tokenizer and licence files
    fingerprint: str  # sha256 over `files`
    license: str | None = None  # the source README's `license:` (front matter), for the model card

    @property
    def name(self) -> str:
        """A default registry name: the last part of the hub id or directory (a GGUF file's without
        .gguf or .gguf.partNN)."""
        return Path(self.ref.rstrip("/")).name.split(".gguf")[0] or "model"

    def lineage(self) -> dict:
        return {"id": self.ref, "path": str(self.path), "revision": self.revision,
                "model_type": self.model_type, "files": dict(self.files), "fingerprint": self.fingerprint,
                "license": self.license}


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or model in (".", "..")


def resolve_model_dir(model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """The local directory of `model` (a directory, a GGUF source made a Hugging Face directory by
    tasks.gguf, or a hub id fetched into the HF cache)."""
    local = Path(model).expanduser()
    if local.exists():
        if is_gguf_source(local):  # a .gguf, its *.gguf.partNN, or a directory of them: converted once, cached
            return gguf_checkpoint(local), None
        if not local.is_dir():
            raise InputError(f"model {model!r} is a file; give the checkpoint directory (with config.json "
                             "and *.safetensors, as written by save_pretrained) or a .gguf file")
        return local.resolve(), None
    if _looks_like_path(model):
        raise InputError(f"model directory {model!r} does not exist; give a checkpoint directory written by "
                         "save_pretrained, or a Hugging Face hub id such as 'facebook/opt-125m'")
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types (offline, 404, auth, validation)
        offline = " (HF_HUB_OFFLINE is set: only models already in the local HF cache can be used)" \
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") else ""
        raise InputError(f"model {model!r} is not a local directory and could not be fetched from the Hugging "
                         f"Face hub{offline}: {type(exc).__name__}: {exc}. For a local checkpoint pass its "
                         "directory path (e.g. ./my-model)") from None
    return snapshot, snapshot.name if revision is None or len(revision) != 40 else revision


def inspect_source(model: str, *, revision: str | None = None, hash_files: bool = True) -> SourceModel:
    """Find and check a source checkpoint; hash its files (hash_files=False: a quick check whose
    `files` and `fingerprint` are empty). Raises InputError or UnsupportedArchitectureError with
    what to do."""
    path, resolved_revision = resolve_model_dir(model, revision)
    try:
        ckpt = HFCheckpoint(path)
    except FormatError as exc:
        raise InputError(str(exc)) from None
    model_type = ckpt.config["model_type"]
    try:
        arch = get_architecture(model_type)
        args = arch.ModelArgs.from_hf(ckpt.config)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(f"{model}: {exc}") from None
    except KeyError as exc:
        raise InputError(f"{path / 'config.json'}: missing key {exc.args[0]!r} for a {model_type} model") from None
    tokenizer = [n for n in TOKENIZER_FILES if (path / n).is_file()]
    if not set(tokenizer) - {"chat_template.jinja", "generation_config.json"}:
        raise InputError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}...): calibration text "
                         "is tokenized with the model's own tokenizer; save it next to the weights "
                         "(tokenizer.save_pretrained)")
    licences = {p.name for p in ckpt.licence_files()}
    names = sorted({p.name for p in ckpt.file_paths()} | set(tokenizer) | licences)
    files = tuple((n, sha256_file(path / n)) for n in names) if hash_files else ()
    fingerprint = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files).encode()).hexdigest() if files else ""
    dtype = str(ckpt.config.get("torch_dtype") or ckpt.config.get("dtype") or "float32").replace("torch.", "")
    log.info("source %s: %s, %d layers, d_model %d, %d FFN neurons", model, model_type, args.n_layers,
             args.dim, args.ffn_dim)
    return SourceModel(ref=model, path=path, revision=resolved_revision, model_type=model_type,
                       n_layers=args.n_layers, dim=args.dim, ffn_dim=args.ffn_dim, gated=arch.FFN.gated,
                       max_positions=args.max_positions, config_dtype=dtype, files=files,
                       fingerprint=fingerprint, license=source_license(path))


@task(name="inspect-source", retries=0)
def inspect_source_task(model: str, revision: str | None = None) -> SourceModel:
    """Not cached: hashing the files is what tells whether they changed."""
    src = inspect_source(model, revision=revision)
    get_run_logger().info("source %s (%s, %d layers): fingerprint %s", src.ref, src.model_type, src.n_layers,
                          src.fingerprint[:16])
    return src
