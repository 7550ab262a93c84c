"""OpenAI request and response shapes (the subset deltafleet serves), and the error JSON.

Requests are validated strictly (a string where a number belongs is an error, not coerced); every refusal
becomes `{"error": {"message", "type", "param", "code"}}` with the offending field in `param`. Options we do
not implement (n > 1, logprobs, echo, penalties, tools) are refused by name rather than silently ignored.
Unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltafleet.serve.http.gateway import InvalidRequest


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's extension; -1 and 0 mean off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
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
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

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
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None

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
    name: str
    path: str | None = None  # relative to the adapters root; defaults to the name


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
        got = "" if err["type"] == "missing" else f" (got {err['input']!r})"
        raise InvalidRequest(f"{field}: {err['msg']}{got}", loc[0] if loc else None) from None


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
