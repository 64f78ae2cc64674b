"""``AutoAnchor``, the callback, for ``pytorch_lightning``; :mod:`lightning_autoanchor.lightning` has it
for the unified ``lightning`` package.

The hooks only orchestrate plain functions: the training setup's boxes and image size
(:mod:`~lightning_autoanchor.sources.training`), the check and fit (:func:`~lightning_autoanchor.refit.refit_anchors`,
run on global rank 0), the agreement of every rank on its outcome and the all-or-none write
(:mod:`~lightning_autoanchor.collective`), the heads (:mod:`~lightning_autoanchor.heads`), and the
logs, report and files (:mod:`~lightning_autoanchor.reporting`).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_autoanchor.boxes import BoxSet
from lightning_autoanchor.collective import SpawnHandoff, outcome_from_rank_zero, write_on_every_rank
from lightning_autoanchor.errors import AutoAnchorError, ConfigError
from lightning_autoanchor.heads import GridAnchorHead, Heads, find_heads, holds, write_heads
from lightning_autoanchor.placed import place_boxes
from lightning_autoanchor.refit import AnchorUpdate, follows_strides, refit_anchors
from lightning_autoanchor.refit_grid import GridUpdate, refit_grid_anchors, update_from_dict
from lightning_autoanchor.reporting import grid_report_lines, log_update, report_lines, save_grid_update, save_update
from lightning_autoanchor.settings import AnchorSettings, Metric, Resize
from lightning_autoanchor.sources import load_boxes
from lightning_autoanchor.sources.training import training_boxes, training_img_size

__all__ = ["AutoAnchor"]

_STATE_VERSION = 2
Update = AnchorUpdate | GridUpdate


class AutoAnchor(Callback):
    """Check the detection head's anchors against the training boxes at fit start; re-fit them if they fit badly.

    At fit start, on global rank 0: read the training boxes (letterboxed to ``img_size``), score the
    head's anchors (best possible recall with YOLOv5's 0.9-1.1 scale jitter), and when BPR is under
    ``bpr_threshold`` fit new anchors (k-means, evolution, coordinate search) and keep them only if
    their BPR is higher. The outcome is broadcast; every rank writes the same anchors into the head's
    buffers in place (all named heads, e.g. an EMA copy, or none). Metrics go to every logger,
    a report to the console, the anchors to ``autoanchor.yaml`` (and a plot to ``autoanchor.png``)
    in the log directory. A run resumed from a checkpoint keeps the anchors of the first run (and
    writes them back where the checkpoint did not hold them); a new fit checks again.

    torchvision's RetinaNet, Faster R-CNN and SSD are found and served too: their anchors are scored
    where the model places them (each level's grid, after the model's own resize) by the share of
    boxes whose best IoU reaches the matcher's threshold, and the generator's sizes and aspect ratios
    (SSD: scales and ratios) are fitted in the model's structure, keeping the count per location.

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
        head: path(s) of the detection head(s), e.g. ``"model.head"`` or
            ``["model.head", "ema.ema.model.24"]`` (the first is read, all are written);
            default: found automatically.
        annotations: read boxes from this COCO JSON, dataset YAML, YOLO or VOC folder instead of the
            datamodule.
        split: split of ``annotations`` (dataset YAML entry or VOC ImageSets list).
        resize: ``"letterbox"`` (longer side to ``img_size``) or ``"stretch"`` (both sides).
        scale_jitter: per-image scale jitter of the recall check (YOLOv5: 0.1 for 0.9-1.1).
        mutation_prob: probability that a mutant changes each anchor side (YOLOv5: 0.9).
        sigma: mutation strength (YOLOv5: 0.1).
        on_error: ``"raise"``, or ``"warn"`` to go on training with the anchors unchanged when the
            check cannot run on this data or model (no head, bad anchors, no boxes). A mistake in
            the settings is always an error.
        save_dir: folder for ``autoanchor.yaml`` and ``autoanchor.png`` (default: the trainer's log dir).
        plot: save the plot (needs matplotlib).
        strict: refuse bad records in ``annotations`` instead of skipping them with a warning.
        min_stride_ratio: keep every fitted anchor's size ``sqrt(w * h)`` at or above this multiple of
            its level's stride (1.0: no anchor under its stride), inside the fit; ``None``: no limit.
        scale_aug: the training's scale augmentation (YOLOv5's ``scale``: 0.5 for factors 0.5-1.5): the
            check, the fit and the keep-if-better rule score the boxes as the network sees them under it.
        min_size, max_size, iou_threshold: for torchvision's detectors (IoU-matching heads whose
            anchors sit on each level's grid): the resize's shorter-side target(s) and longer-side cap,
            and the matcher's foreground IoU, in place of the model's own (read from it by default).

    Raises:
        ConfigError: a setting is out of range (when the callback is made).
    """

    _info: Callable[..., Any] = staticmethod(rank_zero_info)
    _warn: Callable[..., Any] = staticmethod(rank_zero_warn)

    def __init__(
        self,
        img_size: float | None = None,
        bpr_threshold: float = 0.98,
        thr: float | None = None,
        metric: Metric = "ratio",
        generations: int = 1000,
        seed: int = 0,
        enabled: bool = True,
        head: str | list[str] | None = None,
        annotations: str | None = None,
        split: str | None = None,
        resize: Resize = "letterbox",
        scale_jitter: float = 0.1,
        mutation_prob: float = 0.9,
        sigma: float = 0.1,
        on_error: Literal["raise", "warn"] = "raise",
        save_dir: str | None = None,
        plot: bool = True,
        strict: bool = False,
        min_stride_ratio: float | None = None,
        scale_aug: float = 0.0,
        min_size: int | list[int] | None = None,
        max_size: int | None = None,
        iou_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.settings = AnchorSettings(img_size=img_size, bpr_threshold=bpr_threshold, thr=thr, metric=metric,
                                       generations=generations, seed=seed, resize=resize, scale_jitter=scale_jitter,
                                       mutation_prob=mutation_prob, sigma=sigma, min_stride_ratio=min_stride_ratio,
                                       scale_aug=scale_aug, min_size=min_size, max_size=max_size,
                                       iou_threshold=iou_threshold)
        if on_error not in ("raise", "warn"):
            raise ConfigError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        paths = [head] if isinstance(head, str) else head
        if head is not None and not (isinstance(paths, list | tuple) and paths
                                     and all(isinstance(h, str) and h for h in paths)):
            raise ConfigError(f"head must be a module path such as 'model.head', or a non-empty list of them, "
                              f"got {head!r}")
        self.enabled = enabled
        self.head = head
        self.annotations = annotations
        self.split = split
        self.on_error = on_error
        self.save_dir = save_dir
        self.plot = plot
        self.strict = strict
        self._update: Update | None = None
        self._restored = False
        self._heads: list[str] = []  # the paths written, for restore_anchors
        self._handoff: SpawnHandoff | None = None

    @property
    def update(self) -> Update | None:
        """What the last check did (``None`` before the first fit start): also in the process that
        started a ``ddp_spawn`` run."""
        if self._handoff is not None:
            data = self._handoff.receive()
            if data is not None:
                self._update = update_from_dict(data)
        return self._update

    def __getstate__(self) -> dict[str, Any]:
        # Pickled to start the processes of a ddp_spawn run: give the copies a way back.
        if self._handoff is None and multiprocessing.parent_process() is None:
            self._handoff = SpawnHandoff()
        return self.__dict__.copy()

    # ----------------------------------------------------------------- state (checkpoints, resume)
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(head=self.head, annotations=self.annotations)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "update": self._update.as_dict() if self._update else None,
                "heads": self._heads}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        data = state_dict.get("update")
        self._update = update_from_dict(data) if data else None
        self._heads = list(state_dict.get("heads") or [])
        self._restored = True

    # ----------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        restored, self._restored = self._restored, False
        if restored and self._update is not None:
            self._resume(trainer, pl_module)
            return
        folder = self._save_folder(trainer)  # on every rank: trainer.log_dir is a collective call
        plot_wh: list[Tensor] = []  # rank 0's boxes at the training size, kept for the plot
        try:
            heads = find_heads(pl_module, self.head)
            update = outcome_from_rank_zero(trainer.strategy, lambda: self._check(trainer, pl_module, heads, plot_wh),
                                            trainer.is_global_zero)
            if update.replaced:
                write_on_every_rank(trainer.strategy, lambda: write_heads(heads, update.anchors_after),
                                    lambda: write_heads(heads, update.anchors_before))
        except AutoAnchorError as err:
            if self.on_error == "warn" and not isinstance(err, ConfigError):
                self._warn(f"AutoAnchor: {err} -- training goes on with the anchors unchanged.")
                return
            raise
        self._update, self._heads = update, heads.names
        if trainer.is_global_zero:
            self._report(trainer, heads, update, folder, plot_wh[0] if plot_wh else None)
            if self._handoff is not None:
                self._handoff.send(update.as_dict())

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Before validate/test/predict: the anchors of the last fit go back into a model that lost them."""
        if self.enabled and stage != "fit" and self._update is not None and self._update.replaced:
            self._write_back(trainer, find_heads(pl_module, self.head))

    # ----------------------------------------------------------------- steps
    def _check(self, trainer: Any, pl_module: nn.Module, heads: Heads, plot_wh: list[Tensor]) -> Update:
        """Rank 0: read the boxes, score the primary head's anchors, fit new ones if they fit badly."""
        if heads.unwritten:
            self._warn(f"AutoAnchor: {heads.unwritten} look like detection heads too but are not written; name "
                       f"every copy in AutoAnchor(head=[...]) to keep them in step (writing {heads.names}).")
        if heads.on_grid:
            return self._check_grid(trainer, heads, plot_wh)
        settings = self.settings.but(img_size=training_img_size(trainer, self.settings.img_size, self._warn))
        boxes = training_boxes(trainer, self._annotations_reader())
        plot_wh.append(boxes.scaled(settings.img_size, settings.resize))
        primary = heads.primary
        update = refit_anchors(primary.read_anchors(), primary.strides, boxes, settings, device=_device_of(pl_module),
                               progress=trainer.progress_bar_callback is not None, where=heads.names[0],
                               advise_count=True)
        strides = primary.strides
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

    def _check_grid(self, trainer: Any, heads: Heads, plot_wh: list[Tensor]) -> GridUpdate:
        """Rank 0, for a head matching by IoU on its grid: the boxes placed as the model places them, the
        generator's arguments scored by placed recall at the matcher's threshold and re-fitted if under
        ``bpr_threshold`` (the model's resize and threshold, unless the settings give their own; a custom
        head is resized as ``img_size`` and ``resize`` say)."""
        adapter: Any = heads.primary
        settings = self.settings
        if isinstance(adapter, GridAnchorHead):
            adapter.train_at(training_img_size(trainer, settings.img_size, self._warn), settings.resize)
        boxes = training_boxes(trainer, self._annotations_reader())
        placed = place_boxes(boxes, adapter.detector_resize(settings.min_size, settings.max_size), adapter.layout,
                             adapter.settings.center_offset)
        plot_wh.append(placed.wh)
        thr = adapter.settings.iou_threshold if settings.iou_threshold is None else settings.iou_threshold
        return refit_grid_anchors(adapter.structure(), placed, thr, bpr_threshold=settings.bpr_threshold,
                                  seed=settings.seed, n_images=boxes.num_images, source=boxes.source)

    def _annotations_reader(self) -> Callable[[], BoxSet] | None:
        if not self.annotations:
            return None
        return lambda: load_boxes(self.annotations, split=self.split, strict=self.strict)  # type: ignore[arg-type]

    def _resume(self, trainer: Any, pl_module: nn.Module) -> None:
        """A run restored from a checkpoint: the first run's outcome stands; its anchors go back into the
        model where the checkpoint did not hold them (e.g. a non-persistent buffer, torchvision's cell anchors)."""
        update = self._update
        assert update is not None
        written = self._write_back(trainer, find_heads(pl_module, self.head))
        what = "new anchors fitted" if update.replaced else "anchors checked"
        again = "; written back into the model, whose checkpoint did not hold them" if written else ""
        self._info(f"AutoAnchor: resumed; {what} in the first run stand ({_headline(update)}){again}; not checking "
                   "or re-fitting again.")

    def _write_back(self, trainer: Any, heads: Heads) -> bool:
        """Write the last outcome's anchors on every rank where the model's differ; whether it did."""
        update = self._update
        assert update is not None
        if trainer.strategy.reduce_boolean_decision(not holds(heads, update.anchors_after), all=False):
            before = heads.primary.structure() if heads.on_grid else heads.primary.read_anchors()  # type: ignore
            write_on_every_rank(trainer.strategy, lambda: write_heads(heads, update.anchors_after),
                                lambda: write_heads(heads, before))
            return True
        return False

    def _save_folder(self, trainer: Any) -> Path | None:
        """Where the files go; ``None`` under ``fast_dev_run``, which writes nothing."""
        if trainer.fast_dev_run:
            return None
        return Path(self.save_dir or trainer.log_dir or trainer.default_root_dir)

    def _report(self, trainer: Any, heads: Heads, update: Update, folder: Path | None, wh: Tensor | None) -> None:
        log_update(trainer.loggers, update, trainer.global_step)
        settings = self.settings
        if isinstance(update, GridUpdate):
            adapter: Any = heads.primary
            saved = [] if folder is None else save_grid_update(update, folder, adapter.constructor_args(),
                                                               wh=wh if self.plot else None, warn=self._warn)
            lines = grid_report_lines(update, heads.names, adapter.settings)
        else:
            saved = [] if folder is None else save_update(update, folder, heads.primary.strides.tolist(),
                                                          settings.resize, wh=wh if self.plot else None,
                                                          warn=self._warn)
            lines = report_lines(update, heads.names, settings.bpr_threshold, settings.resize)
        self._info("\n".join(lines + saved))


def _headline(update: Update) -> str:
    if isinstance(update, GridUpdate):
        after = update.after
        return f"placed recall {after.recall:.4f} at IoU {update.thr:g}, mean best IoU {after.mean_best_iou:.4f}"
    return f"BPR {update.after.bpr:.4f}, fitness {update.after.fitness:.4f}"


def _device_of(module: nn.Module) -> torch.device:
    """The model's CUDA device, where the per-box work of the check and fit runs too; else the CPU
    (the scores are summed in float64, which not every accelerator has)."""
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None and tensor.device.type == "cuda" else torch.device("cpu")


def _parameters(heads: Heads) -> list[tuple[str, nn.Parameter]]:
    return [(f"{name}.{p_name}", p) for name, module in zip(heads.names, heads.modules(), strict=True)
            if isinstance(module, nn.Module) for p_name, p in module.named_parameters()]
