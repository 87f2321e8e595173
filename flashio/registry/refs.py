"""References (`name`, `name@version`, `name@alias`) and registry URIs.

    parse_ref("opt-125m@prod")        -> Ref(name="opt-125m", tag="prod")
    parse_ref("opt-125m")             -> Ref(name="opt-125m", tag=None)  # means @latest
    parse_location("s3://bucket/reg") -> Location(scheme="s3", bucket="bucket", prefix="reg")
    split_ref_uri("s3://bucket/reg/opt-125m@latest") -> ("s3://bucket/reg", "opt-125m@latest")

Names, versions and aliases become object keys and directory names, so they are restricted to
letters, digits, '.', '_' and '-', start with a letter or digit and hold at most 128 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flashio.registry.errors import RefError

LATEST = "latest"
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


def check_token(value: str, what: str) -> str:
    """Return `value` if it is a valid name, version or alias (`what` says which), else raise."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise RefError(
            f"invalid {what} {value!r}: expected 1-128 characters from letters, digits, '.', '_', '-' "
            f"starting with a letter or digit (for example 'opt-125m', '2024.06.1', 'prod')"
        )
    return value


@dataclass(frozen=True)
class Ref:
    """A reference to a model in a registry: `name` alone means `name@latest`."""

    name: str
    tag: str | None = None  # a version or an alias; None means the `latest` alias

    def __str__(self) -> str:
        return f"{self.name}@{self.tag}" if self.tag else self.name


def parse_ref(ref: str) -> Ref:
    """Parse `name`, `name@version` or `name@alias` into a :class:`Ref`; raise RefError if malformed."""
    if not isinstance(ref, str) or not ref.strip():
        raise RefError(f"empty model reference {ref!r}: expected 'name', 'name@version' or 'name@alias'")
    name, sep, tag = ref.strip().partition("@")
    if sep and "@" in tag:
        raise RefError(
            f"malformed model reference {ref!r}: more than one '@'; expected 'name', "
            f"'name@version' or 'name@alias'"
        )
    if sep and not tag:
        raise RefError(f"malformed model reference {ref!r}: nothing after '@'; expected 'name@version' or 'name@alias'")
    check_token(name, "model name")
    if sep:
        check_token(tag, "version or alias")
    return Ref(name=name, tag=tag if sep else None)


@dataclass(frozen=True)
class Location:
    """Where a registry lives: a local directory (`path`) or an S3 bucket and key prefix."""

    scheme: str  # "file" or "s3"
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""  # without leading or trailing '/'

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return str(self.path)


def parse_location(uri: str) -> Location:
    """Parse a registry URI: a plain path, `file:///abs/path` or `s3://bucket[/prefix]`."""
    if not isinstance(uri, str) or not uri.strip():
        raise RefError(f"empty registry URI {uri!r}: expected a directory, 'file:///path' or 's3://bucket/prefix'")
    uri = uri.strip()
    if "://" not in uri:
        return Location(scheme="file", path=Path(uri).expanduser())
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RefError(f"registry URI {uri!r} names host {parts.netloc!r}: file URIs must be 'file:///absolute/path'")
        return Location(scheme="file", path=Path(parts.path))
    if scheme == "s3":
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise RefError(f"registry URI {uri!r}: expected 's3://bucket/prefix' without credentials, query or fragment")
        if not _BUCKET.fullmatch(parts.netloc):
            raise RefError(f"registry URI {uri!r}: invalid bucket name {parts.netloc!r}")
        prefix = parts.path.strip("/")
        if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
            raise RefError(f"registry URI {uri!r}: the prefix {prefix!r} has empty, '.' or '..' segments")
        return Location(scheme="s3", bucket=parts.netloc, prefix=prefix)
    raise RefError(
        f"unsupported registry URI scheme {parts.scheme!r} in {uri!r}: expected a directory, "
        f"'file:///path' or 's3://bucket/prefix'"
    )


def split_ref_uri(uri: str) -> tuple[str, str]:
    """Split `<registry uri>/<ref>` at its last '/': `s3://b/p/name@v` -> (`s3://b/p`, `name@v`)."""
    registry, sep, ref = uri.rstrip("/").rpartition("/")
    if not sep or not registry or registry.endswith(":/"):
        raise RefError(
            f"{uri!r} does not name a registry and a model: expected '<registry>/<name>[@tag]' such as "
            f"'s3://bucket/prefix/opt-125m@latest', or pass registry=... with a plain reference"
        )
    parse_ref(ref)
    return registry, ref
