"""The project's own demo model and the text it learns from.

    from tasks.demo import DEMO_CHECKPOINT_DIR, stdlib_text_files
    train_files = stdlib_text_files("train")      # what the demo model was trained on
    heldout_files = stdlib_text_files("heldout")  # what it never saw; also calibration data

No model can be downloaded where this project is built, so it ships a small ReLU OPT checkpoint
(`opt-stdlib/`, trained by `python -m tasks.demo.train`) on the one text every machine with Python
has: the standard library's source. The split is decided by a hash of each file's path relative to
the standard library, so it does not depend on the order of a directory listing, on the Python
version or on which other files exist: a path that is held out is held out everywhere.

This module imports only the standard library (no torch) so that the pipeline can use the same
files as its default calibration data cheaply.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig

__all__ = [
    "DEMO_CHECKPOINT_DIR",
    "EXCLUDED_DIRS",
    "HELDOUT_PERCENT",
    "SPLITS",
    "is_heldout",
    "stdlib_root",
    "stdlib_text_files",
]

DEMO_CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "opt-stdlib"

SPLITS = ("train", "heldout")

# One path in twenty (about 30 files) is held out: enough held-out text (~0.5 MB) for a stable
# perplexity, little enough not to starve a 25-minute training run.
HELDOUT_PERCENT = 5

# Directory names skipped anywhere in the tree: the test suites (huge, generated, and full of
# deliberately odd code), IDLE and lib2to3 (IDE and converter code, partly Python 2 fixtures),
# installed third-party packages, and byte-code caches.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "__pycache__"}
)


def stdlib_root() -> pathlib.Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    """Whether a file, named by its POSIX path relative to the stdlib root, is held out.

    The first 8 bytes of the sha1 of the path, as an integer, modulo 100: below HELDOUT_PERCENT
    means held out.
    """
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def stdlib_text_files(split: str, *, root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's `*.py` files of one split, sorted by relative path.

    split: "train" or "heldout"; the two lists are disjoint and together hold every `*.py` file
    under `root` (default: `stdlib_root()`) outside EXCLUDED_DIRS.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    root = stdlib_root() if root is None else root
    if not root.is_dir():
        raise FileNotFoundError(
            f"standard library directory {root} does not exist: pass root= explicitly"
        )
    want_heldout = split == "heldout"
    files = []
    for directory, subdirectories, names in os.walk(root):
        # Pruning here (not filtering afterwards) keeps a large site-packages from being walked.
        subdirectories[:] = [d for d in subdirectories if d not in EXCLUDED_DIRS]
        for name in names:
            if name.endswith(".py"):
                relative = pathlib.Path(directory, name).relative_to(root).as_posix()
                if is_heldout(relative) == want_heldout:
                    files.append(relative)
    return [root / relative for relative in sorted(files)]
