"""`flashio chat` on a terminal (a pty, as a user types) and with a pipe."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")

STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, first token \d+ ms, prompt (\d+) tokens of 512, (\w+)\]")


class Terminal:
    """A child process on a pty: write lines, read until a pattern shows up."""

    def __init__(self, argv: list[str]):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str | re.Pattern, timeout_s: float = 60) -> re.Match:
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while True:
            m = pattern.search(self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern.pattern!r} not seen in {timeout_s} s; the terminal shows {self.seen!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"{pattern.pattern!r} not seen before the end; it showed {self.seen!r}")
                self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(30)
        finally:
            os.close(self.master)


def test_chat_on_a_terminal_keeps_the_history_and_resets(demo_chat_artifact):
    term = Terminal([sys.executable, "-m", "flashio.cli", "chat", str(demo_chat_artifact), "--mode", "dense",
                     "--torch-threads", "1", "--max-new-tokens", "12", "--system", "Write Python."])
    try:
        term.expect("/reset forgets the conversation")
        term.expect(">>> ")
        term.send("def add(a, b):")
        first = term.expect(STATS)
        assert first.group(1) == "12" and first.group(3) == "length"
        term.expect(">>> ")
        term.send("def add(a, b):")  # the same message again: the prompt now holds the first turn too
        second = term.expect(STATS)
        assert int(second.group(2)) > int(first.group(2)) + 12
        term.expect(">>> ")
        term.send("/reset")
        term.expect(r"\(conversation reset\)")
        term.expect(">>> ")
        term.send("def add(a, b):")  # after /reset: the first turn's prompt, and its reply
        third = term.expect(STATS)
        assert third.group(2) == first.group(2)
        term.expect(">>> ")
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()


def test_chat_reads_a_piped_message(demo_chat_artifact):
    import flashio

    with flashio.open(demo_chat_artifact, mode="dense") as model:
        prompt = model.chat_template.render([{"role": "user", "content": "def add(a, b):"}])
        want = model.generate(model.codec.encode(prompt, add_special_tokens=False), max_new_tokens=10).text
    r = subprocess.run([sys.executable, "-m", "flashio.cli", "chat", str(demo_chat_artifact), "--mode", "dense",
                        "--max-new-tokens", "10"], input="def add(a, b):\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert STATS.search(r.stderr).group(1) == "10"


def test_chat_without_a_template_says_what_to_do(opt_artifact):
    r = subprocess.run([sys.executable, "-m", "flashio.cli", "chat", str(opt_artifact), "--mode", "dense"],
                       input="hi\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "has no chat template" in r.stderr and "--chat-template FILE" in r.stderr
