"""The quantized BGMV (`native/qlora_cpu.c`) before and after its AVX512-BF16 path, in one process, alternated:
the source at commit a1675c3 (AVX2 fp32 rows only) against the working tree's, both built with the project's
flags. 32 bf16 decode rows on SmolLM2's `ft` shapes at 1/64 (2-bit bands of the ranks `bench density` uses,
group 128): 32 distinct slots, and one slot on every row; medians of 7 (README: Tenant density).
    python results/serve/qlora_bf16dp_ab.py > results/serve/qlora_bf16dp_ab.txt"""
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.native.test_qlora_kernel import _pool  # noqa: E402

from deltafleet import native  # noqa: E402
from deltafleet.dtypes import cpu_flags  # noqa: E402

tmp = Path(tempfile.mkdtemp())
old_src = tmp / "qlora_old.c"
old_src.write_text(subprocess.run(["git", "show", "a1675c3:src/deltafleet/native/qlora_cpu.c"], capture_output=True,
                                  text=True, check=True).stdout)
fns = {}
for name, src in [("before", old_src), ("after", native.SOURCE_DIR / "qlora_cpu.c")]:
    so = tmp / f"{name}.so"
    subprocess.run(["cc", *native.CFLAGS, f"-I{native.SOURCE_DIR}", str(src), "-o", str(so)], check=True)
    fns[name] = ctypes.CDLL(str(so)).qlora_bgmv
    fns[name].argtypes = native._QLORA_ARGS["qlora_bgmv"]
print(f"CPU {'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}, {torch.get_num_threads()} threads;"
      f" this build's path: {native.qlora_path()}")
SHAPES = {"q/o (576->576, r32)": (576, 576, 32), "gate/up (576->1536, r47)": (576, 1536, 47),
          "down (1536->576, r47)": (1536, 576, 47), "LM head (576->49152, r59)": (576, 49152, 59)}
for label, (i, o, r) in SHAPES.items():
    t, null = _pool([((2, r),)] * 32, in_f=i, out_f=o, group=128, seed=1)
    for case, index in [("32 distinct", torch.arange(32)), ("1 slot x32", torch.zeros(32, dtype=torch.long))]:
        x = torch.randn(32, i).bfloat16()
        times, outs = {k: [] for k in fns}, {}
        for _ in range(7):
            for k, fn in fns.items():
                y = torch.zeros(32, o).bfloat16()
                t0 = time.perf_counter()
                fn(32, i, o, t["bits"].shape[1], 128, x.data_ptr(), i, y.data_ptr(), o, 1, t["bits"].data_ptr(),
                   t["aoff"].data_ptr(), t["boff"].data_ptr(), t["data"].data_ptr(), t["data"].stride(0),
                   t["ascale"].data_ptr(), t["abias"].data_ptr(), t["bscale"].data_ptr(), t["bbias"].data_ptr(),
                   index.data_ptr(), null)
                times[k].append(time.perf_counter() - t0)
                outs[k] = y.float()
        med = {k: sorted(v)[3] * 1e3 for k, v in times.items()}
        diff = float((outs["after"] - outs["before"]).abs().max() / outs["before"].abs().max())
        print(f"{label:27s} {case:11s} before {med['before']:7.3f} ms  after {med['after']:7.3f} ms  "
              f"x{med['before'] / med['after']:.2f}  max|diff| / max {diff:.1e}")
