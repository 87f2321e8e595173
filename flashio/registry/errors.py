"""The registry's errors: all subclasses of :class:`flashio.errors.RegistryError`.

    try:
        registry.publish(artifact_dir, name="opt-125m", version="1")
    except VersionExistsError as exc:
        ...  # pick another version: versions are immutable

Messages name what failed, the value seen, what was expected and the fix. They never contain
credentials: endpoints are shown without user info, and server error messages are reduced to
their error code and HTTP status.
"""

from __future__ import annotations

from flashio.errors import ChecksumError, FormatError, RegistryError

__all__ = [
    "BadArtifactError",
    "IntegrityError",
    "NotFoundError",
    "RefError",
    "RegistryError",
    "TransferError",
    "UnreachableError",
    "UnsafePathError",
    "VersionExistsError",
]


class RefError(RegistryError):
    """A reference, name, version, alias or registry URI is malformed."""


class NotFoundError(RegistryError):
    """A model, version, alias or bucket does not exist in the registry."""


class VersionExistsError(RegistryError):
    """The version is already published with different content (versions are immutable)."""


class BadArtifactError(RegistryError, FormatError):
    """The artifact directory or a registry manifest is malformed."""


class UnsafePathError(BadArtifactError):
    """A file name in a manifest would leave the artifact (or version) directory."""


class IntegrityError(RegistryError, ChecksumError):
    """Bytes do not match the sha256 or size recorded for them (on upload or on pull)."""


class TransferError(RegistryError):
    """A transfer to or from the registry failed (server error, dropped connection...)."""


class UnreachableError(TransferError):
    """The registry's endpoint could not be reached within the configured timeout and retries."""
