"""`pfe-study data prepare cuhk03`: CUHK03's original .mat release -> the CUHK03-NP folders.

The release is built here as MATLAB writes it (as torchreid reads it): ``cuhk-03.mat`` is HDF5 with
``detected`` / ``labeled`` = 1 x pairs references, each to a 10 x identities (stored transposed) array of
references to 3 x W x H uint8 images, an empty cell a 2-element uint64 array; the protocol files are
MATLAB v5 (scipy.io.savemat) with filelist, labels and 1-based train_idx / query_idx / gallery_idx.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from pfe.cli import main
from pfe.data.cuhk03_release import prepare_cuhk03
from pfe.data.datasets import load_dataset
from pfe.errors import DataError

PAIRS, PERSONS = 2, 4  # identities per camera pair
EMPTY = {(1, 2, 9), (2, 4, 10)}  # (pair, person, image index): cells without an image


def _image(pair: int, person: int, index: int) -> np.ndarray:
    """H x W x 3, a colour unique to the image, and a gradient so that orientation matters."""
    h, w = 12, 6
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[..., 0] = 20 * pair + person
    image[..., 1] = 10 * index
    image[..., 2] = np.arange(h)[:, None] * 10 + np.arange(w)[None, :]
    return image


def write_release(folder: Path, *, drop_from_mat: tuple[int, int, int] | None = None) -> dict[str, list[str]]:
    """A small release under ``folder`` (torchreid's <root>/cuhk03); returns each protocol split's file names."""
    (folder / "cuhk03_release").mkdir(parents=True)
    with h5py.File(folder / "cuhk03_release" / "cuhk-03.mat", "w") as mat:
        refs = mat.create_group("#refs#")
        count = [0]

        def store(array: np.ndarray) -> h5py.Reference:
            count[0] += 1
            return refs.create_dataset(f"r{count[0]}", data=array).ref

        for kind in ("detected", "labeled"):
            pairs = mat.create_dataset(kind, (1, PAIRS), dtype=h5py.ref_dtype)
            for pair in range(1, PAIRS + 1):
                cells = np.empty((10, PERSONS), dtype=object)  # MATLAB's identities x 10, transposed
                for person in range(1, PERSONS + 1):
                    for index in range(1, 11):
                        empty = (pair, person, index) in EMPTY or (pair, person, index) == drop_from_mat
                        data = np.zeros(2, dtype=np.uint64) if empty else _image(pair, person, index).T
                        cells[index - 1, person - 1] = store(data)
                pairs[0, pair - 1] = store_refs(refs, f"pair{kind}{pair}", cells)
    # the new protocol: identities 1..PAIRS*PERSONS labelled in order; the first two train, the rest test
    # (view-1 images of a test identity are queries, view-2 its gallery), image 8 of every identity left out
    names, labels, splits = [], [], {"train_idx": [], "query_idx": [], "gallery_idx": []}
    for pair in range(1, PAIRS + 1):
        for person in range(1, PERSONS + 1):
            label = (pair - 1) * PERSONS + person
            for index in range(1, 11):
                if (pair, person, index) in EMPTY or index == 8:
                    continue
                view = 1 if index <= 5 else 2
                names.append(f"{pair}_{person:03d}_{view}_{index:02d}.png")
                labels.append(label)
                key = "train_idx" if label <= 2 else ("query_idx" if view == 1 else "gallery_idx")
                splits[key].append(len(names))  # 1-based, as MATLAB's
    for kind in ("detected", "labeled"):
        filelist = np.empty((len(names), 1), dtype=object)
        filelist[:, 0] = names
        savemat(folder / f"cuhk03_new_protocol_config_{kind}.mat", {
            "filelist": filelist, "labels": np.array(labels)[:, None],
            **{k: np.array(v)[:, None] for k, v in splits.items()},
        })
    return {k: [names[i - 1] for i in v] for k, v in splits.items()}


def store_refs(refs: h5py.Group, name: str, cells: np.ndarray) -> h5py.Reference:
    dataset = refs.create_dataset(name, cells.shape, dtype=h5py.ref_dtype)
    for position in np.ndindex(cells.shape):
        dataset[position] = cells[position]
    return dataset.ref


def test_the_release_becomes_cuhk03_np_and_loads(tmp_path: Path) -> None:
    release, root = tmp_path / "cuhk03", tmp_path / "data"
    protocol = write_release(release)
    counts = prepare_cuhk03(release, root)
    sizes = {f: len(protocol[k]) for k, f in (("train_idx", "bounding_box_train"), ("query_idx", "query"),
                                              ("gallery_idx", "bounding_box_test"))}
    assert counts == {"detected": sizes, "labeled": sizes}
    assert not list((root / "cuhk03-np").glob(".*"))  # no partial folder left
    with pytest.warns(UserWarning, match="published"):  # a tiny set, not the published sizes
        ds = load_dataset("cuhk03np", root, cuhk03_split="detected")
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == tuple(sizes.values())
    assert ds.num_train_pids == 2 and {s.pid for s in ds.query} == {s.pid for s in ds.gallery} == set(range(3, 9))
    assert {s.camid for s in ds.query} == {0} and {s.camid for s in ds.gallery} == {1}  # view 1 -> camera 0
    # the pixels of one image, as cuhk-03.mat holds it (pair 2, person 3 = label 7; index 6 = view 2)
    png = root / "cuhk03-np" / "detected" / "bounding_box_test" / "0007_c2_06.png"
    assert np.array_equal(np.asarray(Image.open(png)), _image(2, 3, 6))
    assert not (root / "cuhk03-np" / "detected" / "bounding_box_train" / "0001_c2_08.png").exists()  # not in the protocol


def test_an_image_missing_from_the_mat_stops_with_the_count_and_writes_nothing(tmp_path: Path) -> None:
    release, root = tmp_path / "cuhk03", tmp_path / "data"
    write_release(release, drop_from_mat=(1, 1, 3))
    with pytest.raises(DataError, match=r"1 images of cuhk03_new_protocol_config_detected.mat are not in .*1_001_1_03.png"):
        prepare_cuhk03(release, root, ("detected",))
    assert not (root / "cuhk03-np" / "detected").exists() and not list((root / "cuhk03-np").glob(".*"))


def test_a_corrupt_mat_and_a_missing_release_name_the_path(tmp_path: Path) -> None:
    release = tmp_path / "cuhk03"
    write_release(release)
    (release / "cuhk03_release" / "cuhk-03.mat").write_bytes(b"not an HDF5 file" * 64)
    with pytest.raises(DataError, match=r"cuhk-03.mat: cannot read it as MATLAB v7.3"):
        prepare_cuhk03(release, tmp_path / "data")
    with pytest.raises(DataError, match=r"no original release under .*nowhere"):
        prepare_cuhk03(tmp_path / "nowhere", tmp_path / "data")


def test_a_truncated_protocol_file_and_a_foreign_hdf5_file_name_the_path(tmp_path: Path) -> None:
    release = tmp_path / "cuhk03"
    write_release(release)
    protocol = release / "cuhk03_new_protocol_config_detected.mat"
    protocol.write_bytes(b"")  # scipy's MatReadError: the file appears to be truncated
    with pytest.raises(DataError, match=r"cuhk03_new_protocol_config_detected.mat: not a CUHK03 new-protocol file"):
        prepare_cuhk03(release, tmp_path / "data", ("detected",))
    with h5py.File(release / "cuhk03_release" / "cuhk-03.mat", "w") as mat:  # HDF5, but plain numbers
        mat.create_dataset("labeled", data=np.zeros((1, 2)))
    with pytest.raises(DataError, match=r"cuhk-03.mat: not CUHK03's cuhk-03.mat .*'labeled'"):
        prepare_cuhk03(release, tmp_path / "data", ("labeled",))
    assert not list((tmp_path / "data" / "cuhk03-np").glob(".*"))  # no partial folder left


def test_the_loader_points_at_the_release_and_the_cli_converts_it(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    write_release(root / "cuhk03")  # torchreid's layout: <root>/cuhk03/...
    with pytest.raises(DataError, match="pfe-study data prepare cuhk03 --release"):
        load_dataset("cuhk03np", root)
    assert main(["data", "prepare", "cuhk03", "--release", str(root), "--root", str(root), "--splits", "labeled"]) == 0
    out = capsys.readouterr().out
    assert "labeled" in out and "data.dataset=cuhk03np" in out and not (root / "cuhk03-np" / "detected").exists()
    with pytest.warns(UserWarning, match="published"):
        assert len(load_dataset("cuhk03np", root, cuhk03_split="labeled").query) > 0
    assert main(["data", "prepare", "cuhk03", "--release", str(root), "--root", str(root), "--splits", "both"]) == 2
    assert "--splits: both" in capsys.readouterr().err
