"""The report of `pfe-study bench train`: its Markdown table, its figure, and the ``train`` and ``plot``
commands. The measurements and the report's keys are :mod:`pfe.bench.train`'s."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pfe.bench.train import ACCEPTANCE, AUTOTUNED, bench_train, ratio
from pfe.errors import PFEError

# What the report shows, in its order: measurement -> (short label for the plot, label for the table).
THROUGHPUT_ROWS = {
    "baseline": ("baseline (BoT)", "baseline: {net} BoT (BNNeck, CE + triplet), step on device tensors"),
    "stage1": ("stage I", "PFE stage I ({net} + TSAM), step on device tensors"),
    "stage2": ("stage II", "PFE stage II (frozen main branch; MFA, cascade, RO), step on device tensors"),
    "baseline_uncompiled": ("baseline, compile=off", "baseline, nothing compiled (runtime.compile=off)"),
    "stage1_uncompiled": ("stage I, compile=off", "PFE stage I, nothing compiled (runtime.compile=off)"),
    "stage2_uncompiled": ("stage II, compile=off", "PFE stage II, nothing compiled (runtime.compile=off)"),
    "stage1_regions": ("stage I, compile=regions", "PFE stage I, TSAM alone compiled (runtime.compile=regions)"),
    "stage2_regions": ("stage II, compile=regions",
                       "PFE stage II, TSAM and the side branches compiled (runtime.compile=regions)"),
    **{f"{name}_{tuning}": (f"{short}, {tuning}", f"{long}, with runtime.autotune={tuning}")
       for tuning in AUTOTUNED for name, short, long in (("baseline", "baseline", "baseline (BoT)"),
                                                         ("stage1", "stage I", "PFE stage I"))},
    "baseline_eager": ("baseline, eager", "baseline, eager step (runtime.cuda_graph=false)"),
    "stage1_eager": ("stage I, eager", "PFE stage I, eager step (runtime.cuda_graph=false)"),
    "stage2_eager": ("stage II, eager", "PFE stage II, eager step (runtime.cuda_graph=false)"),
    "stage2_separable": ("stage II, MFA-dagger", "PFE stage II with MFA-dagger (separable 3x3)"),
    "stage2_c96": ("stage II, C = 96", "PFE stage II with C = 96, the default before 2026-12 (reports before it)"),
    "stage2_unfolded": ("stage II, frozen_main=modules",
                        "PFE stage II, frozen main branch as checkpointed (runtime.frozen_main=modules)"),
    "stage2_folded": ("stage II, frozen_main=folded",
                      "PFE stage II, BN-folded copy, 1x1 convs as GEMMs (runtime.frozen_main=folded)"),
    "stage2_fused": ("stage II, frozen_main=fused",
                     "PFE stage II, cuDNN conv+ReLU kernels in the folded copy (runtime.frozen_main=fused)"),
    "stage2_frozen_forward": ("stage II's frozen forward alone",
                              "stage II's frozen main branch alone: forward, no grad (the floor of a stage-II step)"),
    "epoch_device_cache": ("stage I epoch from JPEG, cache=device", "stage I, whole epoch from JPEG, data.cache=device"),
    "epoch_workers": ("stage I epoch from JPEG, workers",
                      "stage I, whole epoch from JPEG, data.cache=none (DataLoader workers)"),
}


def throughput_rows(measurements: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The rows a report shows: :data:`THROUGHPUT_ROWS` in their order, then any other measurement with an
    images/s, labelled by its key (a report saved under names since renamed, e.g. session 5's ``stage1_compiled``)."""
    others = [key for key, value in measurements.items()
              if key not in THROUGHPUT_ROWS and isinstance(value, dict) and "img_s" in value]
    order = {"baseline": 0, "stage1": 1, "stage2": 2}  # the baseline first, as in THROUGHPUT_ROWS
    others.sort(key=lambda key: order.get(key.split("_")[0], len(order)))
    return {**THROUGHPUT_ROWS, **{key: (key.replace("_", " "), f"{key} (as recorded)") for key in others}}


