"""Load generation for `deltafleet bench serve`: a light streaming client, arrival schedules, latency statistics.

The client shares the CPU with the server it measures, so it does as little as it can per streamed chunk:

- `stream_chat` speaks just enough HTTP/1.1 over asyncio streams: one connection per request
  (`Connection: close`), the response head parsed once, a body framed by `Transfer-Encoding: chunked`
  (`ChunkedDecoder`), Content-Length or the end of the connection.
- `SSEDecoder` splits the body into server-sent events (lines ending in LF or CRLF, any split across reads; `:`
  comments such as keep-alives, and fields other than `data`, ignored).
- `ChatStreamTally` reads the events of a chat completion stream. It parses JSON only for events before the
  first content delta (the assistant-role chunk, then the first content chunk: TTFT), for the usage chunk and
  for an error event; any other event costs a few byte comparisons (`"content":"` present and not empty). It
  records one arrival time per socket read, shared by the events that read returned.

Open-loop arrivals are a Poisson process: exponential gaps of mean 1 / rate from a seeded RNG, sent at their
times whatever the server has answered (`open_loop`); closed-loop clients send their next request when the
previous one ends (`closed_loop`). Popularity: Zipf, the model of rank k (1-based) weighted 1 / k**s.

Statistics, all on seconds as the client sees them (`perf_counter`), per request from the moment it is sent:
TTFT = first content chunk; inter-token latency (ITL) = the gaps between a request's consecutive content chunks
(a chunk may carry more than one token, and chunks read together have a gap of 0); a request meets the SLO when
it succeeded, its TTFT <= `Slo.ttft_s` and its mean ITL ((last - first chunk) / (chunks - 1), i.e. time per
output chunk after the first) <= `Slo.itl_s`; goodput = requests meeting the SLO per second of the phase.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

# Pseudo-statuses of requests that got no HTTP status, or a 200 whose stream did not end well.
CONNECTION_FAILED = 0  # refused, reset, or a malformed response
TIMED_OUT = 598  # no end of stream within the client's timeout
STREAM_ERROR = 599  # a 200 whose stream carried an error event, or ended without [DONE]
STATUS_LABELS = {CONNECTION_FAILED: "connection", TIMED_OUT: "timeout", STREAM_ERROR: "stream-error"}

_CONTENT = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_USAGE = b'"usage":{'


@dataclass
class Result:
    """One request as the client saw it. Times in seconds from the moment it was sent."""

    status: int
    latency: float  # until the end of the stream (or the error)
    chunks: list[float] = field(default_factory=list)  # arrival of each content chunk
    tokens: int = 0  # completion tokens, from the usage chunk

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] if self.chunks else None


def status_label(status: int) -> str:
    """The key a status is counted under: the HTTP status, or the name of a pseudo-status."""
    return STATUS_LABELS.get(status, str(status))


# ---------------------------------------------------------------------- HTTP/1.1 and server-sent events
def chat_request(host: str, port: int, body: dict, path: str = "/v1/chat/completions") -> bytes:
    """The bytes of one POST of `body` as JSON, asking the server to close the connection after the answer."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + payload


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """`HTTP/1.1 200 OK\\r\\nName: value\\r\\n...\\r\\n\\r\\n` -> (200, {"name": "value"}); names lower-cased."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


class ChunkedDecoder:
    """Incremental `Transfer-Encoding: chunked` decoder: `feed(bytes read)` -> the payload bytes they complete;
    `done` once the last (size 0) chunk and the trailer have arrived. Chunk extensions and trailers are skipped."""

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # payload bytes of the current chunk still to come
        self._state = "size"  # size -> data -> crlf -> size ... -> trailer -> done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf, out = self._buf + data, []
        while not self.done:
            if self._state in ("size", "trailer"):
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                line, buf = buf[:end], buf[end + 2:]
                if self._state == "trailer":
                    self.done = not line
                    continue
                size = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError:
                    raise ValueError(f"bad chunk size line {line[:40]!r}") from None
                self._state = "data" if self._left else "trailer"
            elif self._state == "data":
                piece = buf[:self._left]
                out.append(piece)
                buf, self._left = buf[len(piece):], self._left - len(piece)
                if self._left:
                    break
                self._state = "crlf"
            else:  # crlf after a chunk's payload
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError(f"chunk payload not followed by CRLF: {buf[:10]!r}")
                buf, self._state = buf[2:], "size"
        self._buf = buf
        return b"".join(out)


class SSEDecoder:
    """Incremental server-sent-event decoder: `feed(bytes)` -> the `data` of each event those bytes complete
    (several `data:` lines of one event joined by LF). An event ends at a blank line; comments (`:` lines) and
    other fields (`event:`, `id:`, `retry:`) are ignored; lines end in LF or CRLF."""

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()  # an incomplete line, b"" after a trailing LF
        events = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events


class ChatStreamTally:
    """What the events of one /v1/chat/completions stream say: content-chunk arrival times, completion tokens (from
    the usage chunk), an error, the end ([DONE]). JSON is parsed until the first content chunk, then only for the
    usage chunk and an error event."""

    def __init__(self) -> None:
        self.chunks: list[float] = []
        self.tokens = 0
        self.error: str | None = None
        self.done = False

    def event(self, data: bytes, now: float) -> None:
        if data == b"[DONE]":
            self.done = True
        elif data.startswith(b'{"error"'):
            err = json.loads(data)["error"]
            self.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        elif _USAGE in data:
            self.tokens = json.loads(data)["usage"]["completion_tokens"]
        elif self.chunks:
            if _CONTENT in data and _EMPTY_CONTENT not in data:
                self.chunks.append(now)
        else:
            choices = json.loads(data).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                self.chunks.append(now)


async def _exchange(host: str, port: int, request: bytes, t0: float) -> Result:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        if status != 200:
            return Result(status, time.perf_counter() - t0)
        dechunk = ChunkedDecoder() if headers.get("transfer-encoding", "").lower() == "chunked" else None
        left = int(headers["content-length"]) if dechunk is None and "content-length" in headers else -1
        sse, tally = SSEDecoder(), ChatStreamTally()
        while not tally.done:
            data = await reader.read(1 << 16)
            now = time.perf_counter() - t0
            if not data:
                break
            if dechunk is not None:
                data = dechunk.feed(data)
            for event in sse.feed(data):
                tally.event(event, now)
            if (dechunk is not None and dechunk.done) or (left >= 0 and (left := left - len(data)) <= 0):
                break
        ok = tally.done and tally.error is None
        return Result(200 if ok else STREAM_ERROR, time.perf_counter() - t0, tally.chunks, tally.tokens)
    finally:
        writer.close()


async def stream_chat(host: str, port: int, request: bytes, timeout: float = 600.0) -> Result:
    """Send one streaming request (the bytes of `chat_request`) on a new connection and read its answer."""
    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(_exchange(host, port, request, t0), timeout)
    except TimeoutError:
        return Result(TIMED_OUT, time.perf_counter() - t0)
    except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return Result(CONNECTION_FAILED, time.perf_counter() - t0)


# ---------------------------------------------------------------------- arrivals and popularity
def poisson_arrivals(rate: float, rng: random.Random, *, duration: float | None = None,
                     count: int | None = None) -> list[float]:
    """Arrival times (s from the start, increasing) of a Poisson process of `rate` per second: the first after
    one exponential gap; either every arrival before `duration` or the first `count`."""
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate={rate}: must be a positive, finite number of requests per second")
    if (duration is None) == (count is None):
        raise ValueError(f"duration={duration}, count={count}: give exactly one of them")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration={duration}: must be > 0 seconds")
    if count is not None and count < 1:
        raise ValueError(f"count={count}: must be >= 1")
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if (duration is not None and t >= duration) or (count is not None and len(times) == count):
            return times
        times.append(t)


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Popularity of ranks 1..n under Zipf's law with exponent s: weight of rank k = k**-s / sum_j j**-s."""
    if n < 1 or s < 0:
        raise ValueError(f"n={n}, s={s}: need n >= 1 and s >= 0")
    w = [(k + 1) ** -s for k in range(n)]
    total = sum(w)
    return [x / total for x in w]


