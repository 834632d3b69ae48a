"""SynthReID: `pfe-study data synth` writes a deterministic Market-1501-style tree with twins."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pfe.data.synth import GLOBAL_KEYS, LOCAL_KEYS, MARKET_NAME, SPLIT_DIRS, generate_synthreid
from pfe.errors import DataError

SMALL = {"ids_train": 8, "ids_test": 8, "images_per_id": 4, "cameras": 3}


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def parse(root: Path) -> dict[str, list[tuple[int, int]]]:
    """Split folder -> [(pid, camid)] for every image, asserting the Market file-name rule."""
    out: dict[str, list[tuple[int, int]]] = {}
    for name in SPLIT_DIRS:
        files = sorted((root / name).iterdir())
        out[name] = []
        for f in files:
            assert f.suffix == ".jpg", f
            match = MARKET_NAME.fullmatch(f.stem)
            assert match, f"{f.name} does not follow PPPP_cCsS_FFFFFF_NN"
            pid, cam = int(match.group(1)), int(match.group(2))
            out[name].append((pid, cam))
    return out


def check_rules(root: Path, manifest: dict) -> None:
    """The acceptance rules of the issue, on a generated tree and its manifest."""
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in root.iterdir()) == sorted([*SPLIT_DIRS, "manifest.json"])
    items = parse(root)
    ids = manifest["ids"]
    params = manifest["params"]
    train_cams: dict[int, list[int]] = defaultdict(list)
    for pid, cam in items["bounding_box_train"]:
        train_cams[pid].append(cam)
    train_ids = set(train_cams)
    query_ids = {pid for pid, _ in items["query"]}
    gallery_ids = {pid for pid, _ in items["bounding_box_test"]} - {0}
    assert len(train_ids) == params["ids_train"] and len(query_ids) == params["ids_test"]
    for pid, cams in train_cams.items():
        assert pid > 0 and len(cams) >= 4 and len(set(cams)) >= 2, (pid, cams)
        assert ids[f"{pid:04d}"]["split"] == "train"
    assert not train_ids & query_ids and not train_ids & gallery_ids
    assert query_ids == gallery_ids
    assert min(query_ids) > max(train_ids)  # test pids numbered after train pids
    for pid in query_ids:
        assert ids[f"{pid:04d}"]["split"] == "test"
    for qpid, qcam in items["query"]:
        assert any(gpid == qpid and gcam != qcam for gpid, gcam in items["bounding_box_test"]), (qpid, qcam)
    assert sum(pid == 0 for pid, _ in items["bounding_box_test"]) == params["distractors"]
    assert all(1 <= cam <= params["cameras"] for split in items.values() for _, cam in split)
    for name in SPLIT_DIRS:
        assert manifest["counts"][name]["images"] == len(items[name])
    # twins: named both ways, same split, same global cues, exactly one local cue apart
    twins = {k: v["twin"] for k, v in ids.items() if v["twin"] is not None}
    assert twins, "no twins"
    for a, b in twins.items():
        ia, ib = ids[a], ids[b]
        assert ib["twin"] == a and ia["split"] == ib["split"] and ia["differs_in"] == ib["differs_in"]
        assert ia["attributes"]["global"] == ib["attributes"]["global"]
        differ = [k for k in LOCAL_KEYS if ia["attributes"]["local"][k] != ib["attributes"]["local"][k]]
        assert differ == [ia["differs_in"]]
    for a, b in itertools.combinations(sorted(ids), 2):  # anyone else is at least two attributes away
        if twins.get(a) == b:
            continue
        fa = [ids[a]["attributes"]["global"][k] for k in GLOBAL_KEYS] + [
            ids[a]["attributes"]["local"][k] for k in LOCAL_KEYS
        ]
        fb = [ids[b]["attributes"]["global"][k] for k in GLOBAL_KEYS] + [
            ids[b]["attributes"]["local"][k] for k in LOCAL_KEYS
        ]
        assert sum(x != y for x, y in zip(fa, fb, strict=True)) >= 2, (a, b)


@pytest.fixture(scope="module")
def default_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The default set written by the real CLI into A and, meanwhile, by the function into B."""
    base = tmp_path_factory.mktemp("synth")
    a, b = base / "A", base / "B"
    exe = Path(sys.executable).with_name("pfe-study")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pfe.cli"]
    proc = subprocess.Popen(
        [*cmd, "data", "synth", "--out", str(a), "--seed", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    manifest = generate_synthreid(b, seed=0)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "synthreid" in stdout and "train" in stdout
    return a, b, manifest


def test_cli_default_set_is_byte_identical(default_pair: tuple[Path, Path, dict]) -> None:
    a, b, manifest = default_pair
    digest = tree_digest(a)
    assert digest == tree_digest(b)
    assert len(digest) > 1000
    assert manifest["generator"] == "pfe synthreid" and manifest["version"] == 1 and manifest["seed"] == 0


def test_default_set_follows_the_rules(default_pair: tuple[Path, Path, dict]) -> None:
    a, _, manifest = default_pair
    check_rules(a, manifest)
    p = manifest["params"]
    assert (p["ids_train"], p["ids_test"], p["images_per_id"], p["cameras"]) == (100, 100, 8, 4)
    in_pairs = sum(1 for v in manifest["ids"].values() if v["twin"])
    assert 0.2 <= in_pairs / len(manifest["ids"]) <= 0.4
    assert {v["differs_in"] for v in manifest["ids"].values() if v["twin"]} == set(LOCAL_KEYS)


def test_images_are_plain_128x64_jpegs(default_pair: tuple[Path, Path, dict]) -> None:
    a, _, _ = default_pair
    for name in SPLIT_DIRS:
        for f in sorted((a / name).glob("*.jpg"))[:5]:
            with Image.open(f) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 128)
                assert "exif" not in img.info


@pytest.mark.parametrize(
    "sizes",
    [
        SMALL,
        {"ids_train": 6, "ids_test": 5, "images_per_id": 4, "cameras": 2},
        {"ids_train": 4, "ids_test": 6, "images_per_id": 6, "cameras": 6},
    ],
)
def test_small_sets_follow_the_rules(tmp_path: Path, sizes: dict[str, int]) -> None:
    manifest = generate_synthreid(tmp_path / "s", seed=3, **sizes)
    check_rules(tmp_path / "s", manifest)


def test_seeds_differ_and_regenerating_replaces(tmp_path: Path) -> None:
    m0 = generate_synthreid(tmp_path / "s0", seed=0, **SMALL)
    m1 = generate_synthreid(tmp_path / "s1", seed=1, **SMALL)
    assert m0["ids"] != m1["ids"]
    d0, d1 = tree_digest(tmp_path / "s0"), tree_digest(tmp_path / "s1")
    assert not set(d0.values()) & set(d1.values())
    # the same seed and sizes again: written again, the same bytes
    generate_synthreid(tmp_path / "s0", seed=0, **SMALL)
    assert tree_digest(tmp_path / "s0") == d0
    # another seed over it is refused (runs trained on it would change their data) unless replace=True,
    # which leaves exactly the seed-0 tree (no stale files)
    with pytest.raises(DataError, match=r"s1 holds a SynthReID of other parameters \(seed 1 there, 0 asked\).*--force"):
        generate_synthreid(tmp_path / "s1", seed=0, **SMALL)
    assert tree_digest(tmp_path / "s1") == d1
    generate_synthreid(tmp_path / "s1", seed=0, **SMALL, replace=True)
    assert tree_digest(tmp_path / "s1") == d0


def test_cli_refuses_other_sizes_over_a_set_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pfe.cli import main

    out = str(tmp_path / "s")
    sizes = ["--ids-train", "4", "--ids-test", "4", "--images-per-id", "4", "--cameras", "2"]
    assert main(["data", "synth", "--out", out, *sizes]) == 0
    assert main(["data", "synth", "--out", out, *sizes[:-1], "3"]) == 2
    assert "cameras 2 there, 3 asked" in capsys.readouterr().err
    assert main(["data", "synth", "--out", out, *sizes[:-1], "3", "--force"]) == 0
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["params"]["cameras"] == 3


def test_bad_sizes_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cameras"):
        generate_synthreid(tmp_path / "x", cameras=1, ids_train=4, ids_test=4)
    with pytest.raises(DataError, match="images-per-id"):
        generate_synthreid(tmp_path / "x", images_per_id=3, ids_train=4, ids_test=4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        generate_synthreid(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_cli_bad_size_exits_2(tmp_path: Path) -> None:
    from pfe.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--cameras", "1"]) == 2


def test_cli_stats_reads_a_generated_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pfe.data.datasets")
    from pfe.cli import main

    generate_synthreid(tmp_path / "s", seed=0, **SMALL)
    assert main(["data", "stats", "synthreid", "--root", str(tmp_path / "s")]) == 0
    assert "query" in capsys.readouterr().out
