"""Replacing an adapter's weights under its name over HTTP, and the start-up scan confined to the adapters root."""

from __future__ import annotations

import os
import shutil
import time

import httpx

from deltafleet.serve.engine import Engine, EngineConfig
from tests.serve_http.conftest import ENGINE


def _answer(url: str, model: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_put_replaces_the_weights_under_the_same_name(fresh_server):
    s = fresh_server()
    acme, globex = _answer(s.url, "acme-lora"), _answer(s.url, "globex-lora")
    assert acme != globex
    assert httpx.post(f"{s.url}/v1/adapters", json={"name": "swap", "path": "acme-lora"}).status_code == 202
    assert _answer(s.url, "swap") == acme
    r = httpx.put(f"{s.url}/v1/adapters/swap", json={"path": "globex-lora"}, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "swap", r.text
    assert _answer(s.url, "swap") == globex
    missing = httpx.put(f"{s.url}/v1/adapters/nope", json={"path": "globex-lora"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"
    outside = httpx.put(f"{s.url}/v1/adapters/swap", json={"path": "../x"})
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "path"
    assert _answer(s.url, "swap") == globex  # a refused replacement changes nothing


def test_scan_confines_every_file_to_the_root(tiny_chat_model, adapters_root, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(adapters_root / "acme-lora", outside / "acme-lora")
    shutil.copytree(adapters_root / "acme-lora", root / "ok")
    os.symlink(outside / "acme-lora", root / "dir-link")  # a whole adapter directory symlinked out of the root
    (root / "file-link").mkdir()  # a weights file symlinked out of the root
    for f in (adapters_root / "acme-lora").iterdir():
        if f.suffix == ".safetensors":
            os.symlink(outside / "acme-lora" / f.name, root / "file-link" / f.name)
        else:
            shutil.copy(f, root / "file-link" / f.name)
    engine = Engine.from_pretrained(tiny_chat_model, root, EngineConfig(**ENGINE))
    try:
        for name in ("ok", "dir-link", "file-link"):
            engine.adapters.ensure_loading(name)
        end = time.monotonic() + 60
        while any(str(engine.adapters.status(n)) == "loading" for n in ("ok", "dir-link", "file-link")):
            assert time.monotonic() < end
            time.sleep(0.05)
        assert engine.adapters.error("ok") is None
        for name in ("dir-link", "file-link"):
            assert "resolves outside the adapters root" in engine.adapters.error(name)
    finally:
        engine.shutdown()
