"""The markdown report of one compression, with PNG plots (matplotlib, Agg backend):

- `spectrum.png`: singular values of the delta per projection type (one faint line per layer, normalised by
  the largest), with the kept rank of SVD methods marked;
- `bits.png`: the band plan (rank per band, labelled by bit width) for SVD methods, else bits per weight;
- `error.png`: relative reconstruction error ||Delta - Delta_hat||_F / ||Delta||_F per layer and projection.
"""

from __future__ import annotations

from pathlib import Path

from deltafleet.adapters.adapter import module_name
from deltafleet.compress.pipeline import Compressed
from deltafleet.models.config import PROJECTIONS, TABLES


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectrum(c: Compressed, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(PROJECTIONS), figsize=(3 * len(PROJECTIONS), 3), sharey=True)
    ranks = getattr(c.adapter.config, "ranks", None)
    for ax, proj in zip(axes, PROJECTIONS, strict=True):
        keys = sorted(k for k in c.spectra if k[1] == proj)
        for k in keys:
            s = c.spectra[k]
            ax.semilogy((s / s[0].clamp(min=1e-30)).numpy(), color="C0", alpha=0.3, lw=0.8)
        if keys and ranks is not None:
            o, i = next(st.shape for st in c.stats if (st.layer, st.proj) == keys[0])
            ax.axvline(sum(r for _, r in ranks(o, i)), color="C3", ls="--", lw=1, label="kept rank")
            ax.legend(fontsize=7)
        ax.set_title(proj, fontsize=9)
        ax.set_xlabel("index")
    axes[0].set_ylabel("sigma / sigma_1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bits(c: Compressed, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    cfg = c.adapter.config
    shapes = {proj: next(st.shape for st in c.stats if st.proj == proj) for proj in PROJECTIONS}
    if hasattr(cfg, "ranks"):
        for x, proj in enumerate(PROJECTIONS):
            bottom = 0
            for bits, r in cfg.ranks(*shapes[proj], module_name(0, proj)):  # layer 0's, when modules have their own
                ax.bar(x, r, bottom=bottom, color=f"C{bits % 10}", edgecolor="k", lw=0.5)
                ax.text(x, bottom + r / 2, f"{r}@{bits}b", ha="center", va="center", fontsize=7)
                bottom += r
        ax.set_ylabel("singular vectors (rank)")
    else:
        per = {st.proj: st.bytes * 8 / (st.shape[0] * st.shape[1]) for st in c.stats}
        ax.bar(range(len(PROJECTIONS)), [per[p] for p in PROJECTIONS])
        ax.set_ylabel("stored bits per weight")
    ax.set_xticks(range(len(PROJECTIONS)), PROJECTIONS, fontsize=8)
    ax.set_title(f"{c.settings.method} at ratio {c.settings.ratio:.4g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_error(c: Compressed, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    for proj in PROJECTIONS:
        pts = sorted((st.layer, st.rel_error) for st in c.stats if st.proj == proj)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=proj)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(c: Compressed, out: str | Path, *, base: str, finetuned: str) -> Path:
    out = Path(out)
    plot_spectrum(c, out / "spectrum.png")
    plot_bits(c, out / "bits.png")
    plot_error(c, out / "error.png")
    s = c.settings
    lines = [
        f"# Delta compression: {s.method} at ratio {s.ratio:.6g}",
        "",
        f"- base: `{base}`; fine-tune: `{finetuned}`",
        f"- settings: {', '.join(f'{k}={v}' for k, v in s.to_dict().items() if k != 'schema_version')}",
        f"- whole delta: **{c.bytes:,} bytes** compressed vs {c.fp16_bytes:,} bytes as fp16 "
        f"(ratio {c.bytes / c.fp16_bytes:.5f}; every code, scale, zero point, index and gain counted)",
        f"- mean relative reconstruction error (compressed modules): {c.mean_rel_error:.4f}",
        f"- compression time: {c.seconds:.1f} s",
        f"- adapter kind: `{c.adapter.config.kind}` {c.adapter.config.summary}",
        "",
        "## Bytes per part",
        "",
        "| part | modules | bytes | fp16 bytes | ratio |",
        "|---|---|---|---|---|",
        *(f"| {name} | {p['modules']} | {p['bytes']:,} | {p['fp16_bytes']:,} | {p['bytes'] / p['fp16_bytes']:.5f} |"
          for name, p in c.parts.items()),
        "",
        "Projections and tables (the embedding / LM head delta) are compressed by the method; the RMSNorm gain "
        "deltas are stored exactly (fp16) and paid for from the tables' budget.",
        "",
        "## Other changed parameters (stored exactly, not served)",
        "",
    ]
    if c.extras:
        lines += ["| tensor | shape | dtype | bytes |", "|---|---|---|---|"]
        lines += [f"| `{n}` | {tuple(t.shape)} | {str(t.dtype).removeprefix('torch.')} | "
                  f"{t.numel() * t.element_size():,} |" for n, t in sorted(c.extras.items())]
        lines += ["", f"Total {c.extras_bytes:,} bytes. They are applied by `deltafleet merge` only."]
    else:
        lines.append("None: the projections, tables and norms hold every change.")
    lines += ["", "## Plots", "", "![spectrum](spectrum.png)", "", "![bits](bits.png)", "", "![error](error.png)",
              "", "## Per module type", "", "| module | shape | bytes / module | budget | mean rel. error |",
              "|---|---|---|---|---|"]
    for proj in (*PROJECTIONS, *TABLES):
        st = [x for x in c.stats if x.proj == proj]
        if not st:
            continue
        lines.append(f"| {proj} | {st[0].shape[0]}x{st[0].shape[1]} | {st[0].bytes:,} | {st[0].budget:,} | "
                     f"{sum(x.rel_error for x in st) / len(st):.4f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
