"""OpenAI request and response shapes (the subset deltafleet serves), and the error JSON.

Requests are validated strictly (a string where a number belongs is an error, not coerced); every refusal
becomes `{"error": {"message", "type", "param", "code"}}` with the offending field in `param`. Options we do
not implement (n > 1, logprobs, echo, penalties, tools) are refused by name rather than silently ignored.
Unknown extra fields are ignored, as OpenAI-compatible servers do. Names (models, adapters) and adapter paths
with control characters (NUL, newlines, C1 codes) are refused: they end up in file-system calls and logs.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from deltafleet.serve.http.gateway import InvalidRequest

SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a signed 64-bit integer
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
NO_CONTROL_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"  # the same rule for the OpenAPI schema
ADAPTER_NAME_PATTERN = "^[^./\\u0000-\\u001f\\u007f-\\u009f][^/\\u0000-\\u001f\\u007f-\\u009f]*$"  # the gateway's rule
_SHOWN_INPUT = 80  # characters of an offending value an error message repeats


def _no_control_characters(value: str) -> str:
    if m := CONTROL_CHARACTERS.search(value):
        raise ValueError(f"must not contain control characters (found {m.group()!r} at index {m.start()})")
    return value


def check_name(value: str, param: str) -> str:
    """`value` unless it holds a control character; else InvalidRequest naming `param` and the character."""
    try:
        return _no_control_characters(value)
    except ValueError as e:
        raise InvalidRequest(f"{param}: {e}", param) from None


Name = Annotated[str, AfterValidator(_no_control_characters),
                 WithJsonSchema({"type": "string", "pattern": NO_CONTROL_PATTERN})]
"""A model or adapter name, or an adapter path: any string without control characters."""


def _rule(**schema) -> dict:
    """JSON-schema keywords that document, in the OpenAPI schema, a rule the handlers check with their own error
    messages (the keywords apply by type, so they can sit beside a union's anyOf)."""
    return {"json_schema_extra": schema}


NOT_TRUE = _rule(**{"not": {"const": True}})  # a flag we do not implement: absent, null or false
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
PROMPT_SCHEMA = {"anyOf": [  # one non-empty prompt: text, token ids, or a batch of exactly one of them
    {"type": "string", "minLength": 1}, _TOKEN_IDS,
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1}]}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: Name
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's extension; -1 and 0 mean off
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: str | list[str] | None = Field(None, **_rule(minLength=1, maxItems=4, items={"minLength": 1}))
    n: int | None = Field(None, **_rule(minimum=1, maximum=1))
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, **_rule(minimum=0, maximum=0))
    frequency_penalty: float | None = Field(None, **_rule(minimum=0, maximum=0))
    logit_bias: dict | None = Field(None, **_rule(maxProperties=0))
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise InvalidRequest(f"stop: at most 4 stop strings, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise InvalidRequest("stop: stop strings must be non-empty", "stop")
        return tuple(stops)

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequest(f"n={self.n}: only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise InvalidRequest(f"{name}={getattr(self, name)}: penalties are not supported (use 0)", name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias: not supported", "logit_bias")


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[int] | list[str] | list[list[int]], WithJsonSchema(PROMPT_SCHEMA)]
    echo: bool | None = Field(None, **NOT_TRUE)
    logprobs: int | None = Field(None, **_rule(**{"not": {"type": "integer"}}))
    best_of: int | None = Field(None, **_rule(minimum=1, maximum=1))
    suffix: str | None = Field(None, **_rule(maxLength=0))

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and not isinstance(p[0], int):
            if len(p) != 1:
                raise InvalidRequest(f"prompt: one prompt per request, got a batch of {len(p)}", "prompt")
            p = p[0]
        if not p:
            raise InvalidRequest("prompt: must not be empty", "prompt")
        return p

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise InvalidRequest("echo: not supported", "echo")
        if self.logprobs is not None:
            raise InvalidRequest("logprobs: not supported", "logprobs")
        if self.best_of not in (None, 1):
            raise InvalidRequest(f"best_of={self.best_of}: only 1 is supported", "best_of")
        if self.suffix:
            raise InvalidRequest("suffix: not supported", "suffix")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = Field(None, **NOT_TRUE)
    tools: list | None = Field(None, **_rule(maxItems=0))
    response_format: dict | None = Field(None, **_rule(properties={"type": {"enum": ["text", None]}}))

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs:
            raise InvalidRequest("logprobs: not supported", "logprobs")
        if self.tools:
            raise InvalidRequest("tools: tool calling is not supported", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise InvalidRequest(f"response_format: only type 'text' is supported, got "
                                 f"{self.response_format.get('type')!r}", "response_format")


class LoadAdapterRequest(_Model):
    name: Annotated[Name, Field(json_schema_extra={"pattern": ADAPTER_NAME_PATTERN})]
    path: Name | None = None  # relative to the adapters root; defaults to the name


class ReplaceAdapterRequest(_Model):
    path: Name | None = None  # relative to the adapters root; defaults to the adapter's name


def parse(model: type[_Model], body: bytes) -> _Model:
    """Validate a JSON body; the first problem becomes InvalidRequest naming the field, rule and value."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise InvalidRequest(f"request body is not valid JSON: {err['msg']}") from None
        loc = [str(x) for x in err["loc"]]
        field = ".".join(loc) or "body"
        got = "" if err["type"] == "missing" else f" (got {_shown(err['input'])})"
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]  # our validators' words
        raise InvalidRequest(f"{field}: {msg}{got}", loc[0] if loc else None) from None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_INPUT else f"{text[:_SHOWN_INPUT]}... ({len(text)} characters)"


# ---------------------------------------------------------------------- responses
def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, created: int, text: str, finish: str | None, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_completion(rid: str, model: str, created: int, text: str, finish: str | None, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, owned_by: str, parent: str | None = None) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": owned_by, "parent": parent}
