"""`pfe-study bench`: the speed and memory numbers of issue 9, measured, never asserted in tests.

- :mod:`pfe.bench.train` (``bench train``): training throughput of the baseline and of PFE stages I and
  II, whole epochs from JPEG files, the MSMT17-size evaluation, peak memory; its Markdown, its figure
  and ``bench plot`` are :mod:`pfe.bench.train_report`'s;
- :mod:`pfe.bench.evaluation` (``bench eval``, ``bench rerank``): ranking and re-ranking times at
  Market-1501 and MSMT17 sizes;
- :mod:`pfe.bench.cost` (``bench cost``, any CPU): FLOPs, bytes and kernels of each training step.

Each writes ``<what>_<device>.json`` and ``.md`` under ``--out`` (default reports/bench/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def write_report(out: Path, stem: str, report: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    sys.stdout.write(markdown)
    print(f"wrote {out / stem}.json and .md")


def cli_bench(args: argparse.Namespace) -> int:
    """`pfe-study bench [all|eval|rerank|train|cost|plot] [--device D] [--out DIR] [--quick]`."""
    what, out, suffix = getattr(args, "what", "all"), Path(args.out), "_quick" if args.quick else ""
    if what == "cost":  # CPU only, any machine: FLOPs, bytes and kernels of each training step
        from pfe.bench.cost import cli_bench_cost

        return cli_bench_cost(args)
    if what == "plot":
        from pfe.bench.train_report import cli_bench_plot

        return cli_bench_plot(args)
    if what in ("train", "all"):  # first: on a time-limited GPU run the training numbers matter most
        from pfe.bench.train_report import cli_bench_train

        cli_bench_train(args)
    from pfe.bench.evaluation import bench_eval, bench_rerank, render_markdown, render_rerank_markdown

    if what in ("eval", "all"):
        report = bench_eval(device=args.device, quick=args.quick)
        device = "cuda" if any(r["device"] == "cuda" for r in report["results"]) else "cpu"
        write_report(out, f"eval_{device}{suffix}", report, render_markdown(report))
    if what in ("rerank", "all"):
        rr = bench_rerank(device=args.device, quick=args.quick)
        device = "cuda" if rr["host"]["device"] != "cpu" else "cpu"
        write_report(out, f"rerank_{device}{suffix}", rr, render_rerank_markdown(rr))
    return 0
