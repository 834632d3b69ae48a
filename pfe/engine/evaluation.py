"""Rank metrics (CMC, mAP, mINP) under the Market-1501 protocol, feature extraction, feature sets.

Protocol (used for all four real datasets): for each query, gallery items with the same pid AND the
same camera are removed; the CMC curve is averaged over the queries that keep at least one correct
match ("valid" queries), AP is the non-interpolated average precision over the kept ranking, and
INP = (number of correct matches) / (rank of the hardest correct match) (Ye et al., 2021).
Queries without a valid match are left out of every average and counted. Equal distances are
ordered by gallery index (a stable sort). Results agree with torchreid's ``eval_market1501`` (CMC,
mAP) and fast-reid's (mINP) to 1e-6 on inputs without exact ties (tests/test_evaluation.py).

Speed: no full per-query sort. For each query only the correct matches are sorted (a handful);
every other gallery item is located among them with one batched ``searchsorted``, and a histogram
of those positions gives each match's rank. This is a few passes over the distance matrix, in torch
on whichever device holds it, chunked over queries so that MSMT17 (11,659 x 82,161) fits in memory.
Rows where a non-matching item ties exactly with a correct match are recomputed with a stable
full sort, so the tie rule holds exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pfe.config import DEFAULT_EVAL_SETS, RANK_METRICS
from pfe.errors import DataError

ArrayLike = Any  # numpy array, torch tensor or sequence

# Elements of the (query chunk x gallery) block processed at once; ~20 bytes of temporaries each.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}


def _as_long(x: ArrayLike, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int64).reshape(-1)
    return torch.as_tensor(np.asarray(x).astype(np.int64, copy=False), device=device).reshape(-1)


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point():
        t = t.float()
    return t


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops single-threaded: they are small here, and on a busy machine each
    multi-threaded op waits for a descheduled worker (measured: 0.6 s with 1 thread, 8.9 s with 2,
    Market size, load 7 on 2 cores). The heavy pass runs in NumPy, single-threaded anyway."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class _GalleryIndex:
    """Gallery columns grouped by pid, to find each query's same-pid items without a Q x G pass."""

    def __init__(self, g_pids: torch.Tensor) -> None:
        self.order = torch.argsort(g_pids, stable=True)
        self.pids, self.counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def columns(self, q_pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cols Q x W, present Q x W): gallery indices (ascending) of each query's pid, padded."""
        if self.pids.numel() == 0:
            empty = torch.zeros((q_pids.numel(), 0), dtype=torch.int64, device=q_pids.device)
            return empty, empty.bool()
        j = torch.searchsorted(self.pids, q_pids).clamp_(max=self.pids.numel() - 1)
        count = torch.where(self.pids[j] == q_pids, self.counts[j], 0)
        width = int(count.max()) if count.numel() else 0
        offsets = torch.arange(width, device=q_pids.device)
        present = offsets[None, :] < count[:, None]
        pos = (self.starts[j][:, None] + offsets[None, :]).clamp_(max=self.order.numel() - 1)
        return self.order[pos], present  # ascending within a pid: the argsort is stable


MatchRanks = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
# Above this share of (query, gallery) pairs closer than a query's farthest match, sorting every row's
# values beats sorting the candidates (measured on 2 CPU cores: ~1 us per candidate, ~30 ns per pair).
SORT_SHARE = 1 / 32
METHODS = ("auto", "candidates", "sorted", "full_sort")


