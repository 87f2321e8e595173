"""Artifact registry: versioned, content-addressed, atomic publishing and verified pulls.

    from flashio.registry import open_registry, resolve_to_local

    with open_registry("s3://bucket/models") as reg:          # or a directory, or file:///path
        reg.publish("out/opt-125m", name="opt-125m", version="1", aliases=["prod"])
    path = resolve_to_local("s3://bucket/models/opt-125m@prod")  # pulled, verified, cached
    path = resolve_to_local("s3://bucket/models/opt-125m@prod", offline=True)  # cache only

An explicit version already in the cache opens without contacting the registry; an alias whose
registry is unreachable opens the version it last resolved to, with a warning (offline.py).

Layout, references, transfers and the guarantees are described in the modules: layout.py,
refs.py, publish.py, commit.py, pull.py, download.py, resolver.py, offline.py, gc.py. boto3 is needed only for s3:// URIs.
"""

from flashio.registry.cache import default_cache_dir
from flashio.registry.config import RegistryConfig
from flashio.registry.errors import (
    BadArtifactError,
    IntegrityError,
    NotFoundError,
    RefError,
    TransferError,
    UnreachableError,
    UnsafePathError,
    VersionExistsError,
)
from flashio.registry.gc import GcReport
from flashio.registry.progress import NullProgress, Progress, TerminalProgress
from flashio.registry.publish import PublishResult
from flashio.registry.refs import Ref, parse_ref
from flashio.registry.registry import Registry, ResolvedVersion, open_registry
from flashio.registry.resolver import resolve_to_local

__all__ = [
    "BadArtifactError",
    "GcReport",
    "IntegrityError",
    "NotFoundError",
    "NullProgress",
    "Progress",
    "PublishResult",
    "Ref",
    "RefError",
    "Registry",
    "RegistryConfig",
    "ResolvedVersion",
    "TerminalProgress",
    "TransferError",
    "UnreachableError",
    "UnsafePathError",
    "VersionExistsError",
    "default_cache_dir",
    "open_registry",
    "parse_ref",
    "resolve_to_local",
]
