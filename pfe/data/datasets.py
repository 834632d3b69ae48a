"""ReID dataset registry: market1501, dukemtmcreid, msmt17, cuhk03np, synthreid.

Every dataset is read from its real on-disk layout and file names. A root prepared for torchreid
(``root/market1501/Market-1501-v15.09.15/...``) or for fast-reid (``root/Market-1501-v15.09.15/...``)
works unchanged, and so does a root that is the dataset folder itself. The root comes from the
config (``data.root``) or ``--root``, else ``$PFE_DATA``, else ``./data``.

Conventions (those of torchreid and fast-reid): junk images (pid -1) are dropped, distractors
(pid 0 in Market-1501 and DukeMTMC-reID) stay in the gallery, camera ids start at 0, query and
gallery keep their original pids, and training pids are relabelled 0..N-1 in sorted order. File
names are parsed by regexes applied to the file name only, never to the full path.

MSMT17 and its validation list: the official MSMT17 training set is 32,621 images of 1,041 ids;
its ``list_val.txt`` (2,373 images) is carved out of it, the rest is ``list_train.txt`` (30,248).
``msmt_train_includes_val`` (default True) trains on both, i.e. on the official training set, as
the MSMT17 paper and BoT-style code bases do. torchreid 0.2.5 and fast-reid 1.4.0 add the val list
only when asked (``combineall``); set the option False to match them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, get_args

from pfe.config import Cuhk03Split, DataConfig
from pfe.errors import DataError

SPLITS = ("train", "query", "gallery")
MARKET_DIRS = ("bounding_box_train", "query", "bounding_box_test")
# Market-1501, DukeMTMC-reID, CUHK03-NP, SynthReID: PPPP_cC... (Market: 0002_c1s1_000451_03.jpg,
# Duke: 0001_c2_f0046182.jpg, CUHK03-NP: 0001_c1_1.png); pid -1 is junk, 0000 a distractor.
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
# MSMT17: PPPP_SSS_CC_DATE_FFFF_N[_ex].jpg (pid, sequence, camera 01-15, ...).
MSMT_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Published split sizes: split -> (ids or None, images).
PUBLISHED: dict[str, dict[str, tuple[int | None, int]]] = {
    "market1501": {"train": (751, 12936), "query": (None, 3368), "gallery": (None, 15913)},
    "dukemtmcreid": {"train": (702, 16522), "query": (None, 2228), "gallery": (None, 17661)},
    "msmt17": {"train": (1041, 32621), "query": (None, 11659), "gallery": (None, 82161)},
    "msmt17/no-val": {"train": (1041, 30248), "query": (None, 11659), "gallery": (None, 82161)},
    "cuhk03np/detected": {"train": (767, 7365), "query": (None, 1400), "gallery": (None, 5332)},
    "cuhk03np/labeled": {"train": (767, 7368), "query": (None, 1400), "gallery": (None, 5328)},
}


class DatasetCountWarning(UserWarning):
    """A known dataset whose split sizes differ from the published ones."""


class Sample(NamedTuple):
    path: str
    pid: int
    camid: int


@dataclass
class ReIDDataset:
    """Train / query / gallery samples of one dataset (train pids relabelled 0..N-1)."""

    name: str
    root: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    num_train_pids: int
    num_train_cams: int
    twins: dict[int, int] = field(default_factory=dict)  # synthreid: pid -> twin pid (file-name pids)
    train_pid_map: dict[int, int] = field(default_factory=dict)  # file-name pid -> training label
    variant: str = ""  # "detected"/"labeled" (cuhk03np), "v1"/"v2" (msmt17)
    published_key: str | None = None

    def stats(self) -> dict[str, dict[str, int]]:
        """Ids, images and cameras per split."""
        return {
            split: {
                "ids": len({s.pid for s in samples}),
                "images": len(samples),
                "cameras": len({s.camid for s in samples}),
            }
            for split, samples in zip(SPLITS, (self.train, self.query, self.gallery))
        }

    def published_mismatches(self) -> list[str]:
        """How the split sizes differ from the published ones (empty when they agree or are unknown)."""
        published = PUBLISHED.get(self.published_key or "")
        if not published:
            return []
        stats = self.stats()
        problems = []
        for split, (ids, images) in published.items():
            got = stats[split]
            if got["images"] != images:
                problems.append(f"{split}: {got['images']:,} images, published {images:,}")
            if ids is not None and got["ids"] != ids:
                problems.append(f"{split}: {got['ids']:,} ids, published {ids:,}")
        return problems


def format_stats(ds: ReIDDataset) -> str:
    """A printable summary table, with a note when the sizes differ from the published ones."""
    title = ds.name + (f" ({ds.variant})" if ds.variant else "")
    lines = [f"{title} at {ds.root}", f"  {'subset':<8} {'ids':>7} {'images':>9} {'cameras':>8}"]
    for split, s in ds.stats().items():
        lines.append(f"  {split:<8} {s['ids']:>7,} {s['images']:>9,} {s['cameras']:>8,}")
    if ds.twins:
        lines.append(f"  twins: {len(ds.twins) // 2} pairs")
    mismatches = ds.published_mismatches()
    if mismatches:
        lines.append("  differs from the published sizes: " + "; ".join(mismatches))
    return "\n".join(lines)


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root`` if given, else ``$PFE_DATA``, else ``./data``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("PFE_DATA")
    return Path(env).expanduser() if env else Path("data")


# ---- helpers ------------------------------------------------------------------------------------


def _layout_error(name: str, root: Path, tried: Iterable[Path], layout: str) -> DataError:
    looked = "\n".join(f"    {p}" for p in tried)
    return DataError(
        f"{name}: no dataset found under {root}\n  looked in:\n{looked}\n  expected layout:\n{layout}\n"
        "  Point data.root (or --root, or $PFE_DATA) at the folder that holds it."
    )


def _find(root: Path, candidates: Iterable[Path], ok: Callable[[Path], bool]) -> tuple[Path | None, list[Path]]:
    tried = []
    for candidate in candidates:
        tried.append(candidate)
        if ok(candidate):
            return candidate, tried
    return None, tried


def _has_dirs(*names: str) -> Callable[[Path], bool]:
    return lambda p: all((p / n).is_dir() for n in names)


def _image_names(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())


def _parse_market_dir(folder: Path, name: str) -> list[Sample]:
    """Images named PPPP_cC...; junk (pid -1) dropped; camera ids from 0."""
    samples: list[Sample] = []
    unparsed: list[str] = []
    for file in _image_names(folder):
        m = MARKET_NAME.match(file)
        if m is None:
            unparsed.append(file)
            continue
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == -1:
            continue
        if pid < -1 or cam < 1:
            unparsed.append(file)
            continue
        samples.append(Sample(str(folder / file), pid, cam - 1))
    _warn_unparsed(name, folder, unparsed, "PPPP_cC..._.jpg")
    return samples


def _warn_unparsed(name: str, folder: Path, unparsed: list[str], pattern: str) -> None:
    if unparsed:
        shown = ", ".join(unparsed[:3]) + (" ..." if len(unparsed) > 3 else "")
        warnings.warn(
            f"{name}: {len(unparsed)} file(s) in {folder} do not look like {pattern} and are skipped: {shown}",
            stacklevel=3,
        )


def parse_market_name(filename: str) -> tuple[int, int]:
    """(pid, camid from 0) of a Market-style file name (Market, Duke, CUHK03-NP, SynthReID)."""
    m = MARKET_NAME.match(Path(filename).name)
    if m is None:
        raise DataError(f"{filename}: not a PPPP_cC... file name")
    return int(m.group(1)), int(m.group(2)) - 1


def parse_msmt_name(filename: str) -> tuple[int, int]:
    """(pid, camid from 0) of an MSMT17 file name PPPP_SSS_CC_..."""
    m = MSMT_NAME.match(Path(filename).name)
    if m is None:
        raise DataError(f"{filename}: not an MSMT17 file name (PPPP_SSS_CC_...)")
    return int(m.group(1)), int(m.group(3)) - 1


def _relabel(train: list[Sample]) -> tuple[list[Sample], dict[int, int]]:
    mapping = {pid: label for label, pid in enumerate(sorted({s.pid for s in train}))}
    return [Sample(s.path, mapping[s.pid], s.camid) for s in train], mapping


def _make(name: str, root: Path, train: list[Sample], query: list[Sample], gallery: list[Sample], **extra: Any) -> ReIDDataset:
    for split, samples in (("query", query), ("gallery", gallery)):
        if not samples:
            raise DataError(f"{name}: the {split} split at {root} holds no usable image")
    if not train:  # evaluation still works; training stops in the sampler with its own message
        warnings.warn(f"{name}: the train split at {root} holds no usable image", stacklevel=3)
    train, mapping = _relabel(train)
    return ReIDDataset(
        name=name,
        root=str(root),
        train=train,
        query=query,
        gallery=gallery,
        num_train_pids=len(mapping),
        num_train_cams=len({s.camid for s in train}),
        train_pid_map=mapping,
        **extra,
    )


def _market_layout(name: str, base: Path, folder: Path, published_key: str | None, **extra: Any) -> ReIDDataset:
    train, query, gallery = (_parse_market_dir(folder / d, name) for d in MARKET_DIRS)
    return _make(name, base, train, query, gallery, published_key=published_key, **extra)


# ---- datasets -----------------------------------------------------------------------------------


def _load_bounding_box_set(name: str, root: Path, top: str, torchreid_dir: str, *aliases: str) -> ReIDDataset:
    """A Market-style release (``top`` holding bounding_box_train/, query/, bounding_box_test/) as
    fast-reid (<root>/<top>) or torchreid (<root>/<torchreid_dir>/<top>) lay it out, or <root> itself."""
    candidates = [root, root / top, root / torchreid_dir / top, root / torchreid_dir, *(root / a for a in aliases)]
    folder, tried = _find(root, candidates, _has_dirs(*MARKET_DIRS))
    if folder is None:
        layout = (
            f"    <root>/{top}/{{bounding_box_train,query,bounding_box_test}}/*.jpg   (fast-reid)\n"
            f"    <root>/{torchreid_dir}/{top}/...   (torchreid)\n"
            "    or <root> = the folder holding bounding_box_train/, query/, bounding_box_test/"
        )
        raise _layout_error(name, root, tried, layout)
    return _market_layout(name, folder, folder, name)


def _load_market(root: Path) -> ReIDDataset:
    return _load_bounding_box_set("market1501", root, "Market-1501-v15.09.15", "market1501", "Market-1501")


def _load_duke(root: Path) -> ReIDDataset:
    return _load_bounding_box_set("dukemtmcreid", root, "DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid/DukeMTMC-reID")


def _load_cuhk03np(root: Path, split: str = "detected") -> ReIDDataset:
    if split not in get_args(Cuhk03Split):
        raise DataError(f"cuhk03np: data.cuhk03_split must be one of {', '.join(get_args(Cuhk03Split))}, got {split!r}")
    candidates = [root / "cuhk03-np" / split, root / split, root / "cuhk03np" / split, root]
    folder, tried = _find(root, candidates, _has_dirs(*MARKET_DIRS))
    if folder is None:
        layout = (
            "    <root>/cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}/*.png\n"
            "    or <root> = cuhk03-np/, or the detected/ (labeled/) folder itself"
        )
        error = _layout_error("cuhk03np", root, tried, layout)
        from pfe.data.cuhk03_release import find_release

        release = find_release(root)
        if release is not None:  # torchreid's layout of the original .mat release: convert it once
            error.args = (f"{error.args[0]}\n  It holds CUHK03's original release ({release[0]}): write the "
                          f"CUHK03-NP folders from it once with\n    pfe-study data prepare cuhk03 --release {root} "
                          f"--root {root}",)
        raise error
    return _market_layout("cuhk03np", folder, folder, f"cuhk03np/{split}", variant=split)


MSMT_VERSIONS = {"v1": ("MSMT17_V1", "train", "test"), "v2": ("MSMT17_V2", "mask_train_v2", "mask_test_v2")}
MSMT_LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")


def _read_msmt_list(list_path: Path, image_dir: Path) -> list[Sample]:
    samples: list[Sample] = []
    try:
        lines = list_path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"msmt17: cannot read {list_path} ({err.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        m = MSMT_NAME.match(Path(parts[0]).name) if len(parts) == 2 and parts[1].lstrip("-").isdigit() else None
        if m is None:
            raise DataError(
                f"msmt17: {list_path}:{number}: expected 'PPPP/PPPP_SSS_CC_....jpg LABEL', got {line.strip()!r}"
            )
        samples.append(Sample(str(image_dir / parts[0]), int(parts[1]), int(m.group(3)) - 1))
    for s in (samples[:1] + samples[-1:]) if samples else []:
        if not Path(s.path).is_file():
            raise DataError(f"msmt17: {list_path} lists {s.path}, which does not exist: is {image_dir} complete?")
    return samples


def _load_msmt(root: Path, version: str = "v2", train_includes_val: bool = True) -> ReIDDataset:
    if version not in MSMT_VERSIONS:
        raise DataError(f"msmt17: data.msmt_version must be 'v1' or 'v2', got {version!r}")
    top, train_dir, test_dir = MSMT_VERSIONS[version]

    def ok(p: Path) -> bool:
        return (p / train_dir).is_dir() and (p / test_dir).is_dir() and all((p / f).is_file() for f in MSMT_LISTS)

    candidates = [root, root / top, root / "msmt17" / top, root / "MSMT17" / top]
    folder, tried = _find(root, candidates, ok)
    if folder is None:
        other_top, other_train, _ = MSMT_VERSIONS["v1" if version == "v2" else "v2"]
        other = [p for p in (root, root / other_top, root / "msmt17" / other_top) if (p / other_train).is_dir()]
        hint = (
            f"\n  found the other version at {other[0]}: set data.msmt_version: {'v1' if version == 'v2' else 'v2'}"
            if other
            else ""
        )
        layout = (
            f"    <root>/{top}/{{{train_dir},{test_dir}}}/PPPP/*.jpg and <root>/{top}/{{{','.join(MSMT_LISTS)}}}"
            f"   (fast-reid)\n    <root>/msmt17/{top}/...   (torchreid)\n    or <root> = the {top} folder itself"
        )
        raise DataError(str(_layout_error("msmt17", root, tried, layout)) + hint)
    train = _read_msmt_list(folder / "list_train.txt", folder / train_dir)
    if train_includes_val:
        train += _read_msmt_list(folder / "list_val.txt", folder / train_dir)
    query = _read_msmt_list(folder / "list_query.txt", folder / test_dir)
    gallery = _read_msmt_list(folder / "list_gallery.txt", folder / test_dir)
    key = "msmt17" if train_includes_val else "msmt17/no-val"
    return _make("msmt17", folder, train, query, gallery, published_key=key, variant=version)


def _load_synthreid(root: Path) -> ReIDDataset:
    def ok(p: Path) -> bool:
        return _has_dirs(*MARKET_DIRS)(p) and (p / "manifest.json").is_file()

    folder, tried = _find(root, [root, root / "synthreid"], ok)
    if folder is None:
        layout = (
            "    <root>/{bounding_box_train,query,bounding_box_test}/PPPP_cCsS_FFFFFF_NN.jpg and <root>/manifest.json\n"
            "    (make one with `pfe-study data synth --out DIR`)"
        )
        raise _layout_error("synthreid", root, tried, layout)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"synthreid: {folder / 'manifest.json'} is not readable JSON ({err})") from None
    twins: dict[int, int] = {}
    ids = manifest.get("ids", {}) if isinstance(manifest, dict) else {}
    for pid, entry in ids.items() if isinstance(ids, dict) else []:
        twin = entry.get("twin") if isinstance(entry, dict) else None
        if twin is not None:
            twins[int(pid)] = int(twin)
    return _market_layout("synthreid", folder, folder, None, twins=twins)


LOADERS: dict[str, Callable[..., ReIDDataset]] = {
    "market1501": _load_market,
    "dukemtmcreid": _load_duke,
    "msmt17": _load_msmt,
    "cuhk03np": _load_cuhk03np,
    "synthreid": _load_synthreid,
}
OPTIONS: dict[str, dict[str, str]] = {  # load_dataset option -> loader argument, per dataset
    "msmt17": {"msmt_version": "version", "msmt_train_includes_val": "train_includes_val"},
    "cuhk03np": {"cuhk03_split": "split"},
}


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, **options: Any) -> ReIDDataset:
    """Load a registered dataset. ``options``: ``cuhk03_split`` (detected | labeled),
    ``msmt_version`` (v1 | v2), ``msmt_train_includes_val`` (bool); options of other datasets are
    ignored. Warns (DatasetCountWarning) when a known dataset's sizes differ from the published ones."""
    if name not in LOADERS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(LOADERS)}")
    known = {"cuhk03_split", "msmt_version", "msmt_train_includes_val"}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"load_dataset: unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    path = resolve_root(root)
    if not path.is_dir():
        raise DataError(
            f"{name}: data root {path} does not exist. Set data.root in the config, pass --root, or set $PFE_DATA "
            "to the folder that holds the datasets."
        )
    kwargs = {arg: options[opt] for opt, arg in OPTIONS.get(name, {}).items() if opt in options}
    ds = LOADERS[name](path, **kwargs)
    mismatches = ds.published_mismatches()
    if mismatches:
        warnings.warn(
            f"{name} at {ds.root} differs from the published sizes: {'; '.join(mismatches)}",
            DatasetCountWarning,
            stacklevel=2,
        )
    return ds


def build_dataset(data_cfg: DataConfig) -> ReIDDataset:
    """The one mapping from the config's ``data`` section to a loaded dataset."""
    return load_dataset(
        data_cfg.dataset,
        data_cfg.root,
        cuhk03_split=data_cfg.cuhk03_split,
        msmt_version=data_cfg.msmt_version,
        msmt_train_includes_val=data_cfg.msmt_train_includes_val,
    )
