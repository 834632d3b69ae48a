"""The GPU machines have torch but not Ray, MLflow or Optuna: the core must import without them."""

from __future__ import annotations

import subprocess
import sys

CORE = ["pfe", "pfe.config", "pfe.model", "pfe.losses", "pfe.data.datasets", "pfe.data.synth",
        "pfe.engine.trainer", "pfe.engine.evaluation", "pfe.engine.rerank", "pfe.engine.eval_checkpoint", "pfe.bench",
        "pfe.bench.train", "pfe.bench.train_report", "pfe.bench.cost", "pfe.bench.evaluation"]


def test_core_imports_without_ray_mlflow_optuna():
    code = (
        "import sys\n"
        "for name in ('ray', 'mlflow', 'optuna'):\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        f"for module in {CORE!r}:\n"
        "    __import__(module)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "pfe.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("run", "report", "train", "eval", "profile", "ui", "bench", "data"):
        assert f"    {command} " in proc.stdout, command


def test_the_study_driver_imports_without_torch():
    """`pfe-study run --simulate` and the driver of a real study never need torch (about 4 s and 1 GB to import):
    trials import it in their own worker processes."""
    code = "import sys\nimport pfe.study.runner, pfe.study.report, pfe.study.eval_command\nprint('torch' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr or proc.stdout
