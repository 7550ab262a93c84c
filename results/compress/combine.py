"""Join frontier runs of one fine-tune (e.g. ratios split over two processes) into one frontier.md/png/json.

    .venv/bin/python results/compress/combine.py OUT RUN_DIR [RUN_DIR ...]

Each RUN_DIR holds a frontier.json (or a frontier.partial.json of an interrupted run) and a frontier.md;
the last run's first paragraph (the settings) is kept as the header. Reference rows (finetuned, no-delta) come
from the first run; measured points from all, in method order then ratio order. A (method, ratio) point
measured again in a later run replaces the earlier one (e.g. delta-come re-run with another band plan).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deltafleet.compress.frontier import REFERENCES, Point, write_frontier


def load(run: Path) -> list[Point]:
    f = run / "frontier.json"
    f = f if f.is_file() else run / "frontier.partial.json"
    return [Point(**p) for p in json.loads(f.read_text())]


def main(out: str, *runs: str) -> None:
    dirs = [Path(r) for r in runs]
    all_points = [load(d) for d in dirs]
    refs = [p for p in all_points[0] if p.method in REFERENCES]
    latest = {(p.method, p.ratio): p for pts in all_points for p in pts if p.method not in REFERENCES}
    measured = list(latest.values())
    order = list(dict.fromkeys(p.method for p in measured))
    measured.sort(key=lambda p: (order.index(p.method), -p.ratio))
    md = dirs[-1] / "frontier.md"
    header = md.read_text().split("\n\n![")[0] if md.is_file() else "# Compression frontier"
    header += "\n\nJoined from " + ", ".join(f"`{d}`" for d in dirs) + " (results/compress/combine.py)."
    print(write_frontier(refs + measured, out, header))


if __name__ == "__main__":
    main(*sys.argv[1:])
