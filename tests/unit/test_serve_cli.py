"""`flashio serve` as a user runs it: a real subprocess on the packed demo model, driven with the
real openai client (and httpx where the client hides what is tested: a cut-off stream, bad JSON)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

PROMPT = "def read_lines(path):"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(demo_chat_artifact, tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "FLASHIO_API_KEY": ""}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    out = open(log, "wb")  # noqa: SIM115 - the server writes here for the module's life
    proc = subprocess.Popen([sys.executable, "-m", "flashio.cli", "-v", "serve", str(demo_chat_artifact),
                             "--mode", "dense", "--port", str(port), "--torch-threads", "1", "--api-key", "test-key"],
                            stdout=out, stderr=subprocess.STDOUT, env=env)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"flashio serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    yield base, proc
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    out.close()


@pytest.fixture(scope="module")
def greedy(demo_chat_artifact):
    """FlashModel.generate's greedy text on the same artifact (the reference)."""
    import flashio

    with flashio.open(demo_chat_artifact, mode="dense") as model:
        return model.generate(PROMPT, max_new_tokens=16, temperature=0.0).text


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="test-key", max_retries=0, timeout=60)


def _healthy(base: str) -> dict:
    r = httpx.get(f"{base}/health", timeout=5)
    assert r.status_code == 200
    return r.json()


def test_models_and_the_api_key(server):
    base, _ = server
    assert [m.id for m in _client(base).models.list()] == ["opt-stdlib-chat"]
    with pytest.raises(openai.AuthenticationError) as exc:
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    assert "API key is not valid" in str(exc.value)


def test_completion_whole_and_streamed_equal_generate(server, greedy):
    base, _ = server
    client = _client(base)
    r = client.completions.create(model="opt-stdlib-chat", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == greedy and greedy
    assert r.usage.completion_tokens == 16 and r.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="opt-stdlib-chat", prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
    assert chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streams_through_the_template(server, demo_chat_artifact):
    base, _ = server
    import flashio

    messages = [{"role": "system", "content": "Write Python."}, {"role": "user", "content": "def main():"}]
    with flashio.open(demo_chat_artifact, mode="dense") as model:
        ids = model.codec.encode(model.chat_template.render(messages), add_special_tokens=False)
        want = model.generate(ids, max_new_tokens=12, temperature=0.0).text
    client = _client(base)
    stream = client.chat.completions.create(model="opt-stdlib-chat", messages=messages, max_tokens=12,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    whole = client.chat.completions.create(model="opt-stdlib-chat", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == want and whole.usage.prompt_tokens == len(ids)


def test_eight_concurrent_clients(server, greedy):
    base, _ = server

    def one(i: int) -> str:
        stream = _client(base).completions.create(model="opt-stdlib-chat", prompt=PROMPT, max_tokens=16,
                                                  temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert texts == [greedy] * 8
    assert _healthy(base)["admitted"] == 0


def test_a_client_cut_off_mid_stream_frees_its_slot(server, greedy):
    base, proc = server
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer test-key"}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
    # the connection is closed with ~400 tokens to go: the worker drops the job at its next token
    deadline = time.monotonic() + 20
    while _healthy(base)["admitted"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _healthy(base)["admitted"] == 0
    assert "request cancelled by its client; generation stopped" in proc.log.read_text()
    r = _client(base).completions.create(model="opt-stdlib-chat", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == greedy and proc.poll() is None


def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(server, greedy):
    base, proc = server
    headers = {"Authorization": "Bearer test-key", "Content-Type": "application/json"}
    r = httpx.post(f"{base}/v1/completions", content=b'{"prompt": "x", ', headers=headers, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        _client(base).completions.create(model="opt-stdlib-chat", prompt="x = 1\n" * 400, max_tokens=8)
    err = exc.value.body
    assert err["code"] == "context_length_exceeded" and "512 tokens" in err["message"]
    with pytest.raises(openai.NotFoundError):
        _client(base).completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert _healthy(base)["status"] == "ok" and proc.poll() is None
    r = _client(base).completions.create(model="opt-stdlib-chat", prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == greedy


def test_a_missing_serve_extra_is_one_clear_line(demo_chat_artifact):
    # a `starlette` that cannot be imported stands for an install without the serve extra
    code = ("import sys; sys.modules['starlette'] = None; from flashio.cli import main; "
            f"sys.exit(main(['serve', {str(demo_chat_artifact)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("flashio serve: error: `flashio serve` needs the 'serve' extra (module 'starlette' "
                                "is not installed): pip install 'flashio[serve]'")
