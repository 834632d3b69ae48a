"""`pfe-study bench eval` and `bench rerank`: how long ranking and re-ranking take.

``bench eval`` times :func:`pfe.engine.evaluation.rank_metrics` on random features shaped like
Market-1501's test split (3,368 queries x 15,913 gallery images, 750 ids, 6 cameras, distractors)
against a per-query NumPy loop of the same protocol (:func:`per_query_numpy`), and on a GPU also at
MSMT17 size (11,659 x 82,161). torchreid's pure-Python ``eval_market1501`` is not shipped here; set
``PFE_BENCH_TORCHREID_RANK`` to the path of its ``metrics/rank.py`` (from the torchreid source
archive) and the benchmark loads that file on its own and times it once too.

``bench rerank`` times k-reciprocal re-ranking (:mod:`pfe.engine.rerank`) at Market-1501 size
(and MSMT17 size on a GPU) in a fresh subprocess, with that process's peak resident memory.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from pfe.engine.evaluation import rank_metrics
from pfe.engine.trainer import resolve_device
from pfe.errors import DataError

# name -> (queries, gallery, ids, cameras, share of gallery that is distractors)
SIZES: dict[str, tuple[int, int, int, int, float]] = {
    "market1501": (3368, 15913, 750, 6, 2793 / 15913),
    "msmt17": (11659, 82161, 3060, 15, 0.0),
    "quick": (300, 1500, 60, 6, 0.15),
}
TORCHREID_ENV = "PFE_BENCH_TORCHREID_RANK"


def synthetic_eval_problem(
    size: str, seed: int = 0, device: str | torch.device = "cpu", dim: int = 128
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random distance matrix with ReID structure: (distmat, q_pids, g_pids, q_camids, g_camids).

    Query i has id ``1 + i % ids``; gallery images are spread over the ids, a share of them are
    distractors (pid 0); features are noisy id centres, so rankings look like a trained model's.
    """
    num_q, num_g, ids, cams, distractor_share = SIZES[size]
    rng = np.random.default_rng(seed)
    q_pids = 1 + np.arange(num_q) % ids
    num_distractors = int(round(num_g * distractor_share))
    g_pids = np.concatenate([1 + np.arange(num_g - num_distractors) % ids, np.zeros(num_distractors, dtype=np.int64)])
    g_pids = rng.permutation(g_pids).astype(np.int64)
    q_camids = rng.integers(0, cams, num_q)
    g_camids = rng.integers(0, cams, num_g)
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids + 1, dim, generator=gen)
    qf = centres[torch.as_tensor(q_pids)] + 1.2 * torch.randn(num_q, dim, generator=gen)
    gf = centres[torch.as_tensor(g_pids)] + 1.2 * torch.randn(num_g, dim, generator=gen)
    qf, gf = qf.to(device), gf.to(device)
    distmat = torch.cdist(qf, gf)
    return distmat, q_pids.astype(np.int64), g_pids, q_camids.astype(np.int64), g_camids.astype(np.int64)


