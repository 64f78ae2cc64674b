"""What users read: the anchors YAML for model configs, the console report, the logged values and a plot.

All anchors here are ``(K, 2)`` widths and heights in pixels at the training size, unless a
function says ``(levels, per_level, 2)``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_autoanchor import __version__
from lightning_autoanchor.boxes import ImgSize, describe_img_size
from lightning_autoanchor.errors import ConfigError
from lightning_autoanchor.formats import anchors_yaml, yolo_number
from lightning_autoanchor.metrics import AnchorScores

if TYPE_CHECKING:
    from lightning_autoanchor.anchor_count import AnchorCountResult
    from lightning_autoanchor.refit import AnchorUpdate
    from lightning_autoanchor.refit_grid import GridUpdate

__all__ = [
    "PLOT_NAME",
    "YAML_NAME",
    "describe_scores",
    "grid_report_lines",
    "header_comments",
    "log_update",
    "plot_anchor_counts",
    "plot_anchors",
    "report_lines",
    "save_grid_update",
    "save_update",
    "write_atomic",
    "write_text_atomic",
]

YAML_NAME = "autoanchor.yaml"
PLOT_NAME = "autoanchor.png"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    """Create or replace ``path`` with what ``write(binary_file)`` writes, so that a crash or a full disk
    leaves the old file or the new one, never half of one (a temporary file beside it, renamed over it).

    The file gets the permissions any new file gets (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def describe_scores(scores: AnchorScores, thr: float, metric: str) -> list[str]:
    """Lines saying what the scores mean, for console reports."""
    rule = f"both sides within {thr:g}x of an anchor" if metric == "ratio" else f"width/height IoU above {thr:g}"
    return [
        f"best possible recall {scores.bpr:.4f}  (share of boxes with {rule})",
        f"anchors per target   {scores.aat:.2f}",
        f"fitness              {scores.fitness:.4f}  (YOLOv5's anchor fitness)",
        f"average IoU          {scores.avg_iou:.4f}",
    ]


def header_comments(source: str, img_size: ImgSize, resize: str, metric: str, thr: float,
                    scores: AnchorScores, seed: int | None = None) -> list[str]:
    """Comment lines for the anchors YAML: where they come from and how well they fit."""
    seeded = f", seed {seed}" if seed is not None else ""
    return [
        f"Anchors fitted by lightning-autoanchor {__version__} to {source}",
        f"pixels at img_size {describe_img_size(img_size)} ({resize}), metric {metric}, thr {thr:g}{seeded}",
        f"fitness {scores.fitness:.4f}, best possible recall {scores.bpr:.4f}, "
        f"anchors/target {scores.aat:.2f}, average IoU {scores.avg_iou:.4f}, {scores.n_boxes} boxes",
    ]


def plot_anchors(wh: Tensor, anchors: Tensor, path: str | os.PathLike[str], *, thr: float, metric: str,
                 before: Tensor | None = None, title: str = "") -> Path:
    """Save a log-log 2-D histogram of box sizes with the anchors (and ``before``, if given) over it, as PNG.

    For the ratio metric, each anchor's match region (sides within ``thr`` times) is outlined. The
    figure is a ``matplotlib.figure.Figure`` of its own (pyplot and the global backend are left
    alone), written atomically (:func:`write_atomic`). Needs matplotlib
    (``pip install lightning-autoanchor[plot]``).
    """
    try:
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise ConfigError("plots need matplotlib: pip install 'lightning-autoanchor[plot]'") from err
    wh = wh.detach().float().cpu()
    fig = Figure(figsize=(7, 6), dpi=110)
    ax = fig.subplots()
    low = max(float(wh.min()), 0.5)
    high = max(float(wh.max()), float(anchors.max()))
    edges = torch.logspace(torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high * 1.05)), 80).numpy()
    _, _, _, image = ax.hist2d(wh[:, 0].numpy(), wh[:, 1].numpy(), bins=[edges, edges], cmap="Blues", cmin=1,
                               norm=LogNorm())
    fig.colorbar(image, ax=ax, label="boxes per cell")
    if before is not None:
        ax.scatter(before[:, 0].cpu(), before[:, 1].cpu(), marker="x", s=60, c="0.4", label="anchors before")
    ax.scatter(anchors[:, 0].cpu(), anchors[:, 1].cpu(), marker="o", s=70, facecolors="none", edgecolors="crimson",
               linewidths=2, label="anchors")
    if metric == "ratio":
        for w, h in anchors.tolist():
            ax.add_patch(Rectangle((w / thr, h / thr), w * thr - w / thr, h * thr - h / thr,
                                   fill=False, lw=0.6, ec="crimson", alpha=0.35))
    ax.set(xscale="log", yscale="log", xlabel="box width (px at training size)",
           ylabel="box height (px at training size)", title=title or "Boxes and anchors")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format="png"))