def _match_ranks(
    dist: torch.Tensor,
    qp: torch.Tensor,
    qc: torch.Tensor,
    gp: torch.Tensor,
    gc: torch.Tensor,
    index: _GalleryIndex,
    method: str = "auto",
    numpy_on_cpu: bool = True,
) -> MatchRanks:
    """(rows, k, rank, num_rel): the 0-based rank, in the kept ranking of query ``rows[i]``, of its
    ``k[i]``-th valid match; ``num_rel`` = valid matches per query. ``method``: "candidates" sorts
    only the items no farther than each query's farthest match, "sorted" sorts every row's values,
    "auto" picks by the share of such candidates. ``numpy_on_cpu=False`` keeps the full passes in
    torch on CPU too (the code path a GPU takes)."""
    use_numpy = numpy_on_cpu and dist.device.type == "cpu"
    cols, present = index.columns(qp)
    same_cam = gc[cols] == qc[:, None]
    valid = present & ~same_cam
    num_rel = valid.sum(1)
    match_d = dist.gather(1, cols)
    if bool(torch.isnan(match_d[valid]).any()):
        raise ValueError("distmat contains NaN at a correct match")
    far = torch.where(valid, match_d, float("-inf")).amax(1) if cols.shape[1] else match_d.new_zeros(dist.shape[0])
    far = torch.where(num_rel > 0, far, float("nan"))  # a query without a match selects nothing
    if method == "sorted":
        return _ranks_from_sorted_values(dist, qp, qc, gp, gc, cols, present & same_cam, valid, match_d, num_rel, use_numpy)
    # The one full pass: which items are no farther than the query's farthest match (the rest
    # rank behind every match and do not matter). NumPy is several times faster than torch on CPU.
    if use_numpy:
        mask_np = dist.numpy() <= far.numpy()[:, None]
        count = int(np.count_nonzero(mask_np)) if method == "auto" else 0
    else:
        mask = dist <= far[:, None]
        count = int(mask.sum()) if method == "auto" else 0
    if count > SORT_SHARE * dist.numel():
        return _ranks_from_sorted_values(dist, qp, qc, gp, gc, cols, present & same_cam, valid, match_d, num_rel, use_numpy)
    if use_numpy:
        flat = torch.from_numpy(np.flatnonzero(mask_np))
        rows, cand = flat // dist.shape[1], flat % dist.shape[1]
    else:
        rows, cand = mask.nonzero(as_tuple=True)
    same = gp[cand] == qp[rows]
    keep = ~(same & (gc[cand] == qc[rows]))
    rows, cand, same = rows[keep], cand[keep], same[keep]
    # order by (row, distance, gallery index): candidates arrive row-major with ascending index
    order = torch.argsort(dist[rows, cand], stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    rows, same = rows[order], same[order]
    per_row = torch.bincount(rows, minlength=dist.shape[0])
    position = torch.arange(rows.numel(), device=dist.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    m_rows, m_rank = rows[same], position[same]
    k = torch.arange(m_rows.numel(), device=dist.device) - (torch.cumsum(num_rel, 0) - num_rel)[m_rows]
    return m_rows, k, m_rank, num_rel


def _ranks_from_sorted_values(
    dist: torch.Tensor,
    qp: torch.Tensor,
    qc: torch.Tensor,
    gp: torch.Tensor,
    gc: torch.Tensor,
    cols: torch.Tensor,
    removed: torch.Tensor,
    valid: torch.Tensor,
    match_d: torch.Tensor,
    num_rel: torch.Tensor,
    use_numpy: bool,
) -> MatchRanks:
    """Ranks from each row's sorted values: rank = #{items closer} - #{removed items closer}.
    Rows where a match ties exactly with another item are redone with a stable full sort."""
    sorted_rows = torch.from_numpy(np.sort(dist.numpy(), axis=1)) if use_numpy else torch.sort(dist, dim=1).values
    left = torch.searchsorted(sorted_rows, match_d)
    ties = valid & (torch.searchsorted(sorted_rows, match_d, right=True) - left > 1)
    removed_d = torch.where(removed, match_d, float("inf")).sort(dim=1).values
    rank = left - torch.searchsorted(removed_d, match_d)
    tie_rows = ties.any(1)
    ranked = torch.where(valid, rank, torch.iinfo(torch.int64).max).sort(dim=1).values
    k = torch.arange(cols.shape[1], device=dist.device).expand_as(ranked)
    take = (k < num_rel[:, None]) & ~tie_rows[:, None]
    m_rows = torch.arange(dist.shape[0], device=dist.device)[:, None].expand_as(ranked)[take]
    k, m_rank = k[take], ranked[take]
    if bool(tie_rows.any()):
        idx = tie_rows.nonzero(as_tuple=True)[0]
        t_rows, t_k, t_rank, _ = _ranks_by_sort(dist[idx], qp[idx], qc[idx], gp, gc)
        m_rows, k, m_rank = torch.cat([m_rows, idx[t_rows]]), torch.cat([k, t_k]), torch.cat([m_rank, t_rank])
    return m_rows, k, m_rank, num_rel


def _ranks_by_sort(dist: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor) -> MatchRanks:
    """The same as ``_match_ranks`` through a stable full sort of every row (a cross-check)."""
    order = torch.argsort(dist, dim=1, stable=True)
    gp_o, gc_o = gp[order], gc[order]
    match = gp_o == qp[:, None]
    keep = ~(match & (gc_o == qc[:, None]))
    valid = match & keep
    kept_rank = torch.cumsum(keep, dim=1) - 1
    rows, cols = valid.nonzero(as_tuple=True)  # position order within a row = rank order
    num_rel = valid.sum(1)
    k = torch.arange(rows.numel(), device=dist.device) - (torch.cumsum(num_rel, 0) - num_rel)[rows]
    return rows, k, kept_rank[rows, cols], num_rel


class RankAccumulator:
    """Accumulates rank statistics over chunks of queries; ``result()`` gives the metrics dict."""

    def __init__(self, g_pids: ArrayLike, g_camids: ArrayLike, max_rank: int, device: torch.device,
                 method: str = "auto", per_query: bool = False, numpy_on_cpu: bool = True) -> None:
        if max_rank < 1:
            raise ValueError("max_rank must be >= 1")
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        self.device = device
        self.gp = _as_long(g_pids, device)
        self.gc = _as_long(g_camids, device)
        if self.gp.shape != self.gc.shape:
            raise ValueError(f"g_pids ({self.gp.numel()}) and g_camids ({self.gc.numel()}) differ in length")
        self.index = _GalleryIndex(self.gp)
        self.max_rank = max_rank
        self.method = method
        self.numpy_on_cpu = numpy_on_cpu
        self.per_query = per_query
        acc = _acc_dtype(device)
        self.cmc_counts = torch.zeros(max_rank + 1, dtype=torch.int64, device=device)
        self.ap_sum = torch.zeros((), dtype=acc, device=device)
        self.inp_sum = torch.zeros((), dtype=acc, device=device)
        self.num_valid = 0
        self.num_queries = 0
        self._ap: list[torch.Tensor] = []
        self._inp: list[torch.Tensor] = []

    def add(self, dist: torch.Tensor, q_pids: ArrayLike, q_camids: ArrayLike) -> None:
        """Add a (chunk of queries x whole gallery) block of distances."""
        dist = _as_float_tensor(dist).to(self.device)
        qp, qc = _as_long(q_pids, self.device), _as_long(q_camids, self.device)
        if dist.dim() != 2 or dist.shape[1] != self.gp.numel() or dist.shape[0] != qp.numel() or qp.shape != qc.shape:
            raise ValueError(
                f"distmat of shape {tuple(dist.shape)} does not fit {qp.numel()} query pids, {qc.numel()} query "
                f"camids and {self.gp.numel()} gallery items"
            )
        with _one_cpu_thread(self.device):
            self._add(dist, qp, qc)

    def _add(self, dist: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor) -> None:
        if self.method == "full_sort":
            m_rows, k, m_rank, num_rel = _ranks_by_sort(dist, qp, qc, self.gp, self.gc)
        else:
            m_rows, k, m_rank, num_rel = _match_ranks(
                dist, qp, qc, self.gp, self.gc, self.index, self.method, self.numpy_on_cpu
            )
        acc = self.ap_sum.dtype
        num_q = qp.numel()
        valid_q = num_rel > 0
        precision = (k + 1).to(acc) / (m_rank + 1).to(acc)
        ap = torch.zeros(num_q, dtype=acc, device=self.device).index_add_(0, m_rows, precision)
        ap /= num_rel.clamp(min=1).to(acc)
        first = torch.zeros(num_q, dtype=torch.int64, device=self.device)
        is_first = k == 0
        first[m_rows[is_first]] = m_rank[is_first]
        last = torch.zeros(num_q, dtype=torch.int64, device=self.device)
        is_last = k == num_rel[m_rows] - 1
        last[m_rows[is_last]] = m_rank[is_last]
        inp = num_rel.to(acc) / (last + 1).to(acc)
        self.cmc_counts += torch.bincount(first[valid_q].clamp(max=self.max_rank), minlength=self.max_rank + 1)
        self.ap_sum += ap[valid_q].sum()
        self.inp_sum += inp[valid_q].sum()
        self.num_queries += num_q
        self.num_valid += int(valid_q.sum())
        if self.per_query:
            nan = torch.tensor(float("nan"), dtype=acc, device=self.device)
            self._ap.append(torch.where(valid_q, ap, nan).cpu())
            self._inp.append(torch.where(valid_q, inp, nan).cpu())

    def result(self) -> dict[str, Any]:
        if self.num_valid == 0:
            raise DataError(
                f"none of the {self.num_queries} queries has a correct match in the gallery under another "
                "camera: check that query and gallery come from the same dataset split"
            )
        cmc = torch.cumsum(self.cmc_counts[: self.max_rank], 0).double().cpu().numpy() / self.num_valid
        out: dict[str, Any] = {
            "cmc": cmc,
            "mAP": float(self.ap_sum) / self.num_valid,
            "mINP": float(self.inp_sum) / self.num_valid,
            "num_valid_queries": self.num_valid,
            "num_invalid_queries": self.num_queries - self.num_valid,
        }
        if self.per_query:
            out["AP"] = torch.cat(self._ap).double().numpy()
            out["INP"] = torch.cat(self._inp).double().numpy()
        return out


def _chunk_rows(num_gallery: int, device: torch.device, chunk_elements: int | None) -> int:
    budget = chunk_elements or DEFAULT_CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS["cpu"])
    return max(1, budget // max(1, num_gallery))


def rank_metrics(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    *,
    chunk_elements: int | None = None,
    method: str = "auto",
    per_query: bool = False,
    numpy_on_cpu: bool = True,
) -> dict[str, Any]:
    """CMC, mAP and mINP of a query x gallery distance matrix (Market-1501 protocol).

    Accepts numpy arrays or torch tensors (CPU or GPU; the work runs where ``distmat`` lives).
    Returns ``cmc`` (numpy float64 array of length ``max_rank``; a gallery shorter than
    ``max_rank`` pads the curve with its last value), ``mAP`` and ``mINP`` as fractions in [0, 1],
    ``num_valid_queries`` and ``num_invalid_queries`` (queries with no correct match under another
    camera, left out of the averages). ``per_query=True`` adds ``AP`` and ``INP`` arrays (NaN for
    invalid queries). ``method``: "auto" (default), or one of the strategies it chooses from,
    "candidates" and "sorted", or "full_sort" (a stable argsort of every row: slow, a cross-check). On CPU the full passes over
    the matrix run in NumPy (faster there); ``numpy_on_cpu=False`` keeps them in torch.
    Raises DataError when no query has a valid match.
    """
    dist = _as_float_tensor(distmat)
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D (queries x gallery), got shape {tuple(dist.shape)}")
    device = dist.device
    qp, qc = _as_long(q_pids, device), _as_long(q_camids, device)
    acc = RankAccumulator(g_pids, g_camids, max_rank, device, method=method, per_query=per_query, numpy_on_cpu=numpy_on_cpu)
    if qp.numel() != dist.shape[0] or qc.numel() != dist.shape[0]:
        raise ValueError(f"distmat has {dist.shape[0]} rows but {qp.numel()} query pids and {qc.numel()} camids")
    step = _chunk_rows(dist.shape[1], device, chunk_elements)
    for start in range(0, dist.shape[0], step):
        rows = slice(start, start + step)
        acc.add(dist[rows], qp[rows], qc[rows])
    return acc.result()


# ---- features -----------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    loader: Iterable[Sequence[Any]],
    device: torch.device | str,
    flip: bool = False,
    *,
    to_cpu: bool = False,
) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]:
    """Run ``forward`` over a loader of (images, pids, camids, ...) batches.

    ``forward`` maps a batch of images to named features (e.g. ``model.extract``); with ``flip`` the
    features of each image and its horizontal mirror are averaged. Returns the concatenated
    features (float32, kept on ``device`` unless ``to_cpu``), pids and camids as numpy arrays.
    """
    device = torch.device(device)
    chunks: dict[str, list[torch.Tensor]] = {}
    pids: list[np.ndarray] = []
    camids: list[np.ndarray] = []
    for batch in loader:
        images, batch_pids, batch_camids = batch[0], batch[1], batch[2]
        x = images.to(device, non_blocking=True)
        out = forward(x)
        if flip:
            mirrored = forward(torch.flip(x, dims=[3]))
            out = {name: (value + mirrored[name]) / 2 for name, value in out.items()}
        for name, value in out.items():
            value = value.float()
            chunks.setdefault(name, []).append(value.cpu() if to_cpu else value)
        pids.append(np.asarray(torch.as_tensor(batch_pids).cpu(), dtype=np.int64).reshape(-1))
        camids.append(np.asarray(torch.as_tensor(batch_camids).cpu(), dtype=np.int64).reshape(-1))
    if not pids:
        raise DataError("feature extraction got an empty loader (no images in this split?)")
    features = {name: torch.cat(values) for name, values in chunks.items()}
    return features, np.concatenate(pids), np.concatenate(camids)


