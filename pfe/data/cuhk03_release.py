"""CUHK03 from its original release, written once as the CUHK03-NP folders the ``cuhk03np`` loader reads.

The paper evaluates CUHK03 under the new protocol (Zhong et al., CVPR 2017: 767 training and 700 test
identities). Its images come in ``cuhk-03.mat`` (MATLAB v7.3, an HDF5 file) and the protocol in
``cuhk03_new_protocol_config_{detected,labeled}.mat`` (MATLAB v5); torchreid lays them out as

    <release>/cuhk03_release/cuhk-03.mat
    <release>/cuhk03_new_protocol_config_detected.mat
    <release>/cuhk03_new_protocol_config_labeled.mat

(``<release>`` = torchreid's ``<root>/cuhk03``). :func:`prepare_cuhk03` writes

    <root>/cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}/PPPP_cV_II.png

PPPP: the protocol's label of the identity (``labels``, 1..1467); V: the view, 1 or 2 (the camera within
the identity's camera pair, as torchreid's ``camid``); II: the image's index (1-10) in ``cuhk-03.mat``.
The protocol's file names (``filelist``, e.g. ``1_001_1_01.png``: camera pair, identity within the pair,
view, image) locate each image in ``cuhk-03.mat``. Each split is written to a temporary folder first and
renamed when complete, so an interrupted conversion leaves no half-written split. Needs h5py and scipy
(``pip install -e '.[cuhk03]'``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import numpy as np
from PIL import Image

from pfe.config import Cuhk03Split
from pfe.errors import DataError

CUHK03_SPLITS = get_args(Cuhk03Split)  # "detected", "labeled"
MAT_NAME = "cuhk-03.mat"
PROTOCOL_NAME = "cuhk03_new_protocol_config_{split}.mat"
FOLDERS = {"train_idx": "bounding_box_train", "query_idx": "query", "gallery_idx": "bounding_box_test"}


def find_release(release: Path) -> tuple[Path, dict[str, Path]] | None:
    """``cuhk-03.mat`` and the protocol files under ``release`` (or its ``cuhk03/``), as torchreid lays them out."""
    for folder in (release, release / "cuhk03"):
        for mat in (folder / "cuhk03_release" / MAT_NAME, folder / MAT_NAME):
            protocols = {s: folder / PROTOCOL_NAME.format(split=s) for s in CUHK03_SPLITS}
            if mat.is_file() and any(p.is_file() for p in protocols.values()):
                return mat, {s: p for s, p in protocols.items() if p.is_file()}
    return None


def _import(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ModuleNotFoundError:
        raise DataError(
            f"converting CUHK03's .mat release needs {module.split('.')[0]}: pip install -e '.[cuhk03]'"
        ) from None


def read_protocol(path: Path) -> dict[str, dict[str, tuple[int, int]]]:
    """The new protocol's splits: folder -> {file name in ``filelist``: (label, view)}."""
    scipy_io = _import("scipy.io")
    try:
        config = scipy_io.loadmat(str(path))
        names = [str(np.asarray(entry).reshape(-1)[0]) for entry in config["filelist"].reshape(-1)]
        labels = config["labels"].reshape(-1).astype(int)
        splits = {folder: config[key].reshape(-1).astype(int) - 1 for key, folder in FOLDERS.items()}
    except (KeyError, IndexError, ValueError, OSError, scipy_io.matlab.MatReadError) as err:
        raise DataError(f"{path}: not a CUHK03 new-protocol file ({type(err).__name__}: {err}); it holds "
                        "filelist, labels, train_idx, query_idx and gallery_idx") from None
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for folder, indices in splits.items():
        if len(indices) and (indices.min() < 0 or indices.max() >= len(names)):
            raise DataError(f"{path}: {folder} indices outside filelist (1..{len(names)})")
        out[folder] = {names[i]: (int(labels[i]), _view(names[i], path)) for i in indices}
    return out


