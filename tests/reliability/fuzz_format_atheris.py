"""libFuzzer harness (atheris) for flashio's untrusted-input parsers.

    python tests/reliability/fuzz_format_atheris.py -runs=100000 CORPUS_DIR

The first byte picks the parser; the rest is its input. Only flashio.errors exceptions may
escape the parsers: anything else is reported by libFuzzer as a crash.
"""

import io
import sys

import atheris
import numpy  # noqa: F401 - heavy third-party modules are imported uninstrumented first
import safetensors  # noqa: F401
import torch  # noqa: F401

with atheris.instrument_imports(include=["flashio"]):
    from flashio.errors import FlashError
    from flashio.format.ffnfile import read_safetensors_header
    from flashio.format.manifest import parse_manifest


def test_one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    try:
        if data[0] % 2:
            parse_manifest(body)
        else:
            read_safetensors_header(io.BytesIO(body), len(body), "fuzz")
    except FlashError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
