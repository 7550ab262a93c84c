"""The service layer without FastAPI or an engine: SSE framing, the error table, auth, submit and collect."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest

from deltafleet.serve.http import gateway as G
from deltafleet.serve.http import protocol as P
from deltafleet.serve.http.gateway import Event, Generation
from deltafleet.serve.http.metrics import Metrics
from deltafleet.serve.http.service import (
    ERRORS,
    ApiError,
    Service,
    Submitted,
    api_error,
    chat_sse,
    completion_sse,
)
from deltafleet.serve.http.tenancy import Tenancy

BASE = "base-model"
KEY, ADMIN_KEY = "sk-tenant-0001", "sk-admin-0002"
TENANCY = Tenancy.from_dict({"tenants": [
    {"name": "t", "api_key": KEY, "adapters": ["t-*"]},
    {"name": "ops", "api_key": ADMIN_KEY, "adapters": ["*"], "admin": True},
]})


class FakeStream:
    """Plays back fixed events; `hang` keeps it waiting after them, as a request still generating."""

    def __init__(self, events: list[Event], hang: bool = False):
        self.events, self.hang, self.aborted = events, hang, False

    async def __aiter__(self):
        for ev in self.events:
            await asyncio.sleep(0)
            yield ev
        if self.hang:
            await asyncio.Event().wait()

    replica = ""

    async def start(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    @property
    def finished(self) -> bool:
        return not self.hang


class FakeGateway:
    model_name = BASE
    max_model_len = 64

    def __init__(self, stream: FakeStream | None = None, submit_error: G.GatewayError | None = None):
        self.stream, self.submit_error, self.submitted = stream, submit_error, []

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        return [ord(c) for m in messages for c in m["content"]]

    def submit(self, generation: Generation) -> FakeStream:
        if self.submit_error is not None:
            raise self.submit_error
        self.submitted.append(generation)
        return self.stream

    def adapter_names(self) -> list[str]:
        return ["t-one", "other-one"]


ANSWER = [Event("Hel", None, 3, 1), Event("", None, 3, 2), Event("lo", "length", 3, 3)]


def frames(gen) -> list[str]:
    async def run():
        return [f async for f in gen]

    return asyncio.run(run())


def sub(stream: FakeStream, chat: bool = False) -> Submitted:
    return Submitted("id-1", "m", 7, chat, stream, aiter(stream))


def data(frame: str):
    assert frame.startswith("data: ") and frame.endswith("\n\n"), frame
    body = frame[len("data: "):-2]
    return body if body == "[DONE]" else json.loads(body)


# ---------------------------------------------------------------------- SSE framing
def test_completion_sse_frames_text_finish_usage_and_done():
    stream = FakeStream(ANSWER)
    out = frames(completion_sse(sub(stream), include_usage=True))
    assert out[0] == ('data: {"id":"id-1","object":"text_completion","created":7,"model":"m","choices":'
                      '[{"index":0,"text":"Hel","logprobs":null,"finish_reason":null}]}\n\n')
    got = [data(f) for f in out]
    assert [c["choices"][0]["text"] for c in got[:2]] == ["Hel", "lo"]  # the empty middle event sends nothing
    assert got[1]["choices"][0]["finish_reason"] == "length"
    assert got[2] == P.usage_chunk("id-1", "m", 7, "text_completion", 3, 3) and got[2]["choices"] == []
    assert got[3] == "[DONE]" and len(got) == 4
    assert stream.aborted  # the finally clause always aborts (a no-op for a finished request)


def test_chat_sse_frames_role_deltas_finish_and_done_without_usage():
    got = [data(f) for f in frames(chat_sse(sub(FakeStream(ANSWER), chat=True), include_usage=False))]
    assert [c["choices"][0]["delta"] for c in got[:-1]] == [{"role": "assistant", "content": ""},
                                                           {"content": "Hel"}, {"content": "lo"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in got[:-1]] == [None, None, None, "length"]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "id-1" for c in got[:-1])
    assert got[-1] == "[DONE]"


@pytest.mark.parametrize("sse", [completion_sse, chat_sse])
@pytest.mark.parametrize("last,status_code,words", [
    (Event("", "abort", 3, 1), "aborted", "server shut down"),
    (Event("", "error", 3, 0, "/srv/adapters/x/adapter_model.safetensors: truncated"), "engine_error",
     "request id -"),  # the engine's reason is logged, never sent
])
def test_a_failed_request_ends_with_an_error_event_then_done(sse, last, status_code, words):
    stream = FakeStream([Event("a", None, 3, 1), last])
    got = [data(f) for f in frames(sse(sub(stream), include_usage=False))]
    assert got[-1] == "[DONE]" and "error" not in got[-3]
    err = got[-2]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status_code and words in err["message"] and "/srv" not in err["message"]


def test_closing_the_event_stream_aborts_the_request():
    stream = FakeStream(ANSWER[:1], hang=True)

    async def first_then_close():
        gen = completion_sse(sub(stream), include_usage=False)
        first = await anext(gen)
        await gen.aclose()
        return first

    assert "Hel" in asyncio.run(first_then_close()) and stream.aborted


# ---------------------------------------------------------------------- the error table
GATEWAY_ERRORS = [c for _, c in inspect.getmembers(G, inspect.isclass) if issubclass(c, G.GatewayError)]


def test_every_gateway_error_has_its_own_row():
    assert set(GATEWAY_ERRORS) == set(ERRORS)


@pytest.mark.parametrize("cls,status,type_,code,param,retry", [
    (G.InvalidRequest, 400, "invalid_request_error", "invalid_value", "p", None),
    (G.PromptTooLong, 400, "invalid_request_error", "context_length_exceeded", "p", None),
    (G.UnknownModel, 404, "not_found_error", "not_found", "p", None),
    (G.AdapterConflict, 409, "conflict_error", "conflict", "p", None),
    (G.QueueFull, 429, "rate_limit_error", "queue_full", None, "1"),
    (G.ShuttingDown, 503, "service_unavailable", "shutting_down", None, "1"),
    (G.GatewayError, 500, "server_error", None, None, None),
])
def test_gateway_errors_become_openai_errors(cls, status, type_, code, param, retry):
    e = api_error(cls("it broke", "p"))
    assert (e.status, e.type, e.code, e.param) == (status, type_, code, param)
    assert (e.headers or {}).get("Retry-After") == retry
    assert e.message == ("it broke; retry later" if cls is G.QueueFull else "it broke")
    assert e.body() == {"error": {"message": e.message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------- auth and models
def test_auth_admin_and_adapter_visibility():
    svc = Service(FakeGateway(), TENANCY, Metrics())
    with pytest.raises(ApiError) as e:
        svc.principal("Bearer sk-wrong-000000")
    assert e.value.status == 401 and e.value.headers == {"WWW-Authenticate": "Bearer"}
    p = svc.principal(f"Bearer {KEY}")
    with pytest.raises(ApiError) as e:
        svc.admin(f"Bearer {KEY}")
    assert (e.value.status, e.value.code) == (403, "admin_only")
    assert svc.admin(f"Bearer {ADMIN_KEY}").admin
    assert svc.adapter_for(p, BASE) is None and svc.adapter_for(p, "t-one") == "t-one"
    with pytest.raises(ApiError) as denied:
        svc.adapter_for(p, "other-one")
    with pytest.raises(ApiError) as missing:
        svc.adapter_for(p, "other-two")
    assert denied.value.body() == ApiError(404, missing.value.message.replace("other-two", "other-one"),
                                           "not_found_error", "model", "model_not_found").body()
    assert [m["id"] for m in svc.models(p)["data"]] == [BASE, "t-one"]


# ---------------------------------------------------------------------- submit and collect
def never() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


def test_completion_submits_collects_and_times_tokens():
    gw, metrics = FakeGateway(FakeStream(ANSWER)), Metrics()
    svc = Service(gw, TENANCY, metrics)
    req = P.parse(P.CompletionRequest, b'{"model": "t-one", "prompt": "hi", "top_k": -1, "stop": "x"}')

    async def run():
        return await svc.collect(await svc.completion(svc.principal(f"Bearer {KEY}"), req, 0.0), never())

    body = asyncio.run(run())
    assert gw.submitted == [Generation([104, 105], 16, "t-one", 1.0, 1.0, 0, None, ("x",), False)]
    assert body["id"].startswith("cmpl-") and body["model"] == "t-one"
    assert body["choices"][0]["text"] == "Hello" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    text = metrics.render({})
    assert "deltafleet_time_to_first_token_seconds_count 1.0" in text  # the first token, then two gaps
    assert "deltafleet_inter_token_latency_seconds_count 2.0" in text
    assert 'deltafleet_model_requests_total{model="t-one"} 1.0' in text
    assert 'deltafleet_model_generated_tokens_total{model="t-one"} 3.0' in text


def test_prompt_too_long_names_the_field_the_client_sent():
    gw = FakeGateway(submit_error=G.PromptTooLong("too long", "prompt"))
    svc = Service(gw, TENANCY, Metrics())
    req = P.parse(P.ChatCompletionRequest, b'{"model": "base-model", "messages": [{"role": "user", "content": "x"}],'
                                           b' "max_tokens": 2}')
    with pytest.raises(G.PromptTooLong) as e:
        asyncio.run(svc.chat_completion(svc.principal(f"Bearer {KEY}"), req, 0.0))
    assert e.value.param == "messages"
    gw.submit_error = G.UnknownModel("gone", "model")  # removed between the check and the submission
    with pytest.raises(ApiError) as e:
        asyncio.run(svc.chat_completion(svc.principal(f"Bearer {KEY}"), req, 0.0))
    assert e.value.code == "model_not_found"


def test_collect_aborts_when_the_client_leaves_and_reports_failures():
    svc = Service(FakeGateway(), TENANCY, Metrics())
    hanging = FakeStream(ANSWER[:1], hang=True)

    async def leave():
        await svc.collect(sub(hanging), asyncio.sleep(0.01))

    with pytest.raises(ApiError) as e:
        asyncio.run(leave())
    assert e.value.status == 499 and hanging.aborted

    async def fail():
        await svc.collect(sub(FakeStream([Event("", "error", 3, 0, "boom")])), never())

    with pytest.raises(ApiError) as e:
        asyncio.run(fail())
    assert (e.value.status, e.value.code) == (500, "engine_error") and "boom" not in e.value.message
    assert e.value.message.startswith("the request could not run (request id -)")
