"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on 127.0.0.1.

The session is a stand-in for FlashModel: the demo tokenizer, a ChatML template, and a "model" whose
logits spell a fixed reply, run through the real decoding loop (flashio.generation.stream_tokens)
with a small delay per token. It records how many generations ran at once and how far each got.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from flashio.chat_template import ChatTemplate
from flashio.generation import GenerationConfig, stream_tokens

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from flashio.server import create_app  # noqa: E402  (after the extra's importorskip)

DEMO = Path(__file__).resolve().parents[2] / "tasks" / "demo" / "opt-stdlib"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REPLY = "Hello from flash! Déjà vu 😀 and then some more words. STOP here, then more text follows. "
CONTEXT = 160


class _Encoder:
    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


class FakeSession:
    model_id = "demo-fake"
    context_tokens = CONTEXT

    def __init__(self, token_delay_s: float = 0.002):
        self.tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
        self.tokenizer = _Encoder(self.tok)
        self.chat_template = ChatTemplate(CHATML, {"eos_token": "</s>"})
        self.defaults = GenerationConfig(max_new_tokens=24, eos_token_ids={2})
        self.script = self.tok.encode(REPLY * 4, add_special_tokens=False).ids
        self.delay_s = token_delay_s
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.runs: list[int] = []  # tokens produced per generation, in order

    def stream(self, prompt_ids, config):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.runs.append(0)
            run = len(self.runs) - 1
        pos = 0

        def next_logits(new_ids):
            nonlocal pos
            time.sleep(self.delay_s)
            logits = torch.zeros(self.tok.get_vocab_size())
            logits[self.script[pos % len(self.script)]] = 30.0
            pos += 1
            return logits

        try:
            for t in stream_tokens(next_logits, prompt_ids, config, tokenizer=self.tok,
                                   max_total_tokens=self.context_tokens):
                self.runs[run] += 1
                yield t
        finally:
            with self.lock:
                self.active -= 1

    def reply(self, n_tokens: int) -> str:
        return self.tok.decode(self.script[:n_tokens]).rstrip("\ufffd")  # an unfinished character is not emitted


class Server:
    def __init__(self, session: FakeSession, **app_kw):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.app = create_app(session, **app_kw)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def served():
    servers = []

    def start(session=None, **kw):
        s = Server(session or FakeSession(), **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def _wait_idle(server: Server, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while server.app.state.worker.admitted:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.005)


def test_chat_and_completions_streaming_and_not(served):
    session = FakeSession()
    server = served(session)
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["demo-fake"]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]
    r = client.chat.completions.create(model="demo-fake", messages=messages, max_tokens=12)
    assert r.choices[0].message.content == session.reply(12) and r.choices[0].finish_reason == "length"
    prompt = session.tokenizer.encode(session.chat_template.render(messages), add_special_tokens=False)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), 12, len(prompt) + 12)

    chunks = list(client.chat.completions.create(model="demo-fake", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == session.reply(12) and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(prompt)

    r = client.completions.create(model="demo-fake", prompt="def main():", max_tokens=40, stop=["STOP"])
    assert r.choices[0].text == REPLY.split("STOP")[0] and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(session.tokenizer.encode("def main():"))
    streamed = list(client.completions.create(model="demo-fake", prompt="def main():", max_tokens=40,
                                              stop=["STOP"], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    # defaults: max_tokens from the session's generation config, clipped to the context
    r = client.completions.create(model="demo-fake", prompt="x")
    assert r.usage.completion_tokens == 24


def test_eight_concurrent_clients_take_turns_on_one_session(served):
    session = FakeSession()
    server = served(session, max_waiting=8)

    def ask(i: int) -> str:
        client = server.client()
        if i % 2:
            stream = client.chat.completions.create(model="demo-fake", max_tokens=10 + i, stream=True,
                                                    messages=[{"role": "user", "content": f"q{i}"}])
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        r = client.completions.create(model="demo-fake", prompt=f"q{i}", max_tokens=10 + i)
        return r.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert answers == [session.reply(10 + i) for i in range(8)]
    assert session.max_active == 1 and sorted(session.runs) == [10 + i for i in range(8)]


def test_a_client_cut_off_mid_stream_frees_its_slot(served):
    session = FakeSession(token_delay_s=0.01)
    server = served(session, max_waiting=0)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "demo-fake", "stream": True, "max_tokens": 120,
                "messages": [{"role": "user", "content": "long answer please"}]}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [line for line, _ in zip(lines, range(6))]
            assert any(line.startswith("data: {") for line in got)
        # the connection is closed: the worker stops at its next token and the slot is free again
        _wait_idle(server)
    assert session.runs[0] < 60
    r = server.client().completions.create(model="demo-fake", prompt="next", max_tokens=5)
    assert r.choices[0].text == session.reply(5)


def test_malformed_requests_get_clear_4xx_and_the_server_stays_healthy(served):
    session = FakeSession()
    server = served(session)
    client = server.client()
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.post("/v1/chat/completions", content=b'{"model": "demo-fake", "messages": [',
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert "not valid JSON" in err["message"] and err["type"] == "invalid_request_error"
        assert set(err) == {"message", "type", "param", "code"}
        assert http.post("/v1/completions", json=["a list"]).status_code == 400
        assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
        assert http.get("/health").json()["status"] == "ok"

    long_prompt = "word " * CONTEXT
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo-fake", messages=[{"role": "user", "content": long_prompt}])
    assert e.value.code == "context_length_exceeded" and f"context is {CONTEXT} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.completions.create(model="demo-fake", prompt="word " * 100, max_tokens=100)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo-fake", prompt="x", temperature=-1)
    assert e.value.param == "temperature" and "temperature=-1" in e.value.message
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        client.completions.create(model="demo-fake", prompt="x", n=2)
    with pytest.raises(openai.NotFoundError, match="serves 'demo-fake'"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.completions.create(model="demo-fake", prompt="x", stop=["a", "b", "c", "d", "e"])

    r = client.chat.completions.create(model="demo-fake", messages=[{"role": "user", "content": "ok?"}], max_tokens=4)
    assert r.choices[0].message.content == session.reply(4)
    assert session.runs == [4]  # the refused requests never reached the model


def test_past_the_queue_bound_requests_get_429_with_retry_after(served):
    session = FakeSession(token_delay_s=0.05)  # 5 s per request: both slots stay taken during the test
    server = served(session, max_waiting=1)
    body = {"model": "demo-fake", "prompt": "slow", "max_tokens": 100, "stream": True}
    with httpx.Client(base_url=server.url, timeout=10) as a, httpx.Client(base_url=server.url, timeout=10) as b, \
            a.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(lines).startswith("data: {")
        with b.stream("POST", "/v1/completions", json=body) as waiting:
            assert waiting.status_code == 200  # admitted: it waits its turn
            assert server.app.state.worker.admitted == 2
            with pytest.raises(openai.RateLimitError) as e:
                server.client().completions.create(model="demo-fake", prompt="third", max_tokens=3)
            assert e.value.response.headers["Retry-After"] == "1"
            assert "busy" in e.value.message and e.value.code == "queue_full"
            assert server.app.state.worker.admitted == 2
    _wait_idle(server)  # both clients left: their slots are freed at the next token
    assert server.client().completions.create(model="demo-fake", prompt="x", max_tokens=2).choices[0].text


def test_api_key(served):
    server = served(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        server.client(api_key="wrong").models.list()
    assert server.client(api_key="s3cret").models.list().data[0].id == "demo-fake"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
