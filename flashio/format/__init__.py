"""The artifact format (version 1): one module writes it, one reads it, both here.

See DESIGN.md section 2. `write_artifact` is what `flashio pack` and the pipeline's bundling
task call; `Artifact` is what the runtime opens.
"""

from flashio.format.finalize import finalize_artifact
from flashio.format.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    ManifestFiles,
    UnsafeNameError,
    check_files_on_disk,
    check_relative_name,
    parse_manifest,
    parse_manifest_files,
)
from flashio.format.reader import Artifact
from flashio.format.writer import ModelSource, source_from_checkpoint, write_artifact
from flashio.hashing import sha256_file  # re-exported: pipeline tasks hash their outputs with it

__all__ = [
    "FORMAT_VERSION",
    "Artifact",
    "FileEntry",
    "Manifest",
    "ManifestFiles",
    "ModelSource",
    "UnsafeNameError",
    "check_files_on_disk",
    "check_relative_name",
    "finalize_artifact",
    "parse_manifest",
    "parse_manifest_files",
    "sha256_file",
    "source_from_checkpoint",
    "write_artifact",
]
