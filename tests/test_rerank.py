"""k-reciprocal re-ranking: the chunked sparse version equals a plain dense implementation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pfe.cli import main
from pfe.engine.rerank import _groups, clustered_features, k_reciprocal_rerank


def dense_rerank(q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """Zhong et al. (CVPR 2017), Sec. 3, written out with dense (Q+G)^2 float64 matrices and loops."""
    x = np.concatenate([q, g]).astype(np.float64)
    nq, n = len(q), len(x)
    sq = (x * x).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)  # squared Euclidean
    dist = dist / dist.max(axis=1, keepdims=True)  # each row by its maximum
    rank = np.argsort(dist, axis=1, kind="stable")

    def k_reciprocal(i: int, k: int) -> np.ndarray:  # R(i, k) = {j in N(i, k) : i in N(j, k)}
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=int)

    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    for i in range(n):
        r = k_reciprocal(i, k1)
        expansion = set(r.tolist())
        for c in r:  # Eq. (6): add R(c, k1/2) when it overlaps R(i, k1) by more than 2/3
            rc = k_reciprocal(c, half)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                expansion |= set(rc.tolist())
        idx = np.array(sorted(expansion))
        w = np.exp(-dist[i, idx])  # Eq. (7)
        v[i, idx] = w / w.sum()
    if k2 > 1:  # local query expansion, Eq. (11)
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    out = np.zeros((nq, n - nq))
    for i in range(nq):  # Jaccard distance, Eq. (10)
        for j in range(nq, n):
            out[i, j - nq] = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
    return lam * dist[:nq, nq:] + (1 - lam) * out  # Eq. (12)


def _case(nq: int = 25, ng: int = 110, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    x = clustered_features(nq + ng, dim, ids=12, seed=seed, noise=0.7)
    return x[:nq], x[nq:]


@pytest.mark.parametrize(("k1", "k2", "lam"), [(20, 6, 0.3), (8, 3, 0.0), (6, 1, 0.5), (5, 6, 1.0)])
def test_matches_dense_reference(k1: int, k2: int, lam: float) -> None:
    q, g = _case()
    want = dense_rerank(q, g, k1, k2, lam)
    got = k_reciprocal_rerank(torch.from_numpy(q).double(), torch.from_numpy(g).double(), k1, k2, lam)
    assert got.shape == (len(q), len(g)) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    # float32 features, tiny chunks (every chunking path): equal to 1e-5
    got32 = k_reciprocal_rerank(q, g, k1, k2, lam, chunk_size=7)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, atol=1e-5)


def test_rerank_is_a_distance_and_helps_on_clusters() -> None:
    q, g = _case(nq=40, ng=200, dim=32, seed=3)
    d = k_reciprocal_rerank(q, g).numpy()
    assert np.isfinite(d).all() and (d >= 0).all() and (d <= 1 + 1e-6).all()


def test_groups_bound_totals() -> None:
    counts = torch.tensor([5, 5, 5, 20, 1, 1])
    assert _groups(counts, max_total=10, max_rows=100) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert _groups(counts, max_total=100, max_rows=2) == [(0, 2), (2, 4), (4, 6)]


def test_bad_arguments() -> None:
    q, g = _case(nq=3, ng=10)
    with pytest.raises(ValueError, match="k1"):
        k_reciprocal_rerank(q, g, k1=20)
    with pytest.raises(ValueError, match="k2"):
        k_reciprocal_rerank(q, g, k1=5, k2=7)


def test_bench_rerank_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "rerank", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "rerank_cpu_quick.json").read_text())
    (row,) = report["results"]
    assert (row["num_query"], row["num_gallery"], row["finite"]) == (300, 1500, True)
    assert row["peak_rss_mb"] > 0 and row["rerank_s"] > 0
    assert "| quick | 300 x 1,500 |" in capsys.readouterr().out
