"""llama.cpp for `deltafleet bench peer`: build `llama-server` once from source, convert models and LoRAs to GGUF,
and the server's command line.

Sources: the PyPI sdist of llama-cpp-python (it vendors llama.cpp under `vendor/llama.cpp`), fetched through the
PyPI JSON API (`pip download` would build the package's metadata, which needs scikit-build-core) and checked
against a pinned SHA-256. Only `vendor/llama.cpp` is extracted. It is configured so that nothing is downloaded
(no web UI assets, no OpenSSL, no tests or examples) and only the `llama-server` target is built, under
`nice -n 19`. Conversion uses llama.cpp's own `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` with the
`gguf-py` of the same sources on PYTHONPATH, so the GGUF writer matches the server that reads it.

Cache layout, `cache_dir() / "llamacpp" / <version>`:
    llama.cpp/          the extracted sources
    build/              the cmake build tree; build/bin/llama-server
    build.log           the last configure + build output
    build.json          written last: cmake arguments, seconds; its presence means the build is complete
    models/             base-model GGUFs, keyed by the base's fingerprint and the GGUF type
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from deltafleet.store.cache import cache_dir
from deltafleet.store.fingerprint import base_fingerprint

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
PYPI_JSON = "https://pypi.org/pypi/llama-cpp-python/json"
VENDOR_DIR = "vendor/llama.cpp"
GGUF_TYPES = ("f32", "f16", "bf16")

# Every option that would fetch something at configure or build time is off; nothing but the server is built.
CMAKE_OPTIONS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "GGML_NATIVE": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TOOLS": "ON",  # the server lives under tools/; only its target is built
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",  # no npm build of the web UI
    "LLAMA_USE_PREBUILT_UI": "OFF",  # no download of prebuilt UI assets: the server runs without a web UI
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",  # deprecated and ignored in this version; kept for older ones
    "LLAMA_LLGUIDANCE": "OFF",
}

Reporter = Callable[[str, int, int], None]
"""progress(step, done, total): a long step's progress; total 0 when unknown."""


def silent(step: str, done: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class PeerBuild:
    """Where one pinned llama.cpp lives in the cache."""

    version: str
    root: Path

    @property
    def source(self) -> Path:
        return self.root / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def server(self) -> Path:
        return self.build_dir / "bin" / "llama-server"

    @property
    def stamp(self) -> Path:
        return self.root / "build.json"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    @property
    def built(self) -> bool:
        return self.stamp.is_file() and self.server.is_file()


def peer_build(version: str = LLAMA_CPP_PYTHON_VERSION, root: Path | None = None) -> PeerBuild:
    return PeerBuild(version, root if root is not None else cache_dir() / "llamacpp" / version)


def sdist_entry(pypi: dict, version: str, index_url: str = PYPI_JSON) -> tuple[str, str]:
    """(absolute URL, sha256) of `version`'s sdist in a PyPI JSON API answer (`releases` -> files)."""
    files = pypi.get("releases", {}).get(version)
    if not files:
        raise RuntimeError(f"llama-cpp-python {version}: not in the PyPI index")
    for f in files:
        if f.get("packagetype") == "sdist":
            return urljoin(index_url, f["url"]), f["digests"]["sha256"]
    raise RuntimeError(f"llama-cpp-python {version}: the PyPI index lists no sdist")


def download(url: str, dest: Path, sha256: str, progress: Reporter = silent) -> Path:
    """Stream `url` to `dest`, refusing it unless its SHA-256 is `sha256`."""
    h = hashlib.sha256()
    part = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=120) as r, part.open("wb") as f:
        total, done = int(r.headers.get("Content-Length") or 0), 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            h.update(chunk)
            done += len(chunk)
            progress("download sdist (MB)", done >> 20, total >> 20)
    if h.hexdigest() != sha256:
        part.unlink()
        raise RuntimeError(f"{url}: sha256 {h.hexdigest()} != the expected {sha256}")
    part.replace(dest)
    return dest


def extract_vendor(tarball: Path, dest: Path, progress: Reporter = silent) -> Path:
    """Extract only `<top>/vendor/llama.cpp/**` of the sdist into `dest` (atomic: a temporary sibling renamed)."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    with tarfile.open(tarball) as tar:
        members = []
        for m in tar.getmembers():
            top, _, rest = m.name.partition("/")
            if rest.startswith(VENDOR_DIR + "/") and (m.isfile() or m.isdir() or m.issym()):
                m.name = rest[len(VENDOR_DIR) + 1:]
                members.append(m)
        for i, m in enumerate(members):
            tar.extract(m, tmp, filter="data")
            progress("extract llama.cpp", i + 1, len(members))
    if not (tmp / "CMakeLists.txt").is_file():
        shutil.rmtree(tmp)
        raise RuntimeError(f"{tarball}: no {VENDOR_DIR}/CMakeLists.txt in the sdist")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return dest


def cmake_configure_command(source: Path, build_dir: Path, options: dict[str, str] = CMAKE_OPTIONS,
                            generator: str | None = "Ninja") -> list[str]:
    """`cmake -S source -B build_dir [-G generator] -DKEY=VALUE ...` (options in a stable, sorted order)."""
    cmd = ["cmake", "-S", str(source), "-B", str(build_dir)]
    if generator:
        cmd += ["-G", generator]
    return cmd + [f"-D{k}={v}" for k, v in sorted(options.items())]


def cmake_build_command(build_dir: Path, target: str = "llama-server", jobs: int = 2, niceness: int = 19) -> list[str]:
    """`nice -n niceness cmake --build build_dir --target target -j jobs` (niceness 0: no nice)."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: must be >= 1")
    cmd = ["cmake", "--build", str(build_dir), "--target", target, "-j", str(jobs)]
    return (["nice", "-n", str(niceness)] if niceness else []) + cmd


