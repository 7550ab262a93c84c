"""Microbenchmark of the CPU adapter and dequantization paths on SmolLM2-135M's projection shapes.

    python bench/kernels.py [--threads N] [--batch 32] [--adapters 32] [--rank 16] [--dram] [--gemv] [--sparse]
                            [--sign]

Per decoder layer (the seven projections, shapes from SmolLM2: hidden 576, intermediate 1536, 3 kv heads of
64), for one decode step of `batch` tokens spread over `adapters` distinct LoRA adapters resident in a slot pool:
- grouped: the grouped-matmul path (`torch._grouped_mm` over slot-sorted tokens, then index_add);
- native: the BGMV C kernel (`deltafleet.native.lora_bgmv_`), in place, fp32 pools;
- native-bf16w: the same kernel reading bf16 pools (half the bytes), widening them to fp32 as it reads;
- road-torch / road-native: RoAd's element-wise rotation of the seven outputs, torch ops (the CPU backend's
  fallback) against the native in-place kernel (`deltafleet.native.road_apply_`);
- base: the layer's seven dense fp32 matmuls, for scale;
and, per 1536 x 576 matrix at 2/3/4/8 bits, the quantized-linear kernels `fast`, `native` and `cached` against
nn.Linear. Figures are the best of 15 repeats of 20 calls (robust to a noisy machine), in ms; the weights stay in
cache between calls, so these are op costs, not DRAM-bound step costs (`deltafleet bench engine` measures those).

`--gemv` times only a decode step's dense base matmuls (weights in DRAM), prepacked oneDNN against the native
streaming kernel `deltafleet.native.gemv_`, in bf16 and fp32 at 1-16 rows (the rows below which `PrepackedLinear`
takes the native kernel, `models.prepack.GEMV_ROWS`, come from it).

`--dram` adds one whole decode step in DRAM: 30 layers x 7 projections, each with its own bf16 slot pool (as
the engine holds them, about 300 MB for 32 adapters, far beyond the caches), the native BGMV call per projection
against a streaming read (torch sum) of the same bytes; and the step's base matmuls (210 projections and the
49152-row LM head, fp32) through F.linear against the prepacked oneDNN path (the `PrepackedLinear` modules
`deltafleet.models.prepack` swaps in).
Medians of 9 alternating repeats.

`--sparse` times only PaFi's sparse-additive deltas per projection (one CSR pattern per projection shared by every
slot, `density` of its entries, `batch` tokens over `adapters` slots), in microseconds per call: the native kernel
(`deltafleet.native.BoundSparse`) against the vectorised torch path (gather x[:, cols] * values[index], then
index_add over the nonzeros' rows), fp32 and bf16.

`--sign` times only OneBit's 1-bit linear (`quant.sign_linear.SignLinear`) on a 1536 x 576 matrix at 1, 8 and 32
rows: the native sign-select-add kernel against the `fast` torch path (byte-table unpack, then matmul) and the
`cached` dense ±1 matrix, beside the 4-bit `QuantLinear` (native dequantizer) and nn.Linear, fp32 and bf16 x.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def best_ms(fn, calls: int = 20, repeats: int = 15) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def lora_paths(batch: int, adapters: int, rank: int) -> dict[str, float]:
    from deltafleet.native import lora_bgmv_, road_apply_
    from deltafleet.serve.engine.backends import CpuBackend

    g = torch.Generator().manual_seed(0)
    index = torch.arange(batch) % adapters
    order = torch.argsort(index, stable=True)
    offs = torch.bincount(index, minlength=adapters).cumsum(0).to(torch.int32)
    total = {"grouped": 0.0, "native": 0.0, "native-bf16w": 0.0, "road-torch": 0.0, "road-native": 0.0,
             "base": 0.0}
    backend = CpuBackend(native=False)
    for d_in, d_out in SHAPES.values():
        x, y = torch.randn(batch, d_in, generator=g), torch.randn(batch, d_out, generator=g)
        A = torch.randn(adapters + 1, rank, d_in, generator=g) * 0.01
        B = torch.randn(adapters + 1, rank, d_out, generator=g) * 0.01
        W = torch.randn(d_out, d_in, generator=g)

        def grouped(x=x, y=y, A=A, B=B):
            h = torch._grouped_mm(x[order], A[:adapters].transpose(1, 2), offs=offs)
            return y.index_add(0, order, torch._grouped_mm(h, B[:adapters], offs=offs))

        y_native = y.clone()
        if not lora_bgmv_(x, y_native, A, B, index, rank, adapters):
            raise SystemExit("the native kernel is unavailable (no C compiler, or DELTAFLEET_NATIVE=0)")
        torch.testing.assert_close(y_native, grouped(), rtol=1e-4, atol=1e-4)
        total["grouped"] += best_ms(grouped)
        total["native"] += best_ms(lambda x=x, y=y, A=A, B=B: lora_bgmv_(x, y, A, B, index, rank, adapters))
        A16, B16 = A.bfloat16(), B.bfloat16()
        total["native-bf16w"] += best_ms(lambda x=x, y=y, A=A16, B=B16: lora_bgmv_(x, y, A, B, index, rank, adapters))
        c = torch.ones(adapters + 1, d_out) + 0.01 * torch.randn(adapters + 1, d_out, generator=g)
        s = 0.01 * torch.randn(adapters + 1, d_out, generator=g)
        step = SimpleNamespace(index=index, pool=SimpleNamespace(width=64, null=adapters))
        y_road = y.clone()
        assert road_apply_(y_road, c, s, index, 64, adapters)
        torch.testing.assert_close(y_road, backend.elementwise(y, c, s, step), rtol=1e-5, atol=1e-5)
        total["road-torch"] += best_ms(lambda y=y, c=c, s=s, step=step: backend.elementwise(y, c, s, step))
        total["road-native"] += best_ms(lambda y=y, c=c, s=s: road_apply_(y, c, s, index, 64, adapters))
        total["base"] += best_ms(lambda x=x, W=W: torch.nn.functional.linear(x, W))
    return total


def dequant_paths(batch: int) -> dict[int, dict[str, float]]:
    from deltafleet.quant.linear import QuantLinear
    from deltafleet.store.quantized import QuantizedMatrix

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(1536, 576, generator=g) * 0.05, torch.randn(batch, 576, generator=g)
    dense = torch.nn.Linear(576, 1536, bias=False)
    out = {}
    with torch.inference_mode():
        for bits in (2, 3, 4, 8):
            layer = QuantLinear(QuantizedMatrix.quantize(w, bits, 64))
            row = {}
            for kernel in ("fast", "native", "cached"):
                layer.set_kernel(kernel)
                row[kernel] = best_ms(lambda layer=layer: layer(x), calls=5)
            row["nn.Linear"] = best_ms(lambda: dense(x), calls=5)
            out[bits] = row
    return out


def dram_step(batch: int, adapters: int, rank: int) -> dict[str, float]:
    import statistics

    import torch.nn.functional as F

    from deltafleet.models import prepack
    from deltafleet.native import BoundBgmv

    g = torch.Generator().manual_seed(2)
    index = torch.randperm(batch, generator=g) % adapters
    calls, linears = [], []
    for _ in range(30):
        for d_in, d_out in SHAPES.values():
            A = (torch.randn(adapters + 1, rank, d_in, generator=g) * 0.01).bfloat16()
            B = (torch.randn(adapters + 1, rank, d_out, generator=g) * 0.01).bfloat16()
            calls.append((BoundBgmv.bind(A, B), torch.randn(batch, d_in, generator=g), torch.zeros(batch, d_out)))
            linears.append(torch.nn.Linear(d_in, d_out, bias=False))
    linears.append(torch.nn.Linear(576, 49152, bias=False))  # the LM head
    for m in linears:
        m.requires_grad_(False)
    packed_linears = [prepack.PrepackedLinear(m, batch_hint=batch) for m in linears]  # what pack_linears_ swaps in
    xs = {d: torch.randn(batch, d, generator=g) for d in (576, 1536)}
    nbytes = sum(2 * (k.A[:adapters].numel() + k.B[:adapters].numel()) for k, _, _ in calls)
    stream = torch.ones(nbytes // 4)

    def bgmv():
        for k, x, y in calls:
            k(x, y, index, rank, adapters)

    def f_linear():
        for m in linears:
            F.linear(xs[m.in_features], m.weight)

    def packed():
        for m in packed_linears:
            m(xs[m.in_features])

    fns = {"bgmv": bgmv, "sum": lambda: stream.sum(), "F.linear": f_linear, "onednn": packed}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(9):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    out["mb"] = nbytes / 1e6
    return out


def gemv_step(rows: int, dtype: torch.dtype) -> dict[str, float]:
    """One decode step's base matmuls with weights in DRAM (30 layers x 7 projections + the LM head, `dtype`), at
    `rows` token rows: prepacked oneDNN against the native streaming kernel (`deltafleet.native.gemv_`). Best of
    7 alternating repeats, ms; `gb` the weight bytes read per step."""
    from deltafleet import native

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g).to(dtype) * 0.02 for _ in range(30) for (i, o) in SHAPES.values()]
    ws.append(torch.randn(49152, 576, generator=g).to(dtype) * 0.02)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in ws]
    x = torch.randn(rows, 1536, generator=g).to(dtype)
    outs = [torch.empty(rows, w.shape[0], dtype=dtype) for w in ws]

    def onednn():
        for w, p in zip(ws, packed, strict=True):
            torch.ops.mkldnn._linear_pointwise(x[:, :w.shape[1]], p, None, "none", [], "")

    def gemv():
        for w, o in zip(ws, outs, strict=True):
            native.gemv_(x[:, :w.shape[1]], w, None, o)

    best = {"onednn": float("inf"), "gemv": float("inf")}
    for _ in range(8):
        for name, fn in (("onednn", onednn), ("gemv", gemv)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return {**best, "gb": sum(w.numel() * w.element_size() for w in ws) / 1e9}


def sparse_paths(batch: int, adapters: int, density: float, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """proj -> {"native": us, "torch": us} for one sparse-additive call, x, y and values of `dtype`."""
    from deltafleet.native import BoundSparse

    g = torch.Generator().manual_seed(3)
    index = torch.randperm(batch, generator=g) % adapters
    out = {}
    for name, (d_in, d_out) in SHAPES.items():
        mask = torch.rand(d_out, d_in, generator=g) < density
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: sorted by row, then column
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)]).int()
        values = (torch.randn(adapters + 1, cols.numel(), generator=g) * 0.01).to(dtype)
        values[adapters] = 0
        x, y = torch.randn(batch, d_in, generator=g).to(dtype), torch.randn(batch, d_out, generator=g).to(dtype)
        bound = BoundSparse.bind(values, cols.int(), row_ptr)
        if bound is None:
            raise SystemExit("the native kernel is unavailable (no C compiler, or DELTAFLEET_NATIVE=0)")

        def vectorised(x=x, y=y, values=values, cols=cols, rows=rows):
            return y.index_add(1, rows, x[:, cols] * values[index])

        got = y.clone()
        assert bound(x, got, index, adapters)
        torch.testing.assert_close(got.float(), vectorised().float(), rtol=2**-7, atol=1e-3)
        out[name] = {"native": 1e3 * best_ms(lambda x=x, y=y, b=bound: b(x, y, index, adapters), calls=50),
                     "torch": 1e3 * best_ms(vectorised, calls=50)}
    return out


def sign_paths(rows: int, dtype: torch.dtype) -> dict[str, float]:
    from deltafleet.quant.linear import QuantLinear
    from deltafleet.quant.sign_linear import SignLinear
    from deltafleet.store.quantized import QuantizedMatrix
    from deltafleet.store.signs import SignMatrix

    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(1536, 576, generator=g) * 0.05, torch.randn(rows, 576, generator=g).to(dtype)
    sign = SignLinear(SignMatrix.from_factors(w, torch.rand(576, generator=g), torch.rand(1536, generator=g)))
    q4 = QuantLinear(QuantizedMatrix.quantize(w, 4, 64))
    dense = torch.nn.Linear(576, 1536, bias=False).to(dtype)
    out = {}
    for kernel in ("native", "fast", "cached"):
        sign.set_kernel(kernel)
        out[f"1-bit {kernel}"] = best_ms(lambda: sign(x), calls=10)
    out["4-bit native"] = best_ms(lambda: q4(x), calls=10)
    out["nn.Linear"] = best_ms(lambda: dense(x), calls=10)
    return out


def merge_only_kinds(batch: int) -> dict[str, float]:
    """Per decode step of `batch` rows, each a distinct tenant, on one 1536 x 576 projection (bf16): the base's
    batched matmul, and each kind's per-tenant work for all rows: low-rank factors at the same 1/16 budget (as
    Delta-CoMe/low-rank tenants are served: one batched matmul pair over the rows' own factors), BitDelta
    (the native sign kernel, one row per tenant, one scale) and DARE at 1/16 (a CSR matvec per row). ms per step."""
    from deltafleet.compress.budget import budget_bytes, sparse_nnz
    from deltafleet.quant.sign_linear import SignLinear
    from deltafleet.store.signs import SignMatrix

    g = torch.Generator().manual_seed(3)
    out_f, in_f, dt = 1536, 576, torch.bfloat16
    x = torch.randn(batch, in_f, generator=g).to(dt)
    base = torch.randn(out_f, in_f, generator=g).to(dt)
    r = budget_bytes(out_f, in_f, 1 / 16) // (2 * (out_f + in_f))  # fp16 low-rank at the same 1/16 budget
    A, B = torch.randn(batch, in_f, r, generator=g).to(dt), torch.randn(batch, r, out_f, generator=g).to(dt)
    signs = [SignLinear(SignMatrix.from_factors(torch.randn(out_f, in_f, generator=g), torch.ones(in_f),
                                                torch.full((out_f,), 0.01))) for _ in range(batch)]
    nnz = sparse_nnz(out_f, in_f, budget_bytes(out_f, in_f, 1 / 16))
    dares = []
    for _ in range(batch):
        idx = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
        dense = torch.zeros(out_f * in_f)
        dense[idx] = torch.randn(nnz, generator=g)
        dares.append(dense.reshape(out_f, in_f).to_sparse_csr())
    xf = x.float()
    return {
        "base batched matmul": best_ms(lambda: x @ base.t(), calls=10),
        f"low-rank r{r} at 1/16, per row (batched bmm)": best_ms(lambda: torch.bmm(torch.bmm(x[:, None], A), B),
                                                                 calls=10),
        "BitDelta, per row (native sign)": best_ms(lambda: [s(x[i:i + 1]) for i, s in enumerate(signs)], calls=3),
        f"DARE 1/16 ({nnz / (out_f * in_f):.3f} dense), per row (CSR)":
            best_ms(lambda: [d @ xf[i] for i, d in enumerate(dares)], calls=3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dram", action="store_true", help="also time one whole decode step with pools in DRAM")
    ap.add_argument("--gemv", action="store_true", help="only: a decode step's base matmuls, oneDNN vs the native "
                    "streaming kernel, bf16 and fp32, 1 to 16 rows")
    ap.add_argument("--sparse", action="store_true", help="only: PaFi sparse-additive deltas per projection, "
                    "native kernel vs vectorised torch (--density of each projection's entries)")
    ap.add_argument("--density", type=float, default=0.02)
    ap.add_argument("--sign", action="store_true", help="only: OneBit's 1-bit linear, native sign kernel vs torch "
                    "paths, the 4-bit native dequantizer and nn.Linear")
    ap.add_argument("--merge-only-kinds", action="store_true", help="only: what serving BitDelta and DARE tenants "
                    "in mixed batches would cost per step (each row a distinct tenant) against LoRA and the base")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.merge_only_kinds:
        print(f"{args.threads} thread(s); batch {args.batch}, each row a distinct tenant; 1536 x 576 bf16; ms per step")
        with torch.inference_mode():
            for name, ms in merge_only_kinds(args.batch).items():
                print(f"  {name:44s} {ms:8.3f}")
        return
    if args.sign:
        from deltafleet import native

        print(f"{args.threads} thread(s); sign kernel path: {native.sign_matmul_path()}; 1536 x 576, ms per call")
        with torch.inference_mode():
            for dtype in (torch.float32, torch.bfloat16):
                for rows in (1, 8, 32):
                    t = sign_paths(rows, dtype)
                    print(f"{str(dtype)[6:]:>8} rows {rows:2d}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
        return
    if args.sparse:
        print(f"{args.threads} thread(s); batch {args.batch} over {args.adapters} slots, density {args.density}; "
              "us per projection call")
        with torch.inference_mode():
            for dtype in (torch.float32, torch.bfloat16):
                for name, t in sparse_paths(args.batch, args.adapters, args.density, dtype).items():
                    print(f"{str(dtype)[6:]:>8} {name:>9}: native {t['native']:7.1f}, torch {t['torch']:7.1f} "
                          f"({t['torch'] / t['native']:.1f}x)")
        return
    if args.gemv:
        from deltafleet import native

        print(f"{args.threads} thread(s); native bf16 path: {native.gemv_bf16_path()}")
        with torch.inference_mode():
            for dtype in (torch.bfloat16, torch.float32):
                for rows in (1, 2, 4, 8, 16):
                    d = gemv_step(rows, dtype)
                    gbs = {k: d["gb"] / d[k] * 1e3 for k in ("onednn", "gemv")}
                    print(f"{str(dtype)[6:]:>8} rows {rows:2d}: oneDNN {d['onednn']:6.1f} ms ({gbs['onednn']:4.1f} "
                          f"GB/s), native {d['gemv']:6.1f} ms ({gbs['gemv']:4.1f} GB/s), "
                          f"{d['onednn'] / d['gemv']:.2f}x")
        return
    print(f"{args.threads} thread(s); batch {args.batch}, {args.adapters} distinct LoRA r={args.rank} adapters")
    t = lora_paths(args.batch, args.adapters, args.rank)
    print(f"per decoder layer: grouped {t['grouped']:.3f} ms, native {t['native']:.3f} ms "
          f"({t['grouped'] / t['native']:.2f}x), native bf16 pools {t['native-bf16w']:.3f} ms; "
          f"RoAd torch {t['road-torch']:.3f} ms, native {t['road-native']:.3f} ms "
          f"({t['road-torch'] / t['road-native']:.2f}x); base matmuls {t['base']:.3f} ms")
    if args.dram:
        d = dram_step(args.batch, args.adapters, args.rank)
        print(f"one decode step, pools in DRAM ({d['mb']:.0f} MB of bf16 adapter rows): native BGMV {d['bgmv']:.1f} ms "
              f"({d['mb'] / d['bgmv']:.1f} GB/s), streaming sum of the same bytes {d['sum']:.1f} ms "
              f"({d['mb'] / d['sum']:.1f} GB/s); base matmuls F.linear {d['F.linear']:.1f} ms, "
              f"prepacked oneDNN {d['onednn']:.1f} ms ({d['F.linear'] / d['onednn']:.2f}x)")
    print("1536 x 576 quantized linear, group 64, ms per call:")
    for bits, row in dequant_paths(args.batch).items():
        print(f"  {bits}-bit: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items())
              + f"  (native {row['fast'] / row['native']:.2f}x fast)")


if __name__ == "__main__":
    main()
