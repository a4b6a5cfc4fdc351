"""OpenAI's wire format: request checks and response bodies, with no web framework in sight.

Field names, types, error bodies and finish reasons follow the OpenAI API, so an unchanged
OpenAI client works. What a stack adds goes in one extension field, ``fslm``: the same
trace ``edge-fslm run --json`` prints (every stage's text, tokens, seconds; the peak RSS).
Clients that do not know the field ignore it.

How a conversation becomes the stack's one input: a single user message (after any system
messages) is the input as it is. Otherwise every message becomes a line ``System: …``,
``User: …`` or ``Assistant: …`` in order, and that transcript is the input; the last message
must be the user's. The runtime never reads chat markup from input text, so a message
cannot forge a turn of the stack's own prompts.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..pipeline import FinalStageSettings, RunResult

# Documented request limits (README, SECURITY.md); --max-body changes the first.
MAX_BODY_BYTES = 1 << 20
MAX_MESSAGES = 256
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_TOKENS_LIMIT = 4096  # and never more than the context, which the runtime checks per prompt

_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


class WireError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class StackRequest:
    """What a chat or completion request asks of a stack, checked."""

    model: str
    prompt: str
    final: FinalStageSettings
    stream: bool
    include_usage: bool
    stream_stages: bool  # extension: stream every stage's text as ``fslm`` events (the page uses it)


def parse_json(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(400, f"request body is not valid UTF-8 (byte {exc.start}) — send JSON encoded as UTF-8",
                        code="invalid_json") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WireError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                        code="invalid_json") from None
    if not isinstance(body, dict):
        raise WireError(400, f"request body must be a JSON object, got {_kind(body)}", code="invalid_json")
    return body


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise WireError(400, f"'{param}' must be a string, got {_kind(value)}", param=param, code="invalid_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WireError(400, f"'{param}' holds a lone surrogate at character {exc.start} — send valid Unicode text",
                        param=param, code="invalid_value") from None
    return value


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or an array of text parts (OpenAI's content parts)."""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            p = f"{param}[{j}]"
            if not isinstance(part, dict) or part.get("type") != "text":
                got = part.get("type") if isinstance(part, dict) else _kind(part)
                raise WireError(400, f"'{p}' is a content part of type {got!r}; only text parts are supported",
                                param=p, code="invalid_value")
            texts.append(_text(part.get("text"), f"{p}.text"))
        return "\n".join(texts)
    return _text(value, param)


