"""The multi-tenant generation engine: continuous batching over one base model and many adapters.

Each `step()`:
1. takes newly submitted requests from the inbox and admits waiting ones while KV slots are free and their
   adapter is resident or can be made so (loading happens on a background thread; a request whose adapter
   is still loading waits without blocking others);
2. prefills admitted prompts (chunked to `prefill_tokens` per step), sampling a first token where a prompt
   completes, and decodes one token for every sequence already decoding: both in one forward when the step has
   both (`EngineConfig.mixed_steps`: the tokens laid end to end, attention per sequence, as vLLM's and SGLang's
   chunked prefill do), else a prefill forward and a decode forward;
3. retires finished sequences, compacting the KV cache so running sequence i always owns cache slot i
   (decode then reads the cache as a view, with no per-step gather).

The batch adapter layout (`BatchLayout`) is computed once per forward and read by every layer. Base-only
requests, LoRA, RoAd and low-rank deltas mix freely in one batch.

Faults stay with the request that caused them; the others of the step go on:
- a row whose logits hold inf/NaN, or whose sampling raises, fails only its request (`sampling.sample`);
- if a forward pass raises, it is run again once per adapter version of the batch, and only the groups whose own
  forward raises fail (all of the step's requests when they share one adapter or none);
- a request that fails or is aborted has its KV-cache positions zeroed before its cache slot is reused: masked
  attention still multiplies a masked value by 0, so a stale inf/NaN would reach the slot's next sequence;
- a request waiting for its adapter to load fails after `EngineConfig.adapter_load_timeout` seconds;
- anything else a step raises fails the running requests, and the engine thread goes on with later ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import torch

import deltafleet.quant  # noqa: F401  (registers the quantized-base format that from_pretrained may load)
from deltafleet.adapters import Adapter
from deltafleet.dtypes import DTYPES
from deltafleet.errors import DeltafleetError
from deltafleet.models import prepack
from deltafleet.models.llama import KVCache, Transformer
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.native import openmp
from deltafleet.serve.engine.adapters import AdapterManager, AdapterState, UnknownAdapterError
from deltafleet.serve.engine.backends import make_backend
from deltafleet.serve.engine.config import EngineConfig
from deltafleet.serve.engine.detok import Detokenizer
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import POOL_CLASSES, Pool
from deltafleet.serve.engine.sampling import RowFailure, sample
from deltafleet.serve.engine.sequence import Seq
from deltafleet.serve.engine.stream import AsyncStream
from deltafleet.serve.engine.types import (
    NO_ADAPTER,
    EngineShutdownError,
    FinishReason,
    InvalidParameterError,
    PromptTooLongError,
    QueueFullError,
    Request,
    RequestOutput,
    TokenEvent,
)
from deltafleet.store.fingerprint import base_fingerprint

log = logging.getLogger(__name__)

class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None,
                 adapters_dir: str | Path | None = None, base_fingerprint: str | None = None):
        self.config = config = config or EngineConfig()
        self.dtype = DTYPES[config.dtype]
        adt = self.adapter_dtype = DTYPES[config.adapter_dtype or config.dtype]
        self.model = model.to(self.dtype).eval()
        if config.prepack:
            prepack.pack_linears_(self.model, batch_hint=config.max_batch)
            prepack.pack_norms_(self.model)
        self.tokenizer = tokenizer
        mcfg = model.config
        self.backend = make_backend(config.backend)
        max_batch = config.max_batch
        per_seq = KVCache.bytes_per_token(mcfg, self.dtype) * config.max_model_len
        if config.kv_cache_bytes is not None:
            max_batch = min(max_batch, config.kv_cache_bytes // per_seq)
            if max_batch < 1:
                raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no sequence of "
                                 f"max_model_len={config.max_model_len} ({per_seq} bytes each)")
        self.max_batch = max_batch
        self.cache = KVCache.allocate(mcfg, max_batch, config.max_model_len, self.dtype)
        pools = [POOL_CLASSES[spec.family](spec, mcfg, adt) for spec in config.pools]
        self.adapters = AdapterManager(mcfg, adt, pools, config.host_cache_bytes, base_fingerprint,
                                       config.loader_threads)
        if adapters_dir is not None:
            scanned = self.adapters.scan(adapters_dir)
            if config.preload_adapters:
                self.adapters.preload(scanned)
        eos = set(mcfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._inbox: deque[Seq] = deque()
        self._by_id: dict[str, Seq] = {}
        self._lock = threading.Lock()  # guards the inbox and _by_id
        self._step_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # decode_* count steps of decode tokens only, prefill_seconds steps of prompt chunks only, mixed_* the
        # steps that run both in one forward (`EngineConfig.mixed_steps`)
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "finished": 0, "steps": 0,
                         "decode_tokens": 0, "decode_seconds": 0.0, "prefill_seconds": 0.0,
                         "mixed_steps": 0, "mixed_decode_tokens": 0, "mixed_seconds": 0.0}
        self.ttft: deque[float] = deque(maxlen=4096)
        self.itl: deque[float] = deque(maxlen=16384)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, base: str | Path, adapters_dir: str | Path | None = None,
                        config: EngineConfig | None = None) -> Engine:

        config = config or EngineConfig()
        model, path = load_model(base, dtype=DTYPES[config.dtype])
        try:
            tokenizer = load_tokenizer(path)
        except DeltafleetError:
            tokenizer = None
        return cls(model, tokenizer, config, adapters_dir, base_fingerprint(path))

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, source: str | Path | Adapter) -> None:
        """Register an adapter directory (loaded in the background) or an in-memory `Adapter` under `name`."""
        if isinstance(source, Adapter):
            self.adapters.add_loaded(name, source)
            return
        self.adapters.add(name, source)
        self.adapters.ensure_loading(name)

    def remove_adapter(self, name: str) -> None:
        """New requests for `name` fail at once; running ones finish on its weights. An idle resident adapter's
        slot is freed at once, one in use when its last request finishes. Safe from any thread."""
        self.adapters.remove(name)

    def replace_adapter(self, name: str, source: str | Path | Adapter) -> None:
        """Swap the weights registered as `name` for `source` (a directory or an in-memory `Adapter`) atomically:
        requests already running finish on the old weights, every request admitted afterwards gets the new. Blocks
        while a directory is read and validated (call it off an event loop); a bad source raises
        (`AdapterLoadError` for a directory) and the old weights stay. Safe from any thread."""
        self.adapters.replace(name, source)

    # ------------------------------------------------------------------ submission (any thread)
    def submit(self, request: Request, on_event: Callable[[TokenEvent], None] | None = None) -> Seq:
        if self._stopping:
            raise EngineShutdownError("the engine is shutting down")
        p = request.params
        total = len(request.prompt_ids) + p.max_tokens
        if total > self.config.max_model_len:
            raise PromptTooLongError(
                f"prompt of {len(request.prompt_ids)} tokens + max_tokens {p.max_tokens} = {total} exceeds the "
                f"context length {self.config.max_model_len}"
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise InvalidParameterError("prompt_ids", f"token ids must be in [0, {vocab})")
        if request.adapter is not None:
            if request.adapter not in self.adapters.names():
                raise UnknownAdapterError(f"adapter {request.adapter!r} not found")
            self.adapters.ensure_loading(request.adapter)
        if p.stop and self.tokenizer is None:
            raise InvalidParameterError("stop", "stop strings need a tokenizer; this engine has none")
        gen = None if p.greedy else torch.Generator()
        if gen is not None:
            gen.manual_seed(p.seed if p.seed is not None else torch.seed())
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
        detok = Detokenizer(self.tokenizer, p.stop) if self.tokenizer is not None else None
        seq = Seq(request, on_event, detok, gen, stop_ids)
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.config.max_queue:
                raise QueueFullError(f"queue full: {self.config.max_queue} requests waiting")
            if request.request_id in self._by_id:
                raise InvalidParameterError("request_id", "already in use", request.request_id)
            self._by_id[request.request_id] = seq
            self._inbox.append(seq)
        self._wake.set()
        return seq

    def abort(self, request_id: str) -> None:
        """Cancel a request; its batch slot and KV cache are freed at the next step."""
        with self._lock:
            seq = self._by_id.get(request_id)
        if seq is not None:
            seq.aborted = True
            self._wake.set()

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling iteration; returns whether any model work was done."""
        with self._step_lock:
            with self._lock:
                while self._inbox:
                    self.waiting.append(self._inbox.popleft())
            self._reap_aborted()
            self._admit()
            decoding = [s for s in self.running if not s.in_prefill and s.finish is None]
            prefilling = [s for s in self.running if s.in_prefill]
            if prefilling and decoding and self.config.mixed_steps:
                self._timed("mixed_seconds", self._mixed, decoding, self._chunks(prefilling))
                self.counters["mixed_steps"] += 1
                self.counters["mixed_decode_tokens"] += len(decoding)
                decoding = []
            elif prefilling:
                self._timed("prefill_seconds", self._prefill, prefilling)
            if decoding:
                self._timed("decode_seconds", self._decode, decoding)
                self.counters["decode_tokens"] += len(decoding)
            self._retire()
            if prefilling or decoding:
                self.counters["steps"] += 1
            return bool(prefilling or decoding)

    def _timed(self, counter: str, fn: Callable, *args) -> None:
        """fn(*args), its seconds added to `counters[counter]`."""
        t0 = time.perf_counter()
        fn(*args)
        self.counters[counter] += time.perf_counter() - t0

    def _reap_aborted(self) -> None:
        for s in list(self.waiting):
            if s.aborted:
                self.waiting.remove(s)
                self._finish(s, FinishReason.ABORT)
                self._complete(s)
        for s in self.running:
            if s.aborted and s.finish is None:
                self._finish(s, FinishReason.ABORT)

    def _admit(self) -> None:
        self._expire_loads()
        for s in list(self.waiting):
            if len(self.running) >= self.max_batch:
                return
            name = s.req.adapter
            if name is not None:
                try:
                    err = self.adapters.error(name)
                    lease = None if err else self.adapters.acquire(name)
                except Exception as e:  # noqa: BLE001 (unknown, or failed to enter a slot: this request fails)
                    err, lease = str(e) if isinstance(e, DeltafleetError) else f"{type(e).__name__}: {e}", None
                if err:
                    self._drop_waiting(s, err)
                    continue
                if lease is None:
                    continue  # still loading, or every slot of its pool is busy
                s.lease = lease
            self.waiting.remove(s)
            s.kv = len(self.running)
            self.running.append(s)

    def _expire_loads(self) -> None:
        """Fail waiting requests whose adapter is still not loaded `adapter_load_timeout` seconds after submission
        (a request waiting only for a free slot of a loaded adapter stays)."""
        timeout = self.config.adapter_load_timeout
        now = time.perf_counter()
        for s in list(self.waiting):
            if s.req.adapter is None or now - s.t_submit <= timeout:
                continue
            try:
                loading = self.adapters.status(s.req.adapter) in (AdapterState.LOADING, AdapterState.ON_DISK)
            except UnknownAdapterError:
                continue  # _admit fails it
            if loading:
                self._drop_waiting(s, f"adapter {s.req.adapter!r} did not finish loading within {timeout:g} s "
                                      f"(EngineConfig.adapter_load_timeout)")

    def _drop_waiting(self, s: Seq, error: str) -> None:
        self.waiting.remove(s)
        self._fail(s, error)
        self._complete(s)

    def _rows(self, seqs: list[Seq]) -> list[tuple[Pool | None, int]]:
        return [(s.lease.pool, s.lease.slot) if s.lease is not None else (None, -1) for s in seqs]

    def _isolated(self, items: list, forward: Callable[[list], torch.Tensor],
                  seq: Callable[[object], Seq] = lambda item: item) -> list[tuple[list, torch.Tensor]]:
        """[(items, forward(items))]; if that forward raises, forward runs again once per adapter version (the base
        model is one group) and the groups whose own forward raises fail: [(group, its logits)] of the others.
        `seq(item)` is the item's sequence. A forward only writes the KV positions it is given, so a rerun
        overwrites what the failed one wrote."""
        try:
            return [(items, forward(items))]
        except Exception as e:  # noqa: BLE001 (one adapter's failure must not fail the others)
            failure = e
        groups: dict[tuple[int, int] | None, list] = {}
        for item in items:
            lease = seq(item).lease
            groups.setdefault(None if lease is None else (id(lease.pool), lease.slot), []).append(item)
        if len(groups) == 1:
            log.error("forward pass of %d requests failed", len(items), exc_info=failure)
            self._fail_group([seq(item) for item in items], failure)
            return []
        log.warning("forward pass of %d requests (%d adapter groups) failed; running each group alone",
                    len(items), len(groups), exc_info=failure)
        out = []
        for group in groups.values():
            try:
                out.append((group, forward(group)))
            except Exception as e:  # noqa: BLE001
                self._fail_group([seq(item) for item in group], e)
        return out

    def _fail_group(self, seqs: list[Seq], e: Exception) -> None:
        for s in seqs:
            self._fail(s, f"{self._blame(s)}: forward pass failed: {type(e).__name__}: {e}")

    @staticmethod
    def _blame(s: Seq) -> str:
        return "base model" if s.req.adapter is None else f"adapter {s.req.adapter!r}"

    def _fail(self, s: Seq, error: str) -> None:
        """This request alone ends with finish reason error."""
        if s.finish is None:
            log.warning("request %s failed: %s", s.req.request_id, error)
            s.error = s.error or error
        self._finish(s, FinishReason.ERROR)

    def _chunks(self, seqs: list[Seq]) -> list[tuple[Seq, int]]:
        """This step's prompt chunks (sequence, tokens), at most `prefill_tokens` in all, in admission order."""
        budget = self.config.prefill_tokens
        chunks: list[tuple[Seq, int]] = []
        for s in seqs:
            if budget <= 0:
                break
            n = min(s.prompt_len - s.computed, budget)
            chunks.append((s, n))
            budget -= n
        return chunks

    def _prefill(self, seqs: list[Seq]) -> None:
        for part, logits in self._isolated(self._chunks(seqs), self._prefill_forward, seq=lambda chunk: chunk[0]):
            self._chunks_done(part, logits)

    def _chunks_done(self, chunks: list[tuple[Seq, int]], logits: torch.Tensor) -> None:
        """Account computed prompt chunks; sample a first token for those that end a prompt (their rows of
        `logits`, in order)."""
        done = []
        for s, n in chunks:
            s.computed += n
            self.counters["prompt_tokens"] += n
            if s.computed == s.prompt_len:
                done.append(s)
        if done:
            self._emit(done, sample(logits, [s.req.params for s in done], [s.gen for s in done]))

    def _mixed(self, decoding: list[Seq], chunks: list[tuple[Seq, int]]) -> None:
        """One forward for a decode token of every decoding sequence and this step's prompt chunks."""
        items = [(s, 0) for s in decoding] + chunks  # (sequence, prompt tokens; 0: its decode token)
        for part, logits in self._isolated(items, self._mixed_forward, seq=lambda item: item[0]):
            dec = [s for s, n in part if n == 0]
            if dec:
                self._emit(dec, sample(logits[:len(dec)], [s.req.params for s in dec], [s.gen for s in dec]))
            self._chunks_done([(s, n) for s, n in part if n], logits[len(dec):])

    def _mixed_forward(self, items: list[tuple[Seq, int]]) -> torch.Tensor:
        """Decode tokens (n = 0) and prompt chunks (n tokens) laid end to end in one ragged forward (padded to a
        multiple of `prefill_bucket` tokens) -> logits of the decode tokens, then of the chunks that end a prompt.
        Items must list the decode tokens first."""
        ids, pos, lens, last = [], [], [], []
        for s, n in items:
            if n == 0:
                ids.append(s.out[-1])
                pos.append(s.decode_position)
                lens.append(1)
            else:
                ids.extend(s.req.prompt_ids[s.computed:s.computed + n])
                pos.extend(range(s.computed, s.computed + n))
                lens.append(n)
            if n == 0 or s.computed + n == s.prompt_len:
                last.append(len(ids) - 1)
        bucket = self.config.prefill_bucket
        pad = -len(ids) % bucket
        rows = self._rows([s for s, _ in items])
        if pad:
            rows.append((None, NO_ADAPTER))  # padding tokens: the base model, never written nor attended
        layout = BatchLayout.build(rows, lens + [pad] if pad else lens)
        logits_index = torch.tensor(last)
        return self.model(torch.tensor([ids + [0] * pad]), positions=torch.tensor([pos + [0] * pad]),
                          cache=self.cache, cache_slots=torch.tensor([s.kv for s, _ in items]),
                          hook=layout.hook(self.backend, logits_index), logits_index=logits_index,
                          seq_lens=torch.tensor(lens))

    def _prefill_forward(self, chunks: list[tuple[Seq, int]]) -> torch.Tensor:
        """Prompt chunks (sequence, tokens) through the model -> logits (D, V) of the D chunks that end a prompt."""
        bucket = self.config.prefill_bucket
        T = -(-max(n for _, n in chunks) // bucket) * bucket  # padded to the bucket: fewer distinct shapes
        B = len(chunks)
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        pos = torch.zeros(B, T, dtype=torch.long)
        last_index = []
        for b, (s, n) in enumerate(chunks):
            ids[b, :n] = torch.tensor(s.req.prompt_ids[s.computed:s.computed + n])
            mask[b, :n] = True
            pos[b] = s.computed + torch.arange(T)
            if s.computed + n == s.prompt_len:
                last_index.append(b * T + n - 1)
        layout = BatchLayout.build(self._rows([s for s, _ in chunks]), T)
        slots = torch.tensor([s.kv for s, _ in chunks])
        logits_index = torch.tensor(last_index) if last_index else torch.zeros(0, dtype=torch.long)
        return self.model(ids, positions=pos, attention_mask=mask, cache=self.cache, cache_slots=slots,
                          hook=layout.hook(self.backend, logits_index), logits_index=logits_index)

    def _decode(self, seqs: list[Seq]) -> None:
        for part, logits in self._isolated(seqs, self._decode_forward):
            self._emit(part, sample(logits, [s.req.params for s in part], [s.gen for s in part]))

    def _decode_forward(self, seqs: list[Seq]) -> torch.Tensor:
        """One token per decoding sequence through the model -> logits (B, V)."""
        B = len(seqs)
        ids = torch.tensor([[s.out[-1]] for s in seqs])
        pos = torch.tensor([[s.decode_position] for s in seqs])
        kv = [s.kv for s in seqs]
        slots = slice(0, B) if kv == list(range(B)) else torch.tensor(kv)
        layout = BatchLayout.build(self._rows(seqs), 1)
        logits_index = torch.arange(B)
        return self.model(ids, positions=pos, cache=self.cache, cache_slots=slots,
                          hook=layout.hook(self.backend, logits_index), logits_index=logits_index)

    def _emit(self, seqs: list[Seq], tokens: list[int | RowFailure]) -> None:
        now = time.perf_counter()
        for s, tok in zip(seqs, tokens, strict=True):
            if isinstance(tok, RowFailure):
                self._fail(s, f"{self._blame(s)}: {tok}")
                continue
            try:
                self._append(s, tok, now)
            except Exception as e:  # noqa: BLE001 (e.g. its detokenizer: this request fails, not the step)
                self._fail(s, f"{self._blame(s)}: token {tok} could not be emitted: {type(e).__name__}: {e}")

    def _append(self, s: Seq, tok: int, now: float) -> None:
        """Add a sampled token to `s`: timings, stop and length rules, its event."""
        if s.t_first is None:
            s.t_first = now
            self.ttft.append(now - s.t_submit)
        elif s.out:
            self.itl.append(now - s.t_last)
        s.t_last = now
        s.out.append(tok)
        self.counters["generated_tokens"] += 1
        is_stop_token = tok in s.stop_ids
        hit_stop_string = s.detok.push(tok, visible=not is_stop_token) if s.detok else False
        if is_stop_token or hit_stop_string:
            self._finish(s, FinishReason.STOP)
        elif len(s.out) >= s.req.params.max_tokens or s.prompt_len + len(s.out) >= self.config.max_model_len:
            self._finish(s, FinishReason.LENGTH)
        if s.on_event is not None:
            text = s.detok.take(final=s.finish is not None) if s.detok else ""
            self._notify(s, TokenEvent(s.req.request_id, tok, text, s.finish, s.prompt_len, len(s.out), s.error))

    def _notify(self, s: Seq, ev: TokenEvent) -> None:
        """Deliver an event; a failing listener (e.g. a closed event loop) aborts its request, never the engine."""
        try:
            s.on_event(ev)
        except Exception as e:  # noqa: BLE001 (any listener failure)
            log.warning("request %s: event listener failed (%s); aborting it", s.req.request_id, e)
            s.on_event = None
            s.aborted = True

    def _finish(self, s: Seq, reason: FinishReason) -> None:
        if s.finish is None:
            s.finish = reason

    def _retire(self) -> None:
        if not any(s.finish is not None for s in self.running):
            return
        survivors = []
        for s in self.running:
            if s.finish is None:
                survivors.append(s)
                continue
            if s.finish in (FinishReason.ERROR, FinishReason.ABORT):
                self._scrub(s)
            if s.lease is not None:
                self.adapters.release(s.lease)
                s.lease = None
            self._complete(s)
        for i, s in enumerate(survivors):
            if s.kv != i:  # compaction: move the sequence's cached keys/values down to slot i
                n = s.computed + max(len(s.out) - 1, 0)
                self.cache.k[:, i, :, :n] = self.cache.k[:, s.kv, :, :n]
                self.cache.v[:, i, :, :n] = self.cache.v[:, s.kv, :, :n]
                s.kv = i
        self.running = survivors

    def _scrub(self, s: Seq) -> None:
        """Zero the KV positions a failed or aborted sequence may have written (possibly inf/NaN, or never checked
        by a logit): a later sequence in this cache slot reads them masked, and 0 * NaN is NaN."""
        n = min(s.prompt_len + len(s.out), self.cache.max_len)
        self.cache.k[:, s.kv, :, :n].zero_()
        self.cache.v[:, s.kv, :, :n].zero_()

    def _complete(self, s: Seq) -> None:
        """Publish the final output (and a final event for requests that never reached the model)."""
        now = time.perf_counter()
        text = (s.detok.text if s.detok else "")
        s.result = RequestOutput(
            request_id=s.req.request_id, adapter=s.req.adapter, prompt_tokens=s.prompt_len, token_ids=list(s.out),
            text=text, finish_reason=s.finish, time_to_first_token=(s.t_first or now) - s.t_submit,
            latency=now - s.t_submit, error=s.error,
        )
        if s.on_event is not None and (not s.out or s.finish in (FinishReason.ABORT, FinishReason.ERROR)):
            self._notify(s, TokenEvent(s.req.request_id, None, s.detok.take(final=True) if s.detok else "", s.finish,
                                       s.prompt_len, len(s.out), s.error))
        self.counters["finished"] += 1
        with self._lock:
            self._by_id.pop(s.req.request_id, None)
        s.done.set()

    # ------------------------------------------------------------------ driving
    def generate(self, requests: list[Request]) -> list[RequestOutput]:
        """Run requests to completion (in this thread unless the background loop is running)."""
        handles = [self.submit(r) for r in requests]
        if self._thread is None:
            while not all(h.done.is_set() for h in handles):
                if not self.step():
                    time.sleep(0.002)  # waiting for an adapter load
        else:
            for h in handles:
                h.done.wait()
        return [h.result for h in handles]

    @classmethod
    def spawn(cls, build: Callable[[], Engine]) -> Engine:
        """`build()` an engine on a new thread that then runs its step loop (as `start` would), and return it once
        built (or raise what `build` raised). Use it when the engine will run in the background anyway: the model
        is then loaded and run on one thread.

        The calling thread's idle OpenMP team, if its earlier torch ops made one, is released first
        (`native.openmp.release_team`): with it, the process has more OpenMP threads than cores, libgomp stops
        spinning between parallel regions, and every region of the step loop waits for its workers to wake
        (SmolLM2 bf16 at batch 32 on a 2-core AMD EPYC: 203-250 tokens/s instead of 359-374, the cause of the
        1.6x an engine loaded on one thread and stepped on another lost before). A caller that goes on running
        multi-threaded torch ops makes a new team and slows the loop again."""
        openmp.release_team()
        built: dict[str, object] = {}
        ready = threading.Event()

        def run() -> None:
            try:
                engine = build()
            except BaseException as e:  # noqa: BLE001 (re-raised on the caller's thread)
                built["error"] = e
                ready.set()
                return
            engine._thread = threading.current_thread()
            built["engine"] = engine
            ready.set()
            engine._loop()

        threading.Thread(target=run, name="deltafleet-engine", daemon=True).start()
        ready.wait()
        if "error" in built:
            raise built["error"]
        return built["engine"]

    def start(self) -> None:
        """Run the step loop on a background thread (needed by `stream`). An engine that will only ever run in the
        background is faster built by `Engine.spawn` (see there). Releases the calling thread's idle OpenMP team
        (see `spawn`)."""
        if self._thread is None:
            openmp.release_team()
            self._thread = threading.Thread(target=self._loop, name="deltafleet-engine", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        """The step loop is running (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def _loop(self) -> None:
        while not (self._stopping and not self.running and not self.waiting and not self._inbox):
            try:
                worked = self.step()
            except Exception as e:  # noqa: BLE001 (the loop must outlive a failed step)
                log.exception("engine step failed; failing the running requests")
                self._fail_running(f"engine step failed: {type(e).__name__}: {e}")
                continue
            if not worked:
                self._wake.wait(timeout=0.02)
                self._wake.clear()

    @torch.inference_mode()
    def _fail_running(self, message: str) -> None:
        with self._step_lock:
            for s in self.running:
                self._fail(s, message)
            self._retire()

    async def stream(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Per-token events for one request (submitted at the first iteration). Leaving early aborts it."""
        self.start()
        events = AsyncStream(self, request)
        try:
            async for ev in events:
                yield ev
        finally:
            events.abort()

    def shutdown(self, deadline: float = 30.0) -> None:
        """Refuse new requests, let running ones finish within `deadline` seconds, abort the rest."""
        self._stopping = True
        self._wake.set()
        end = time.monotonic() + deadline
        while (self.running or self.waiting or self._inbox) and time.monotonic() < end:
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.01)
        with self._lock:
            pending = list(self._by_id.values())
        for s in pending:
            self.abort(s.req.request_id)
        if self._thread is None:
            self.step()
        else:
            self._wake.set()
            self._thread.join(timeout=5)
        self.adapters.shutdown()

    def stats(self) -> dict:
        return {"waiting": len(self.waiting) + len(self._inbox), "running": len(self.running),
                "max_batch": self.max_batch, "resident_adapters": self.adapters.resident_count,
                **self.counters, "adapter_cache": vars(self.adapters.stats).copy()}
