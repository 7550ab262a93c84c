"""Keys, allowances, admin-only endpoints, and every refusal in OpenAI's error shape with the right status."""

from __future__ import annotations

import httpx
import openai
import pytest

from deltafleet.errors import ArtifactError
from deltafleet.serve.http.tenancy import Tenancy
from tests.serve_http.conftest import KEYS, MODEL, TENANCY


def post(live, path: str, body: dict, key: str | None = KEYS["acme"]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=30)


def assert_error(r: httpx.Response, status: int, param: str | None = None, words: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert words in err["message"], err
    return err


COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("key", [None, "sk-wrong-key-123456", KEYS["acme"] + "x", ""])
def test_missing_or_wrong_key_is_401(live, key):
    r = post(live, "/v1/completions", COMPLETION, key=key)
    assert_error(r, 401, None, "API key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert KEYS["acme"] not in r.text
    with pytest.raises(openai.AuthenticationError):
        live.client("sk-wrong-key-123456").models.list()


def test_other_tenants_adapter_is_404_exactly_like_a_missing_one(live):
    denied = post(live, "/v1/completions", {**COMPLETION, "model": "globex-lora"})
    missing = post(live, "/v1/completions", {**COMPLETION, "model": "globex-nope"})
    assert_error(denied, 404, "model")
    assert denied.json()["error"] == {**missing.json()["error"],
                                      "message": missing.json()["error"]["message"].replace("globex-nope",
                                                                                            "globex-lora")}
    with pytest.raises(openai.NotFoundError):
        live.client(KEYS["acme"]).chat.completions.create(model="globex-delta", messages=[{"role": "user",
                                                                                          "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        live.client(KEYS["acme"]).models.retrieve("globex-lora")


def test_admin_endpoints_need_an_admin_key(live):
    for key, status in ((None, 401), (KEYS["acme"], 403)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(f"{live.url}/v1/adapters", headers=headers).status_code == status
        assert httpx.get(f"{live.url}/metrics", headers=headers).status_code == status
        assert httpx.delete(f"{live.url}/v1/adapters/acme-lora", headers=headers).status_code == status
        assert post(live, "/v1/adapters", {"name": "x", "path": "acme-lora"}, key=key).status_code == status
    admin = {"Authorization": f"Bearer {KEYS['ops']}"}
    assert httpx.get(f"{live.url}/v1/adapters", headers=admin).status_code == 200
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}  # liveness needs no key


@pytest.mark.parametrize("patch,param,words", [
    ({"max_tokens": -3}, "max_tokens", "greater than or equal to 1"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": -0.1}, "temperature", "temperature"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"n": 2}, "n", "only n=1"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": [1, 49152]}, "prompt", "token ids"),
    ({"model": None}, "model", "valid string"),
])
def test_invalid_completion_parameters_are_400_naming_the_field(live, patch, param, words):
    assert_error(post(live, "/v1/completions", {**COMPLETION, **patch}), 400, param, words)


def test_invalid_chat_requests_are_400(live):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    assert_error(post(live, "/v1/chat/completions", {**chat, "messages": []}), 400, "messages")
    assert_error(post(live, "/v1/chat/completions", {**chat, "messages": "hello"}), 400, "messages")
    assert_error(post(live, "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}),
                 400, "messages", "role")
    assert_error(post(live, "/v1/chat/completions", {**chat, "max_completion_tokens": -1}), 400,
                 "max_completion_tokens")
    assert_error(post(live, "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), 400, "tools")
    r = httpx.post(f"{live.url}/v1/chat/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEYS['acme']}", "Content-Type": "application/json"})
    assert_error(r, 400, None, "not valid JSON")
    with pytest.raises(openai.BadRequestError) as e:
        live.client(KEYS["acme"]).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                          temperature=3)
    assert e.value.body["param"] == "temperature"


def test_prompt_longer_than_the_context_is_400(live):
    long_prompt = list(range(100, 100 + 510))  # max_model_len 512
    err = assert_error(post(live, "/v1/completions", {**COMPLETION, "prompt": long_prompt, "max_tokens": 8}),
                       400, "prompt", "exceeds the context length 512")
    assert err["code"] == "context_length_exceeded"
    text = "word " * 600
    err = assert_error(post(live, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                                                         "content": text}]}),
                       400, "messages", "context length 512")
    assert err["code"] == "context_length_exceeded"


def test_unknown_route_and_method_use_the_error_shape(live):
    assert_error(httpx.get(f"{live.url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{live.url}/v1/completions"), 405)


# ---------------------------------------------------------------------- the tenancy file
def test_tenancy_file_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("ACME_KEY", "sk-from-env-123")
    f = tmp_path / "tenants.toml"
    f.write_text('[[tenants]]\nname = "acme"\napi_key_env = "ACME_KEY"\nadapters = ["acme-*"]\n\n'
                 '[[tenants]]\nname = "ops"\napi_key = "sk-admin-123456"\nadapters = ["*"]\nadmin = true\n')
    t = Tenancy.from_file(f)
    acme = t.authenticate("Bearer sk-from-env-123")
    assert acme.name == "acme" and not acme.admin and acme.may_use("acme-x") and not acme.may_use("globex-x")
    assert t.authenticate("bearer sk-admin-123456").admin
    assert t.authenticate("Basic sk-admin-123456") is None and t.authenticate(None) is None
    assert Tenancy.from_dict(TENANCY).authenticate(f"Bearer {KEYS['globex']}").name == "globex"


@pytest.mark.parametrize("text,words", [
    ("tenants = 3", "needs at least one [[tenants]]"),
    ('[[tenants]]\nname = "a"\n', "exactly one of api_key and api_key_env"),
    ('[[tenants]]\nname = "a"\napi_key = "short"\n', "at least 8 characters"),
    ('[[tenants]]\nname = "a"\napi_key_env = "DELTAFLEET_NOT_SET_XYZ"\n', "'DELTAFLEET_NOT_SET_XYZ' is not set"),
    ('[[tenants]]\nname = "a"\napi_key = "sk-12345678"\nadapters = "a-*"\n', "tenants[0].adapters"),
    ('[[tenants]]\nname = "a"\napi_key = "sk-12345678"\nadmin = "yes"\n', "tenants[0].admin"),
    ('[[tenants]]\nname = "a"\napi_key = "sk-12345678"\nkey = 1\n', "unknown field 'key'"),
    ('[[tenants]]\nname = "a"\napi_key = "sk-12345678"\n[[tenants]]\nname = "b"\napi_key = "sk-12345678"\n',
     "same as an earlier tenant"),
    ('[[tenants]]\nname = "a"\napi_key = "sk-12345678"\n[[tenants]]\nname = "a"\napi_key = "sk-87654321"\n',
     "'a' is used twice"),
    ("[[tenants]\n", "not valid TOML"),
])
def test_bad_tenancy_files_name_the_field(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ArtifactError) as e:
        Tenancy.from_file(f)
    assert words in str(e.value) and str(f) in str(e.value)
    assert "sk-12345678" not in str(e.value)
