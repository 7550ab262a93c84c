"""`deltafleet.bench.loadgen`: Poisson schedules, Zipf draws, latency statistics and goodput on synthetic timings,
and the light client's HTTP/SSE readers on canned bytes (split anywhere, keep-alive comments, errors, [DONE])."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from collections import Counter

import pytest

from deltafleet.bench.loadgen import (
    CONNECTION_FAILED,
    STREAM_ERROR,
    ChatStreamTally,
    ChunkedDecoder,
    Result,
    Slo,
    SSEDecoder,
    chat_request,
    closed_loop,
    gaps,
    mean_itl,
    open_loop,
    parse_head,
    percentile,
    poisson_arrivals,
    status_label,
    stream_chat,
    zipf_choices,
    zipf_weights,
)
from deltafleet.bench.serve import OpenLoopConfig, report


# ---------------------------------------------------------------------- schedules
def test_poisson_arrivals_are_seeded_increasing_with_mean_gap_one_over_rate():
    a = poisson_arrivals(4.0, random.Random(7), count=4000)
    assert a == poisson_arrivals(4.0, random.Random(7), count=4000)  # deterministic for a seed
    assert a != poisson_arrivals(4.0, random.Random(8), count=4000)
    assert len(a) == 4000 and a[0] > 0 and all(x < y for x, y in zip(a, a[1:], strict=False))
    g = [a[0], *gaps(a)]
    assert statistics.mean(g) == pytest.approx(0.25, rel=0.05)  # exponential gaps: mean 1/rate ...
    assert statistics.stdev(g) == pytest.approx(0.25, rel=0.08)  # ... and standard deviation 1/rate


def test_poisson_arrivals_for_a_duration():
    a = poisson_arrivals(50.0, random.Random(1), duration=20.0)
    assert all(0 < t < 20.0 for t in a)
    assert len(a) == pytest.approx(1000, rel=0.1)  # rate x duration
    assert a == poisson_arrivals(50.0, random.Random(1), count=len(a))  # the same draws, cut differently


@pytest.mark.parametrize("kw, match", [
    ({"rate": 0.0, "count": 3}, "rate=0.0: must be a positive"),
    ({"rate": float("inf"), "count": 3}, "rate=inf"),
    ({"rate": 1.0}, "give exactly one"),
    ({"rate": 1.0, "count": 3, "duration": 1.0}, "give exactly one"),
    ({"rate": 1.0, "count": 0}, "count=0: must be >= 1"),
    ({"rate": 1.0, "duration": -1.0}, "duration=-1.0: must be > 0"),
])
def test_poisson_arrivals_refuse_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        poisson_arrivals(rng=random.Random(0), **kw)


def test_zipf_weights_and_choices():
    w = zipf_weights(4)
    assert w == pytest.approx([12 / 25, 6 / 25, 4 / 25, 3 / 25])  # 1, 1/2, 1/3, 1/4 normalised
    assert zipf_weights(3, s=0.0) == pytest.approx([1 / 3] * 3)  # s=0: uniform
    items = ["base", "a", "b", "c", "d"]
    draws = zipf_choices(items, 20000, random.Random(3))
    assert draws == zipf_choices(items, 20000, random.Random(3))
    freq = Counter(draws)
    for item, p in zip(items, zipf_weights(5), strict=True):
        assert freq[item] / 20000 == pytest.approx(p, abs=0.015)
    assert freq["base"] > freq["a"] > freq["b"] > freq["c"] > freq["d"]
    with pytest.raises(ValueError, match="n=0"):
        zipf_weights(0)


def test_open_loop_config_names_the_bad_field():
    with pytest.raises(ValueError, match=r"OpenLoopConfig.rates=\(1.0, -2.0\)"):
        OpenLoopConfig(rates=(1.0, -2.0))
    with pytest.raises(ValueError, match="OpenLoopConfig.duration=0"):
        OpenLoopConfig(rates=(1.0,), duration=0)
    with pytest.raises(ValueError, match="OpenLoopConfig.tenants=0"):
        OpenLoopConfig(rates=(1.0,), tenants=0)
    with pytest.raises(ValueError, match="Slo.itl_s=0"):
        Slo(itl_s=0)


# ---------------------------------------------------------------------- statistics
def test_percentile_gaps_and_mean_itl():
    assert percentile([], 50) is None
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0 and percentile([4.0, 1.0, 3.0, 2.0], 99) == 4.0
    assert gaps([0.5, 0.6, 0.8, 1.1]) == pytest.approx([0.1, 0.2, 0.3])
    assert gaps([0.5]) == [] and mean_itl([0.5]) is None
    assert mean_itl([0.5, 0.6, 0.8, 1.1]) == pytest.approx(0.2)


def test_slo_uses_ttft_and_the_mean_itl():
    slo = Slo(ttft_s=1.0, itl_s=0.1)
    assert slo.met(Result(200, 2.0, [0.9, 1.0, 1.1, 1.2], 4))
    assert not slo.met(Result(200, 2.0, [1.1, 1.2], 2))  # first token too late
    assert slo.met(Result(200, 2.0, [0.5, 0.5, 0.5, 0.77], 4))  # one gap of 0.27 > 0.1, mean 0.09
    assert not slo.met(Result(200, 2.0, [0.5, 0.6, 0.9], 3))  # mean 0.2
    assert slo.met(Result(200, 0.6, [0.5], 1))  # a single chunk has no ITL
    assert not slo.met(Result(200, 0.6, [], 0))  # no content at all
    assert not slo.met(Result(429, 0.01))


def test_report_on_synthetic_timings():
    results = [Result(200, 1.0 + i / 10, [0.2 + i / 10, 0.3 + i / 10, 0.45 + i / 10], 3) for i in range(10)]
    results += [Result(429, 0.01), Result(429, 0.02), Result(CONNECTION_FAILED, 0.0), Result(STREAM_ERROR, 0.5)]
    p = report("x", results, 5.0, Counter({"base": 14}), Slo(ttft_s=0.55, itl_s=0.2), client_cpu_s=0.123,
               lags=[0.001, 0.002, 0.0])
    assert (p.requests, p.ok) == (14, 10)
    assert p.errors == {"429": 2, "connection": 1, "stream-error": 1}
    assert p.requests_per_s == 2.0 and p.output_tokens_per_s == 6.0
    assert p.ttft_p50_s == pytest.approx(0.6) and p.ttft_p99_s == pytest.approx(1.1)
    assert p.itl_p50_s == pytest.approx(0.1) and p.itl_p99_s == pytest.approx(0.15)  # 10 gaps of 0.1, 10 of 0.15
    assert p.latency_p50_s == pytest.approx(1.4) and p.latency_p99_s == pytest.approx(1.9)
    assert p.slo_met == 4 and p.goodput_rps == pytest.approx(0.8)  # TTFT 0.2, 0.3, 0.4, 0.5
    assert p.client_cpu_s == 0.12 and p.send_lag_p99_s == 0.002 and p.server_cpu_s is None
    assert status_label(429) == "429" and status_label(CONNECTION_FAILED) == "connection"


# ---------------------------------------------------------------------- readers
def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()) + b"\n\n"


def _chat_chunk(delta: dict, finish=None) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


USAGE = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
STREAM = (_sse(_chat_chunk({"role": "assistant", "content": ""})) + b": keep-alive\n\n"
          + _sse(_chat_chunk({"content": "He"})) + _sse(_chat_chunk({"content": 'llo "content":""'}))
          + b": ping\r\n\r\n" + _sse(_chat_chunk({"content": "!"})) + _sse(_chat_chunk({}, "length"))
          + _sse(USAGE) + _sse(b"[DONE]"))


def _chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = b"", 0
    for n in sizes:
        out += f"{n:x};ext=1\r\n".encode() + body[i:i + n] + b"\r\n"
        i += n
    return out + f"{len(body) - i:x}\r\n".encode() + body[i:] + b"\r\n0\r\nX-Trailer: y\r\n\r\n"


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_sse_decoder_across_any_split_with_comments_and_crlf():
    whole = SSEDecoder().feed(STREAM)
    assert len(whole) == 7 and whole[-1] == b"[DONE]" and json.loads(whole[5])["usage"]["completion_tokens"] == 3
    rng = random.Random(0)
    for _ in range(200):
        d = SSEDecoder()
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 30)))
        assert [e for p in _pieces(STREAM, cuts) for e in d.feed(p)] == whole
    crlf = SSEDecoder().feed(b"id: 1\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\ndata:c\r\n")
    assert crlf == [b"a\nb"]  # the last event waits for its blank line


def test_chunked_decoder_across_any_split():
    body = STREAM
    framed = _chunked(body, [17, 1, 250, 3])
    rng = random.Random(1)
    for _ in range(200):
        d = ChunkedDecoder()
        cuts = sorted(rng.sample(range(1, len(framed)), rng.randint(1, 40)))
        out = b"".join(d.feed(p) for p in _pieces(framed, cuts))
        assert out == body and d.done
    d = ChunkedDecoder()
    assert d.feed(b"5\r\nabc") == b"abc" and not d.done
    with pytest.raises(ValueError, match="bad chunk size line"):
        ChunkedDecoder().feed(b"zz\r\n")
    with pytest.raises(ValueError, match="not followed by CRLF"):
        ChunkedDecoder().feed(b"2\r\nabXY")


def test_tally_times_content_chunks_only_and_reads_usage_and_errors():
    t = ChatStreamTally()
    for i, e in enumerate(SSEDecoder().feed(STREAM)):
        t.event(e, float(i))
    # events: role(0), He(1), llo(2), !(3), finish(4), usage(5), [DONE](6)
    assert t.chunks == [1.0, 2.0, 3.0] and t.tokens == 3 and t.done and t.error is None
    t = ChatStreamTally()
    for i, e in enumerate(SSEDecoder().feed(_sse(_chat_chunk({"role": "assistant", "content": ""}))
                                             + _sse(_chat_chunk({"content": "a"}))
                                             + _sse({"error": {"message": "the request could not run",
                                                               "type": "server_error"}}) + _sse(b"[DONE]"))):
        t.event(e, float(i))
    assert t.chunks == [1.0] and t.error == "the request could not run" and t.done


def test_http_head_and_request_bytes():
    status, headers = parse_head(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                                 b"Retry-After: 1\r\n\r\n")
    assert status == 429 and headers == {"content-type": "application/json", "retry-after": "1"}
    with pytest.raises(ValueError, match="not an HTTP status line"):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")
    req = chat_request("127.0.0.1", 8000, {"model": "m", "stream": True})
    head, body = req.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head and json.loads(body) == {"model": "m", "stream": True}


# ---------------------------------------------------------------------- the client over a socket
async def _serve_canned(responses: dict[bytes, list[bytes]]):
    """A loopback socket that answers a request for model X with the pieces of responses[X], one per write with
    a short pause (for the client's framing only: the real server is tested in test_bench_serve_open_loop)."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(parse_head(b"HTTP/1.1 200 x\r\n" + head.split(b"\r\n", 1)[1])[1]["content-length"])
        model = json.loads(await reader.readexactly(length))["model"].encode()
        for piece in responses[model]:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_stream_chat_framings_statuses_and_timings():
    ok_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    framed = _chunked(STREAM, [40, 300])
    responses = {
        b"chunked": _pieces(ok_head + b"transfer-encoding: chunked\r\n\r\n" + framed, [30, 400, 500, 700]),
        b"length": [ok_head + f"content-length: {len(STREAM)}\r\n\r\n".encode(), *_pieces(STREAM, [200, 600])],
        b"close": [ok_head + b"\r\n", STREAM],
        b"cut": [ok_head + b"\r\n", STREAM[:600]],  # the connection ends before [DONE]
        b"busy": [b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\n\r\n{}"],
        b"junk": [b"hello\r\n\r\n"],
    }

    async def main():
        server = await _serve_canned(responses)
        port = server.sockets[0].getsockname()[1]
        async with server:
            out = {}
            for name in responses:
                request = chat_request("127.0.0.1", port, {"model": name.decode()})
                out[name] = await stream_chat("127.0.0.1", port, request)
            return out

    out = asyncio.run(main())
    for name in (b"chunked", b"length", b"close"):
        r = out[name]
        assert r.status == 200 and r.tokens == 3 and len(r.chunks) == 3, name
        assert 0 < r.ttft <= r.chunks[-1] <= r.latency, name
    assert out[b"chunked"].chunks[-1] - out[b"chunked"].ttft > 0.01  # the pieces came 20 ms apart
    assert out[b"cut"].status == STREAM_ERROR and out[b"busy"].status == 429
    assert out[b"junk"].status == CONNECTION_FAILED


def test_drivers_closed_and_open_loop_timing():
    async def send(item):
        await asyncio.sleep(0.4)
        return Result(200, 0.4, [0.01 * item], 1)

    results, seconds = asyncio.run(closed_loop(send, list(range(8)), 4))
    assert len(results) == 8 and 0.8 <= seconds < 2.0  # two rounds of 4
    arrivals = [0.0, 0.05, 0.1, 0.3]
    results, seconds, lags = asyncio.run(open_loop(send, arrivals, [1, 2, 3, 4]))
    assert sorted(r.chunks[0] for r in results) == pytest.approx([0.01, 0.02, 0.03, 0.04])
    # each request was sent at its arrival time, not after the previous answer (0.4 s later)
    assert 0.7 <= seconds < 1.5 and all(0 <= lag < 0.2 for lag in lags)
    with pytest.raises(ValueError, match="2 arrivals for 1 requests"):
        asyncio.run(open_loop(send, [0.0, 0.1], [1]))
