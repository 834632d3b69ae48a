"""`pfe-study`: the command line.

Each command's work lives in the module that owns it (``pfe.<module>:cli_<command>``), imported
only when that command runs, so `pfe-study --help` stays fast and `pfe`, `pfe.model`, `pfe.data`,
`pfe.engine` import without Ray, MLflow or Optuna.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pfe.errors import PFEError, user_message

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("pfe.study.runner", "cli_run", "run a study file as Ray Tune trials tracked in MLflow"),
    "report": ("pfe.study.report", "cli_report", "build a study's tables and plots from MLflow"),
    "train": ("pfe.engine.trainer", "cli_train", "train one config (stage I then stage II), no Ray"),
    "eval": ("pfe.study.eval_command", "cli_eval", "evaluate a trained checkpoint on a dataset"),
    "profile": ("pfe.model.profile", "cli_profile", "parameters and GMACs, Table V style"),
    "ui": ("pfe.study.ui", "cli_ui", "the MLflow UI on a study's tracking store"),
    "bench": ("pfe.bench", "cli_bench", "throughput, evaluation time, memory and step-cost benchmarks"),
    "data": ("pfe.data.cli", "cli_data", "datasets: generate synthetic data, show statistics"),
}


def _add_config_args(p: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", help="YAML config file (default: the paper's recipe)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.side=fa stage1.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pfe-study",
        description="Progressive Feature Enhancement (PFE) person re-ID ablation studies.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    subs = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, _, help_) in COMMANDS.items()}

    p = subs["run"]
    p.add_argument("study", help="study YAML file, e.g. studies/table3.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the trials and stage-I groups; run nothing")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument("--max-concurrent", type=_positive_int, help="at most N trials at once")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="a stand-in trainer with made-up metrics (no data, no torch): checks Ray, MLflow and storage in seconds",
    )

    p = subs["report"]
    p.add_argument("studies", nargs="*", help="study YAML files (default: every study in the store)")
    p.add_argument("--out", default="reports", help="output folder (default: reports/)")
    p.add_argument("--format", default="md,csv,tex", help="comma-separated: md, csv, tex")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the study's)")

    p = subs["train"]
    _add_config_args(p)
    p.add_argument("--out", help="run folder (default: runtime.output_dir/<config hash>)")
    p.add_argument("--stage1-from", help="start stage II from this stage-I checkpoint folder")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints already in the run folder")

    p = subs["eval"]
    p.add_argument("checkpoint", help="a checkpoint file, a run folder or a Tune checkpoint folder")
    p.add_argument("--dataset", required=True, help="registered dataset name")
    p.add_argument("--root", help="dataset root (default: $PFE_DATA)")
    p.add_argument("--sets", nargs="*", help="feature sets, e.g. F5 F2_F3_F4_F5")
    p.add_argument("--export", help="write query/gallery features with pids and camids to this .npz")
    p.add_argument("--rerank", action="store_true", help="also k-reciprocal re-ranking")
    p.add_argument("--log-mlflow", action="store_true", help="log the metrics to the model's MLflow run")
    p.add_argument("--pictures", help="write activation maps and retrieval grids to this folder")

    p = subs["profile"]
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")

    p = subs["ui"]
    p.add_argument("study", nargs="?", help="study YAML file whose tracking store to open")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)

    p = subs["bench"]
    p.add_argument("what", nargs="?", default="all", choices=["all", "eval", "rerank", "train", "cost", "plot"],
                   help="all = train, eval and rerank; cost: FLOPs, bytes and kernels of each training step, "
                   "counted on the CPU; plot: the figure of each training report in --out (default: all)")
    p.add_argument("--device", default="auto", help="cpu | cuda (default: cuda when present)")
    p.add_argument("--out", default="reports/bench", help="output folder for JSON and Markdown")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="train: only these measurements, comma-separated (e.g. stage1,stage1_uncompiled); the "
                   "JPEG set is made only for epoch_* and eval runs only when named")

    p = subs["data"]
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    s = data_sub.add_parser("synth", help="write a synthetic ReID dataset in the Market-1501 layout")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--ids-train", type=int, default=None, help="training identities")
    s.add_argument("--ids-test", type=int, default=None, help="test identities")
    s.add_argument("--images-per-id", type=int, default=None, help="images per identity")
    s.add_argument("--cameras", type=int, default=None, help="number of cameras")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true",
                   help="replace a SynthReID of other seed or sizes already in --out (the same one is written again)")
    s = data_sub.add_parser("prepare", help="write a dataset's folders from its original release "
                            "(cuhk03: cuhk-03.mat and the new protocol's files -> cuhk03-np/)")
    s.add_argument("dataset", choices=["cuhk03"], help="the dataset")
    s.add_argument("--release", required=True, help="the folder holding the release (torchreid's <root>/cuhk03)")
    s.add_argument("--root", help="the data root to write under (default: $PFE_DATA, else ./data)")
    s.add_argument("--splits", default="detected,labeled", help="comma-separated: detected, labeled")
    s.add_argument("--force", action="store_true", help="write a split again even if its folder exists")
    s = data_sub.add_parser("stats", help="print a dataset's statistics")
    s.add_argument("dataset", help="registered dataset name")
    s.add_argument("--root", help="dataset root (default: $PFE_DATA)")
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of trials, 1 or more")
    return int(text)


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name, _ = COMMANDS[command]
    return getattr(importlib.import_module(module_name), func_name)


def _split_config_and_overrides(args: argparse.Namespace) -> None:
    """`train key=value` with no config file: argparse took the first override for the config."""
    config = getattr(args, "config", None)
    if config is not None and "=" in config and not Path(config).is_file():
        args.config, args.overrides = None, [config, *args.overrides]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _split_config_and_overrides(args)
    try:
        return int(_handler(args.command)(args) or 0)
    except PFEError as err:
        print(f"pfe-study {args.command}: {user_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the command could not read or write: named, without a traceback
        if err.filename is None:
            raise
        print(f"pfe-study {args.command}: {err.filename}: {err.strerror or err}; check the path (an output "
              "folder must be a writable folder, not a file)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pfe-study {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
