"""The paper's pictures of a trained model, as PNG (matplotlib, Agg backend).

- :func:`activation_figure` (Figs. 1 and 5): one row per image: the input, the activation maps
  A2..A5 (Eq. 12) over it (jet colours, each map stretched to its own min-max, the range printed
  in the corner with the map's grid size), and the masks M2..M5 (the masked top-alpha positions
  in red, with their count).
  A model without side branches has no A_s of its own: the same formula is applied to the main
  branch's layer outputs, and the columns say so.
- :func:`retrieval_figure` (in the manner of Fig. 9, which sets PFE's top 5 against a baseline
  model's): per query, one model's top-10 gallery images under its own F5 (its stage-I feature) and
  under the final set (F2_F3_F4_F5); green border = same identity, red = another identity or a
  distractor; gallery images of the query's identity under the query's camera are skipped (the
  evaluation protocol ignores them too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from pfe.engine.evaluation import euclidean_distances, set_features

ACTIVATION_PNG = "activation_maps.png"
RETRIEVAL_PNG = "retrieval.png"
MATCH, MISMATCH, QUERY = "#1a9a3a", "#d62728", "#1f4e9a"


def _figure(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure on its own Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def load_display_image(path: str, height: int, width: int) -> np.ndarray:
    """The image as the model sees it (resized to the input size), H x W x 3 uint8."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((width, height), Image.BILINEAR))


@torch.no_grad()
def activation_maps(model: torch.nn.Module, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], bool]:
    """(A_s, M_s, from_side_branches) for a batch of preprocessed images, each B x H_s x W_s on the CPU.

    With side branches: the model's own A_s (of T_s) and M_s. Without: A_s computed from the main
    branch's post-attention maps of layers 2..5 with the same formula, and no masks.
    """
    from pfe.model.side import activation_map

    was_training = model.training
    model.eval()
    try:
        if getattr(model, "side", None) is not None:
            out = model.features(images, stage=2)
            maps = {k: v.float().cpu() for k, v in out.activation_maps.items()}
            masks = {k: v.float().cpu() for k, v in out.masks.items()}
            return maps, masks, True
        layer_maps = model.main_maps(images)
        maps = {f"A{s}": activation_map(m.float()).cpu() for s, m in zip(range(2, 6), layer_maps)}
        return maps, {}, False
    finally:
        model.train(was_training)


def _upsample(m: Tensor, height: int, width: int, mode: str) -> np.ndarray:
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(m[None, None].float(), size=(height, width), mode=mode, **kwargs)[0, 0].numpy()