def report_lines(update: AnchorUpdate, head_names: Sequence[str], bpr_threshold: float, resize: str) -> list[str]:
    """The console report of a check (and fit): what was scored, what was decided, what was written."""
    before, after = update.before, update.after
    n = update.anchors_before.reshape(-1, 2).shape[0]
    lines = [f"AutoAnchor: {head_names[0]}, {n} anchors at img_size {describe_img_size(update.img_size)} ({resize}), "
             f"{update.metric} thr {update.thr:g}; {before.n_boxes:,} boxes in {update.n_images:,} images"]
    lines += ["  current anchors:"] + [f"    {line}" for line in describe_scores(before, update.thr, update.metric)]
    if update.advice:
        lines.append(f"  note: {update.advice}")
    if not update.fitted:
        lines.append(f"  BPR {before.bpr:.4f} >= {bpr_threshold}: the anchors fit; kept as they are")
        return lines
    candidate = update.candidate
    assert candidate is not None
    lines.append(f"  BPR {before.bpr:.4f} < {bpr_threshold}: fitted new anchors in {update.seconds:.2f} s "
                 f"(seed {update.seed})")
    if not update.replaced:
        lines.append(f"  new anchors are no better (BPR {candidate.bpr:.4f} <= {before.bpr:.4f}): "
                     "kept the current ones")
        return lines
    lines += ["  new anchors:"] + [f"    {line}" for line in describe_scores(after, update.thr, update.metric)]
    rows = "; ".join(", ".join(f"{yolo_number(w)},{yolo_number(h)}" for w, h in level)
                     for level in update.anchors_after.tolist())
    lines.append(f"  written into {', '.join(head_names)}: [{rows}] (pixels, per level)")
    return lines


def log_update(loggers: Sequence[Any], update: AnchorUpdate, step: int) -> None:
    """Send :meth:`AnchorUpdate.metrics` to every Lightning logger."""
    for logger in loggers:
        logger.log_metrics(update.metrics(), step=step)


def save_update(update: AnchorUpdate, folder: Path, strides: Sequence[float], resize: str, *,
                wh: Tensor | None, warn: Callable[[str], Any]) -> list[str]:
    """Write ``autoanchor.yaml`` (and ``autoanchor.png`` of the boxes ``wh`` at the training size, when
    given) into ``folder``; returns report lines naming what was written. A file that cannot be written
    only warns through ``warn``: the anchors are in the model already."""
    levels = update.anchors_after.shape[0]
    text = anchors_yaml(update.anchors_after.reshape(-1, 2), levels, strides=strides,
                        comments=header_comments(update.source, update.img_size, resize, update.metric,
                                                 update.thr, update.after, update.seed))
    return _save(folder, text, wh, update.anchors_after.reshape(-1, 2),
                 update.anchors_before.reshape(-1, 2) if update.replaced else None, update.thr, update.metric,
                 f"AutoAnchor at {describe_img_size(update.img_size)} px", warn)


def _save(folder: Path, text: str, wh: Tensor | None, anchors: Tensor, before: Tensor | None, thr: float,
          metric: str, title: str, warn: Callable[[str], Any]) -> list[str]:
    saved = []
    try:
        saved.append(f"anchors YAML: {write_text_atomic(folder / YAML_NAME, text)}")
    except OSError as err:
        warn(f"AutoAnchor: cannot write {folder / YAML_NAME}: {err}")
    if wh is None:
        return saved
    try:
        path = plot_anchors(wh, anchors, folder / PLOT_NAME, thr=thr, metric=metric, before=before, title=title)
        saved.append(f"plot: {path}")
    except ConfigError as err:  # matplotlib missing
        saved.append(f"(no plot: {err})")
    except Exception as err:  # a plot never stops training
        warn(f"AutoAnchor: could not save the plot: {err!r}")
    return saved


def _cell_wh(structure: dict[str, Any]) -> Tensor:
    from lightning_autoanchor.refit_grid import structure_from_dict

    return torch.cat(structure_from_dict(structure).cell_anchors())