def _view(name: str, path: Path) -> int:
    parts = Path(name).stem.split("_")
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or parts[2] not in ("1", "2"):
        raise DataError(f"{path}: filelist entry {name!r} is not PAIR_PID_VIEW_IMAGE.png (e.g. 1_001_1_01.png)")
    return int(parts[2])


def _images(mat: Any, split: str, path: Path) -> Any:
    """(pair, identity within the pair, image index from 1, H x W x 3 uint8) of every image of ``split``."""
    if split not in mat:
        raise DataError(f"{path}: no '{split}' images in it (is it CUHK03's cuhk-03.mat?)")
    for pair, pair_ref in enumerate(mat[split][0], start=1):
        cells = mat[pair_ref][()].T  # identities x 10 references (MATLAB stores column-major)
        for person, row in enumerate(cells, start=1):
            for index, ref in enumerate(row, start=1):
                image = mat[ref][()].T
                if image.ndim == 3 and image.size:  # an empty cell: a person without that image
                    yield pair, person, index, image


def prepare_cuhk03(
    release: Path | str,
    root: Path | str,
    splits: tuple[str, ...] = CUHK03_SPLITS,
    *,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Write the CUHK03-NP folders of ``splits`` under ``root``/cuhk03-np from the release at ``release``.
    A split already there is kept unless ``force``. Returns split -> folder -> images written (or found)."""
    found = find_release(Path(release))
    if found is None:
        raise DataError(
            f"cuhk03: no original release under {release}: expected cuhk03_release/{MAT_NAME} and "
            f"{PROTOCOL_NAME.format(split='detected')} (and/or _labeled.mat) there or in {Path(release) / 'cuhk03'}"
        )
    mat_path, protocols = found
    missing = [s for s in splits if s not in protocols]
    if missing:
        raise DataError(f"cuhk03: {', '.join(PROTOCOL_NAME.format(split=s) for s in missing)} not found next to "
                        f"{mat_path.parent}; download the new protocol's files (Zhong et al., CVPR 2017)")
    h5py = _import("h5py")
    counts: dict[str, dict[str, int]] = {}
    for split in splits:
        target = Path(root) / "cuhk03-np" / split
        if target.is_dir() and not force:
            counts[split] = {f: sum(1 for _ in (target / f).glob("*.png")) for f in FOLDERS.values()}
            continue
        protocol = read_protocol(protocols[split])
        where = {name: (folder, label, view) for folder, names in protocol.items()
                 for name, (label, view) in names.items()}
        partial = target.with_name(f".{split}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        for folder in FOLDERS.values():
            (partial / folder).mkdir(parents=True)
        written = dict.fromkeys(FOLDERS.values(), 0)
        try:
            with h5py.File(mat_path, "r") as mat:
                for pair, person, index, image in _images(mat, split, mat_path):
                    place = where.pop(f"{pair}_{person:03d}_{1 if index <= 5 else 2}_{index:02d}.png", None)
                    if place is None:  # not in the protocol's splits
                        continue
                    folder, label, view = place
                    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
                        partial / folder / f"{label:04d}_c{view}_{index:02d}.png")
                    written[folder] += 1
                    if progress is not None:
                        progress(split, sum(written.values()), sum(written.values()) + len(where))
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(f"{mat_path}: cannot read it as MATLAB v7.3 (HDF5): {err}") from None
        except (KeyError, IndexError, TypeError, ValueError) as err:  # HDF5, but not cuhk-03.mat's cells
            shutil.rmtree(partial, ignore_errors=True)
            raise DataError(f"{mat_path}: not CUHK03's cuhk-03.mat ({type(err).__name__}: {err}); it holds "
                            f"'{split}' as camera pairs of identities x 10 image references") from None
        if where:
            shutil.rmtree(partial, ignore_errors=True)
            shown = ", ".join(sorted(where)[:3])
            raise DataError(f"cuhk03 {split}: {len(where)} images of {protocols[split].name} are not in "
                            f"{mat_path} (e.g. {shown}); is the release complete?")
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, target)
        counts[split] = written
    return counts
