"""`deltafleet bench peer` without llama.cpp or a network: parsing of canned server output, the figures, the
command lines it builds, the sdist handling and the command's argument checks."""

from __future__ import annotations

import asyncio
import io
import re
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltafleet.bench.loadgen import SSEDecoder
from deltafleet.bench.peer import (
    NEAR_TIE,
    CheckCase,
    PeerConfig,
    case_row,
    cpu_info,
    failures,
    parse_choices,
    quick_config,
)
from deltafleet.bench.peer_build import (
    cmake_build_command,
    cmake_configure_command,
    extract_vendor,
    llamacpp_command,
    parse_build_progress,
    peer_build,
    sdist_entry,
)
from deltafleet.bench.peer_client import (
    StreamResult,
    parse_chunk,
    phase_figures,
    ratio,
    stream_completion,
    tally,
    throughput_ratios,
)
from deltafleet.bench.peer_workload import (
    agreeing_tokens,
    agreeing_tokens_text,
    deltafleet_body,
    llamacpp_body,
    make_prompt,
    phase_plan,
    phase_prompts,
    rescale_lora_b,
    rms,
)
from deltafleet.cli import app

# llama-server from llama-cpp-python 0.3.36's sources, POST /v1/completions with stream and include_usage, as
# captured (the model's path shortened): two tokens, then the final chunk with usage and timings, then [DONE].
_LLAMA_HEAD = b'data: {"choices":[{"text":'
_LLAMA_TAIL = (b',"created":1796208881,"model":"/m/smollm2-bf16.gguf","system_fingerprint":"b0-unknown",'
               b'"object":"text_completion"')
