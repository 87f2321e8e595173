"""The artifact format (version 1): one module writes it, one reads it, both here.

See DESIGN.md section 2. `write_artifact` is what `flashio pack` and the pipeline's bundling
task call; `Artifact` is what the runtime opens.
"""

from flashio.format.finalize import finalize_artifact
from flashio.format.manifest import FORMAT_VERSION, Manifest, parse_manifest
from flashio.format.reader import Artifact
from flashio.format.writer import ModelSource, sha256_file, source_from_checkpoint, write_artifact

__all__ = [
           "FORMAT_VERSION",
           "Artifact",
           "Manifest",
           "ModelSource",
           "finalize_artifact",
           "parse_manifest",
           "sha256_file",
           "source_from_checkpoint",
           "write_artifact",
]
