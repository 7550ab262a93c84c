"""The official openai client against the live server: answers equal solo greedy generation, streams are OpenAI's."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.serve_http.conftest import KEYS, MODEL

PROMPTS = ["The quick brown fox", "Once upon a time", "def add(a, b):", "Paris is the capital of"]


def chat_ids(live, text: str) -> list[int]:
    return live.gateway.chat_prompt([{"role": "user", "content": text}])


def test_completion_equals_solo_greedy(live, solo):
    client = live.client(KEYS["acme"])
    for model, adapter in ((MODEL, None), ("acme-lora", "acme-lora")):
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=7, temperature=0)
        want, n = solo(live.gateway.encode(PROMPTS[0]), 7, adapter)
        assert r.object == "text_completion" and r.model == model and r.id.startswith("cmpl-")
        assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(live.gateway.encode(PROMPTS[0])), n)
        assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_adapters_change_the_answer(live, solo):
    answers = {a: solo(live.gateway.encode(PROMPTS[1]), 6, a)[0] for a in (None, "acme-lora", "acme-road")}
    assert len(set(answers.values())) == 3


def test_chat_uses_the_chat_template(live, solo):
    client = live.client(KEYS["globex"])
    r = client.chat.completions.create(model="globex-lora", messages=[{"role": "user", "content": "Hi there"}],
                                       max_tokens=6, temperature=0)
    want, n = solo(chat_ids(live, "Hi there"), 6, "globex-lora")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(chat_ids(live, "Hi there")) > 10  # the template's turn markers
    assert r.usage.completion_tokens == n


def test_chat_accepts_content_parts_and_system_messages(live, solo):
    client = live.client(KEYS["acme"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Yo"}]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=4, temperature=0)
    ids = live.gateway.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yo"}])
    assert r.choices[0].message.content == solo(ids, 4, None)[0]


def test_streaming_chat_chunks_and_usage(live, solo):
    client = live.client(KEYS["acme"])
    chunks = list(client.chat.completions.create(
        model="acme-road", messages=[{"role": "user", "content": "Stream me"}], max_tokens=9, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    want, n = solo(chat_ids(live, "Stream me"), 9, "acme-road")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(chat_ids(live, "Stream me"))


def test_streaming_completion_raw_sse_ends_with_done(live, solo):
    body = {"model": "acme-lora", "prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events)  # no include_usage
    assert "".join(e["choices"][0]["text"] for e in events) == solo(live.gateway.encode(PROMPTS[2]), 5, "acme-lora")[0]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_streaming_completion_with_usage_through_the_client(live):
    client = live.client(KEYS["globex"])
    chunks = list(client.completions.create(model="globex-delta", prompt="abc", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.completion_tokens == 4 and usage.total_tokens == 4 + usage.prompt_tokens


def test_concurrent_adapters_and_base_each_equal_solo(live, solo):
    """Twelve requests over four adapters and the base, two tenants, streaming and not, all at once."""
    jobs = []
    for i in range(12):
        adapter = [None, "acme-lora", "acme-road", "globex-lora", "globex-delta"][i % 5]
        key = KEYS["globex"] if adapter and adapter.startswith("globex") else KEYS["acme"]
        jobs.append((key, adapter, PROMPTS[i % len(PROMPTS)], 4 + i % 5, i % 2 == 1, i % 3 == 0))

    async def one(key, adapter, prompt, max_tokens, stream, chat):
        client = live.async_client(key)
        model = adapter or MODEL
        if chat:
            kw = dict(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
            if stream:
                return "".join([c.choices[0].delta.content or "" async for c in
                                await client.chat.completions.create(stream=True, **kw) if c.choices])
            return (await client.chat.completions.create(**kw)).choices[0].message.content
        kw = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        if stream:
            return "".join([c.choices[0].text async for c in await client.completions.create(stream=True, **kw)])
        return (await client.completions.create(**kw)).choices[0].text

    async def main():
        return await asyncio.gather(*(one(*j) for j in jobs))

    got = asyncio.run(main())
    for (_, adapter, prompt, max_tokens, _, chat), text in zip(jobs, got, strict=True):
        ids = chat_ids(live, prompt) if chat else live.gateway.encode(prompt)
        assert text == solo(ids, max_tokens, adapter)[0], (adapter, prompt, chat)


def test_models_lists_the_base_and_only_the_callers_adapters(live):
    ids = {k: {m.id for m in live.client(KEYS[k]).models.list().data} for k in KEYS}
    assert ids["acme"] == {MODEL, "acme-lora", "acme-road"}
    assert ids["globex"] == {MODEL, "globex-lora", "globex-delta"}
    assert {MODEL, "acme-lora", "acme-road", "globex-lora", "globex-delta"} <= ids["ops"]
    card = live.client(KEYS["acme"]).models.retrieve("acme-lora")
    assert card.id == "acme-lora" and card.owned_by == "deltafleet"


def test_token_id_prompt_and_stop_string(live, solo):
    client = live.client(KEYS["acme"])
    ids = live.gateway.encode(PROMPTS[3])
    full, _ = solo(ids, 8, None)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == full and r.usage.prompt_tokens == len(ids)
    stop = full.strip().split()[1] if len(full.split()) > 1 else full[2:4]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(live):
    client = live.client(KEYS["acme"])
    kw = dict(model="acme-lora", prompt="Sample", max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
