"""Dataset registry on generated trees with each dataset's real layout and file names, on the real
crops in ../shared/fixtures/reid-real/, and the image loader and transforms."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pfe.config import DataConfig
from pfe.data.datasets import (
    DatasetCountWarning,
    ReIDDataset,
    build_dataset,
    format_stats,
    load_dataset,
    parse_market_name,
    parse_msmt_name,
    resolve_root,
)
from pfe.data.loader import ImageDataset, read_image
from pfe.data.transforms import IMAGENET_MEAN, RandomErasing, build_test_transform, build_train_transform
from pfe.errors import DataError, user_message

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "reid-real"
pytestmark = pytest.mark.filterwarnings("ignore::pfe.data.datasets.DatasetCountWarning")


def _img(path: Path, shade: int = 100, size: tuple[int, int] = (8, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, 60)).save(path)


def _tree(folder: Path, files: dict[str, list[str]]) -> None:
    for sub, names in files.items():
        for i, name in enumerate(names):
            _img(folder / sub / name, 10 * i)


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s3_077419_03.jpg",
                           "0010_c6s4_002427_02.jpg", "0010_c1s1_002301_00.jpg"],
    "query": ["0001_c1s1_001051_00.jpg", "0003_c3s1_000201_00.jpg"],
    "bounding_box_test": ["-1_c1s1_000401_03.jpg", "0000_c1s1_000151_01.jpg", "0001_c2s1_000301_01.jpg",
                          "0001_c1s1_001101_00.jpg", "0003_c5s1_000251_00.jpg"],
}


def _check_market(ds: ReIDDataset) -> None:
    assert ds.name == "market1501"
    assert [s.pid for s in ds.train] == [0, 0, 1, 2, 2]  # 2, 7, 10 relabelled in sorted order
    assert ds.train_pid_map == {2: 0, 7: 1, 10: 2}
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    assert [(s.pid, s.camid) for s in ds.query] == [(1, 0), (3, 2)]
    gallery = [(Path(s.path).name[:4], s.pid, s.camid) for s in ds.gallery]
    assert ("0000", 0, 0) in gallery  # distractor kept
    assert all(s.pid != -1 for s in ds.gallery) and len(ds.gallery) == 4  # junk dropped
    assert ds.stats() == {
        "train": {"ids": 3, "images": 5, "cameras": 4},
        "query": {"ids": 2, "images": 2, "cameras": 2},
        "gallery": {"ids": 3, "images": 4, "cameras": 3},
    }


def test_market_torchreid_fastreid_and_direct_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the folder above the tree looks like a Market file name: only file names may be parsed
    base = tmp_path / "0099_c9s9_999999_99"
    torchreid_root = base / "torchreid"
    _tree(torchreid_root / "market1501" / "Market-1501-v15.09.15", MARKET)
    (torchreid_root / "market1501" / "Market-1501-v15.09.15" / "query" / "Thumbs.db").write_bytes(b"x")
    fastreid_root = base / "fastreid"
    _tree(fastreid_root / "Market-1501-v15.09.15", MARKET)
    for root in (torchreid_root, fastreid_root, fastreid_root / "Market-1501-v15.09.15"):
        _check_market(load_dataset("market1501", root))
    monkeypatch.setenv("PFE_DATA", str(fastreid_root))
    assert resolve_root(None) == fastreid_root
    _check_market(build_dataset(DataConfig(dataset="market1501")))
    monkeypatch.delenv("PFE_DATA")
    assert resolve_root(None) == Path("data")


def test_published_size_warning_and_summary(tmp_path: Path) -> None:
    _tree(tmp_path / "Market-1501-v15.09.15", MARKET)
    with pytest.warns(DatasetCountWarning, match="12,936"):
        ds = load_dataset("market1501", tmp_path)
    text = format_stats(ds)
    assert "gallery" in text and "published" in text and "12,936" in text


def test_unparsable_names_are_skipped_with_a_warning(tmp_path: Path) -> None:
    _tree(tmp_path, MARKET)
    _img(tmp_path / "query" / "holiday.jpg")
    with pytest.warns(UserWarning, match="holiday.jpg"):
        ds = load_dataset("market1501", tmp_path)
    assert len(ds.query) == 2


def test_missing_or_malformed_root_spells_out_the_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("market1501", tmp_path / "nowhere")
    (tmp_path / "Market-1501-v15.09.15" / "query").mkdir(parents=True)
    with pytest.raises(DataError, match=r"bounding_box_train,query,bounding_box_test") as err:
        load_dataset("market1501", tmp_path)
    assert "looked in" in str(err.value) and "torchreid" in str(err.value)
    for d in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "empty" / d).mkdir(parents=True)
    with pytest.raises(DataError, match="query split .* no usable image"):
        load_dataset("market1501", tmp_path / "empty")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("viper", tmp_path)


def test_duke_layouts(tmp_path: Path) -> None:
    files = {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg", "0005_c2_f0047152.jpg"],
        "query": ["0005_c7_f0101254.jpg"],
        "bounding_box_test": ["0005_c1_f0058403.jpg", "0019_c8_f0057662.jpg", "0000_c3_f0100990.jpg"],
    }
    _tree(tmp_path / "dukemtmc-reid" / "DukeMTMC-reID", files)
    ds = load_dataset("dukemtmcreid", tmp_path)
    assert [(s.pid, s.camid) for s in ds.train] == [(0, 1), (0, 4), (1, 1)]
    assert [(s.pid, s.camid) for s in ds.query] == [(5, 6)]
    assert sorted(s.pid for s in ds.gallery) == [0, 5, 19]
    assert load_dataset("dukemtmcreid", tmp_path / "dukemtmc-reid").stats() == ds.stats()


def _msmt(root: Path, version: str) -> Path:
    top, train_dir, test_dir = {"v1": ("MSMT17_V1", "train", "test"), "v2": ("MSMT17_V2", "mask_train_v2", "mask_test_v2")}[version]
    folder = root / top
    lists = {
        ("list_train.txt", train_dir): ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_15_0303morning_0035_1.jpg 0",
                                        "0001/0001_000_05_0303noon_0100_2.jpg 1"],
        ("list_val.txt", train_dir): ["0002/0002_003_07_0303afternoon_0450_0.jpg 2"],
        ("list_query.txt", test_dir): ["0000/0000_000_12_0113morning_0123_0.jpg 0", "0001/0001_004_03_0113noon_0456_1_ex.jpg 1"],
        ("list_gallery.txt", test_dir): ["0000/0000_002_14_0113morning_0789_3.jpg 0", "0001/0001_000_03_0113noon_1011_0.jpg 1",
                                         "0001/0001_001_09_0113noon_1213_2.jpg 1"],
    }
    for (list_name, image_dir), lines in lists.items():
        for line in lines:
            _img(folder / image_dir / line.split()[0])
        (folder / list_name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_msmt17_list_files(tmp_path: Path, version: str) -> None:
    folder = _msmt(tmp_path / "msmt17", version)
    ds = load_dataset("msmt17", tmp_path, msmt_version=version)  # torchreid layout
    assert ds.variant == version and ds.num_train_pids == 3  # val included by default
    assert [s.camid for s in ds.train] == [0, 14, 4, 6]
    assert [(s.pid, s.camid) for s in ds.query] == [(0, 11), (1, 2)]
    assert len(ds.gallery) == 3 and all(Path(s.path).is_file() for s in ds.gallery)
    no_val = load_dataset("msmt17", folder, msmt_version=version, msmt_train_includes_val=False)  # the folder itself
    assert len(no_val.train) == 3 and no_val.num_train_pids == 2
    other = "v1" if version == "v2" else "v2"
    with pytest.raises(DataError, match=f"set data.msmt_version: {version}"):
        load_dataset("msmt17", tmp_path, msmt_version=other)


def test_msmt17_malformed_list_names_the_line(tmp_path: Path) -> None:
    folder = _msmt(tmp_path, "v2")
    (folder / "list_query.txt").write_text("0000/0000_000_12_0113morning_0123_0.jpg 0\nnot a line\n")
    with pytest.raises(DataError, match=r"list_query.txt:2"):
        load_dataset("msmt17", tmp_path)
    (folder / "list_query.txt").write_text("0007/0007_000_12_0113morning_0123_0.jpg 7\n")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("msmt17", tmp_path)


def test_cuhk03np_detected_and_labeled_png(tmp_path: Path) -> None:
    for split, n_train in (("detected", 3), ("labeled", 2)):
        files = {
            "bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png", "0004_c1_2.png"][:n_train],
            "query": ["0003_c1_1.png"],
            "bounding_box_test": ["0003_c2_7.png", "0008_c2_9.png"],
        }
        _tree(tmp_path / "cuhk03-np" / split, files)
    detected = load_dataset("cuhk03np", tmp_path)
    labeled = load_dataset("cuhk03np", tmp_path, cuhk03_split="labeled")
    assert detected.variant == "detected" and len(detected.train) == 3 and detected.num_train_cams == 2
    assert labeled.variant == "labeled" and len(labeled.train) == 2
    assert all(s.path.endswith(".png") for s in detected.gallery)
    assert load_dataset("cuhk03np", tmp_path / "cuhk03-np" / "labeled").stats() == labeled.stats()
    cfg = DataConfig(dataset="cuhk03np", root=str(tmp_path), cuhk03_split="labeled")
    assert build_dataset(cfg).stats() == labeled.stats()
    with pytest.raises(DataError, match="cuhk03-np/"):
        load_dataset("cuhk03np", tmp_path / "cuhk03-np" / "detected" / "query")


def test_synthreid_twins_from_the_manifest(tmp_path: Path) -> None:
    _tree(tmp_path, {"bounding_box_train": ["0001_c1s1_000100_00.jpg", "0002_c2s1_000120_00.jpg"],
                     "query": ["0003_c1s1_000200_00.jpg"],
                     "bounding_box_test": ["0003_c2s1_000220_00.jpg", "0004_c3s1_000240_01.jpg", "0000_c1s1_000260_00.jpg"]})
    manifest = {"ids": {"0001": {"split": "train", "twin": "0002"}, "0002": {"split": "train", "twin": "0001"},
                        "0003": {"split": "test", "twin": "0004"}, "0004": {"split": "test", "twin": "0003"},
                        "0005": {"split": "test", "twin": None}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no published sizes for synthreid
        ds = load_dataset("synthreid", tmp_path)
    assert ds.twins == {1: 2, 2: 1, 3: 4, 4: 3}
    assert "twins: 2 pairs" in format_stats(ds)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json"):
        load_dataset("synthreid", tmp_path)


def test_synthreid_generated_set(tmp_path: Path) -> None:
    synth = pytest.importorskip("pfe.data.synth")
    synth.generate_synthreid(tmp_path / "s", ids_train=4, ids_test=4, images_per_id=4, cameras=2, seed=0)
    ds = load_dataset("synthreid", tmp_path / "s")
    assert ds.num_train_pids == 4 and ds.query and ds.gallery
    assert all(ds.twins[ds.twins[p]] == p for p in ds.twins)


# ---- the real crops --------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL.is_dir(), reason="needs ../shared/fixtures/reid-real")
def test_real_crops_parse_and_decode() -> None:
    for folder, parse in (("market1501", parse_market_name), ("dukemtmc", parse_market_name), ("msmt17", parse_msmt_name)):
        files = sorted((REAL / folder).glob("*.jpg"))
        assert files
        for f in files:
            pid, camid = parse(f.name)
            assert pid >= 0 and camid >= 0
            img = read_image(str(f))
            assert img.mode == "RGB" and min(img.size) > 8
    assert parse_market_name("0051_c3s1_005551_00.jpg") == (51, 2)
    assert parse_market_name("4141_c8_f0022224.jpg") == (4141, 7)
    assert parse_msmt_name("0168_018_14_0303morning_1118_1_ex.jpg") == (168, 13)


@pytest.mark.skipif(not REAL.is_dir(), reason="needs ../shared/fixtures/reid-real")
def test_real_market_crops_as_a_dataset(tmp_path: Path) -> None:
    root = tmp_path / "Market-1501-v15.09.15"
    files = sorted((REAL / "market1501").glob("*.jpg"))
    for i, f in enumerate(files):
        split = "query" if f.name.startswith("0051_c3") else ("bounding_box_train" if i % 3 == 1 else "bounding_box_test")
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / f.name).write_bytes(f.read_bytes())
    ds = load_dataset("market1501", tmp_path)
    assert [(s.pid, s.camid) for s in ds.query] == [(51, 2)]
    assert any(Path(s.path).name.startswith("0051_c4") for s in ds.gallery + ds.train)
    assert any(s.pid == 0 for s in ds.gallery)  # the distractor crop
    image, pid, camid, index = ImageDataset(ds.query, build_test_transform(64, 32))[0]
    assert image.shape == (3, 64, 32) and (pid, camid, index) == (51, 2, 0)


# ---- loader and transforms -----------------------------------------------------------------------


def test_seeded_batches_give_the_same_augmentations_with_any_number_of_workers(tmp_path: Path) -> None:
    """data.workers changes how fast, never what: flips and erasings are drawn per (seed, stage, epoch, place)."""
    from pfe.data.loader import SeededBatches
    from pfe.data.sampler import PKSampler
    from pfe.data.synth import generate_synthreid

    generate_synthreid(tmp_path / "s", ids_train=4, ids_test=2, images_per_id=4, cameras=2, seed=0)
    train = load_dataset("synthreid", tmp_path / "s").train
    dataset = ImageDataset(train, build_train_transform(32, 16, flip_prob=0.5, erasing_prob=0.5))
    sampler = PKSampler([t.pid for t in train], 2, 2, seed=0)

    def epoch(stage: int, number: int, workers: int) -> list[torch.Tensor]:
        sampler.set_epoch(number)
        loader = DataLoader(dataset, batch_sampler=SeededBatches(sampler, 0, stage, number), num_workers=workers)
        return [images for images, *_ in loader]

    kept = SeededBatches(sampler, 0)  # one loader whose workers outlive the epochs, as the trainer's
    persistent = DataLoader(dataset, batch_sampler=kept, num_workers=2, persistent_workers=True)
    for number in (2, 3):
        sampler.set_epoch(number)
        kept.set_epoch(1, number)
        last_of_kept = [images for images, *_ in persistent]

    state = torch.get_rng_state()
    assert torch.equal(dataset[(5, 77)][0], dataset[(5, 77)][0])
    assert torch.equal(torch.get_rng_state(), state)  # the process's own generator is left alone
    in_process = epoch(1, 3, workers=0)
    for other in (epoch(1, 3, workers=1), epoch(1, 3, workers=2), last_of_kept):
        assert len(other) == len(in_process) and all(torch.equal(a, b) for a, b in zip(other, in_process))
    unseeded = [images for images, *_ in DataLoader(dataset, batch_sampler=sampler, num_workers=2)]
    assert not all(torch.equal(a, b) for a, b in zip(unseeded, in_process))  # per-worker streams differ
    for stage, number in ((2, 3), (1, 4)):  # another stage or epoch: other draws on the same images
        sampler.set_epoch(3)
        same_images = DataLoader(dataset, batch_sampler=SeededBatches(sampler, 0, stage, number), num_workers=0)
        assert not all(torch.equal(a, b) for (a, *_), b in zip(same_images, in_process))


def test_corrupt_image_stops_with_its_path_or_is_skipped(tmp_path: Path) -> None:
    _tree(tmp_path, MARKET)
    ds = load_dataset("market1501", tmp_path)
    bad = Path(ds.train[1].path)
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    strict = ImageDataset(ds.train, build_test_transform(16, 8))
    assert strict[0][0].shape == (3, 16, 8)
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read image .*set data.skip_corrupt: true"):
        strict[1]
    with pytest.raises(DataError, match=r"Replace or delete the file$"):  # eval's: it has no data.skip_corrupt
        ImageDataset(ds.train, build_test_transform(16, 8), hint="")[1]
    lenient = ImageDataset(ds.train, build_test_transform(16, 8), skip_corrupt=True)
    with pytest.warns(UserWarning, match=bad.name):
        _, pid, camid, index = lenient[1]
    assert index == 2 and (pid, camid) == (ds.train[2].pid, ds.train[2].camid)
    assert lenient[1][3] == 2  # remembered, no second warning needed
    with pytest.raises(DataError, match="cannot read"):
        read_image(str(tmp_path / "missing.jpg"))
    # Through a DataLoader worker the error comes back wrapped with the worker's traceback; the user sees its message.
    with pytest.raises(DataError) as err:
        next(iter(DataLoader(strict, batch_size=2, num_workers=1)))
    assert "Original Traceback" in str(err.value)
    assert user_message(err.value).startswith(f"{bad}: cannot read image") and "Traceback" not in user_message(err.value)


def test_train_transform_shapes_and_random_erasing() -> None:
    img = Image.new("RGB", (64, 128), (200, 30, 30))
    torch.manual_seed(0)
    tf = build_train_transform(64, 32, flip_prob=0.5, erasing_prob=1.0, pad=4)
    out = tf(img)
    assert out.shape == (3, 64, 32)
    assert (out == 0).all(dim=0).any()  # the erased box holds the mean pixel: 0 after normalising
    plain = build_train_transform(64, 32, flip_prob=0.0, erasing_prob=0.0)(img)
    assert torch.allclose(plain, build_test_transform(64, 32)(img))
    erase = RandomErasing(p=1.0)
    x = torch.ones(3, 100, 50)
    for seed in range(20):
        torch.manual_seed(seed)
        y = erase(x)
        erased = (y[0] != 1).float().mean().item()
        assert erased == 0 or 0.015 <= erased <= 0.41  # area ratio in [sl, sh] = [0.02, 0.4] up to rounding
        assert torch.allclose(y[:, y[0] != 1], torch.tensor(IMAGENET_MEAN)[:, None])
    assert torch.equal(RandomErasing(p=0.0)(x), x)
