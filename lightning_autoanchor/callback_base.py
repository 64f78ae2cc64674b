"""The AutoAnchor callback's behaviour, shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes.

The hooks only orchestrate: find boxes and heads, run :func:`~lightning_autoanchor.refit.refit_anchors`
once on global rank 0, broadcast its outcome (or its error) to every rank, write the anchors on
every rank (all heads or none), then log and report on rank 0.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_autoanchor import errors
from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.errors import AutoAnchorError, ConfigError, DataError, HeadError
from lightning_autoanchor.heads import Heads, find_heads, follows_strides, write_all
from lightning_autoanchor.metrics import DEFAULT_THR, match_cut
from lightning_autoanchor.refit import AnchorUpdate, refit_anchors
from lightning_autoanchor.reporting import (
    anchors_yaml,
    describe_scores,
    header_comments,
    write_text_atomic,
    yolo_number,
)
from lightning_autoanchor.sources import load_boxes
from lightning_autoanchor.sources.training import boxes_of

YAML_NAME = "autoanchor.yaml"
PLOT_NAME = "autoanchor.png"
_STATE_VERSION = 1


class AutoAnchorBase:
    """Check the detection head's anchors against the training boxes at fit start; re-fit them if they fit badly.

    At fit start, on global rank 0: read the training boxes (letterboxed to ``img_size``), score the
    head's anchors (best possible recall with YOLOv5's 0.9-1.1 scale jitter), and when BPR is under
    ``bpr_threshold`` fit new anchors (k-means, evolution, coordinate search) and keep them only if
    their BPR is higher. The outcome is broadcast; every rank writes the same anchors into the head's
    buffers in place (all named heads, e.g. an EMA copy, or none). Metrics go to every logger,
    a report to the console, the anchors to ``autoanchor.yaml`` (and a plot to ``autoanchor.png``)
    in the log directory. Runs once: a run resumed from a checkpoint keeps the restored anchors.

    Args:
        img_size: training image size in pixels (the longer side for letterboxing); default: the
            datamodule's ``img_size`` attribute. A warning says when the two differ.
        bpr_threshold: re-fit when the best possible recall is under this (YOLOv5: 0.98).
        thr: match threshold: the largest box/anchor side ratio for ``metric="ratio"`` (YOLOv5's
            ``anchor_t``, default 4.0), the smallest IoU for ``metric="iou"`` (default 0.5).
        metric: ``"ratio"`` (YOLOv5-style target assignment) or ``"iou"`` (IoU-based assignment).
        generations: mutants scored by the evolution (YOLOv5: 1000).
        seed: seed of the callback's private random generator (training's RNG is left alone).
        enabled: set ``False`` to keep the model's anchors without checking them.
        head: module path(s) of the detection head(s), e.g. ``"model.head"`` or
            ``["model.head", "ema.module.model.head"]`` (the first is read, all are written);
            default: found automatically.
        annotations: read boxes from this COCO JSON, dataset YAML, YOLO or VOC folder instead of the
            datamodule.
        split: split of ``annotations`` (dataset YAML entry or VOC ImageSets list).
        resize: ``"letterbox"`` (longer side to ``img_size``) or ``"stretch"`` (both sides).
        scale_jitter: per-image scale jitter of the recall check (YOLOv5: 0.1 for 0.9-1.1).
        mutation_prob: probability that a mutant changes each anchor side (YOLOv5: 0.9).
        sigma: mutation strength (YOLOv5: 0.1).
        on_error: ``"raise"``, or ``"warn"`` to go on training with the anchors unchanged when the
            check cannot run (no head, bad anchors, no boxes, bad image size).
        save_dir: folder for ``autoanchor.yaml`` and ``autoanchor.png`` (default: the trainer's log dir).
        plot: save the plot (needs matplotlib).
        strict: refuse bad records in ``annotations`` instead of skipping them with a warning.
    """

    _info: Callable[..., Any] = staticmethod(print)
    _warn: Callable[..., Any] = staticmethod(print)

    def __init__(
        self,
        img_size: int | None = None,
        bpr_threshold: float = 0.98,
        thr: float | None = None,
        metric: Literal["ratio", "iou"] = "ratio",
        generations: int = 1000,
        seed: int = 0,
        enabled: bool = True,
        head: str | list[str] | None = None,
        annotations: str | None = None,
        split: str | None = None,
        resize: Literal["letterbox", "stretch"] = "letterbox",
        scale_jitter: float = 0.1,
        mutation_prob: float = 0.9,
        sigma: float = 0.1,
        on_error: Literal["raise", "warn"] = "raise",
        save_dir: str | None = None,
        plot: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        match_cut(metric, thr)
        if img_size is not None and not img_size > 0:
            raise ConfigError(f"img_size must be a positive number of pixels, got {img_size}")
        if not 0.0 <= bpr_threshold <= 1.0:
            raise ConfigError(f"bpr_threshold must be in [0, 1], got {bpr_threshold}")
        if on_error not in ("raise", "warn"):
            raise ConfigError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if generations < 0 or not 0.0 <= scale_jitter < 1.0:
            raise ConfigError(f"generations must be >= 0 and scale_jitter in [0, 1), got {generations}, {scale_jitter}")
        self.img_size = img_size
        self.bpr_threshold = bpr_threshold
        self.thr = DEFAULT_THR[metric] if thr is None else float(thr)
        self.metric = metric
        self.generations = generations
        self.seed = seed
        self.enabled = enabled
        self.head = head
        self.annotations = annotations
        self.split = split
        self.resize = resize
        self.scale_jitter = scale_jitter
        self.mutation_prob = mutation_prob
        self.sigma = sigma
        self.on_error = on_error
        self.save_dir = save_dir
        self.plot = plot
        self.strict = strict
        self.update: AnchorUpdate | None = None
        self._boxes: BoxSet | None = None

    # ----------------------------------------------------------------- state (checkpoints, resume)
    @property
    def state_key(self) -> str:
        return self._generate_state_key(head=self.head, annotations=self.annotations)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "update": self.update.as_dict() if self.update else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        data = state_dict.get("update")
        self.update = AnchorUpdate.from_dict(data) if data else None

    # ----------------------------------------------------------------- the hook
    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not self.enabled:
            return
        if self.update is not None:
            self._report_resumed(trainer, pl_module)
            return
        failure: BaseException | None = None
        payload: dict[str, Any] | None = None
        if trainer.is_global_zero:
            try:
                payload = {"update": self._check_and_fit(trainer, pl_module).as_dict()}
            except BaseException as err:  # every rank must hear of it, KeyboardInterrupt included
                failure = err
                payload = {"error": type(err).__name__, "message": str(err)}
        payload = trainer.strategy.broadcast(payload, src=0)
        if "error" in payload:
            self._fail(payload, failure)
            return
        update = AnchorUpdate.from_dict(payload["update"])
        heads = find_heads(pl_module, self.head)
        self._write(trainer, heads, update)
        self.update = update
        if trainer.is_global_zero:
            self._report(trainer, heads, update)
        self._boxes = None

    # ----------------------------------------------------------------- steps
    def _check_and_fit(self, trainer: Any, pl_module: nn.Module) -> AnchorUpdate:
        heads = find_heads(pl_module, self.head)
        img_size = self._resolve_img_size(trainer)
        self._boxes = self._find_boxes(trainer)
        update = refit_anchors(heads, self._boxes, img_size=img_size, bpr_threshold=self.bpr_threshold, thr=self.thr,
                               metric=self.metric, resize=self.resize, scale_jitter=self.scale_jitter,
                               generations=self.generations, mutation_prob=self.mutation_prob, sigma=self.sigma,
                               seed=self.seed, device=_device_of(pl_module),
                               progress=trainer.progress_bar_callback is not None)
        strides = heads.primary.strides
        if not update.replaced and not follows_strides(update.anchors_before, strides):
            areas = [round(a) for a in update.anchors_before.prod(-1).mean(-1).tolist()]
            self._warn(f"AutoAnchor: the anchors of {heads.names[0]} do not grow with the strides of their levels "
                       f"(mean areas {areas} px^2 at strides {strides.tolist()}): small objects are matched on "
                       "coarse levels. Reverse the order of the levels' anchors in the model config.")
        if update.replaced:
            frozen = [n for n, p in _parameters(heads) if not p.requires_grad]
            if frozen:
                self._warn(f"AutoAnchor: replacing the anchors of {heads.names[0]} while {len(frozen)} of its "
                           f"parameters are frozen (e.g. {frozen[0]}): its outputs were trained for the old anchors "
                           "and cannot adapt. Unfreeze the head, or keep the anchors with AutoAnchor(enabled=False).")
        return update

    def _resolve_img_size(self, trainer: Any) -> float:
        declared = getattr(trainer.datamodule, "img_size", None)
        if declared is not None and not isinstance(declared, int | float):
            declared = None
        if self.img_size is None and declared is None:
            raise ConfigError("AutoAnchor needs the training image size: set AutoAnchor(img_size=...) or give the "
                              "datamodule an 'img_size' attribute")
        if self.img_size is not None and declared is not None and not math.isclose(self.img_size, declared):
            self._warn(f"AutoAnchor(img_size={self.img_size}) differs from the datamodule's img_size {declared}: "
                       f"anchors are fitted for {self.img_size} px images; they must match the size the model "
                       "trains at.")
        return float(self.img_size if self.img_size is not None else declared)

    def _find_boxes(self, trainer: Any) -> BoxSet:
        if self.annotations:
            return load_boxes(self.annotations, split=self.split, strict=self.strict)
        for source in (lambda: trainer.datamodule, lambda: _train_dataset(trainer)):  # the dataset only if needed
            found = source()
            boxes = boxes_of(found) if found is not None else None
            if boxes is not None:
                return boxes
        raise DataError("AutoAnchor found no training boxes: it looked for AutoAnchor(annotations=...), a datamodule "
                        "method autoanchor_boxes(), and a train dataset with autoanchor_boxes() or YOLOv5-style "
                        "'shapes' and 'labels' attributes. Add one of these (see the README).")

    def _write(self, trainer: Any, heads: Heads, update: AnchorUpdate) -> None:
        """Write on every rank; if any rank fails, every rank rolls back and raises."""
        error: BaseException | None = None
        if update.replaced:
            try:
                write_all(heads, update.anchors_after)
            except Exception as err:
                error = err
        if trainer.strategy.reduce_boolean_decision(error is None, all=True):
            return
        if error is None and update.replaced:
            write_all(heads, update.anchors_before)
        raise HeadError(f"AutoAnchor could not write the new anchors on every rank; all heads keep their old "
                        f"anchors ({error or 'failed on another rank'})")

    def _fail(self, payload: dict[str, Any], failure: BaseException | None) -> None:
        """Raise rank 0's error on every rank (the original on rank 0), or warn when configured to."""
        name, message = payload["error"], payload["message"]
        if name == "KeyboardInterrupt":
            raise failure if failure is not None else KeyboardInterrupt()
        error_class = getattr(errors, name, None) or getattr(builtins, name, None)
        ours = isinstance(error_class, type) and issubclass(error_class, AutoAnchorError)
        if ours and self.on_error == "warn":
            self._warn(f"AutoAnchor: {message} -- training goes on with the anchors unchanged.")
            return
        if failure is not None:
            raise failure
        if isinstance(error_class, type) and issubclass(error_class, Exception):
            raise error_class(message)
        raise RuntimeError(f"{name} on rank 0: {message}")

    # ----------------------------------------------------------------- reports (rank 0)
    def _report(self, trainer: Any, heads: Heads, update: AnchorUpdate) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(update.metrics(), step=trainer.global_step)
        folder = Path(self.save_dir or trainer.log_dir or trainer.default_root_dir)
        strides = heads.primary.strides
        levels = update.anchors_after.shape[0]
        text = anchors_yaml(update.anchors_after.reshape(-1, 2), levels, strides=strides.tolist(),
                            comments=header_comments(update.source, update.img_size, self.resize, update.metric,
                                                     update.thr, update.after, update.seed))
        try:
            saved = [f"anchors YAML: {write_text_atomic(folder / YAML_NAME, text)}"]
        except OSError as err:  # the anchors are in the model already: a file that cannot be written only warns
            self._warn(f"AutoAnchor: cannot write {folder / YAML_NAME}: {err}")
            saved = []
        if self.plot and self._boxes is not None:
            saved.extend(self._save_plot(folder, update))
        self._info("\n".join(_report_lines(heads, update, self.bpr_threshold, self.resize) + saved))

    def _save_plot(self, folder: Path, update: AnchorUpdate) -> list[str]:
        try:
            from lightning_autoanchor.reporting import plot_anchors

            path = plot_anchors(self._boxes.scaled(update.img_size, self.resize),  # type: ignore[union-attr]
                                update.anchors_after.reshape(-1, 2), folder / PLOT_NAME, thr=update.thr,
                                metric=update.metric, before=update.anchors_before.reshape(-1, 2) if update.replaced
                                else None, title=f"AutoAnchor at {update.img_size:g} px")
            return [f"plot: {path}"]
        except ConfigError as err:  # matplotlib missing
            return [f"(no plot: {err})"]
        except Exception as err:  # a plot never stops training
            self._warn(f"AutoAnchor: could not save the plot: {err!r}")
            return []

    def _report_resumed(self, trainer: Any, pl_module: nn.Module) -> None:
        update = self.update
        assert update is not None
        if not trainer.is_global_zero:
            return
        current = find_heads(pl_module, self.head).primary.read_anchors()
        same = current.shape == update.anchors_after.shape and bool(
            (current - update.anchors_after).abs().max() <= 1e-3 * update.anchors_after.abs().max())
        what = "new anchors fitted" if update.replaced else "anchors checked"
        self._info(f"AutoAnchor: resumed; {what} in the first run stand (BPR {update.after.bpr:.4f}, fitness "
                   f"{update.after.fitness:.4f}); not checking or re-fitting again.")
        if not same:
            now, then = current.reshape(-1, 2).tolist(), update.anchors_after.reshape(-1, 2).tolist()
            self._warn("AutoAnchor: the model's anchors differ from the ones this callback wrote before the "
                       f"checkpoint: now {now}, then {then}")


def _device_of(module: nn.Module) -> torch.device:
    """The model's CUDA device, where the per-box work of the check and fit runs too; else the CPU
    (the scores are summed in float64, which not every accelerator has)."""
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None and tensor.device.type == "cuda" else torch.device("cpu")


def _parameters(heads: Heads) -> list[tuple[str, nn.Parameter]]:
    return [(f"{name}.{p_name}", p) for name, module in zip(heads.names, heads.modules(), strict=True)
            if isinstance(module, nn.Module) for p_name, p in module.named_parameters()]


def _train_dataset(trainer: Any) -> Any:
    """The dataset of the training dataloader (asks the datamodule or module for it; ``None`` if unknown)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    try:
        loaders = source.dataloader() if source is not None and source.is_defined() else None
    except Exception:  # a dataloader hook that cannot run yet: the other sources still apply
        return None
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    return getattr(loaders, "dataset", None)


def _report_lines(heads: Heads, update: AnchorUpdate, bpr_threshold: float, resize: str) -> list[str]:
    before, after = update.before, update.after
    n = update.anchors_before.reshape(-1, 2).shape[0]
    lines = [f"AutoAnchor: {heads.names[0]}, {n} anchors at img_size {update.img_size:g} ({resize}), "
             f"{update.metric} thr {update.thr:g}; {before.n_boxes:,} boxes in {update.n_images:,} images"]
    lines += ["  current anchors:"] + [f"    {line}" for line in describe_scores(before, update.thr, update.metric)]
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
    lines.append(f"  written into {', '.join(heads.names)}: [{rows}] (pixels, per level)")
    return lines