def activation_figure(
    images: Sequence[np.ndarray],
    maps: dict[str, Tensor],
    masks: dict[str, Tensor],
    out: str | Path,
    *,
    titles: Sequence[str] | None = None,
    from_side: bool = True,
    suptitle: str | None = None,
) -> Path:
    """Write the Figs. 1/5 grid: a row per image with the input, A_s overlays and M_s overlays."""
    a_keys = sorted(maps)
    m_keys = sorted(masks)
    cols = 1 + len(a_keys) + len(m_keys)
    rows = len(images)
    h, w = images[0].shape[:2]
    cell_w = 1.25
    fig, axes = _figure(rows, cols, (cols * cell_w, rows * cell_w * h / w + 0.6))
    for r, img in enumerate(images):
        ax = axes[r][0]
        ax.imshow(img)
        if titles:
            ax.set_ylabel(titles[r], fontsize=7)
        for c, key in enumerate(a_keys, start=1):
            a = maps[key][r]
            ax = axes[r][c]
            ax.imshow(img)
            heat = _upsample(a, h, w, "bilinear")
            lo, hi = float(heat.min()), float(heat.max())
            ax.imshow((heat - lo) / (hi - lo) if hi > lo else heat * 0, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            ax.text(
                1,
                h - 2,
                f"{a.shape[0]}x{a.shape[1]} {float(a.min()):.2f}-{float(a.max()):.2f}",
                fontsize=5,
                color="white",
            )
        for c, key in enumerate(m_keys, start=1 + len(a_keys)):
            m = masks[key][r]
            hidden = _upsample(1.0 - m, h, w, "nearest")
            overlay = np.zeros((h, w, 4))
            overlay[..., 0] = 1.0
            overlay[..., 3] = 0.65 * hidden
            ax = axes[r][c]
            ax.imshow(img)
            ax.imshow(overlay)
            ax.text(1, h - 2, f"{int((m == 0).sum())}/{m.numel()}", fontsize=5, color="white")
    labels = ["input"] + [(k if from_side else f"{k} (main)") for k in a_keys] + m_keys
    for c, label in enumerate(labels):
        axes[0][c].set_title(label, fontsize=8)
    return _save(fig, axes, suptitle, out)


def ranked_gallery(
    query: dict[str, Tensor],
    gallery: dict[str, Tensor],
    set_name: str,
    rows: Sequence[int],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    top: int = 10,
) -> list[list[int]]:
    """For each query row, the indices of its ``top`` nearest gallery items (same id + same camera
    skipped, as the protocol does), nearest first; computed in chunks of queries."""
    qf_all = set_features(query, set_name)
    gf = set_features(gallery, set_name).to(qf_all.device)
    dev = gf.device
    gp = torch.as_tensor(np.asarray(g_pids), device=dev)
    gc = torch.as_tensor(np.asarray(g_camids), device=dev)
    g_sq = (gf * gf).sum(1)
    k = min(top, gf.shape[0])
    out: list[list[int]] = []
    rows = list(rows)
    step = max(1, (1 << 22) // max(1, gf.shape[0]))
    for s in range(0, len(rows), step):
        ids = rows[s : s + step]
        idx = torch.as_tensor(ids, device=dev)
        dist = euclidean_distances(qf_all[idx], gf, g_sq)
        qp = torch.as_tensor(np.asarray(q_pids)[ids], device=dev)
        qc = torch.as_tensor(np.asarray(q_camids)[ids], device=dev)
        dist.masked_fill_((gp[None] == qp[:, None]) & (gc[None] == qc[:, None]), float("inf"))
        vals, order = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        for v, o in zip(vals.cpu(), order.cpu()):
            out.append(o[torch.isfinite(v)].tolist())
    return out


def retrieval_figure(
    query_images: Sequence[np.ndarray],
    gallery_image: Any,
    rankings: dict[str, list[list[int]]],
    q_pids: Sequence[int],
    g_pids: np.ndarray,
    out: str | Path,
    *,
    suptitle: str | None = None,
) -> Path:
    """Write the Fig. 9 grid: per query, one row per set: the query, then its top-k gallery images
    (green border: same id, red: not). ``gallery_image(j)`` returns gallery image j (H x W x 3)."""
    sets = list(rankings)
    top = max(len(r) for ranks in rankings.values() for r in ranks)
    rows = len(query_images) * len(sets)
    h, w = query_images[0].shape[:2]
    cell_w = 0.85
    fig, axes = _figure(rows, top + 1, ((top + 1) * cell_w + 0.9, rows * cell_w * h / w + 0.5))
    for qi, q_img in enumerate(query_images):
        for si, name in enumerate(sets):
            r = qi * len(sets) + si
            ax = axes[r][0]
            ax.imshow(q_img)
            _border(ax, QUERY)
            ax.set_ylabel(f"{name}\nid {q_pids[qi]}", fontsize=6)
            for c in range(top):
                ax = axes[r][c + 1]
                ranking = rankings[name][qi]
                if c >= len(ranking):
                    ax.axis("off")
                    continue
                j = ranking[c]
                ax.imshow(gallery_image(j))
                _border(ax, MATCH if g_pids[j] == q_pids[qi] else MISMATCH)
                if r == 0:
                    ax.set_title(str(c + 1), fontsize=7)
    axes[0][0].set_title("query", fontsize=7)
    return _save(fig, axes, suptitle, out)


def _save(fig: Any, axes: Any, suptitle: str | None, out: str | Path) -> Path:
    """Axes without ticks, the layout finished, the figure written as PNG to ``out``."""
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    _finish_layout(fig, suptitle)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _finish_layout(fig: Any, suptitle: str | None) -> None:
    """Tight layout that leaves room above the axes for a (possibly two-line) title."""
    if not suptitle:
        fig.tight_layout()
        return
    lines = suptitle.count("\n") + 1
    fig.suptitle(suptitle, fontsize=8, y=1.0 - 0.04 / fig.get_figheight(), va="top")
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - (0.12 * lines + 0.02) / fig.get_figheight()))


def _border(ax: Any, color: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3)