_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE = re.compile(r"^\[\s*(\d+)%\]")


def parse_build_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a build line: ninja's `[12/345] ...` or make's `[ 45%] ...` (as (45, 100))."""
    if m := _NINJA.match(line):
        return int(m[1]), int(m[2])
    if m := _MAKE.match(line):
        return int(m[1]), 100
    return None


def _run_logged(cmd: list[str], log, step: str, progress: Reporter) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        tail = (tail + [line.rstrip()])[-30:]
        if (p := parse_build_progress(line)) is not None:
            progress(step, *p)
    if proc.wait() != 0:
        log.flush()
        raise RuntimeError(f"{step} failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))


def ensure_server(build: PeerBuild | None = None, jobs: int = 2, progress: Reporter = silent,
                  log: Callable[[str], None] = print) -> PeerBuild:
    """The built `llama-server` of `build` (default: the pinned version), building it first if needed."""
    build = build or peer_build()
    if build.built:
        return build
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama.cpp needs {tool!r} on PATH")
    build.root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (build.source / "CMakeLists.txt").is_file():
        with urllib.request.urlopen(PYPI_JSON, timeout=60) as r:
            url, sha = sdist_entry(json.load(r), build.version)
        if build.version in SDIST_SHA256 and sha != SDIST_SHA256[build.version]:
            raise RuntimeError(f"PyPI lists sha256 {sha} for llama-cpp-python {build.version}, pinned "
                               f"{SDIST_SHA256[build.version]}")
        log(f"downloading {url}")
        tarball = download(url, build.root / Path(url).name, sha, progress)
        extract_vendor(tarball, build.source, progress)
        tarball.unlink()
    generator = "Ninja" if shutil.which("ninja") else None
    configure = cmake_configure_command(build.source, build.build_dir, generator=generator)
    compile_ = cmake_build_command(build.build_dir, jobs=jobs)
    log(f"building llama-server {build.version} in {build.build_dir} (-j {jobs}, nice 19; log {build.log})")
    with build.log.open("w") as f:
        _run_logged(configure, f, "configure", progress)
        _run_logged(compile_, f, "build llama-server", progress)
    if not build.server.is_file():
        raise RuntimeError(f"the build finished without {build.server}")
    seconds = round(time.perf_counter() - t0, 1)
    build.stamp.write_text(json.dumps({"version": build.version, "configure": configure, "build": compile_,
                                       "seconds": seconds}, indent=2))
    log(f"built {build.server} in {seconds:.0f} s")
    return build


def _convert_env(build: PeerBuild) -> dict[str, str]:
    paths = [str(build.source / "gguf-py"), str(build.source), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _convert(build: PeerBuild, args: list[str], out: Path) -> Path:
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None:  # convert_hf_to_gguf imports it for every Llama model
        raise RuntimeError("llama.cpp's converters need sentencepiece: pip install -e '.[peer]'")
    part = out.with_name(out.name + ".part")
    r = subprocess.run([sys.executable, *args, "--outfile", str(part)], env=_convert_env(build),
                       capture_output=True, text=True)
    if r.returncode != 0 or not part.is_file():
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {r.returncode}):\n" + r.stderr[-3000:])
    part.replace(out)
    return out


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf type {gguf_type!r}: must be one of {', '.join(GGUF_TYPES)}")
    return gguf_type


def base_gguf(build: PeerBuild, hf_dir: Path, gguf_type: str) -> Path:
    """The base model (HF directory) as a GGUF of `gguf_type`, converted once per base fingerprint."""
    fp = base_fingerprint(hf_dir).removeprefix("sha256:")
    out = build.root / "models" / f"{hf_dir.name}-{fp}-{check_gguf_type(gguf_type)}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return _convert(build, [str(build.source / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", gguf_type], out)


def lora_gguf(build: PeerBuild, adapter_dir: Path, hf_dir: Path, out: Path, gguf_type: str) -> Path:
    """A peft LoRA directory as a llama.cpp LoRA GGUF (`convert_lora_to_gguf.py --base hf_dir`)."""
    return _convert(build, [str(build.source / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(hf_dir),
                            "--outtype", check_gguf_type(gguf_type)], out)


def llamacpp_command(server: Path, model: Path, loras: Sequence[Path], host: str, port: int, parallel: int,
                     ctx_per_slot: int, threads: int) -> list[str]:
    """llama-server with `parallel` slots of `ctx_per_slot` tokens, every LoRA loaded but not applied, no prompt
    cache, no web UI."""
    cmd = [str(server), "-m", str(model), "--host", host, "--port", str(port), "-np", str(parallel),
           "-c", str(parallel * ctx_per_slot), "-t", str(threads), "-tb", str(threads), "--no-webui",
           "--cache-ram", "0", "--no-cache-prompt"]
    if loras:
        cmd += ["--lora", ",".join(str(p) for p in loras), "--lora-init-without-apply"]
    return cmd
