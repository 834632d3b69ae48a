"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), memory-safe at MSMT17 size.

The published code builds dense (Q+G) x (Q+G) matrices (distances, the argsort, V); at MSMT17
size (93,820 images) that is 35 GB per float32 matrix. This version keeps only what the algorithm
reads: each image's top-(k1+1) neighbour list, the sparse encoding V (a few dozen non-zeros per
row), and the Q x G output. Distances are computed in row chunks; the Jaccard distance is a sparse
join over V's columns (an inverted index, as in the paper's Sec. 3.4). Everything runs on the
features' device (a GPU when they are there).

Conventions, those of the community implementations (Zhong et al.'s code, torchreid, fast-reid):
squared Euclidean distance on the given features, each row of the (Q+G) x (Q+G) distance matrix
divided by its maximum, V = exp(-d) weights over the local-expansion set, query expansion over the
k2 nearest neighbours, final distance = lambda * d + (1 - lambda) * Jaccard.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from pfe.config import RANK_METRICS
from pfe.engine.evaluation import _one_cpu_thread, rank_metrics, set_features

__all__ = ["k_reciprocal_rerank", "rerank_benchmark", "rerank_sets"]

# At most this many float elements in one temporary (distance rows, joined pairs): ~64 MB float32.
_BUDGET = 1 << 24




def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    t = torch.as_tensor(x)
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def _pair_sqdist(x: Tensor, sq: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Squared Euclidean distance of the pairs (i[n], j[n]), same formula as the blocks of pass 1."""
    out = torch.empty(i.numel(), dtype=x.dtype, device=x.device)
    step = max(1, _BUDGET // max(1, x.shape[1]))
    for s in range(0, i.numel(), step):
        a, b = i[s : s + step], j[s : s + step]
        dot = (x[a] * x[b]).sum(dim=1)
        out[s : s + step] = (sq[a] + sq[b] - 2.0 * dot).clamp_min_(0.0)
    return out


def _merge(near: Tensor, near_d: Tensor, rowmax: Tensor, rows: slice, d: Tensor, col0: int) -> None:
    """Fold a block of distances (rows x columns starting at ``col0``) into the rows' sorted
    nearest-neighbour lists and maxima."""
    k = min(near.shape[1], d.shape[1])
    vals, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    both_d = torch.cat([near_d[rows], vals], dim=1)
    both_i = torch.cat([near[rows], idx + col0], dim=1)
    # stable sort: on equal distances the earlier column wins, as one argsort over the row would
    order = torch.sort(both_d, dim=1, stable=True).indices[:, : near.shape[1]]
    near_d[rows] = both_d.gather(1, order)
    near[rows] = both_i.gather(1, order)
    torch.maximum(rowmax[rows], d.amax(dim=1), out=rowmax[rows])


def _copy_query_block(out: Tensor, d: Tensor, rows: slice, cols: slice, nq: int) -> None:
    """Write the (query row, gallery column) part of a distance block into ``out`` (Q x G)."""
    r1 = min(rows.stop, nq)
    c0 = max(cols.start, nq)
    if rows.start < r1 and c0 < cols.stop:
        out[rows.start : r1, c0 - nq : cols.stop - nq] = d[: r1 - rows.start, c0 - cols.start :]


def _reciprocal(nbr: Tensor, chunk: int) -> Tensor:
    """mask[i, a]: nbr[i, a] has i among its own neighbours (the k-reciprocal set R(i, k))."""
    n = nbr.shape[0]
    out = torch.empty(nbr.shape, dtype=torch.bool, device=nbr.device)
    for s in range(0, n, chunk):
        ids = torch.arange(s, min(n, s + chunk), device=nbr.device)
        back = nbr[nbr[ids]]  # c x k x k
        out[ids] = (back == ids[:, None, None]).any(dim=2)
    return out


def _csr_gather(crow: Tensor, col: Tensor, val: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The entries of CSR rows ``rows`` (1-d): (position in ``rows``, column, value)."""
    start, stop = crow[rows], crow[rows + 1]
    counts = stop - start
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts, output_size=total)
    offset = torch.arange(total, device=rows.device) - torch.repeat_interleave(
        torch.cumsum(counts, 0) - counts, counts, output_size=total
    )
    idx = start[owner] + offset
    return owner, col[idx], val[idx]


def _to_csr(rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sorted (row, col) COO entries -> (crow, col, val)."""
    counts = torch.bincount(rows, minlength=n_rows)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, cols, vals


@torch.no_grad()
def k_reciprocal_rerank(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    chunk_size: int | None = None,
    store_factor: int = 3,
) -> Tensor:
    """Re-ranked Q x G distance matrix of query and gallery features (rows are images).

    Pure function of the features; runs on their device, in their float dtype (float32 at
    least). Memory: O((Q+G) * (d + k1^2) + Q*G), never (Q+G)^2. ``chunk_size``: side of the
    square blocks of the distance matrix computed at once (default 4096: 64 MB in float32); ``store_factor``: how many times k1 + 1
    nearest neighbours pass 1 keeps with their distances.
    """
    if not 1 <= k2 <= k1 + 1:
        raise ValueError(f"k2={k2}: must be between 1 and k1 + 1 = {k1 + 1}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value}: must be in [0, 1]")
    q, g = _as_tensor(query), _as_tensor(gallery)
    g = g.to(q.device, q.dtype)
    nq, ng = q.shape[0], g.shape[0]
    x = torch.cat([q, g]).contiguous()
    n = x.shape[0]
    if n < k1 + 1:
        raise ValueError(f"re-ranking with k1={k1} needs at least {k1 + 1} images, got {n}")
    dev, dt = x.device, x.dtype
    sq = (x * x).sum(dim=1)
    block = chunk_size or math.isqrt(_BUDGET)
    kk = k1 + 1
    half = int(np.around(k1 / 2)) + 1

    # ---- pass 1: row maxima, nearest-neighbour lists, the query rows' plain distances.
    # The distance matrix is symmetric: only blocks on and above the diagonal are computed, each
    # serving its rows and (transposed) its columns, which halves the matrix products. More
    # neighbours than k1 + 1 are kept with their distances: the local expansion's members are
    # near, and found there; the few others are computed pair by pair.
    kept = min(n, store_factor * kk)
    out = torch.empty((nq, ng), dtype=dt, device=dev)
    rowmax = torch.zeros(n, dtype=dt, device=dev)
    near = torch.full((n, kept), -1, dtype=torch.long, device=dev)
    near_d = torch.full((n, kept), math.inf, dtype=dt, device=dev)
    starts = list(range(0, n, block))
    for bi in starts:
        ri = slice(bi, min(n, bi + block))
        for bj in starts[starts.index(bi) :]:
            rj = slice(bj, min(n, bj + block))
            d = torch.addmm(sq[ri, None] + sq[None, rj], x[ri], x[rj].T, alpha=-2.0).clamp_min_(0.0)
            _merge(near, near_d, rowmax, ri, d, bj)
            _copy_query_block(out, d, ri, rj, nq)
            if bj != bi:
                d = d.T
                _merge(near, near_d, rowmax, rj, d, bi)
                _copy_query_block(out, d, rj, ri, nq)
            del d
    # The rest is many small sparse operations: one CPU thread does them faster than two on a
    # busy machine (multi-threaded ops wait for descheduled workers; measured 2-3x at 3,000 images).
    with _one_cpu_thread(dev):
        rowmax.clamp_min_(torch.finfo(dt).tiny)
        out /= rowmax[:nq, None]
        nbr = near[:, :kk].contiguous()

        # ---- k-reciprocal sets R(i, k1), R(i, k1/2) and their local expansion R*(i, k1)
        nh = nbr[:, :half].contiguous()
        r_full = torch.where(_reciprocal(nbr, max(1, _BUDGET // (kk * kk))), nbr, -1)  # n x kk, -1 = absent
        r_half = torch.where(_reciprocal(nh, max(1, _BUDGET // (half * half))), nh, -1)  # n x half
        half_size = (r_half >= 0).sum(dim=1).to(torch.float64)
        two_thirds = torch.tensor(2.0 / 3.0, dtype=torch.float64, device=dev)
        ent_rows, ent_cols = [], []
        step = max(1, _BUDGET // (kk * half * kk))
        for s in range(0, n, step):
            ids = torch.arange(s, min(n, s + step), device=dev)
            rf = r_full[ids]  # c x kk
            cand = rf.clamp_min(0)
            rc = r_half[cand]  # c x kk x half: R(candidate, k1/2)
            inter = ((rc[..., None] == rf[:, None, None, :]) & (rc[..., None] >= 0)).any(dim=3).sum(dim=2)
            keep = (rf >= 0) & (inter.to(torch.float64) > two_thirds * half_size[cand])
            rc = torch.where(keep[..., None], rc, -1)
            expanded = torch.cat([rf, rc.flatten(1)], dim=1).sort(dim=1).values
            dup = torch.zeros_like(expanded, dtype=torch.bool)
            dup[:, 1:] = expanded[:, 1:] == expanded[:, :-1]
            valid = (expanded >= 0) & ~dup
            r, c = valid.nonzero(as_tuple=True)
            ent_rows.append(ids[r])
            ent_cols.append(expanded[r, c])
            del rc, inter, expanded, valid
        rows_v, cols_v = torch.cat(ent_rows), torch.cat(ent_cols)  # sorted by row, then column
        del ent_rows, ent_cols, r_full, r_half

        # ---- V: Gaussian weights over R*(i, k1), rows summing to 1
        dist_v = torch.empty(rows_v.numel(), dtype=dt, device=dev)
        step = max(1, _BUDGET // kept)
        for s in range(0, rows_v.numel(), step):
            r, c = rows_v[s : s + step], cols_v[s : s + step]
            hit = near[r] == c[:, None]
            found = hit.any(dim=1)
            dist_v[s : s + step] = torch.where(
                found, near_d[r].gather(1, hit.int().argmax(dim=1, keepdim=True))[:, 0], 0
            )
            miss = (~found).nonzero()[:, 0]
            if miss.numel():
                dist_v[s + miss] = _pair_sqdist(x, sq, r[miss], c[miss])
        del near, near_d
        dist_v /= rowmax[rows_v]
        w = torch.exp(-dist_v)
        wsum = torch.zeros(n, dtype=dt, device=dev).index_add_(0, rows_v, w)
        vals_v = w / wsum[rows_v]
        del dist_v, w, wsum
        crow, col, val = _to_csr(rows_v, cols_v, vals_v, n)
        del rows_v, cols_v, vals_v

        # ---- query expansion: V_qe[i] = mean of V over i's k2 nearest neighbours
        if k2 > 1:
            qe_rows, qe_cols, qe_vals = [], [], []
            avg = max(1, col.numel() // n)
            step = max(1, _BUDGET // (k2 * avg))
            for s in range(0, n, step):
                ids = torch.arange(s, min(n, s + step), device=dev)
                src = nbr[ids, :k2].reshape(-1)
                owner, c, v = _csr_gather(crow, col, val, src)
                owner = ids[owner // k2]
                key, inverse = torch.unique(owner * n + c, return_inverse=True)  # sorted: row, then column
                summed = torch.zeros(key.numel(), dtype=dt, device=dev).index_add_(0, inverse, v) / k2
                qe_rows.append(key // n)
                qe_cols.append(key % n)
                qe_vals.append(summed)
            crow, col, val = _to_csr(torch.cat(qe_rows), torch.cat(qe_cols), torch.cat(qe_vals), n)
            del qe_rows, qe_cols, qe_vals
        del nbr
        row_sum = torch.zeros(n, dtype=dt, device=dev).index_add_(
            0, torch.repeat_interleave(torch.arange(n, device=dev), crow[1:] - crow[:-1]), val
        )

        # ---- inverted index: the gallery rows' entries of V, grouped by column
        grow = torch.repeat_interleave(torch.arange(n, device=dev), crow[1:] - crow[:-1])
        is_g = grow >= nq
        g_rows, g_cols, g_vals = grow[is_g] - nq, col[is_g], val[is_g]
        order = torch.argsort(g_cols, stable=True)
        inv_crow, inv_rows, inv_vals = _to_csr(g_cols[order], g_rows[order], g_vals[order], n)
        del grow, is_g, g_rows, g_cols, g_vals, order
        inv_counts = inv_crow[1:] - inv_crow[:-1]

        # ---- Jaccard distance of each query to each gallery image, sparse join, in query groups
        q_counts = torch.zeros(nq, dtype=torch.long, device=dev)
        q_owner = torch.repeat_interleave(torch.arange(nq, device=dev), crow[1 : nq + 1] - crow[:nq])
        q_counts.index_add_(0, q_owner, inv_counts[col[: crow[nq]]])
        bounds = _groups(q_counts.cpu(), max_total=_BUDGET, max_rows=max(1, _BUDGET // max(1, ng)))
        for s, e in bounds:
            ids = torch.arange(s, e, device=dev)
            owner, k, a = _csr_gather(crow, col, val, ids)  # query entries (i, k, V[i, k])
            pos, j, b = _csr_gather(inv_crow, inv_rows, inv_vals, k)  # gallery entries of column k
            mins = torch.minimum(a[pos], b)
            inter = torch.zeros((e - s) * ng, dtype=dt, device=dev)
            inter.index_add_(0, owner[pos] * ng + j, mins)
            inter = inter.view(e - s, ng)
            union = row_sum[s:e, None] + row_sum[None, nq:] - inter
            jaccard = 1.0 - inter / union.clamp_min(torch.finfo(dt).tiny)
            out[s:e].mul_(lambda_value).add_(jaccard, alpha=1.0 - lambda_value)
            del owner, k, a, pos, j, b, mins, inter, union, jaccard
    return out


def rerank_sets(
    query: dict[str, Tensor],
    gallery: dict[str, Tensor],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    sets: Sequence[str],
    max_rank: int = 50,
    prefix: str = "rerank",
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> dict[str, float]:
    """Re-ranked rank metrics of each feature set, ``{prefix}/<set>/<metric>`` in percent, the
    same sets and keys as :func:`pfe.engine.evaluation.evaluate_sets` gives for the plain ones.
    k1 and k2 shrink on a tiny test split (fewer than k1 + 1 images)."""
    n = len(q_pids) + len(g_pids)
    k1 = min(k1, n - 1)
    k2 = min(k2, k1 + 1)
    q_cache: dict[str, Tensor] = {}
    g_cache: dict[str, Tensor] = {}
    out: dict[str, float] = {}
    for name in sets:
        qf = set_features(query, name, q_cache)
        gf = set_features(gallery, name, g_cache).to(qf.device)
        dist = k_reciprocal_rerank(qf, gf, k1, k2, lambda_value)
        res = rank_metrics(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max(max_rank, 10))
        cmc = res["cmc"]
        values = {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": res["mAP"], "mINP": res["mINP"]}
        for metric in RANK_METRICS:
            out[f"{prefix}/{name}/{metric}"] = 100.0 * float(values[metric])
        del dist
    return out


def _groups(counts: Tensor, max_total: int, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose summed counts stay under ``max_total`` (at least one row each)."""
    bounds, start, total = [], 0, 0
    for i, c in enumerate(counts.tolist()):
        if i > start and (total + c > max_total or i - start >= max_rows):
            bounds.append((start, i))
            start, total = i, 0
        total += c
    if start < len(counts):
        bounds.append((start, len(counts)))
    return bounds


# ---------------------------------------------------------------- benchmark
def clustered_features(n: int, dim: int, ids: int, seed: int = 0, noise: float = 0.6) -> np.ndarray:
    """L2-normalised features drawn around ``ids`` random centres (a ReID-like neighbourhood structure)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim)).astype(np.float32)
    labels = rng.integers(0, ids, n)
    x = centres[labels]
    x += noise * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _bench_child(num_query: int, num_gallery: int, dim: int, device: str) -> dict[str, float]:
    """Runs in a fresh process so its peak RSS is the re-ranking's own."""
    torch.set_grad_enabled(False)
    ids = max(2, (num_query + num_gallery) // 20)
    x = clustered_features(num_query + num_gallery, dim, ids)
    before = _peak_rss_mb()
    feats = torch.from_numpy(x).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    dist = k_reciprocal_rerank(feats[:num_query], feats[num_query:])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result = {
        "num_query": num_query,
        "num_gallery": num_gallery,
        "dim": dim,
        "device": device,
        "rerank_s": round(elapsed, 3),
        "cpu_s": round(time.process_time() - c0, 3),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_mb": round(before, 1),
        "finite": bool(torch.isfinite(dist).all()),
    }
    if device.startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def rerank_benchmark(
    num_query: int = 3368, num_gallery: int = 15913, dim: int = 2048, device: str = "cpu", timeout: float = 1800
) -> dict[str, float]:
    """Time and peak memory of one re-ranking at the given size, measured in a subprocess
    (defaults: Market-1501's 3,368 x 15,913)."""
    import subprocess

    code = (
        "import json, sys; from pfe.engine.rerank import _bench_child; "
        f"print(json.dumps(_bench_child({num_query}, {num_gallery}, {dim}, {device!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"re-ranking benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """`python -m pfe.engine.rerank [--query N --gallery N --dim D --device cpu]`: the benchmark."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--query", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=15913)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    res = rerank_benchmark(a.query, a.gallery, a.dim, a.device)
    print(json.dumps(res, indent=2))
    return 0 if res["finite"] and not math.isnan(res["rerank_s"]) else 1


if __name__ == "__main__":
    sys.exit(main())
