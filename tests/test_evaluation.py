"""rank_metrics against golden outputs of the community's reference code, hand-computed cases
(ties, short galleries), the evaluator over feature sets and feature extraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pfe.bench.evaluation import per_query_numpy
from pfe.config import DEFAULT_EVAL_SETS, RANK_METRICS
from pfe.engine.evaluation import METHODS, evaluate_sets, extract_features, rank_metrics
from pfe.errors import DataError

# Golden data: inputs without exact ties and the outputs of torchreid 0.2.5's pure-Python
# eval_market1501 (metrics/rank.py: cmc, mAP) and fastreid 1.4.0's (evaluation/rank.py: mINP), each
# loaded on its own from the published source archive; see tests/data/make_rank_golden.py.
GOLDEN = np.load(Path(__file__).parent / "data" / "rank_golden.npz")
CASES = sorted({key.split("/")[0] for key in GOLDEN.files})


def _case(name: str) -> tuple[list[np.ndarray], int]:
    arrays = [GOLDEN[f"{name}/{k}"] for k in ("distmat", "q_pids", "g_pids", "q_camids", "g_camids")]
    return arrays, int(GOLDEN[f"{name}/max_rank"])


def test_golden_covers_the_required_cases() -> None:
    assert {"random", "distractors", "no_valid_match", "one_query", "long_gallery"} <= set(CASES)
    assert (GOLDEN["distractors/g_pids"] == 0).any()
    assert GOLDEN["no_valid_match/num_valid_queries"] < len(GOLDEN["no_valid_match/q_pids"])
    assert len(GOLDEN["one_query/q_pids"]) == 1
    assert GOLDEN["long_gallery/distmat"].shape[1] >= 10000


@pytest.mark.parametrize("numpy_on_cpu", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case: str, method: str, numpy_on_cpu: bool) -> None:
    arrays, max_rank = _case(case)
    # small chunks so that several chunks are accumulated; "torch" is the code path of a GPU
    out = rank_metrics(*arrays, max_rank=max_rank, method=method, chunk_elements=2500, numpy_on_cpu=numpy_on_cpu)
    assert out["cmc"].shape == (max_rank,)
    np.testing.assert_allclose(out["cmc"], GOLDEN[f"{case}/cmc"], rtol=0, atol=1e-6)
    assert out["mAP"] == pytest.approx(float(GOLDEN[f"{case}/mAP"]), abs=1e-6)
    assert out["mINP"] == pytest.approx(float(GOLDEN[f"{case}/mINP"]), abs=1e-6)
    assert out["num_valid_queries"] == int(GOLDEN[f"{case}/num_valid_queries"])
    assert out["num_valid_queries"] + out["num_invalid_queries"] == len(arrays[1])


def test_torch_inputs_and_dtypes_give_the_same() -> None:
    arrays, max_rank = _case("structured")
    ref = rank_metrics(*arrays, max_rank=max_rank)
    tensors = [torch.from_numpy(a.astype(np.int64)) if a.dtype != np.float32 else torch.from_numpy(a) for a in arrays]
    out = rank_metrics(*tensors, max_rank=max_rank)
    np.testing.assert_array_equal(out["cmc"], ref["cmc"])
    assert out["mAP"] == ref["mAP"] and out["mINP"] == ref["mINP"]
    out64 = rank_metrics(arrays[0].astype(np.float64), *arrays[1:], max_rank=max_rank)
    assert out64["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)


# ---- hand-computed cases ------------------------------------------------------------------------

# gallery:   index 0      1           2                3      4
#            pid 2 c1     pid 1 c1    pid 1 c0         pid 3  pid 1 c2
TIE_G_PIDS = np.array([2, 1, 1, 3, 1])
TIE_G_CAMS = np.array([1, 1, 0, 4, 2])
TIE_DIST = np.array(
    [
        [0.5, 0.5, 0.1, 0.2, 0.2],  # query pid 1 cam 0: index 2 removed (same pid and camera)
        [0.5, 0.5, 0.1, 0.2, 0.2],  # query pid 2 cam 0
        [0.3, 0.3, 0.3, 0.3, 0.3],  # query pid 9: no match anywhere
    ]
)
TIE_Q_PIDS = np.array([1, 2, 9])
TIE_Q_CAMS = np.array([0, 0, 0])


def _pad_far(dist: np.ndarray, g_pids: np.ndarray, g_cams: np.ndarray, extra: int):
    """Append far-away non-matching gallery items, so that 'auto' takes the candidates path."""
    far = np.full((dist.shape[0], extra), 100.0)
    return (np.concatenate([dist, far], 1), np.concatenate([g_pids, np.full(extra, 77)]),
            np.concatenate([g_cams, np.zeros(extra, dtype=int)]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("extra", [0, 400])
def test_ties_are_ordered_by_gallery_index(method: str, extra: int) -> None:
    # Query pid 1: stable order 2(removed) 3 4* 0 1*  -> kept ranking 3, 4*, 0, 1*: matches at ranks 2 and 4
    #   AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4, first match at rank 2.
    # Query pid 2: order 2 3 4 0* 1 -> match at rank 4: AP = 1/4, INP = 1/4.
    # Query pid 9: no match, left out and counted.
    dist, g_pids, g_cams = _pad_far(TIE_DIST, TIE_G_PIDS, TIE_G_CAMS, extra)
    out = rank_metrics(dist, TIE_Q_PIDS, g_pids, TIE_Q_CAMS, g_cams, max_rank=8, method=method, per_query=True,
                       numpy_on_cpu=extra == 0)
    np.testing.assert_allclose(out["cmc"], [0, 0.5, 0.5, 1, 1, 1, 1, 1])
    assert out["mAP"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["mINP"] == pytest.approx((0.5 + 0.25) / 2)
    assert (out["num_valid_queries"], out["num_invalid_queries"]) == (2, 1)
    np.testing.assert_allclose(out["AP"][:2], [0.5, 0.25])
    assert np.isnan(out["AP"][2]) and np.isnan(out["INP"][2])


@pytest.mark.parametrize("method", METHODS)
def test_all_equal_distances_rank_by_index(method: str) -> None:
    g_pids, g_cams = np.array([2, 1, 3, 1, 1]), np.array([0, 1, 0, 2, 0])
    out = rank_metrics(np.zeros((1, 5)), [1], g_pids, [0], g_cams, max_rank=5, method=method)
    # kept ranking: 0, 1*, 2, 3* (4 removed) -> AP (1/2 + 2/4) / 2, INP 2/4
    np.testing.assert_allclose(out["cmc"], [0, 1, 1, 1, 1])
    assert out["mAP"] == pytest.approx(0.5) and out["mINP"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", METHODS)
def test_short_gallery_pads_the_curve(method: str) -> None:
    out = rank_metrics([[0.1, 0.2, 0.3]], [1], [2, 1, 3], [0], [0, 1, 0], max_rank=50, method=method)
    assert out["cmc"].shape == (50,)
    assert out["cmc"][0] == 0 and (out["cmc"][1:] == 1).all()
    assert out["mAP"] == pytest.approx(0.5) and out["mINP"] == pytest.approx(0.5)


def test_no_valid_query_at_all_is_a_data_error() -> None:
    with pytest.raises(DataError, match="none of the 2 queries"):
        rank_metrics(np.ones((2, 3)), [1, 2], [3, 4, 5], [0, 0], [0, 1, 2])
    with pytest.raises(DataError):  # matches only under the query's own camera
        rank_metrics(np.ones((1, 2)), [1], [1, 1], [0], [0, 0])


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="rows"):
        rank_metrics(np.ones((2, 3)), [1], [1, 2, 3], [0], [0, 1, 2])
    with pytest.raises(ValueError, match="does not fit"):
        rank_metrics(np.ones((1, 3)), [1], [1, 2], [0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics([[np.nan, 1.0]], [1], [1, 2], [0], [1, 0])


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_a_per_query_loop_under_heavy_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    q, g = 40, 600
    q_pids, g_pids = rng.integers(0, 15, q), rng.integers(0, 15, g)
    q_cams, g_cams = rng.integers(0, 3, q), rng.integers(0, 3, g)
    dist = rng.integers(0, 12, (q, g)).astype(np.float32)  # many exact ties
    ref = per_query_numpy(dist, q_pids, g_pids, q_cams, g_cams, 50)
    for method in METHODS:
        for numpy_on_cpu in (True, False):
            out = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, 50, method=method, chunk_elements=5000,
                               numpy_on_cpu=numpy_on_cpu)
            np.testing.assert_allclose(out["cmc"], ref["cmc"], atol=1e-12)
            assert out["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
            assert out["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    arrays, max_rank = _case("long_gallery")
    ref = rank_metrics(*arrays, max_rank=max_rank)
    out = rank_metrics(torch.from_numpy(arrays[0]).cuda(), *arrays[1:], max_rank=max_rank)
    np.testing.assert_allclose(out["cmc"], ref["cmc"], atol=1e-12)
    assert out["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)


# ---- feature sets and extraction ---------------------------------------------------------------


def _features(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, dim, generator=gen) for name, dim in zip(("F2", "F3", "F4", "F5"), (8, 8, 8, 16))}


def test_evaluate_sets_keys_values_and_mask() -> None:
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 6, 20), rng.integers(0, 6, 60)
    q_cams, g_cams = rng.integers(0, 3, 20), rng.integers(0, 3, 60)
    query, gallery = _features(20, 1), _features(60, 2)
    metrics, curves = evaluate_sets(query, gallery, q_pids, g_pids, q_cams, g_cams, max_rank=20, return_cmc=True)
    assert set(metrics) == {f"eval/{s}/{m}" for s in DEFAULT_EVAL_SETS for m in RANK_METRICS}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert curves["F5"].shape == (20,)
    # F4_F5 = both layers L2-normalised, concatenated, Euclidean distance
    qf = torch.cat([torch.nn.functional.normalize(query[k], dim=1) for k in ("F4", "F5")], 1)
    gf = torch.cat([torch.nn.functional.normalize(gallery[k], dim=1) for k in ("F4", "F5")], 1)
    ref = rank_metrics(torch.cdist(qf.double(), gf.double()), q_pids, g_pids, q_cams, g_cams, 20)
    assert metrics["eval/F4_F5/mAP"] == pytest.approx(100 * ref["mAP"], abs=1e-4)
    assert metrics["eval/F4_F5/rank1"] == pytest.approx(100 * ref["cmc"][0], abs=1e-4)
    # a query mask keeps the gallery whole and evaluates only the chosen queries
    mask = np.arange(20) < 7
    masked = evaluate_sets(query, gallery, q_pids, g_pids, q_cams, g_cams, sets=["F5"], query_mask=mask, prefix="twins")
    sub = {k: v[mask] for k, v in query.items()}
    direct = evaluate_sets(sub, gallery, q_pids[mask], g_pids, q_cams[mask], g_cams, sets=["F5"], prefix="twins")
    assert masked == direct and set(masked) == {f"twins/F5/{m}" for m in RANK_METRICS}
    with pytest.raises(KeyError, match="F3"):
        evaluate_sets({"F5": query["F5"]}, {"F5": gallery["F5"]}, q_pids, g_pids, q_cams, g_cams, sets=["F3_F5"])


def test_extract_features_with_flip_averaging() -> None:
    images = torch.arange(6 * 3 * 4 * 2, dtype=torch.float32).reshape(6, 3, 4, 2)
    batches = [(images[i : i + 4], torch.arange(i, min(i + 4, 6)), torch.zeros(min(4, 6 - i), dtype=torch.long))
               for i in (0, 4)]

    def forward(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"F5": x.flatten(1), "F4": x.mean(dim=(1, 2))}

    feats, pids, cams = extract_features(forward, batches, "cpu")
    assert torch.equal(feats["F5"], images.flatten(1)) and list(pids) == list(range(6)) and cams.shape == (6,)
    flipped, _, _ = extract_features(forward, batches, "cpu", flip=True)
    assert torch.allclose(flipped["F5"], (images.flatten(1) + images.flip(3).flatten(1)) / 2)
    with pytest.raises(DataError):
        extract_features(forward, [], "cpu")
