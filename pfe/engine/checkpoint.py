"""Checkpoint files: atomic writes, safe loads, and the keep-last-two policy."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfe.errors import PFEError

EPOCH_FILE = re.compile(r"^epoch_(\d{4})\.pt$")
FINAL_FILE = "final.pt"
FORMAT = "pfe-checkpoint/1"  # the "format" entry of every checkpoint the trainer writes
REQUIRED_KEYS = ("stage", "epoch", "model", "metrics", "config")  # what resuming and evaluating read
KEEP_LAST = 2


def stage_dir(workdir: Path, stage: int) -> Path:
    return Path(workdir) / f"stage{stage}"


def epoch_path(workdir: Path, stage: int, epoch: int) -> Path:
    return stage_dir(workdir, stage) / f"epoch_{epoch:04d}.pt"


def final_path(workdir: Path, stage: int) -> Path:
    return stage_dir(workdir, stage) / FINAL_FILE


def epoch_checkpoints(workdir: Path, stage: int) -> list[tuple[int, Path]]:
    """(epoch, path) of the stage's per-epoch checkpoints, oldest first."""
    folder = stage_dir(workdir, stage)
    found = [(int(m.group(1)), p) for p in folder.glob("epoch_*.pt") if (m := EPOCH_FILE.match(p.name))]
    return sorted(found)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def prune(workdir: Path, stage: int, keep: int = KEEP_LAST) -> None:
    """Keep the last ``keep`` epoch checkpoints of a stage (its final.pt is never touched)."""
    for _, path in epoch_checkpoints(workdir, stage)[:-keep]:
        path.unlink(missing_ok=True)


RESUME_ADVICE = "delete it: the run resumes from the newest checkpoint left, or restarts that stage"


def load(path: str | Path, advice: str = RESUME_ADVICE) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a missing, broken or foreign file is a PFEError naming
    it, why, and ``advice``."""
    path = Path(path)
    if not path.is_file():
        raise PFEError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise PFEError(f"{path}: not a readable pfe checkpoint ({_load_failure(err)}); {advice}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PFEError(
            f"{path}: not a pfe checkpoint (a torch file without format {FORMAT!r}; `pfe-study train` writes "
            f"stage1/final.pt, stage2/final.pt and epoch_NNNN.pt); {advice}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise PFEError(f"{path}: a pfe checkpoint without {', '.join(missing)} (damaged or hand-made); {advice}")
    return state


def _load_failure(err: Exception) -> str:
    """torch.load's reason in one line (its own text goes on to suggest weights_only=False: never here)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n", 1)[0]
        return f"not a torch file, or one holding objects a weights-only load refuses: {detail}"
    reason = text.split(". ", 1)[0].split("\n", 1)[0]
    if len(reason) < 12:  # "", "101" (pickle's opcode), "[Errno 22] ...": torch says nothing useful
        return f"empty, truncated or not a torch file: {type(err).__name__} {reason}".rstrip()
    return reason


def rng_state() -> dict[str, Any]:
    """Every RNG a training epoch draws from, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
