"""Regenerate tests/data/rank_golden.npz (run once by hand; the tests only read the .npz).

The expected outputs come from the community's reference implementations, loaded on their own
from their published source archives (not part of this repository):
  - torchreid 0.2.5 sdist, torchreid/reid/metrics/rank.py: ``eval_market1501`` -> cmc, mAP
  - fastreid 1.4.0 sdist, fastreid/evaluation/rank.py: ``eval_market1501`` -> per-query INP (mINP)
Both are the pure-Python (NumPy) versions. Usage:

    pip download --no-deps --no-binary :all: torchreid==0.2.5 fastreid==1.4.0 -d /tmp/ref
    (unpack both archives)
    python tests/data/make_rank_golden.py TORCHREID_RANK_PY FASTREID_RANK_PY

The inputs have no exact ties (the references sort with an unstable quicksort).
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).with_name("rank_golden.npz")


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(module)
    return module


def _problem(rng, num_q, num_g, ids, cams, distractor_share=0.0, structured=False, absent_ids=0):
    q_pids = rng.integers(1, ids + 1, num_q)
    g_pids = rng.integers(1 + absent_ids, ids + 1, num_g)  # ids 1..absent_ids never in the gallery
    g_pids[rng.random(num_g) < distractor_share] = 0
    q_camids = rng.integers(0, cams, num_q)
    g_camids = rng.integers(0, cams, num_g)
    if structured:  # distances from noisy id centres: rankings like a trained model's
        centres = rng.normal(size=(ids + 1, 32))
        qf = centres[q_pids] + rng.normal(scale=1.0, size=(num_q, 32))
        gf = centres[g_pids] + rng.normal(scale=1.0, size=(num_g, 32))
        distmat = np.sqrt(((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1))
    else:
        distmat = rng.random((num_q, num_g))
    distmat = distmat.astype(np.float32)
    for row in distmat:  # nudge exact float32 ties apart
        while np.unique(row).size < row.size:
            values, counts = np.unique(row, return_counts=True)
            for v in values[counts > 1]:
                idx = np.flatnonzero(row == v)[1:]
                row[idx] = np.nextafter(row[idx], np.float32(np.inf))
    return distmat, q_pids, g_pids, q_camids, g_camids


def main(torchreid_rank: str, fastreid_rank: str) -> None:
    tr = _load(torchreid_rank, "torchreid_rank")
    fr = _load(fastreid_rank, "fastreid_rank")
    rng = np.random.default_rng(20240501)
    cases = {
        "random": (_problem(rng, 40, 400, 30, 6), 50),
        "structured": (_problem(rng, 60, 600, 40, 6, structured=True), 50),
        "distractors": (_problem(rng, 30, 300, 20, 6, distractor_share=0.3, structured=True), 50),
        "no_valid_match": (_problem(rng, 30, 200, 25, 2, absent_ids=5), 20),
        "one_query": (_problem(rng, 1, 500, 10, 6), 50),
        "long_gallery": (_problem(rng, 5, 12000, 300, 8, distractor_share=0.2), 100),
        "max_rank_10": (_problem(rng, 25, 150, 12, 3, structured=True), 10),
    }
    arrays = {}
    for name, ((distmat, q_pids, g_pids, q_camids, g_camids), max_rank) in cases.items():
        cmc, mAP = tr.eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
        _, all_ap, all_inp = fr.eval_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
        assert abs(np.mean(all_ap) - mAP) < 1e-12
        arrays.update({
            f"{name}/distmat": distmat,
            f"{name}/q_pids": q_pids.astype(np.int32),
            f"{name}/g_pids": g_pids.astype(np.int32),
            f"{name}/q_camids": q_camids.astype(np.int8),
            f"{name}/g_camids": g_camids.astype(np.int8),
            f"{name}/max_rank": np.int64(max_rank),
            f"{name}/cmc": np.asarray(cmc, dtype=np.float64),
            f"{name}/mAP": np.float64(mAP),
            f"{name}/mINP": np.float64(np.mean(all_inp)),
            f"{name}/num_valid_queries": np.int64(len(all_ap)),
        })
        print(f"{name}: {distmat.shape}, valid {len(all_ap)}, rank1 {cmc[0]:.4f}, mAP {mAP:.4f}, mINP {np.mean(all_inp):.4f}")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
