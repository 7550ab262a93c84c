"""The streaming client of `deltafleet bench peer` (/v1/completions), and the figures it reports.

The HTTP/1.1 and server-sent-event pieces are `bench.loadgen`'s (one connection per request, `Connection: close`,
chunked or plain bodies, incremental SSE decoding; one arrival time per socket read). Both servers answer
`POST /v1/completions` with `stream: true` in OpenAI's `text_completion` chunk format; llama.cpp's `llama-server`
adds fields (`timings`, `system_fingerprint`) that are ignored here. Each event's JSON is parsed (a few dozen
events per request): the text is kept, so a streamed answer can be compared as well as timed.

Figures per phase, as vLLM's serving benchmark defines them: output tokens/s = generated tokens of all requests /
the phase's wall time; TTFT = request sent -> first event with text; inter-token latency = the gaps between
successive events with text, pooled over all requests of the phase. Percentiles are nearest-rank.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from deltafleet.bench.loadgen import ChunkedDecoder, SSEDecoder, chat_request, gaps, parse_head, percentile


@dataclass
class StreamResult:
    """One streamed request as the client saw it: times are seconds from the moment it was sent."""

    status: int
    seconds: float = 0.0
    event_times: list[float] = field(default_factory=list)  # one per event carrying text
    text: str = ""
    usage_tokens: int | None = None
    error: str | None = None
    done: bool = False  # [DONE] arrived

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.done

    @property
    def tokens(self) -> int:
        """Generated tokens: the usage chunk's count when the server sent one, else the events with text."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.event_times)

    @property
    def ttft(self) -> float | None:
        return self.event_times[0] if self.event_times else None


@dataclass(frozen=True)
class Chunk:
    """What one event means to the benchmark: text generated, a usage count, an error, or the end."""

    text: str = ""
    usage_tokens: int | None = None
    error: str | None = None
    done: bool = False


def parse_chunk(payload: bytes) -> Chunk:
    """An OpenAI `text_completion` stream event (deltafleet's or llama.cpp's), or `[DONE]`."""
    if payload.strip() == b"[DONE]":
        return Chunk(done=True)
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        return Chunk(error=f"unexpected event {payload[:80]!r}")
    if "error" in obj:
        err = obj["error"]
        return Chunk(error=str(err.get("message", err) if isinstance(err, dict) else err))
    usage = obj.get("usage")
    choices = obj.get("choices") or []
    text = (choices[0].get("text") or "") if choices else ""
    return Chunk(text=text, usage_tokens=usage.get("completion_tokens") if isinstance(usage, dict) else None)


def tally(res: StreamResult, payload: bytes, now: float, texts: list[str]) -> None:
    """Fold one event into `res` (text pieces are appended to `texts`)."""
    ch = parse_chunk(payload)
    if ch.error is not None:
        res.error = ch.error
    if ch.text:
        texts.append(ch.text)
        res.event_times.append(now)
    if ch.usage_tokens is not None:
        res.usage_tokens = ch.usage_tokens
    res.done = res.done or ch.done


async def _exchange(host: str, port: int, body: dict, path: str, res: StreamResult, t0: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    texts: list[str] = []
    try:
        writer.write(chat_request(host, port, body, path))
        res.status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        dechunk = ChunkedDecoder() if headers.get("transfer-encoding", "").lower() == "chunked" else None
        sse = SSEDecoder()
        while not res.done:
            data = await reader.read(1 << 16)
            now = time.perf_counter() - t0
            if not data:
                break
            if dechunk is not None:
                data = dechunk.feed(data)
            if res.status != 200:
                res.error = f"HTTP {res.status}: {data[:200]!r}"
                break
            for payload in sse.feed(data):
                tally(res, payload, now, texts)
    finally:
        writer.close()
        res.text = "".join(texts)


async def stream_completion(host: str, port: int, body: dict, path: str = "/v1/completions",
                            timeout: float = 600.0) -> StreamResult:
    """Send one streaming request on a new connection and time its events; errors are returned, never raised."""
    t0 = time.perf_counter()
    res = StreamResult(status=0)
    try:
        await asyncio.wait_for(_exchange(host, port, body, path, res, t0), timeout)
    except TimeoutError:
        res.error = f"no end of stream in {timeout:.0f} s"
    except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        res.error = f"{type(e).__name__}: {e}"
    if not res.done and res.error is None:
        res.error = "the stream ended without [DONE]"
    res.seconds = time.perf_counter() - t0
    return res


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def phase_figures(results: Sequence[StreamResult], seconds: float) -> dict:
    """The reported figures of one phase: output tok/s over the wall time, TTFT and inter-token latency (ms)."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in gaps(r.event_times)]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results), "ok": len(ok), "errors": [r.error for r in results if not r.ok][:3],
        "seconds": round(seconds, 2), "output_tokens": tokens,
        "output_tok_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)), "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "itl_p50_ms": _ms(percentile(itl, 50)), "itl_p99_ms": _ms(percentile(itl, 99)),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 3 digits; None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def throughput_ratios(runs: Sequence[dict]) -> dict:
    """Output tok/s ratios: mixed/base per run (and of TTFT p99), served base over the in-process engine on the same
    requests (deltafleet runs with an "engine" entry), and deltafleet/llama.cpp per phase for every pair of runs.

    `runs`: [{"label", "server": "deltafleet" | "llama.cpp", "phases": {phase: figures}, "engine"?: figures}]."""
    out: dict = {"mixed_over_base": {}, "ttft_p99_mixed_over_base": {}, "served_base_over_engine": {},
                 "deltafleet_over_llamacpp": {}}
    for r in runs:
        ph = r["phases"]
        if "mixed" in ph and "base" in ph:
            out["mixed_over_base"][r["label"]] = ratio(ph["mixed"]["output_tok_s"], ph["base"]["output_tok_s"])
            out["ttft_p99_mixed_over_base"][r["label"]] = ratio(ph["mixed"]["ttft_p99_ms"], ph["base"]["ttft_p99_ms"])
        if "engine" in r and "base" in ph:
            out["served_base_over_engine"][r["label"]] = ratio(ph["base"]["output_tok_s"], r["engine"]["output_tok_s"])
    ours = [r for r in runs if r["server"] == "deltafleet"]
    theirs = [r for r in runs if r["server"] == "llama.cpp"]
    for a in ours:
        for b in theirs:
            out["deltafleet_over_llamacpp"][f"{a['label']} / {b['label']}"] = {
                phase: ratio(a["phases"][phase]["output_tok_s"], b["phases"][phase]["output_tok_s"])
                for phase in a["phases"] if phase in b["phases"]}
    return out
