"""References, registry URIs and settings: what is accepted, what is refused and how it says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashio.errors import RegistryError
from flashio.registry import Ref, RefError, RegistryConfig, parse_ref
from flashio.registry.refs import parse_location, split_ref_uri

token = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)


@settings(deadline=None)
@given(name=token, tag=st.none() | token)
def test_parse_ref_round_trips(name: str, tag: str | None):
    ref = Ref(name, tag)
    assert parse_ref(str(ref)) == ref


@settings(deadline=None)
@given(text=st.text(max_size=30))
def test_parse_ref_accepts_or_raises_ref_error(text: str):
    try:
        ref = parse_ref(text)
    except RefError:
        return
    assert str(ref) == text.strip() and parse_ref(str(ref)) == ref
    assert not {"/", "\\", "\x00"} & set(str(ref)) and not str(ref).startswith(".")


@pytest.mark.parametrize("ref, expected", [
    ("opt-125m", Ref("opt-125m", None)),
    ("opt-125m@prod", Ref("opt-125m", "prod")),
    ("Llama_3.1-8B@2024.06.1", Ref("Llama_3.1-8B", "2024.06.1")),
    ("  m@1  ", Ref("m", "1")),
])
def test_parse_ref_valid(ref: str, expected: Ref):
    assert parse_ref(ref) == expected


@pytest.mark.parametrize("ref, message", [
    ("", "empty model reference"),
    ("m@", "nothing after '@'"),
    ("m@1@2", "more than one '@'"),
    ("@1", "invalid model name ''"),
    ("../etc@1", "invalid model name"),
    ("m@../x", "invalid version or alias"),
    ("org/model@1", "invalid model name"),
    ("-m", "invalid model name"),
    ("m" * 129, "invalid model name"),
])
def test_parse_ref_malformed(ref: str, message: str):
    with pytest.raises(RefError, match=message):
        parse_ref(ref)


def test_parse_location():
    assert parse_location("/srv/reg").path == Path("/srv/reg")
    assert parse_location("file:///srv/reg").path == Path("/srv/reg")
    s3 = parse_location("s3://my-bucket/a/b/")
    assert (s3.scheme, s3.bucket, s3.prefix, str(s3)) == ("s3", "my-bucket", "a/b", "s3://my-bucket/a/b")
    assert parse_location("s3://my-bucket").prefix == ""
    for bad, message in [("gs://b/p", "unsupported registry URI scheme"), ("file://host/p", "names host"),
                         ("s3://AK:SK@bucket/p", "without credentials"), ("s3://b/p", "invalid bucket"),
                         ("s3://bucket/a//b", "empty, '.' or '..'"), ("", "empty registry URI")]:
        with pytest.raises(RefError, match=message):
            parse_location(bad)


def test_split_ref_uri():
    assert split_ref_uri("s3://bucket/prefix/opt@latest") == ("s3://bucket/prefix", "opt@latest")
    assert split_ref_uri("file:///srv/reg/opt") == ("file:///srv/reg", "opt")
    assert split_ref_uri("/srv/reg/opt@1") == ("/srv/reg", "opt@1")
    for bad in ("opt@1", "s3://opt@1", "s3://bucket/prefix/bad@@x"):
        with pytest.raises(RefError):
            split_ref_uri(bad)


def test_config_is_validated():
    RegistryConfig()
    for kwargs, message in [({"part_size_bytes": 1024}, "at least"), ({"concurrency": 0}, "1..256"),
                            ({"max_attempts": 0}, "first try"), ({"read_timeout_s": 0}, "positive"),
                            ({"commit_timeout_s": 10, "claim_ttl_s": 30}, "must exceed")]:
        with pytest.raises(RegistryError, match=message):
            RegistryConfig(**kwargs)


def test_offline_setting(monkeypatch: pytest.MonkeyPatch):
    from flashio.registry.offline import offline_setting

    monkeypatch.delenv("FLASHIO_OFFLINE", raising=False)
    assert offline_setting(None) is None  # automatic: fall back only when the registry is unreachable
    assert offline_setting(True) is True and offline_setting(False) is False
    for value, expected in [("1", True), ("true", True), (" YES ", True), ("on", True),
                            ("", None), ("0", None), ("false", None), ("off", None), ("auto", None)]:
        monkeypatch.setenv("FLASHIO_OFFLINE", value)
        assert offline_setting(None) is expected, value
        assert offline_setting(False) is False  # the argument wins over the environment
    monkeypatch.setenv("FLASHIO_OFFLINE", "sometimes")
    with pytest.raises(RegistryError, match=r"FLASHIO_OFFLINE='sometimes': expected 1"):
        offline_setting(None)
