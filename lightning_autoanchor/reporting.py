"""What users read: the anchors YAML for model configs, a console summary, and a plot.

All anchors here are ``(K, 2)`` widths and heights in pixels at the training size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from lightning_autoanchor import __version__
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.formats import anchors_yaml, yolo_number  # noqa: F401  (moved; imported from here too)
from lightning_autoanchor.metrics import AnchorScores


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def describe_scores(scores: AnchorScores, thr: float, metric: str) -> list[str]:
    """Lines saying what the scores mean, for console reports."""
    rule = f"both sides within {thr:g}x of an anchor" if metric == "ratio" else f"width/height IoU above {thr:g}"
    return [
        f"best possible recall {scores.bpr:.4f}  (share of boxes with {rule})",
        f"anchors per target   {scores.aat:.2f}",
        f"fitness              {scores.fitness:.4f}  (YOLOv5's anchor fitness)",
        f"average IoU          {scores.avg_iou:.4f}",
    ]


def header_comments(source: str, img_size: float, resize: str, metric: str, thr: float,
                    scores: AnchorScores, seed: int | None = None) -> list[str]:
    """Comment lines for the anchors YAML: where they come from and how well they fit."""
    seeded = f", seed {seed}" if seed is not None else ""
    return [
        f"Anchors fitted by lightning-autoanchor {__version__} to {source}",
        f"pixels at img_size {img_size:g} ({resize}), metric {metric}, thr {thr:g}{seeded}",
        f"fitness {scores.fitness:.4f}, best possible recall {scores.bpr:.4f}, "
        f"anchors/target {scores.aat:.2f}, average IoU {scores.avg_iou:.4f}, {scores.n_boxes} boxes",
    ]


def plot_anchors(wh: Tensor, anchors: Tensor, path: str | os.PathLike[str], *, thr: float, metric: str,
                 before: Tensor | None = None, title: str = "") -> Path:
    """Save a log-log 2-D histogram of box sizes with the anchors (and ``before``, if given) over it.

    For the ratio metric, each anchor's match region (sides within ``thr`` times) is outlined.
    Needs matplotlib (``pip install lightning-autoanchor[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigError("plots need matplotlib: pip install 'lightning-autoanchor[plot]'") from err
    wh = wh.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    low = max(float(wh.min()), 0.5)
    high = max(float(wh.max()), float(anchors.max()))
    edges = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high * 1.05)), 80).numpy()
    _, _, _, image = ax.hist2d(wh[:, 0].numpy(), wh[:, 1].numpy(), bins=[edges, edges], cmap="Blues", cmin=1,
                               norm=matplotlib.colors.LogNorm())
    fig.colorbar(image, ax=ax, label="boxes per cell")
    if before is not None:
        ax.scatter(before[:, 0].cpu(), before[:, 1].cpu(), marker="x", s=60, c="0.4", label="anchors before")
    ax.scatter(anchors[:, 0].cpu(), anchors[:, 1].cpu(), marker="o", s=70, facecolors="none", edgecolors="crimson",
               linewidths=2, label="anchors")
    if metric == "ratio":
        for w, h in anchors.tolist():
            ax.add_patch(matplotlib.patches.Rectangle((w / thr, h / thr), w * thr - w / thr, h * thr - h / thr,
                                                      fill=False, lw=0.6, ec="crimson", alpha=0.35))
    ax.set(xscale="log", yscale="log", xlabel="box width (px at training size)",
           ylabel="box height (px at training size)", title=title or "Boxes and anchors")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