def pick_queries(
    query: dict[str, Tensor],
    gallery: dict[str, Tensor],
    sets: Sequence[str],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    count: int,
) -> tuple[list[int], str]:
    """Queries to show: those with a valid match; up to half where the sets disagree at rank 1
    (what Fig. 9 illustrates), the rest evenly spaced. Returns (rows, a description of the choice)."""
    cams_of: dict[int, set[int]] = {}
    for p, c in zip(np.asarray(g_pids).tolist(), np.asarray(g_camids).tolist()):
        cams_of.setdefault(p, set()).add(c)
    q_list, qc_list = np.asarray(q_pids).tolist(), np.asarray(q_camids).tolist()
    valid = [i for i, (p, c) in enumerate(zip(q_list, qc_list)) if cams_of.get(p, set()) - {c}]
    if not valid:
        valid = list(range(len(q_pids)))
    chosen: list[int] = []
    disagree: list[int] = []
    if len(sets) > 1:
        firsts = {s: ranked_gallery(query, gallery, s, valid, q_pids, g_pids, q_camids, g_camids, top=1) for s in sets}
        hit = {s: [bool(r and g_pids[r[0]] == q_pids[i]) for r, i in zip(firsts[s], valid)] for s in sets}
        disagree = [i for k, i in enumerate(valid) if len({hit[s][k] for s in sets}) > 1]
        step = max(1, len(disagree) // max(1, count // 2))
        chosen = disagree[::step][: count // 2]
    rest = [i for i in valid if i not in chosen]
    if rest and len(chosen) < count:
        need = count - len(chosen)
        idx = np.linspace(0, len(rest) - 1, num=min(need, len(rest))).round().astype(int)
        chosen += [rest[k] for k in dict.fromkeys(idx.tolist())]
    chosen = sorted(chosen)
    n_dis = sum(i in disagree for i in chosen)
    how = f"{len(chosen)} queries: {n_dis} where the sets disagree at rank 1, the others evenly spaced"
    return chosen, how


def write_pictures(
    model: torch.nn.Module,
    query_samples: Sequence[Any],
    gallery_samples: Sequence[Any],
    query: dict[str, Tensor],
    gallery: dict[str, Tensor],
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    out_dir: str | Path,
    *,
    height: int,
    width: int,
    transform: Any,
    final_set: str,
    device: torch.device | str = "cpu",
    num_images: int = 6,
    num_queries: int = 6,
    top: int = 10,
    label: str = "",
) -> list[Path]:
    """Both pictures for a model and its extracted features; returns the PNG paths."""
    out_dir = Path(out_dir)
    written: list[Path] = []

    # ---- activation maps and masks (Figs. 1 and 5) over query images of distinct identities
    picks: list[int] = []
    seen: set[int] = set()
    for i, s in enumerate(query_samples):
        if s.pid not in seen:
            picks.append(i)
            seen.add(s.pid)
    picks = [picks[k] for k in np.linspace(0, len(picks) - 1, num=min(num_images, len(picks))).round().astype(int)]
    picks = list(dict.fromkeys(picks))
    paths = [query_samples[i].path for i in picks]
    shown = [load_display_image(p, height, width) for p in paths]
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]).to(device)
    maps, masks, from_side = activation_maps(model, batch)
    titles = [f"id {query_samples[i].pid} c{query_samples[i].camid}" for i in picks]
    note = "A_s of the side branches' T_s maps" if from_side else "no side branches: A_s of the main branch's layers"
    written.append(
        activation_figure(
            shown,
            maps,
            masks,
            out_dir / ACTIVATION_PNG,
            titles=titles,
            from_side=from_side,
            suptitle=f"{label}\n{note}; red = masked (M_s = 0)".strip(),
        )
    )

    # ---- retrieval (Fig. 9): F5 alone against the final set
    sets = ["F5"] if final_set == "F5" else ["F5", final_set]
    rows, how = pick_queries(query, gallery, sets, q_pids, g_pids, q_camids, g_camids, num_queries)
    rankings = {s: ranked_gallery(query, gallery, s, rows, q_pids, g_pids, q_camids, g_camids, top) for s in sets}
    cache: dict[int, np.ndarray] = {}

    def gallery_image(j: int) -> np.ndarray:
        if j not in cache:
            cache[j] = load_display_image(gallery_samples[j].path, height, width)
        return cache[j]

    written.append(
        retrieval_figure(
            [load_display_image(query_samples[i].path, height, width) for i in rows],
            gallery_image,
            rankings,
            [int(q_pids[i]) for i in rows],
            g_pids,
            out_dir / RETRIEVAL_PNG,
            suptitle=f"{label}: top-{top}, green = same id, red = other id or distractor\n{how}".strip(),
        )
    )
    return written
