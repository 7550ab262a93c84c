"""Coverage-guided fuzzing of deltafleet's on-disk readers with atheris (libFuzzer), one target per reader.

    python fuzz/fuzz_readers.py --list
    python fuzz/fuzz_readers.py peft-lora --seconds 60          # one target (its files share the time)
    python fuzz/fuzz_readers.py peft-lora --file adapter_config.json --seconds 60     # one file of it
    python fuzz/fuzz_readers.py all --seconds 60                # every target in turn (`make fuzz`)
    python fuzz/fuzz_readers.py manifest --no-atheris           # random mutations under plain Python
    python fuzz/fuzz_readers.py safetensors -- -jobs=2          # extra libFuzzer flags after --

The targets and their valid seed artifacts are `tests/fuzz/artifacts.py`'s (shared with the hypothesis tests). An
input is the new content of one file of the artifact (`--file`; libFuzzer runs one file per process, seeded with the
file as written). The contract: the reader returns or raises a `DeltafleetError`; anything else (or an input
running past `--timeout` seconds) is a finding, saved under `--out` for replay (`--replay INPUT --file FILE`).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests.fuzz.artifacts`: the targets and their seeds

DICT = Path(__file__).with_name("readers.dict")


def _import_readers(atheris=None) -> None:
    """Import every deltafleet module the readers use (instrumented for coverage when fuzzing under atheris)."""
    modules = ("deltafleet.adapters", "deltafleet.adapters.io", "deltafleet.adapters.delta_format",
               "deltafleet.quant.base", "deltafleet.models.loading", "deltafleet.serve.http.tenancy",
               "deltafleet.store.manifest", "deltafleet.store.safetensors_io")
    import importlib

    if atheris is None:
        for m in modules:
            importlib.import_module(m)
        return
    with atheris.instrument_imports(include=["deltafleet"]):
        for m in modules:
            importlib.import_module(m)


class Harness:
    """A target's seed artifact in a work directory; `run(rel, data)` replaces file `rel`, reads, restores it."""

    def __init__(self, name: str, work: Path):
        from tests.fuzz.artifacts import TARGETS

        self.target = TARGETS[name]
        self.dir = work / name
        self.dir.mkdir(parents=True)
        self.target.build(self.dir)
        self.originals = {rel: (self.dir / rel).read_bytes() for rel in self.target.files}
        self.manifest = (self.dir / "deltafleet.json").read_bytes() if self.target.rehash else b""

    def run(self, rel: str, data: bytes) -> None:
        from tests.fuzz.artifacts import rehash

        from deltafleet.errors import DeltafleetError

        path = self.dir / rel
        path.write_bytes(data)
        try:
            if self.target.rehash and not rel.endswith(".json"):
                rehash(self.dir)
            self.target.read(self.dir)
        except DeltafleetError:
            pass
        finally:
            path.write_bytes(self.originals[rel])
            if self.target.rehash:
                (self.dir / "deltafleet.json").write_bytes(self.manifest)


# ---------------------------------------------------------------------------------------------- plain Python
def _tokens() -> list[bytes]:
    """The libFuzzer dictionary's tokens (`name="value"` lines)."""
    out = []
    for line in DICT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            value = line.split("=", 1)[1].strip()[1:-1]
            out.append(value.encode().decode("unicode_escape").encode("latin-1"))
    return out