def plot_throughput(report: dict[str, Any], path: str | Path) -> Path:
    """The report as a figure: images/s of each measurement with its ratio to the baseline of the same settings
    (whole epochs: to stage I's step), the issue's bounds as lines (stage I 0.9x, stage II 2.0x, epochs 0.95x stage I,
    1,850 images/s on a GPU), and peak GPU memory."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m, base = report["measurements"], report.get("baseline_img_s")
    rows = throughput_rows(m)
    keys = [k for k in rows if k in m]
    if not keys:
        raise ValueError("plot_throughput: the report holds no throughput measurement")
    colours = {"baseline": "0.55", "stage1": "#1f4e9a", "stage2": "#d9731a", "epoch": "#1a9a3a"}
    memory = [m[k].get("peak_mem_gb") for k in keys]
    with_memory = any(v is not None for v in memory)
    fig = Figure(figsize=(12 if with_memory else 9, 0.45 * len(keys) + 1.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_memory else 1, sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [3, 1]} if with_memory else None)[0]
    y = list(range(len(keys)))[::-1]
    speed = [m[k]["img_s"] for k in keys]
    bars = axes[0].barh(y, speed, color=[colours.get(k.split("_")[0], "0.3") for k in keys])
    step1 = report.get("step_from_tensors_img_s")
    for key, bar, value in zip(keys, bars, speed):  # epochs against stage I's step, as the bound
        times, of = (ratio(value, step1), "x stage I") if key.startswith("epoch") else (
            ratio(value, baseline_for(key, m)), "x")
        axes[0].annotate(f" {value:,.0f}" + (f"  ({times:.2f}{of})" if times is not None else ""),
                         (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
    bounds = [(0.9 * base, "stage I bound, 0.9x", colours["stage1"]), (2.0 * base, "stage II bound, 2.0x",
              colours["stage2"])] if base else []
    if step1:
        bounds.append((0.95 * step1, "epoch bound, 0.95x stage I", colours["epoch"]))
    if report["device"] == "cuda":
        bounds.append((ACCEPTANCE["baseline_img_s"][1], "baseline bound (H100), 1,850", colours["baseline"]))
    for x, label, colour in bounds:
        axes[0].axvline(x, color=colour, linestyle="--", linewidth=1, label=label)
    if bounds:
        axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_xlim(0, max(speed + [x for x, _, _ in bounds]) * 1.25)
    axes[0].set_yticks(y, [rows[k][0] for k in keys])
    axes[0].set_xlabel("images/s (training step; whole epochs for the JPEG rows)")
    if with_memory:
        axes[1].barh(y, [v or 0.0 for v in memory], color="0.7")
        axes[1].set_xlabel("peak GPU memory (GB)")
    setup = report["setup"]
    defaults = f"; defaults: compile={setup['compile']}, frozen_main={setup['frozen_main']}" if "compile" in setup else ""
    fig.suptitle(f"pfe-study bench train: {report['card']}, torch {report['torch']}, {setup['backbone']} "
                 f"{setup['input']}, batch {setup['batch']}, {setup['precision']}{defaults}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def baseline_for(key: str, measurements: dict[str, Any]) -> float | None:
    """The baseline images/s a step is compared with: the baseline measured with the same settings
    (``stage1_eager`` -> ``baseline_eager``, ``stage1_max_autotune`` -> ``baseline_max_autotune``) where there
    is one, else the default baseline."""
    _, _, setting = key.partition("_")
    same = measurements.get(f"baseline_{setting}") if setting and key.startswith("stage") else None
    return (same or measurements.get("baseline") or {}).get("img_s")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    host, setup, m = report["host"], report["setup"], report["measurements"]
    lines = [
        "# Training benchmark" + (" (quick smoke sizes: not representative)" if report["quick"] else ""),
        "",
        f"{report['created']}; device {report['device']} ({host['card']}), torch {host['torch']}"
        + (f", CUDA {host['cuda']}, cuDNN {host['cudnn']}" if report["device"] == "cuda" else "")
        + f", {host['cpu_count']} CPUs. Input {setup['input']}, batch {setup['batch']} ({setup['pk']}), "
        f"{setup['backbone']} ({setup['pretrained']}), {setup['precision']}"
        + (", channels_last, cudnn.benchmark, fused Adam." if report["device"] == "cuda" else ".")
        + (f" The trainer's defaults here (the baseline, stage I and stage II rows): runtime.cuda_graph "
           f"{setup['cuda_graph']}, runtime.compile {setup['compile']}, runtime.frozen_main {setup['frozen_main']}."
           if "compile" in setup else ""),
        "",
        "| what | images/s | ms/step | x baseline (same settings) | peak GPU memory (GB) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, (_, label) in throughput_rows(m).items():
        label = label.format(net=setup["backbone"])
        r = m.get(key)
        if r is None:
            status = f"failed: {report['errors'][key]}" if key in report["errors"] else "not run"
            lines.append(f"| {label} | {status} | | | |")
            continue
        ms = r.get("step_ms")
        times = ratio(r["img_s"], baseline_for(key, m))
        lines.append(f"| {label} | {_fmt(r['img_s'])} | {_fmt(ms, 2)} | {_fmt(times, 2)} | "
                     f"{_fmt(r.get('peak_mem_gb'), 2)} |")
    lines += ["", "Ratios: " + ", ".join(f"{k.replace('_', ' ')} {_fmt(report.get(k), 3)}" for k in (
        "stage1_vs_baseline", "stage2_vs_baseline", "stage2_folded_vs_baseline", "stage2_fused_vs_baseline",
        "stage1_uncompiled_vs_baseline_uncompiled", "stage2_uncompiled_vs_baseline_uncompiled",
        "stage1_eager_vs_baseline_eager", "stage2_eager_vs_baseline_eager",
        *(f"stage1_{tuning}_vs_baseline_{tuning}" for tuning in AUTOTUNED),
        "epoch_from_jpeg_vs_step_from_tensors", "epoch_workers_vs_step_from_tensors"))]
    for key, what in (("cuda_graph_speedup", "CUDA graph (runtime.cuda_graph) against the eager step"),
                      ("compile_speedup", "runtime.compile (the default) against compile=off, both graphed")):
        speedup = {k: v for k, v in report.get(key, {}).items() if v is not None}
        if speedup:
            lines += ["", f"{what}: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items())]
    firsts = {k: v["first_step_s"] for k, v in m.items() if "first_step_s" in v}
    if firsts:
        lines += ["", "First step (cuDNN autotuning; compilation where compiled), seconds: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in firsts.items()) + "."]
    syncs = {k: v["host_syncs"] for k, v in m.items() if v.get("host_syncs")}
    if syncs:
        lines += ["", "Host syncs after warm-up (torch.cuda.set_sync_debug_mode): " + ", ".join(
            f"{k} {v['syncs']} in {v['calls']} call(s)" + (f" ({'; '.join(v['examples'])})" if v["examples"] else "")
            for k, v in syncs.items()) + "."]
    for key in ("epoch_device_cache", "epoch_workers"):
        r = m.get(key)
        if r:
            per_epoch = ", ".join(f"epoch {e['epoch']}: {e['img_s']:,.0f} img/s ({e['seconds']:.2f} s)" for e in r["epochs"])
            extra = f", cache {r['cache_gb']} GB" if "cache_gb" in r else ""
            lines += ["", f"{key}: {r['train_images']} JPEG training images, {r['workers']} workers, setup "
                      f"{r['setup_s']} s{extra}; {per_epoch}."]
    for key in ("profile_baseline", "profile_stage1", "profile_stage2"):
        p = m.get(key)
        if not p:
            continue
        lines += ["", f"{key.removeprefix('profile_')}, where the {'GPU' if report['device'] == 'cuda' else 'CPU'} time "
                  f"goes (torch.profiler, {p['steps']} steps): busy {p['busy_ms_per_step']:.2f} of "
                  f"{p['wall_ms_per_step']:.2f} ms a step ({100 * p['busy_fraction']:.0f} %, a lower bound), "
                  f"{p['kernels_per_step']:.0f} kernels a step", "",
                  "| kernel | calls/step | ms/step | share |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{r['name']}` | {r['calls_per_step']:.0f} | {r['ms_per_step']:.3f} | {100 * r['share']:.1f} % |"
                  for r in p["top"]]
    e = m.get("eval")
    if e:
        lines += ["", f"Evaluation at {e['size']} size ({e['queries']:,} x {e['gallery']:,}) on {report['device']}: "
                  f"rank_metrics {e['rank_metrics_s']:.3f} s; final set {e['final_set_dim']}-d from features "
                  f"(distances + ranking) {e['final_set_from_features_s']:.3f} s; peak memory {_fmt(e['peak_mem_gb'], 2)} GB."]
    acc = report.get("acceptance")
    if acc:
        lines += ["", "Acceptance (issue 9)" + ("" if acc["applies"] else ": does not apply to this run (CPU or --quick)")
                  + ":", ""]
        for key, c in acc["checks"].items():
            mark = {True: "pass", False: "FAIL", None: "n/a"}[c["ok"]]
            lines.append(f"- {key.replace('_', ' ')} = {_fmt(c['value'], 3)} (want {c['bound']}): {mark}")
    for name, err in report["errors"].items():
        lines += ["", f"Error in {name}: {err}"]
    return "\n".join(lines) + "\n"


def cli_bench_train(args: Any) -> int:
    """The ``train`` part of `pfe-study bench`: prints the Markdown and where the JSON went."""
    out = Path(args.out)
    report = bench_train(device=args.device, quick=args.quick, out=out,
                         log=lambda message: print(message, file=sys.stderr, flush=True),
                         only=args.only.split(",") if getattr(args, "only", None) else None, render=render_markdown)
    stem = f"bench_{report['device']}" + ("_quick" if args.quick else "")
    sys.stdout.write(render_markdown(report))
    print(f"wrote {out / stem}.json and .md")
    write_plot(out / f"{stem}.json")
    return 0


def write_plot(json_path: Path) -> Path | None:
    """``plot_throughput`` of a saved report, beside it (.png); None, with a line why, without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"no plot of {json_path}: matplotlib is not installed (pip install matplotlib)")
        return None
    path = plot_throughput(json.loads(json_path.read_text()), json_path.with_suffix(".png"))
    print(f"wrote {path}")
    return path


def cli_bench_plot(args: Any) -> int:
    """`pfe-study bench plot [--out DIR]`: the figure of every training report (bench_*.json) in DIR."""
    reports = sorted(Path(args.out).glob("bench_*.json"))
    if not reports:
        raise PFEError(f"bench plot: no bench_*.json in {args.out}: run `pfe-study bench train --out {args.out}` "
                       "first, or point --out at the folder that holds its report")
    for path in reports:
        try:
            write_plot(path)
        except (ValueError, KeyError, json.JSONDecodeError) as err:
            raise PFEError(f"bench plot: {path} is not a training report ({type(err).__name__}: {err})") from None
    return 0