LLAMACPP_STREAM = (
    _LLAMA_HEAD + b'" to","index":0,"logprobs":null,"finish_reason":null}]' + _LLAMA_TAIL
    + b',"id":"chatcmpl-5XaPjeB9Q0hlE7HSEwfBxKkjTEM3Qx6Q"}\n\n'
    + _LLAMA_HEAD + b'" read","index":0,"logprobs":null,"finish_reason":null}]' + _LLAMA_TAIL
    + b',"id":"chatcmpl-5XaPjeB9Q0hlE7HSEwfBxKkjTEM3Qx6Q"}\n\n'
    + _LLAMA_HEAD + b'"","index":0,"logprobs":null,"finish_reason":"length"}]' + _LLAMA_TAIL
    + b',"usage":{"completion_tokens":2,"prompt_tokens":3,"total_tokens":5,"prompt_tokens_details":{"cached_tokens":0}}'
    b',"id":"chatcmpl-5XaPjeB9Q0hlE7HSEwfBxKkjTEM3Qx6Q","timings":{"cache_n":0,"prompt_n":3,"prompt_ms":27.786,'
    b'"prompt_per_token_ms":9.262,"prompt_per_second":107.96804145972791,"predicted_n":2,"predicted_ms":16.91,'
    b'"predicted_per_token_ms":16.91,"predicted_per_second":59.13660555884092}}\n\n'
    b'data: [DONE]\n\n'
)
# deltafleet serve, the same request: a chunk per piece of text, the last with finish_reason, usage, [DONE].
DELTAFLEET_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"base","choices":[{"index":0,'
    b'"text":" to","logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"base","choices":[{"index":0,'
    b'"text":" read","logprobs":null,"finish_reason":"length"}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"base","choices":[],'
    b'"usage":{"prompt_tokens":41,"completion_tokens":2,"total_tokens":43}}\n\n'
    b'data: [DONE]\n\n'
)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# ---------------------------------------------------------------------- stream parsing
@pytest.mark.parametrize("stream", [LLAMACPP_STREAM, DELTAFLEET_STREAM], ids=["llama.cpp", "deltafleet"])
@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_stream_events_in_any_split(stream, piece):
    res, texts, sse = StreamResult(status=200), [], SSEDecoder()
    for i in range(0, len(stream), piece):
        for payload in sse.feed(stream[i:i + piece]):
            tally(res, payload, float(i), texts)
    res.text = "".join(texts)
    assert res.ok and res.done
    assert res.text == " to read"
    assert res.tokens == 2 and res.usage_tokens == 2
    assert len(res.event_times) == 2  # the empty final text is not a token event


def test_parse_chunk_error_and_done():
    assert parse_chunk(b"[DONE]").done
    err = parse_chunk(b'{"error":{"code":500,"message":"lora id out of range","type":"server_error"}}')
    assert err.error == "lora id out of range"
    assert parse_chunk(b'{"error":"plain"}').error == "plain"
    assert parse_chunk(b"[1, 2]").error.startswith("unexpected event")


def _serve_canned(response: bytes):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    return handle


def _chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


@pytest.mark.parametrize("chunked", [True, False])
def test_stream_completion_against_a_canned_server(chunked):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    body = LLAMACPP_STREAM
    response = (head + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(body, 50) if chunked
                else head + b"Connection: close\r\n\r\n" + body)

    async def go():
        server = await asyncio.start_server(_serve_canned(response), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await stream_completion("127.0.0.1", port, {"prompt": [1, 2]})

    res = asyncio.run(go())
    assert res.ok, res.error
    assert (res.status, res.text, res.tokens) == (200, " to read", 2)


def test_stream_completion_reports_http_errors_and_truncation():
    bad = b'HTTP/1.1 400 Bad Request\r\nContent-Length: 23\r\n\r\n{"error":"lora id bad"}'
    cut = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + LLAMACPP_STREAM[:200]

    async def go(response):
        server = await asyncio.start_server(_serve_canned(response), "127.0.0.1", 0)
        async with server:
            return await stream_completion("127.0.0.1", server.sockets[0].getsockname()[1], {})

    r400 = asyncio.run(go(bad))
    assert not r400.ok and r400.status == 400 and "HTTP 400" in r400.error
    rcut = asyncio.run(go(cut))
    assert not rcut.ok and rcut.error == "the stream ended without [DONE]"


# ---------------------------------------------------------------------- figures
def _result(times, tokens=None, ok=True):
    return StreamResult(status=200 if ok else 0, event_times=list(times), usage_tokens=tokens, done=ok,
                        error=None if ok else "ConnectionError: reset")


def test_phase_figures():
    rs = [_result([0.1, 0.2, 0.4], 3), _result([0.3, 0.35, 0.45], 3), _result([], ok=False)]
    f = phase_figures(rs, seconds=2.0)
    assert (f["requests"], f["ok"], f["output_tokens"], f["output_tok_s"]) == (3, 2, 6, 3.0)
    assert f["errors"] == ["ConnectionError: reset"]
    assert f["ttft_p50_ms"] == 100.0 and f["ttft_p99_ms"] == 300.0  # nearest rank of [0.1, 0.3]
    # gaps pooled: 0.1, 0.2, 0.05, 0.1 -> sorted 0.05, 0.1, 0.1, 0.2
    assert f["itl_p50_ms"] == 100.0 and f["itl_p99_ms"] == 200.0


def test_phase_figures_without_usage_counts_text_events():
    assert phase_figures([_result([0.1, 0.2])], 1.0)["output_tokens"] == 2


def test_ratios():
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 1.0) is None and ratio(1.0, 0) is None

    def run(label, server, base, mixed, engine=None):
        out = {"label": label, "server": server,
               "phases": {"base": {"output_tok_s": base, "ttft_p99_ms": 100.0},
                          "mixed": {"output_tok_s": mixed, "ttft_p99_ms": 150.0}}}
        return out if engine is None else {**out, "engine": {"output_tok_s": engine}}

    runs = [run("deltafleet float32", "deltafleet", 20.0, 18.0, engine=25.0),
            run("llama.cpp f32", "llama.cpp", 80.0, 20.0)]
    r = throughput_ratios(runs)
    assert r["mixed_over_base"] == {"deltafleet float32": 0.9, "llama.cpp f32": 0.25}
    assert r["ttft_p99_mixed_over_base"] == {"deltafleet float32": 1.5, "llama.cpp f32": 1.5}
    assert r["served_base_over_engine"] == {"deltafleet float32": 0.8}
    assert r["deltafleet_over_llamacpp"] == {"deltafleet float32 / llama.cpp f32": {"base": 0.25, "mixed": 0.9}}


def test_failures_name_the_run():
    ok_phase = {"requests": 2, "ok": 2, "errors": []}
    runs = [{"label": "deltafleet float32", "correctness": {"first_token_mismatch": False},
             "phases": {"base": ok_phase, "mixed": {"requests": 2, "ok": 1, "errors": ["HTTP 500"]}}},
            {"label": "llama.cpp f32", "correctness": {"first_token_mismatch": True, "base_equals_zero_scales": False},
             "phases": {"base": ok_phase}}]
    assert failures(runs) == [
        "llama.cpp f32: first generated token differs from transformers + peft",
        "llama.cpp f32: a base request differs from one with every LoRA scale 0",
        "deltafleet float32 mixed: 1 failed requests: ['HTTP 500']"]


def test_case_row_names_the_divergence_and_near_ties():
    c = CheckCase(prompt=[1], adapter=1, reference=[5, 6, 7], margins=[0.025, 2.0, 1.0])
    assert case_row(c, 3, NEAR_TIE["bf16"]) == {"adapter": "lora1", "agree": 3, "of": 3, "first_divergence": None,
                                                "reference_margin": None, "near_tie": False}
    first = case_row(c, 0, NEAR_TIE["bf16"])
    assert (first["first_divergence"], first["reference_margin"], first["near_tie"]) == (0, 0.025, True)
    assert not case_row(c, 0, NEAR_TIE["f32"])["near_tie"]  # in fp32 a margin of 0.025 is no excuse
    assert case_row(c, 1, NEAR_TIE["bf16"])["reference_margin"] == 2.0


# ---------------------------------------------------------------------- workload
def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_prompts_have_the_length_and_differ_from_the_start():
    ps = phase_prompts(_encode, "base", 32, 41)
    assert all(len(p) == 41 for p in ps)
    assert len({tuple(p[:9]) for p in ps}) == 32  # "[" + 8 hex digits: unique per request
    assert make_prompt(_encode, "abc", 500)[:5] == _encode("[abc]")  # filler repeats past its length
    assert phase_prompts(_encode, "mixed", 1)[0] != phase_prompts(_encode, "base", 1)[0]


def test_phase_plan_round_robin_and_bodies():
    prompts = [[i] for i in range(10)]
    plan = phase_plan(prompts, 10, 4, 32, llamacpp_body)
    assert [b.get("lora") for b in plan[:5]] == [[{"id": k, "scale": 1.0}] for k in (0, 1, 2, 3, 0)]
    assert all(b["ignore_eos"] and b["stream"] and b["cache_prompt"] is False and b["temperature"] == 0 for b in plan)
    base = phase_plan(prompts, 3, None, 8, deltafleet_body)
    assert [b["model"] for b in base] == ["base"] * 3 and base[2]["prompt"] == [2]
    assert "lora" not in phase_plan(prompts, 1, None, 8, llamacpp_body)[0]
    assert deltafleet_body([1], 5, 8)["model"] == "lora5"
    assert "stream_options" not in deltafleet_body([1], None, 8, False)
    with pytest.raises(ValueError, match="2 prompts for 3 requests"):
        phase_plan(prompts[:2], 3, None, 8, deltafleet_body)


def test_agreement():
    assert agreeing_tokens([1, 2, 3], [1, 2, 3]) == 3
    assert agreeing_tokens([1, 2, 3], [1, 9, 3]) == 1
    assert agreeing_tokens([1, 2, 3], [7]) == 0
    vocab = {1: " to", 2: " read", 3: "\xe2", 4: "\x82\xac"}  # 3 + 4: one character in two byte tokens

    def decode(ids):
        return b"".join(vocab[i].encode("latin-1") for i in ids).decode("utf-8", errors="replace")

    assert agreeing_tokens_text([1, 2], " to read", decode) == 2
    assert agreeing_tokens_text([1, 2], " to go", decode) == 1
    assert agreeing_tokens_text([1, 3, 4], " to\u20ac", decode) == 3  # the half character decides nothing
    assert agreeing_tokens_text([1, 3, 4], " to!", decode) == 1


def test_rescaled_lora_delta_has_the_asked_rms():
    g = torch.Generator().manual_seed(0)
    A, B, W = torch.randn(16, 40, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, 40, generator=g)
    B2 = rescale_lora_b(A, B, 2.0, rms(W * 0.02), 0.2)
    torch.testing.assert_close(torch.tensor(rms(2.0 * B2 @ A)), torch.tensor(0.2 * rms(W * 0.02)), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------- build and server command lines
def test_cmake_configure_downloads_nothing_and_builds_only_the_server():
    cmd = cmake_configure_command(Path("/s"), Path("/b"))
    assert cmd[:7] == ["cmake", "-S", "/s", "-B", "/b", "-G", "Ninja"]
    for opt in ("-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"):
        assert opt in cmd
    assert "-G" not in cmake_configure_command(Path("/s"), Path("/b"), generator=None)
    assert cmake_build_command(Path("/b")) == ["nice", "-n", "19", "cmake", "--build", "/b", "--target",
                                               "llama-server", "-j", "2"]
    assert cmake_build_command(Path("/b"), jobs=1, niceness=0)[0] == "cmake"
    with pytest.raises(ValueError, match="jobs=0"):
        cmake_build_command(Path("/b"), jobs=0)


def test_parse_build_progress():
    assert parse_build_progress("[12/206] Building CXX object src/llama.cpp.o") == (12, 206)
    assert parse_build_progress("[ 45%] Building CXX object src/llama.cpp.o") == (45, 100)
    assert parse_build_progress("-- Configuring done") is None


def test_cache_layout(tmp_path):
    b = peer_build("0.3.36", tmp_path)
    assert b.server == tmp_path / "build" / "bin" / "llama-server"
    assert not b.built


def test_sdist_entry():
    pypi = {"releases": {"0.3.36": [
        {"packagetype": "bdist_wheel", "url": "x.whl", "digests": {"sha256": "w"}},
        {"packagetype": "sdist", "url": "../../packages/ab/llama_cpp_python-0.3.36.tar.gz",
         "digests": {"sha256": "s"}}]}}
    url, sha = sdist_entry(pypi, "0.3.36", "https://pypi.org/pypi/llama-cpp-python/json")
    assert (url, sha) == ("https://pypi.org/packages/ab/llama_cpp_python-0.3.36.tar.gz", "s")
    with pytest.raises(RuntimeError, match="0.0.1: not in the PyPI index"):
        sdist_entry(pypi, "0.0.1")


def _tarball(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extract_vendor_keeps_only_llama_cpp(tmp_path):
    tgz = _tarball(tmp_path / "s.tar.gz", {"pkg-1/setup.py": b"x", "pkg-1/vendor/llama.cpp/CMakeLists.txt": b"c",
                                           "pkg-1/vendor/llama.cpp/src/a.cpp": b"a", "pkg-1/vendor/other/b": b"b"})
    out = extract_vendor(tgz, tmp_path / "llama.cpp")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["CMakeLists.txt", "src/a.cpp"]
    bad = _tarball(tmp_path / "bad.tar.gz", {"pkg-1/vendor/llama.cpp/README.md": b"r"})
    with pytest.raises(RuntimeError, match="no vendor/llama.cpp/CMakeLists.txt"):
        extract_vendor(bad, tmp_path / "other")


def test_llamacpp_command():
    cmd = llamacpp_command(Path("/bin/llama-server"), Path("m.gguf"), [Path("a.gguf"), Path("b.gguf")], "127.0.0.1",
                           8080, 8, 256, 2)
    s = " ".join(cmd)
    assert "-np 8 -c 2048 -t 2 -tb 2" in s and "--host 127.0.0.1 --port 8080" in s
    assert cmd[cmd.index("--lora") + 1] == "a.gguf,b.gguf" and "--lora-init-without-apply" in cmd
    assert "--lora" not in llamacpp_command(Path("s"), Path("m"), [], "127.0.0.1", 1, 1, 256, 1)


def test_cpu_info():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    info = cpu_info(text)
    assert info["model"] == "AMD EPYC 9R14"
    assert info["flags"]["avx512_bf16"] and info["flags"]["avx2"] and not info["flags"]["amx_tile"]
    assert cpu_info("") == {"model": "unknown", "flags": {f: False for f in info["flags"]}}


# ---------------------------------------------------------------------- config and command line
def test_config_validation():
    assert PeerConfig(dtypes=("float32", "bfloat16")).llama_types == ("f32", "bf16")
    assert PeerConfig(gguf_types=("f16",)).llama_types == ("f16",)
    assert quick_config().requests_per_client == 1
    assert PeerConfig().context_per_request == 256 and PeerConfig(max_tokens=300).context_per_request == 512
    with pytest.raises(ValueError, match="clients=0: must be an integer >= 1"):
        PeerConfig(clients=0)
    with pytest.raises(ValueError, match="dtypes=\\('auto',\\)"):
        PeerConfig(dtypes=("auto",))
    with pytest.raises(ValueError, match="gguf_types"):
        PeerConfig(gguf_types=("q4_0",))
    assert parse_choices(["f16,bf16", "f16", " f32 "], ("f32", "f16", "bf16"), "x") == ("f16", "bf16", "f32")
    with pytest.raises(ValueError, match="--dtype 'fp8': must be one of"):
        parse_choices(["fp8"], ("float32",), "--dtype")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float64"], "--dtype 'float64': must be one of auto, float32, bfloat16"),
    (["--gguf-type", "f16,q8_0"], "--gguf-type 'q8_0': must be one of f32, f16, bf16"),
    (["--clients", "0"], "--clients"),
])
def test_command_refuses_bad_options(args, message):
    result = CliRunner().invoke(app, ["bench", "peer", *args])
    assert result.exit_code == 2
    assert message in " ".join(_plain(result.output).replace("│", " ").split())