def set_features(features: dict[str, torch.Tensor], name: str, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The feature of set ``name`` (e.g. "F3_F4_F5"): each layer L2-normalised, then concatenated."""
    parts = name.split("_")
    missing = [p for p in parts if p not in features]
    if missing:
        raise KeyError(f"feature set {name!r} needs {', '.join(missing)}; have {', '.join(sorted(features)) or 'none'}")
    cache = {} if cache is None else cache
    for p in parts:
        if p not in cache:
            cache[p] = F.normalize(features[p].float(), dim=1)
    return torch.cat([cache[p] for p in parts], dim=1) if len(parts) > 1 else cache[parts[0]]


def euclidean_distances(query: torch.Tensor, gallery: torch.Tensor, gallery_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance matrix (query rows x gallery rows)."""
    q_sq = (query * query).sum(1, keepdim=True)
    g_sq = (gallery * gallery).sum(1)[None, :] if gallery_sq is None else gallery_sq[None, :]
    d2 = torch.addmm(q_sq + g_sq, query, gallery.T, alpha=-2.0)
    return d2.clamp_(min=0).sqrt_()


def evaluate_sets(
    query: dict[str, torch.Tensor],
    gallery: dict[str, torch.Tensor],
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    sets: Sequence[str] = DEFAULT_EVAL_SETS,
    max_rank: int = 50,
    query_mask: ArrayLike | None = None,
    prefix: str = "eval",
    *,
    return_cmc: bool = False,
    chunk_elements: int | None = None,
) -> dict[str, float] | tuple[dict[str, float], dict[str, np.ndarray]]:
    """Rank metrics of each feature set, as ``{prefix}/<set>/<metric>`` in percent (0-100).

    A set is layer names joined by "_" (F2_F3_F4_F5): each layer's feature L2-normalised, then
    concatenated; Euclidean distance. Runs on the device holding the features. ``query_mask``
    (boolean, one per query) restricts the queries (the gallery stays whole). With ``return_cmc``
    also returns ``{set: cmc curve (fractions, length max_rank)}``.
    """
    q_pids_t = torch.as_tensor(np.asarray(q_pids, dtype=np.int64))
    q_camids_t = torch.as_tensor(np.asarray(q_camids, dtype=np.int64))
    rows = None
    if query_mask is not None:
        mask = np.asarray(query_mask, dtype=bool).reshape(-1)
        if mask.shape[0] != q_pids_t.numel():
            raise ValueError(f"query_mask has {mask.shape[0]} entries for {q_pids_t.numel()} queries")
        rows = torch.as_tensor(np.flatnonzero(mask))
        q_pids_t, q_camids_t = q_pids_t[rows], q_camids_t[rows]
    internal_rank = max(max_rank, 10)
    q_cache: dict[str, torch.Tensor] = {}
    g_cache: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    curves: dict[str, np.ndarray] = {}
    for name in sets:
        qf = set_features(query, name, q_cache)
        gf = set_features(gallery, name, g_cache)
        if rows is not None:
            qf = qf[rows.to(qf.device)]
        device = gf.device
        qf = qf.to(device)
        acc = RankAccumulator(g_pids, g_camids, internal_rank, device)
        g_sq = (gf * gf).sum(1)
        step = _chunk_rows(gf.shape[0], device, chunk_elements)
        for start in range(0, qf.shape[0], step):
            sl = slice(start, start + step)
            acc.add(euclidean_distances(qf[sl], gf, g_sq), q_pids_t[sl], q_camids_t[sl])
        res = acc.result()
        cmc = res["cmc"]
        values = {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": res["mAP"], "mINP": res["mINP"]}
        for metric in RANK_METRICS:
            metrics[f"{prefix}/{name}/{metric}"] = 100.0 * float(values[metric])
        curves[name] = cmc[:max_rank]
    return (metrics, curves) if return_cmc else metrics


def twins_query_mask(q_pids: np.ndarray, g_pids: np.ndarray, twins: dict[int, int]) -> np.ndarray:
    """Queries whose twin identity (synthreid's manifest) is in the gallery."""
    gallery_ids = set(np.asarray(g_pids).tolist())
    return np.array([twins.get(int(p), -1) in gallery_ids for p in np.asarray(q_pids)], dtype=bool)


def evaluate_features(
    query: dict[str, torch.Tensor],
    gallery: dict[str, torch.Tensor],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    *,
    sets: Sequence[str],
    max_rank: int = 50,
    twins: dict[int, int] | None = None,
    rerank: bool = False,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``eval/<set>/<metric>`` of each set with its CMC curve; with ``twins`` also the twins-only
    queries (``twins/...``); with ``rerank`` also k-reciprocal re-ranked metrics (``rerank/...``)."""
    args = (query, gallery, q_pids, g_pids, q_camids, g_camids)
    metrics, cmc = evaluate_sets(*args, sets=sets, max_rank=max_rank, return_cmc=True)
    if twins:
        mask = twins_query_mask(q_pids, g_pids, twins)
        if mask.any():
            metrics.update(evaluate_sets(*args, sets=sets, max_rank=max_rank, query_mask=mask, prefix="twins"))
    if rerank:
        from pfe.engine.rerank import rerank_sets  # rerank builds on this module

        metrics.update(rerank_sets(*args, sets=sets, max_rank=max_rank))
    return metrics, cmc
