"""Where things live in a registry (keys relative to its root).

    blobs/sha256/<digest>                              create-only, shared by all versions
    models/<name>/versions/<version>/manifest.json     written last: the version exists once it does
    models/<name>/aliases/<alias>                      movable pointer (JSON: {"version": ...})
    models/<name>/claims/<version>/<uuid>              short-lived, see commit.py
"""

from __future__ import annotations

BLOBS_PREFIX = "blobs/sha256/"
MODELS_PREFIX = "models/"
VERSION_MANIFEST = "manifest.json"


def blob_key(digest: str) -> str:
    return f"{BLOBS_PREFIX}{digest}"


def versions_prefix(name: str) -> str:
    return f"{MODELS_PREFIX}{name}/versions/"


def version_key(name: str, version: str) -> str:
    return f"{versions_prefix(name)}{version}/{VERSION_MANIFEST}"


def aliases_prefix(name: str) -> str:
    return f"{MODELS_PREFIX}{name}/aliases/"


def alias_key(name: str, alias: str) -> str:
    return f"{aliases_prefix(name)}{alias}"


def claims_prefix(name: str, version: str) -> str:
    return f"{MODELS_PREFIX}{name}/claims/{version}/"


def parse_model_key(key: str) -> tuple[str, str, str] | None:
    """Split a key under models/ into (name, kind, rest): kind is versions, aliases or claims."""
    parts = key.split("/", 3)
    if len(parts) != 4 or parts[0] != MODELS_PREFIX.rstrip("/") or parts[2] not in ("versions", "aliases", "claims"):
        return None
    return parts[1], parts[2], parts[3]