def zipf_choices(items: Sequence[str], k: int, rng: random.Random, s: float = 1.0) -> list[str]:
    """`k` draws from `items`, the first the most popular (Zipf with exponent s over their order)."""
    return rng.choices(list(items), zipf_weights(len(items), s), k=k)


# ---------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def gaps(times: Sequence[float]) -> list[float]:
    """Inter-token latencies of one request: the gaps between its consecutive content chunks (len(times) - 1)."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def mean_itl(times: Sequence[float]) -> float | None:
    """Time per output chunk after the first: (last - first) / (chunks - 1); None with fewer than 2 chunks."""
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) >= 2 else None


@dataclass(frozen=True)
class Slo:
    """Service-level objective of one request: TTFT and mean ITL at most these many seconds."""

    ttft_s: float = 2.0
    itl_s: float = 0.2

    def __post_init__(self) -> None:
        for name in ("ttft_s", "itl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Slo.{name}={getattr(self, name)}: must be > 0 seconds")

    def met(self, r: Result) -> bool:
        """Succeeded, first chunk within ttft_s, mean ITL within itl_s (a single-chunk answer has no ITL)."""
        itl = mean_itl(r.chunks)
        return r.status == 200 and r.ttft is not None and r.ttft <= self.ttft_s and (itl is None or itl <= self.itl_s)


# ---------------------------------------------------------------------- drivers
async def closed_loop(send: Callable[[object], Awaitable[Result]], plan: Sequence[object],
                      clients: int) -> tuple[list[Result], float]:
    """`clients` workers, each sending the next item of `plan` when its previous request ends -> (results, s)."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[Result] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await send(queue.get_nowait()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - t0


async def open_loop(send: Callable[[object], Awaitable[Result]], arrivals: Sequence[float],
                    plan: Sequence[object]) -> tuple[list[Result], float, list[float]]:
    """Send plan[i] at arrivals[i] s from now whatever has been answered -> (results, seconds until the last
    answer, send lag of each request: how late after its arrival time it was sent)."""
    if len(arrivals) != len(plan):
        raise ValueError(f"{len(arrivals)} arrivals for {len(plan)} requests: need one each")
    t0 = time.perf_counter()
    tasks, lags = [], []
    for at, item in zip(arrivals, plan, strict=True):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(time.perf_counter() - t0 - at)
        tasks.append(asyncio.create_task(send(item)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - t0, lags