def mutate(rng: random.Random, data: bytes, tokens: list[bytes]) -> bytes:
    """1-4 byte-level edits: truncate, flip, overwrite, insert a token or random bytes, delete."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op, i = rng.randrange(6), rng.randint(0, len(out))
        if op == 0:
            del out[i:]
        elif op == 1 and out:
            out[min(i, len(out) - 1)] ^= rng.randint(1, 255)
        elif op == 2:
            chunk = rng.randbytes(rng.randint(1, 8))
            out[i:i + len(chunk)] = chunk
        elif op == 3:
            out[i:i] = rng.choice(tokens)
        elif op == 4:
            del out[i:i + rng.randint(1, 32)]
        else:
            out[i:i] = rng.randbytes(rng.randint(1, 8))
    return bytes(out)


def _alarm(signum, frame):
    raise TimeoutError("the reader ran past --timeout seconds (a hang)")


def fuzz_plain(harness: Harness, files: list[str], seconds: float, timeout: int, out: Path, seed: int) -> int:
    """Random mutations of the seed files and of inputs that passed, under plain Python; returns an exit status."""
    rng, tokens = random.Random(seed), _tokens()
    pool = [(rel, harness.originals[rel]) for rel in files]
    signal.signal(signal.SIGALRM, _alarm)
    start, execs = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        rel, data = rng.choice(pool)
        data = mutate(rng, data, tokens)
        signal.alarm(timeout)
        try:
            harness.run(rel, data)
        except BaseException as e:
            signal.alarm(0)
            if isinstance(e, KeyboardInterrupt):
                raise
            path = out / f"crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            print(f"FINDING after {execs} inputs: {type(e).__name__}: {e}\n  input saved to {path} (replay: python "
                  f"{Path(__file__).relative_to(ROOT)} {harness.target.name} --file {rel} --replay {path})")
            return 1
        signal.alarm(0)
        execs += 1
        if len(pool) < 256 and rng.random() < 0.05:
            pool.append((rel, data))
    print(f"{harness.target.name}: {execs} inputs in {seconds:.0f} s under plain Python, no finding")
    return 0


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    from tests.fuzz.artifacts import TARGETS

    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", help=f"one of {sorted(TARGETS)}, or 'all'")
    p.add_argument("--list", action="store_true", help="print the targets and their files")
    p.add_argument("--file", help="the file of the target's artifact to fuzz (default: each in turn)")
    p.add_argument("--seconds", type=float, default=60, help="fuzzing time per target (default 60)")
    p.add_argument("--timeout", type=int, default=30, help="seconds one input may take before it counts as a hang")
    p.add_argument("--no-atheris", action="store_true", help="random mutations under plain Python")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "deltafleet-fuzz",
                   help="where corpora and findings go (default: $TMPDIR/deltafleet-fuzz)")
    p.add_argument("--replay", type=Path, help="run one saved input and show what it raises")
    p.add_argument("--seed", type=int, default=0, help="random seed of --no-atheris")
    a = p.parse_args(argv)
    if a.list or not a.target:
        print("\n".join(f"{n}: {' '.join(TARGETS[n].files)}" for n in sorted(TARGETS)))
        return 0
    if a.target == "all":
        flags = ["--seconds", str(a.seconds), "--timeout", str(a.timeout), "--out", str(a.out)]
        flags += ["--no-atheris"] if a.no_atheris else []
        failed = [name for name in sorted(TARGETS)
                  if subprocess.run([sys.executable, __file__, name, *flags, "--", *extra]).returncode]
        print(f"fuzzed {len(TARGETS)} targets for {a.seconds:.0f} s each; findings in: {failed or 'none'}")
        return 1 if failed else 0
    if a.target not in TARGETS:
        p.error(f"unknown target {a.target!r}; targets: {sorted(TARGETS)}")
    files = list(TARGETS[a.target].files)
    if a.file is not None and a.file not in files:
        p.error(f"target {a.target!r} has files {files}, not {a.file!r}")
    try:
        import atheris
    except ImportError:
        atheris = None
        if not a.no_atheris and not a.replay:
            print("atheris is not installed (pip install atheris): fuzzing with random mutations (--no-atheris)")
    plain = a.no_atheris or atheris is None or a.replay
    if not plain and a.file is None:  # libFuzzer keeps one seed per coverage: one process per file
        flags = ["--seconds", str(a.seconds / len(files)), "--timeout", str(a.timeout), "--out", str(a.out)]
        cmd = [sys.executable, __file__, a.target, *flags]
        failed = [rel for rel in files if subprocess.run([*cmd, "--file", rel, "--", *extra]).returncode]
        return 1 if failed else 0
    out = a.out / a.target / (a.file or "all").replace("/", "_")
    out.mkdir(parents=True, exist_ok=True)
    _import_readers(None if plain else atheris)
    logging.disable(logging.WARNING)  # loaders warn on valid inputs (e.g. extras not served): not findings
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{a.target}-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    harness = Harness(a.target, work)
    if a.replay:
        if a.file is None:
            p.error("--replay needs --file: which file of the artifact the input replaces")
        harness.run(a.file, a.replay.read_bytes())
        print("no finding: the reader returned or raised a documented error")
        return 0
    if plain:
        return fuzz_plain(harness, [a.file] if a.file else files, a.seconds, a.timeout, out, a.seed)
    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "seed").write_bytes(harness.originals[a.file])
    max_len = max(4096, 2 * len(harness.originals[a.file]))
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={max(int(a.seconds), 1)}", f"-timeout={a.timeout}",
                   f"-artifact_prefix={out}/", f"-dict={DICT}", f"-max_len={max_len}", "-rss_limit_mb=8192",
                   "-print_final_stats=1", *extra], lambda data: harness.run(a.file, data))
    atheris.Fuzz()  # runs libFuzzer, which exits the process
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