def grid_report_lines(update: GridUpdate, head_names: Sequence[str], detector: Any) -> list[str]:
    """The console report of a grid head's check (and fit), in placed recall at the matcher's threshold.

    ``detector``: the head's :class:`~lightning_autoanchor.torchvision_heads.TorchvisionSettings`.
    """
    before, after = update.before, update.after
    resize = (f"fixed {detector.fixed_size[0]}x{detector.fixed_size[1]}" if detector.fixed_size else
              f"min_size {list(detector.min_size)}, max_size {detector.max_size}")
    lines = [f"AutoAnchor: {head_names[0]} ({detector.family}), anchors placed as the model places them ({resize}, "
             f"padded to {detector.size_divisible}); {before.n_boxes:,} boxes in {update.n_images:,} images",
             f"  measure: placed recall, the share of boxes whose best IoU with an anchor the model generates "
             f"is >= {update.thr:g} (the matcher's foreground threshold)"]

    def scores(s: Any) -> list[str]:
        return [f"    placed recall {s.recall:.4f}, mean best IoU {s.mean_best_iou:.4f}, matched only as the "
                f"low-quality fallback {s.low_quality:.4f}"]

    lines += ["  current anchors:", *scores(before)]
    if not update.fitted:
        lines.append(f"  placed recall {before.recall:.4f} >= {update.bpr_threshold}: the anchors fit; kept"
                     if before.recall >= update.bpr_threshold else
                     f"  placed recall {before.recall:.4f} < {update.bpr_threshold}: a re-fit is advised")
        return lines
    candidate = update.candidate
    assert candidate is not None
    relation = "<" if before.recall < update.bpr_threshold else ">="
    lines.append(f"  placed recall {before.recall:.4f} {relation} {update.bpr_threshold}: fitted the generator's "
                 f"arguments in {update.seconds:.2f} s (seed {update.seed})")
    if not update.replaced:
        lines.append(f"  new anchors are no better (placed recall {candidate.recall:.4f}): kept the current ones")
        return lines
    after_args = {k: v for k, v in update.structure_after.items() if k not in ("kind", "image_size", "clip")}
    lines += ["  new anchors:", *scores(after), f"  written into {', '.join(head_names)}: {after_args}"]
    return lines


def save_grid_update(update: GridUpdate, folder: Path, constructor: dict[str, Any], *, wh: Tensor | None,
                     warn: Callable[[str], Any]) -> list[str]:
    """Write the generator's constructor arguments as ``autoanchor.yaml`` (and the plot of the boxes ``wh`` at
    the network input with the cell anchors, when given) into ``folder``; see :func:`save_update`."""
    import yaml

    after = update.after
    comments = [f"Anchors fitted by lightning-autoanchor {__version__} to {update.source}",
                f"placed recall {after.recall:.4f} at IoU {update.thr:g}, mean best IoU {after.mean_best_iou:.4f}, "
                f"{after.n_boxes} boxes (before: {update.before.recall:.4f}, {update.before.mean_best_iou:.4f})",
                f"paste: {constructor['python']}"]
    body = yaml.safe_dump({"class_path": constructor["class_path"], "init_args": constructor["init_args"]},
                          sort_keys=False, default_flow_style=None)
    text = "\n".join(f"# {c}" for c in comments) + "\n" + body
    return _save(folder, text, wh, _cell_wh(update.structure_after),
                 _cell_wh(update.structure_before) if update.replaced else None, update.thr, "iou",
                 "AutoAnchor: boxes and cell anchors at the network input", warn)


def plot_anchor_counts(result: AnchorCountResult, path: str | os.PathLike[str], *, title: str = "") -> Path:
    """Save the anchor-count curve: objective, BPR and average IoU against the count, the recommended one marked.

    Drawn on a :class:`matplotlib.figure.Figure` of its own (the global backend is left alone) and
    written atomically: a failed write leaves any previous file as it was.
    Needs matplotlib (``pip install lightning-autoanchor[plot]``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ConfigError("plots need matplotlib: pip install 'lightning-autoanchor[plot]'") from err
    counts, values = result.counts, [r.objective_value for r in result.rows]
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    ax.plot(counts, values, "o-", color="crimson", label=result.objective)
    ax.plot([counts[0], counts[-1]], [values[0], values[-1]], color="crimson", lw=0.6, ls="--", alpha=0.5,
            label="chord of the knee rule")
    if result.objective != "avg_iou":
        ax.plot(counts, [r.scores.avg_iou for r in result.rows], "s--", color="0.4", ms=4, label="avg_iou")
    ax.plot(counts, [r.scores.bpr for r in result.rows], "^:", color="tab:blue", ms=4, label="BPR")
    ax.axvline(result.recommended, color="crimson", lw=0.8, alpha=0.6)
    ax.annotate(f"recommended: {result.recommended}", (result.recommended, values[counts.index(result.recommended)]),
                xytext=(8, -16), textcoords="offset points", color="crimson")
    ax.set(xlabel="anchors", ylabel="score", xticks=counts, title=title or "Anchor count")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return write_atomic(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".").lower() or "png"))
