"""Parameters and multiply-accumulates, Table V style (`pfe-study profile`).

Conventions (those of Table V): parameters exclude the classifier heads (they do not exist at test
time) and include the BNNecks; the paper's "GFLOPs" are multiply-accumulates, so GMACs = FLOPs / 2
as counted by torch.utils.flop_counter (convolutions and matrix products; element-wise operations,
pooling and BN are not counted) for one image at the configured input size, test-time path (all
features, no classifier). The model is built on the meta device: no weights are loaded or allocated.

Measured for ResNet50, last stride 1, 384x192 (see reports/table5_profile.md): backbone 23.51 M,
9.12 GMACs; +TSAM 24.91 M (+5.96 %); PFE TSAM+MFA-dagger with C = 128 (the default): 25.66 M,
10.23 GMACs (+3.18 %); with C = 96: 25.47 M, 10.00 GMACs (+2.35 %), closer to the paper's 25.5 M, 9.9, +2.5 %.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from pfe.config import ExperimentConfig, load_config
from pfe.model import build_model

# Table V's variants: config overrides on top of the profiled config.
VARIANTS: dict[str, dict[str, Any]] = {
    "backbone": {"model.attention": "none", "model.side": "none"},
    "tsam": {"model.attention": "tsam", "model.side": "none"},
    "tsam+mfa": {"model.attention": "tsam", "model.side": "mfa", "model.separable": False},
    "tsam+mfa-dagger": {"model.attention": "tsam", "model.side": "mfa", "model.separable": True},
}

# What the paper states for ResNet50, last stride 1, 384x192 (Table V and Sec. V-C.7; None: not stated).
PAPER_SETTING = {"backbone": "resnet50", "last_stride": 1, "height": 384, "width": 192}
PAPER_ROWS: dict[str, tuple[float | None, float | None]] = {
    "backbone": (23.5, 9.1),
    "tsam": (None, None),
    "tsam+mfa": (None, None),
    "tsam+mfa-dagger": (25.5, 9.9),
}
PAPER_OVERHEADS = {"tsam_params_pct": 6.0, "mfa_dagger_params_pct": 2.5}


def profile_model(cfg: ExperimentConfig) -> dict[str, float]:
    """``{"params_m", "gmacs"}`` of the model ``cfg`` describes (never loads weights)."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes=1, pretrained="none").eval()
        heads = {id(p) for p in model.classifier_parameters()}
        params = sum(p.numel() for p in model.parameters() if id(p) not in heads)
        images = torch.empty(1, 3, cfg.data.height, cfg.data.width)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model.features(images, stage=2 if model.side is not None else 1)
    return {"params_m": params / 1e6, "gmacs": counter.get_total_flops() / 2e9}


def table5(cfg: ExperimentConfig) -> dict[str, Any]:
    """Table V rows for ``cfg``'s backbone, input size and side settings, with relative overheads."""
    rows = [{"variant": name, **profile_model(cfg.with_overrides(over))} for name, over in VARIANTS.items()]
    by = {r["variant"]: r for r in rows}
    base = by["backbone"]["params_m"]
    overheads = {
        "tsam_params_pct": 100 * (by["tsam"]["params_m"] - base) / base,
        "mfa_params_pct": 100 * (by["tsam+mfa"]["params_m"] - by["tsam"]["params_m"]) / base,
        "mfa_dagger_params_pct": 100 * (by["tsam+mfa-dagger"]["params_m"] - by["tsam"]["params_m"]) / base,
    }
    m = cfg.model
    setting = {
        "backbone": m.backbone,
        "last_stride": m.last_stride,
        "height": cfg.data.height,
        "width": cfg.data.width,
        "channels": m.channels,
        "side_dim": m.side_dim,
        "reduction": m.reduction,
    }
    return {
        "rows": rows,
        "overheads": overheads,
        "configured": {
            "attention": m.attention,
            "side": m.side,
            "separable": m.separable,
            **profile_model(cfg),
        },
        "setting": setting,
        "paper_setting": all(setting[k] == v for k, v in PAPER_SETTING.items()),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table (with the paper's numbers when the setting is the paper's)."""
    s = result["setting"]
    paper = result["paper_setting"]
    lines = [
        f"{s['backbone']}, last stride {s['last_stride']}, input {s['height']}x{s['width']}, "
        f"C = {s['channels']}, side features {s['side_dim']}-d, r = {s['reduction']}; "
        "parameters exclude classifier heads, GMACs = multiply-accumulates per image",
        "",
        "| variant | params (M) | GMACs |" + (" paper params (M) | paper GMACs |" if paper else ""),
        "|---|---:|---:|" + ("---:|---:|" if paper else ""),
    ]
    for row in result["rows"]:
        line = f"| {row['variant']} | {row['params_m']:.2f} | {row['gmacs']:.2f} |"
        if paper:
            p, g = PAPER_ROWS[row["variant"]]
            line += f" {_fmt(p, '.1f')} | {_fmt(g, '.1f')} |"
        lines.append(line)
    o = result["overheads"]
    ref = (lambda key: f" (paper: {PAPER_OVERHEADS[key]:g} %)") if paper else (lambda key: "")
    lines += [
        "",
        f"TSAM adds {o['tsam_params_pct']:.2f} % of the backbone's parameters{ref('tsam_params_pct')}; "
        f"MFA {o['mfa_params_pct']:.2f} %; MFA-dagger {o['mfa_dagger_params_pct']:.2f} %{ref('mfa_dagger_params_pct')}.",
    ]
    c = result["configured"]
    lines.append(
        f"Configured model (attention={c['attention']}, side={c['side']}, separable={c['separable']}): "
        f"{c['params_m']:.2f} M parameters, {c['gmacs']:.2f} GMACs."
    )
    return "\n".join(lines)


def cli_profile(args: argparse.Namespace) -> int:
    """`pfe-study profile [CONFIG] [key=value ...] [--json]`; without CONFIG the paper's setting."""
    cfg = load_config(args.config, args.overrides)
    result = table5(cfg)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