def per_query_numpy(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> dict[str, Any]:
    """The same protocol as ``rank_metrics`` as a plain per-query NumPy loop (a baseline and cross-check)."""
    cmc_sum = np.zeros(max_rank)
    aps: list[float] = []
    inps: list[float] = []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        pids, cams = g_pids[order], g_camids[order]
        keep = ~((pids == q_pids[i]) & (cams == q_camids[i]))
        hits = np.flatnonzero(pids[keep] == q_pids[i])
        if hits.size == 0:
            continue
        cmc_sum[min(hits[0], max_rank) :] += 1
        aps.append(float(np.mean(np.arange(1, hits.size + 1) / (hits + 1))))
        inps.append(hits.size / (hits[-1] + 1))
    if not aps:
        raise DataError("no query has a valid match")
    return {
        "cmc": cmc_sum / len(aps),
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "num_valid_queries": len(aps),
        "num_invalid_queries": distmat.shape[0] - len(aps),
    }


def _load_torchreid_eval(path: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location("_torchreid_rank_reference", path)
    if spec is None or spec.loader is None:
        raise DataError(f"{TORCHREID_ENV}={path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation ... unavailable": that is the point
        spec.loader.exec_module(module)
    return module.eval_market1501


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[list[float], Any]:
    out = None
    runs = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        runs.append(time.perf_counter() - start)
    return runs, out


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    out = {
        "cmc_max_abs": float(
            np.max(np.abs(np.asarray(a["cmc"], dtype=np.float64) - np.asarray(b["cmc"], dtype=np.float64)))
        ),
        "mAP_abs": abs(float(a["mAP"]) - float(b["mAP"])),
    }
    if "mINP" in a and "mINP" in b:
        out["mINP_abs"] = abs(float(a["mINP"]) - float(b["mINP"]))
    return out


def _row(name: str, size: str, device: str, runs: list[float]) -> dict[str, Any]:
    q, g = SIZES[size][:2]
    return {
        "name": name,
        "size": size,
        "queries": q,
        "gallery": g,
        "device": device,
        "seconds": statistics.median(runs),
        "runs": [round(r, 4) for r in runs],
    }


def _host(dev: torch.device) -> dict[str, Any]:
    """Where a benchmark ran: versions, CPU threads, the device, the load when it started."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
    }


def bench_eval(device: str = "auto", quick: bool = False, repeats: int | None = None) -> dict[str, Any]:
    """Run the evaluation benchmark; returns the report as a dict."""
    repeats = repeats or (1 if quick else 3)
    dev = resolve_device(device, "--device")
    size = "quick" if quick else "market1501"
    report: dict[str, Any] = {
        "benchmark": "eval",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": _host(dev),
        "protocol": "Market-1501 (same pid and camera removed per query), max_rank 50, random features",
        "results": [],
        "agreement": {},
        "notes": [],
    }
    results = report["results"]

    distmat, qp, gp, qc, gc = synthetic_eval_problem(size, seed=0, device="cpu")
    dist_np = distmat.numpy()
    rank_metrics(distmat[:64], qp[:64], gp, qc[:64], gc)  # warm-up
    runs, ours = timed(lambda: rank_metrics(distmat, qp, gp, qc, gc), repeats, torch.device("cpu"))
    results.append(_row("rank_metrics (ours)", size, "cpu", runs))
    runs, loop = timed(lambda: per_query_numpy(dist_np, qp, gp, qc, gc), 1, torch.device("cpu"))
    results.append(_row("per-query NumPy loop", size, "cpu", runs))
    report["agreement"]["ours_vs_numpy_loop"] = _diff(ours, loop)
    report["metrics"] = {
        "mAP": ours["mAP"],
        "mINP": ours["mINP"],
        "rank1": float(ours["cmc"][0]),
        "num_valid_queries": ours["num_valid_queries"],
    }

    reference = os.environ.get(TORCHREID_ENV)
    if reference:
        eval_market1501 = _load_torchreid_eval(reference)
        runs, (cmc, mAP) = timed(lambda: eval_market1501(dist_np, qp, gp, qc, gc, 50), 1, torch.device("cpu"))
        results.append(_row("torchreid eval_market1501 (pure Python)", size, "cpu", runs))
        report["agreement"]["ours_vs_torchreid"] = _diff(ours, {"cmc": cmc, "mAP": mAP})
        report["torchreid_reference"] = reference
        report["notes"].append(
            "torchreid orders equal distances with NumPy's unstable quicksort, rank_metrics by gallery index; "
            "float32 distances at this size hold a few exact ties between a correct match and another item, "
            "so torchreid's mAP may differ in the 7th decimal (the stable per-query loop agrees to 1e-15)"
        )
    else:
        report["notes"].append(f"torchreid's pure-Python eval not timed: set {TORCHREID_ENV} to its metrics/rank.py")

    if dev.type == "cuda":
        on_gpu = distmat.to(dev)
        rank_metrics(on_gpu, qp, gp, qc, gc)  # warm-up (kernels, allocator)
        runs, gpu_out = timed(lambda: rank_metrics(on_gpu, qp, gp, qc, gc), repeats, dev)
        results.append(_row("rank_metrics (ours)", size, "cuda", runs))
        report["agreement"]["ours_cuda_vs_cpu"] = _diff(gpu_out, ours)
        del on_gpu
        big = "quick" if quick else "msmt17"
        distmat_g, qp_g, gp_g, qc_g, gc_g = synthetic_eval_problem(big, seed=1, device=dev)
        qp_t, gp_t, qc_t, gc_t = (torch.as_tensor(x, device=dev) for x in (qp_g, gp_g, qc_g, gc_g))
        rank_metrics(distmat_g, qp_t, gp_t, qc_t, gc_t)  # warm-up
        runs, _ = timed(lambda: rank_metrics(distmat_g, qp_t, gp_t, qc_t, gc_t), repeats, dev)
        results.append(_row("rank_metrics (ours)", big, "cuda", runs))
        report["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        del distmat_g
    else:
        report["notes"].append("MSMT17 size (11,659 x 82,161) is timed on a GPU only (--device cuda)")

    by_name = {(r["name"], r["size"], r["device"]): r["seconds"] for r in results}
    ours_cpu = by_name[("rank_metrics (ours)", size, "cpu")]
    speedups = {"vs_numpy_loop": by_name[("per-query NumPy loop", size, "cpu")] / ours_cpu}
    torchreid_key = ("torchreid eval_market1501 (pure Python)", size, "cpu")
    if torchreid_key in by_name:
        speedups["vs_torchreid_pure_python"] = by_name[torchreid_key] / ours_cpu
    report["speedup_cpu"] = speedups
    report["host"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return report


def _heading(title: str, report: dict[str, Any]) -> list[str]:
    """A report's title and the line saying where, when and under what load it ran."""
    host = report["host"]
    versions = f"torch {host['torch']}" + (f", numpy {host['numpy']}" if "numpy" in host else "")
    return [
        f"# {title}",
        "",
        f"{report['created']}; {host['device']}, {host['cpu_threads']} CPU threads, {versions}; "
        f"1-min load average {host['load_average_1min_at_start']} at the start, "
        f"{host.get('load_average_1min_at_end', '?')} at the end. {report['protocol']}.",
        "",
    ]


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        *_heading("Evaluation benchmark", report),
        "| what | size | queries x gallery | device | seconds (median) | runs |",
        "| --- | --- | --- | --- | ---: | --- |",
    ]
    for r in report["results"]:
        runs = ", ".join(f"{x:.3f}" for x in r["runs"])
        lines.append(
            f"| {r['name']} | {r['size']} | {r['queries']:,} x {r['gallery']:,} | {r['device']} | {r['seconds']:.3f} | {runs} |"
        )
    lines += [
        "",
        "Speed-up of rank_metrics on the CPU: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f}x" for k, v in report["speedup_cpu"].items()),
    ]
    lines += ["", "Agreement (max absolute difference):", ""]
    for k, v in report["agreement"].items():
        lines.append(f"- {k.replace('_', ' ')}: " + ", ".join(f"{m} {x:.1e}" for m, x in v.items()))
    m = report.get("metrics")
    if m:
        lines += [
            "",
            f"Metrics of the random problem: rank-1 {100 * m['rank1']:.2f} %, mAP {100 * m['mAP']:.2f} %, "
            f"mINP {100 * m['mINP']:.2f} %, {m['num_valid_queries']} valid queries.",
        ]
    if "peak_gpu_memory_gib" in report:
        lines += ["", f"Peak GPU memory: {report['peak_gpu_memory_gib']} GiB."]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# ---- re-ranking -----------------------------------------------------------------------------------
def bench_rerank(device: str = "auto", quick: bool = False) -> dict[str, Any]:
    """Time and peak memory of k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3), each size in a
    fresh subprocess: Market-1501 size at 2048-d (F5) and 3584-d (F2_F3_F4_F5 of ResNet50 PFE),
    and on a GPU also MSMT17 size."""
    from pfe.engine.rerank import rerank_benchmark

    dev = resolve_device(device, "--device")
    cases = [("quick", 300, 1500, 256)]
    if not quick:
        cases = [("market1501", 3368, 15913, 2048), ("market1501", 3368, 15913, 3584)]
        if dev.type == "cuda":
            cases.append(("msmt17", 11659, 82161, 3584))
    report: dict[str, Any] = {
        "benchmark": "rerank",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": _host(dev),
        "protocol": "k-reciprocal re-ranking (Zhong et al. 2017), k1 20, k2 6, lambda 0.3, on L2-normalised features "
        "clustered around (Q+G)/20 centres; each size in a fresh process; peak RSS is that process's maximum "
        "(it includes generating the features: see RSS before)",
        "results": [],
    }
    for size, q, g, dim in cases:
        row = rerank_benchmark(q, g, dim, str(dev))
        report["results"].append({"size": size, **row})
    report["host"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return report


def render_rerank_markdown(report: dict[str, Any]) -> str:
    lines = [
        *_heading("Re-ranking benchmark", report),
        "| size | queries x gallery | dim | device | wall s | CPU s | peak RSS MB | RSS before MB | peak GPU MB |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['size']} | {r['num_query']:,} x {r['num_gallery']:,} | {r['dim']} | {r['device']} | "
            f"{r['rerank_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | "
            f"{r.get('peak_gpu_mb', '-')} |"
        )
    return "\n".join(lines) + "\n"