def _number(body: dict, name: str, lo: float, hi: float, *, integer: bool) -> Any:
    v = body.get(name)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
        want = "an integer" if integer else "a number"
        raise WireError(400, f"'{name}' must be {want}, got {_kind(v)}", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise WireError(400, f"'{name}' must be between {lo:g} and {hi:g}, got {v}", param=name, code="invalid_value")
    return v


def _stop(body: dict) -> tuple[str, ...] | None:
    v = body.get("stop")
    if v is None:
        return None
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise WireError(400, f"'stop' must be a string or an array of strings, got {_kind(v)}", param="stop",
                        code="invalid_type")
    if len(items) > MAX_STOP:
        raise WireError(400, f"'stop' has {len(items)} sequences; at most {MAX_STOP} are allowed", param="stop",
                        code="invalid_value")
    out = []
    for j, s in enumerate(items):
        s = _text(s, f"stop[{j}]")
        if not s or len(s) > MAX_STOP_CHARS:
            raise WireError(400, f"'stop[{j}]' must be 1 to {MAX_STOP_CHARS} characters", param=f"stop[{j}]",
                            code="invalid_value")
        out.append(s)
    return tuple(out)


def _common(body: dict) -> tuple[str, FinalStageSettings, bool, bool, bool]:
    model = body.get("model")
    if model is None:
        raise WireError(400, "'model' is required — GET /v1/models lists the stacks served", param="model",
                        code="missing_required_parameter")
    model = _text(model, "model")
    n = _number(body, "n", 1, 1, integer=True)
    del n  # only one choice: a stack's steps are one readable chain
    max_tokens = _number(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, MAX_TOKENS_LIMIT, integer=True)
    final = FinalStageSettings(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2, integer=False),
        seed=_number(body, "seed", -(2**63), 2**63 - 1, integer=True),
        stop=_stop(body),
    )
    if final.seed is not None:
        final = FinalStageSettings(final.max_tokens, final.temperature, final.seed & 0xFFFFFFFF, final.stop)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise WireError(400, f"'stream' must be a boolean, got {_kind(stream)}", param="stream", code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise WireError(400, f"'stream_options' must be an object, got {_kind(options)}", param="stream_options",
                        code="invalid_type")
    include_usage = bool(options.get("include_usage", False))
    stages = body.get("fslm_stream_stages", False)
    if not isinstance(stages, bool):
        raise WireError(400, f"'fslm_stream_stages' must be a boolean, got {_kind(stages)}",
                        param="fslm_stream_stages", code="invalid_type")
    return model, final, stream, include_usage, stages


def conversation_input(messages: Any) -> str:
    """The stack's input for a chat conversation (the rule is in this module's docstring)."""
    if not isinstance(messages, list) or not messages:
        raise WireError(400, "'messages' must be a non-empty array", param="messages",
                        code="missing_required_parameter" if messages is None else "invalid_type")
    if len(messages) > MAX_MESSAGES:
        raise WireError(400, f"'messages' has {len(messages)} entries; at most {MAX_MESSAGES} are allowed",
                        param="messages", code="invalid_value")
    turns: list[tuple[str, str]] = []
    for j, m in enumerate(messages):
        p = f"messages[{j}]"
        if not isinstance(m, dict):
            raise WireError(400, f"'{p}' must be an object, got {_kind(m)}", param=p, code="invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise WireError(400, f"'{p}.role' is {role!r}; use one of: {', '.join(_ROLES)} (tools are not supported)",
                            param=f"{p}.role", code="invalid_value")
        turns.append((role, _content(m.get("content"), f"{p}.content")))
    if turns[-1][0] != "user":
        raise WireError(400, "the last message must be the user's — a stack answers a request",
                        param=f"messages[{len(turns) - 1}].role", code="invalid_value")
    others = [t for t in turns[:-1] if t[0] not in ("system", "developer")]
    if not others and len(turns) == 1:
        return turns[-1][1]
    return "\n".join(f"{_ROLES[role]}: {text}" for role, text in turns)


def chat_request(body: dict) -> StackRequest:
    model, final, stream, include_usage, stages = _common(body)
    return StackRequest(model, conversation_input(body.get("messages")), final, stream, include_usage, stages)


def completion_request(body: dict) -> StackRequest:
    model, final, stream, include_usage, stages = _common(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise WireError(400, f"'prompt' has {len(prompt)} entries; send one prompt per request", param="prompt",
                            code="invalid_value")
        prompt = prompt[0]
    if prompt is None:
        raise WireError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")
    return StackRequest(model, _text(prompt, "prompt"), final, stream, include_usage, stages)


# -- responses ---------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(result: RunResult) -> str:
    return "length" if result.stages[-1].stop_reason == "length" else "stop"


def usage(result: RunResult) -> dict:
    """Every stage's tokens, not only the final one's: that is what the request cost."""
    p = sum(s.prompt_tokens for s in result.stages)
    c = sum(s.completion_tokens for s in result.stages)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def trace(result: RunResult) -> dict:
    return result.to_dict()


def chat_completion(result: RunResult, *, model: str, id: str, created: int) -> dict:
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                     "logprobs": None, "finish_reason": finish_reason(result)}],
        "usage": usage(result),
        "fslm": trace(result),
    }


def text_completion(result: RunResult, *, model: str, id: str, created: int) -> dict:
    return {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": result.answer, "logprobs": None, "finish_reason": finish_reason(result)}],
        "usage": usage(result),
        "fslm": trace(result),
    }


def chat_chunk(*, id: str, created: int, model: str, delta: dict | None = None, finish: str | None = None,
               choices: bool = True, **extra: Any) -> dict:
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                             "choices": [{"index": 0, "delta": delta or {}, "logprobs": None,
                                          "finish_reason": finish}] if choices else []}
    chunk.update(extra)
    return chunk


def text_chunk(*, id: str, created: int, model: str, text: str = "", finish: str | None = None,
               choices: bool = True, **extra: Any) -> dict:
    chunk: dict[str, Any] = {"id": id, "object": "text_completion", "created": created, "model": model,
                             "choices": [{"index": 0, "text": text, "logprobs": None,
                                          "finish_reason": finish}] if choices else []}
    chunk.update(extra)
    return chunk


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def models_list(names: list[str], descriptions: dict[str, str], created: int | None = None) -> dict:
    created = created or int(time.time())
    return {"object": "list", "data": [
        {"id": n, "object": "model", "created": created, "owned_by": "edge-fslm", "fslm": {"description": descriptions[n]}}
        for n in names]}
