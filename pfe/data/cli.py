"""`pfe-study data synth|prepare|stats`: generate the synthetic dataset, write CUHK03-NP from CUHK03's
original release, print a dataset's statistics."""

from __future__ import annotations

import argparse
import sys
import time

PROGRESS_FROM = 5000  # show progress on stderr for sets with at least this many images


def _synth(args: argparse.Namespace) -> int:
    from pfe.data.synth import DEFAULTS, generate_synthreid

    ids_train = args.ids_train if args.ids_train is not None else DEFAULTS["ids_train"]
    ids_test = args.ids_test if args.ids_test is not None else DEFAULTS["ids_test"]
    images_per_id = args.images_per_id if args.images_per_id is not None else DEFAULTS["images_per_id"]
    total = (ids_train + ids_test) * images_per_id
    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = 100 * done // total
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            print(f"\r  {done}/{total} images ({pct}%)", end="\n" if done == total else "", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    manifest = generate_synthreid(
        args.out,
        ids_train=args.ids_train,
        ids_test=args.ids_test,
        images_per_id=args.images_per_id,
        cameras=args.cameras,
        seed=args.seed,
        progress=progress if total >= PROGRESS_FROM else None,
        replace=args.force,
    )
    seconds = time.perf_counter() - t0
    params, counts = manifest["params"], manifest["counts"]
    twins = {
        split: sum(1 for i in manifest["ids"].values() if i["split"] == split and i["twin"])
        for split in ("train", "test")
    }
    print(f"synthreid (seed {manifest['seed']}) written to {args.out} in {seconds:.1f} s")
    print(f"  {params['cameras']} cameras, {params['height']}x{params['width']} JPEG")
    print(
        f"  train   {counts['bounding_box_train']['ids']:5d} ids {counts['bounding_box_train']['images']:6d} images  ({twins['train']} in twin pairs)"
    )
    print(
        f"  query   {counts['query']['ids']:5d} ids {counts['query']['images']:6d} images  ({twins['test']} test ids in twin pairs)"
    )
    print(
        f"  gallery {counts['bounding_box_test']['ids']:5d} ids {counts['bounding_box_test']['images']:6d} images  ({params['distractors']} distractors, pid 0000)"
    )
    print(f"  manifest: {args.out}/manifest.json")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from pfe.data.datasets import format_stats, load_dataset

    dataset = load_dataset(args.dataset, args.root)
    print(format_stats(dataset))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from pfe.data.cuhk03_release import CUHK03_SPLITS, prepare_cuhk03
    from pfe.data.datasets import resolve_root
    from pfe.errors import ConfigError

    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    unknown = [s for s in splits if s not in CUHK03_SPLITS]
    if unknown or not splits:
        raise ConfigError(f"--splits: {', '.join(unknown) or 'none given'}; choose from {', '.join(CUHK03_SPLITS)}")
    root = resolve_root(args.root)

    def progress(split: str, done: int, total: int) -> None:
        if done % 500 == 0 or done == total:
            print(f"\r  {split}: {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    counts = prepare_cuhk03(args.release, root, splits, force=args.force, progress=progress)
    print(f"cuhk03-np written under {root / 'cuhk03-np'} in {time.perf_counter() - t0:.1f} s")
    for split, folders in counts.items():
        print(f"  {split:9s}" + "  ".join(f"{folder} {n}" for folder, n in folders.items()))
    print(f"  train with: data.dataset=cuhk03np data.root={root} data.cuhk03_split=detected")
    return 0


def cli_data(args: argparse.Namespace) -> int:
    """`pfe-study data ACTION`: ``synth`` writes a SynthReID dataset, ``prepare`` a dataset's folders from
    its original release, ``stats`` prints a dataset's statistics."""
    if args.data_command == "synth":
        return _synth(args)
    if args.data_command == "prepare":
        return _prepare(args)
    if args.data_command == "stats":
        return _stats(args)
    raise ValueError(f"unknown data action {args.data_command!r}")  # argparse restricts the choices
