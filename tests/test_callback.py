"""The AutoAnchor callback with real Trainers, loggers and checkpoints (single process; DDP is in test_ddp.py)."""

from __future__ import annotations

import csv
import io
import signal
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lightning_autoanchor import AutoAnchor, BoxSet, fit_anchors
from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo, YoloHead
from lightning_autoanchor.errors import AnchorFitError, ConfigError, DataError, HeadError
from lightning_autoanchor.heads import YoloAnchors, find_heads
from lightning_autoanchor.refit import AnchorUpdate, refit_anchors
from lightning_autoanchor.reporting import PLOT_NAME, YAML_NAME, report_lines

IMG = 64


class CountingData(RenderedBoxesDataModule):
    """The demo datamodule, counting how often the callback asks it for boxes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(img_size=IMG, batch_size=8, **kwargs)  # type: ignore[arg-type]
        self.box_reads = 0

    def autoanchor_boxes(self) -> BoxSet:
        self.box_reads += 1
        return super().autoanchor_boxes()


def trainer(tmp_path: Path, *callbacks: pl.Callback, **kwargs: object) -> pl.Trainer:
    options = {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0, "accelerator": "cpu",
               "logger": CSVLogger(tmp_path, name="run"), "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path}
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)  # type: ignore[arg-type]


def fitted_anchors(data: RenderedBoxesDataModule) -> list[list[float]]:
    """Anchors fitted to the demo boxes at IMG px, as TinyYolo's ``anchors`` argument (3 levels)."""
    result = fit_anchors(data.autoanchor_boxes().scaled(IMG), 9, generations=0)
    return result.anchors.reshape(3, 6).tolist()


def match_rate(model: TinyYolo, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        model.loss_fn(model(batch[0]), batch[1])
    return model.loss_fn.last_match_rate


def test_replaces_anchors_in_place_and_the_loss_trains_with_them(tmp_path: Path) -> None:
    data, model = CountingData(), TinyYolo(width=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    buffer, before = model.head.anchors, model.head.anchors.clone()
    rate_before = match_rate(model, batch)
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(model, data)

    update = callback.update
    assert update is not None and update.replaced and update.fitted
    assert update.before.bpr < 0.98 < update.after.bpr
    assert model.head.anchors is buffer, "written in place"
    assert model.loss_fn.anchors is model.head.anchors
    assert not torch.equal(buffer, before)
    torch.testing.assert_close(buffer * model.head.stride.view(-1, 1, 1), update.anchors_after)
    torch.testing.assert_close(update.anchors_before, before * model.head.stride.view(-1, 1, 1))
    assert match_rate(model, batch) > rate_before
    assert data.box_reads == 1
    # small anchors on the fine level, large on the coarse one
    areas = update.anchors_after.prod(-1)
    assert areas[0].max() <= areas[1].min() and areas[1].max() <= areas[2].min()


def test_logs_to_every_logger_and_saves_yaml_and_plot(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback, logger=[csv_logger, tb_logger]).fit(TinyYolo(width=4), CountingData())
    expected = callback.update.metrics()  # type: ignore[union-attr]
    assert set(expected) == {"autoanchor/bpr_before", "autoanchor/bpr_after", "autoanchor/aat_before",
                             "autoanchor/aat_after", "autoanchor/fitness_before", "autoanchor/fitness_after",
                             "autoanchor/avg_iou_after", "autoanchor/replaced"}
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("autoanchor/replaced"))
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_logger.log_dir)
    events.Reload()
    assert events.Scalars("autoanchor/bpr_after")[0].value == pytest.approx(expected["autoanchor/bpr_after"])

    folder = Path(csv_logger.log_dir)  # the trainer's log dir is the first logger's
    saved = yaml.safe_load((folder / YAML_NAME).read_text())
    rows = saved["anchors"]
    assert len(rows) == 3 and all(len(r) == 6 for r in rows)
    np.testing.assert_allclose(np.array(rows, dtype=float).reshape(3, 3, 2),
                               callback.update.anchors_after.numpy(), atol=0.51)  # type: ignore[union-attr]
    assert (folder / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_keeps_anchors_that_fit(tmp_path: Path) -> None:
    data = CountingData()
    model = TinyYolo(width=4, anchors=fitted_anchors(data))
    before = model.head.anchors.clone()
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(model, data)
    update = callback.update
    assert update is not None and not update.fitted and not update.replaced
    assert update.before.bpr >= 0.98 and update.after == update.before
    assert torch.equal(model.head.anchors, before)


def test_keeps_anchors_when_new_ones_are_no_better() -> None:
    """One anchor, two size clusters far apart: no anchor covers both, so the fit cannot win on BPR."""
    head = YoloHead(1, [4], [[10.0, 10.0]], [8])
    boxes = BoxSet(np.array([[640, 640]]), np.array([[10, 10]] * 10 + [[500, 500]] * 10), np.zeros(20))
    update = refit_anchors(head.anchors * 8, head.stride, boxes, img_size=640, scale_jitter=0.0)
    assert update.fitted and not update.replaced
    assert update.candidate is not None and update.candidate.bpr <= update.before.bpr
    assert torch.equal(update.anchors_after, update.anchors_before)


def test_resume_keeps_restored_anchors_and_does_not_refit(tmp_path: Path) -> None:
    first = AutoAnchor(img_size=IMG)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trained = TinyYolo(width=4)
    trainer(tmp_path, first, checkpoint, enable_checkpointing=True).fit(trained, CountingData())
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)  # plain data only: loads without unpickling code
    assert saved["callbacks"][first.state_key]["update"]["replaced"] is True
    torch.testing.assert_close(saved["state_dict"]["head.anchors"], trained.head.anchors)

    data, model, again = CountingData(), TinyYolo(width=4), AutoAnchor(img_size=IMG)
    trainer(tmp_path, again, max_epochs=2, enable_checkpointing=True).fit(model, data, ckpt_path=path)
    assert data.box_reads == 0, "no re-check, no re-fit"
    assert torch.equal(model.head.anchors, trained.head.anchors)
    assert again.update == first.update


def test_two_callbacks_keep_their_own_state(tmp_path: Path) -> None:
    class TwoHeads(TinyYolo):
        def __init__(self) -> None:
            super().__init__(width=4)
            self.head_b = YoloHead(80, [16], [[100.0, 100.0, 200.0, 100.0]], [32])

    callbacks = [AutoAnchor(img_size=IMG, head="head"), AutoAnchor(img_size=IMG, head="head_b")]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = TwoHeads()
    trainer(tmp_path, *callbacks, checkpoint, enable_checkpointing=True).fit(model, CountingData())
    a, b = (c.update for c in callbacks)
    assert a is not None and b is not None and a.anchors_after.shape == (3, 3, 2) and b.anchors_after.shape == (1, 2, 2)
    torch.testing.assert_close(model.head_b.anchors * 32, b.anchors_after)
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert states[callbacks[0].state_key] != states[callbacks[1].state_key]
    restored = [AutoAnchor(img_size=IMG, head="head"), AutoAnchor(img_size=IMG, head="head_b")]
    for callback in restored:
        callback.load_state_dict(states[callback.state_key])
    assert [c.update for c in restored] == [a, b]


def test_ema_copy_gets_the_same_anchors(tmp_path: Path) -> None:
    class WithEma(TinyYolo):
        def __init__(self) -> None:
            super().__init__(width=4)
            self.ema = AveragedModel(nn.ModuleDict({"head": self.head}))

    model = WithEma()
    assert find_heads(model).names == ["head", "ema.module.head"]
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(model, CountingData())
    assert callback.update is not None and callback.update.replaced
    assert torch.equal(model.ema.module["head"].anchors, model.head.anchors)


def test_update_round_trips_through_plain_data() -> None:
    head = find_heads(TinyYolo(width=4)).primary
    update = refit_anchors(head.read_anchors(), head.strides, CountingData().autoanchor_boxes(), img_size=IMG,
                           generations=50)
    buffer = io.BytesIO()
    torch.save(update.as_dict(), buffer)
    buffer.seek(0)
    assert AnchorUpdate.from_dict(torch.load(buffer, weights_only=True)) == update


# ----------------------------------------------------------------- what must warn or fail, and how


class NoHead(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        return self.layer.weight.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoHeads(TinyYolo):
    def __init__(self) -> None:
        super().__init__(width=4)
        self.extra = YoloHead(80, [16], [[10.0, 10.0]], [32])


class NanAnchors(TinyYolo):
    def __init__(self) -> None:
        super().__init__(width=4)
        self.head.anchors[0, 0, 0] = float("nan")


class NoBoxes(CountingData):
    def autoanchor_boxes(self) -> BoxSet:
        return BoxSet(np.array([[640, 480]]), np.zeros((0, 2)), np.zeros(0))


class NoProtocol(pl.LightningDataModule):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 3, IMG, IMG)), batch_size=2)


@pytest.mark.parametrize(("model", "data", "callback", "error", "match"), [
    (NoHead, CountingData, {}, HeadError, "no detection head"),
    (TwoHeads, CountingData, {}, HeadError, r"2 candidate detection heads.*'head', 'extra'"),
    (NanAnchors, CountingData, {}, HeadError, "positive and finite"),
    (TinyYolo, CountingData, {"head": "stages"}, HeadError, "head 'stages'"),
    (TinyYolo, CountingData, {"head": "nowhere"}, HeadError, "not found"),
    (TinyYolo, NoBoxes, {}, AnchorFitError, "no training boxes"),
    (TinyYolo, NoProtocol, {}, DataError, "found no training boxes"),
    (TinyYolo, CountingData, {"img_size": 100}, ConfigError, "not a multiple of the head's largest stride 32"),
    (TinyYolo, NoProtocol, {"annotations": "missing.json"}, DataError, "no such file"),
])
def test_clear_errors_and_anchors_left_alone(tmp_path: Path, model: type, data: type, callback: dict, error: type,
                                             match: str) -> None:
    settings = {"img_size": IMG, **callback}
    module = model() if model is not TinyYolo else TinyYolo(width=4)
    before = {k: v.clone() for k, v in module.state_dict().items() if k.endswith("anchors")}
    with pytest.raises(error, match=match):
        trainer(tmp_path, AutoAnchor(**settings)).fit(module, data())
    after = {k: v for k, v in module.state_dict().items() if k.endswith("anchors")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if not torch.isnan(before[k]).any())


def test_img_size_is_required_somewhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs the training image size"):
        trainer(tmp_path, AutoAnchor()).fit(TinyYolo(width=4), NoProtocol())


def test_on_error_warn_goes_on_training_with_anchors_unchanged(tmp_path: Path) -> None:
    model = TinyYolo(width=4)
    before = model.head.anchors.clone()
    run = trainer(tmp_path, AutoAnchor(img_size=IMG, on_error="warn"))
    with pytest.warns(UserWarning, match="no training boxes.*anchors unchanged"):
        run.fit(model, NoBoxes())
    assert run.state.finished and run.global_step == 2
    assert torch.equal(model.head.anchors, before)


def test_warns_when_img_sizes_disagree(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"img_size=96\) differs from the datamodule's img_size 64"):
        trainer(tmp_path, AutoAnchor(img_size=96)).fit(TinyYolo(width=4), CountingData())


def test_img_size_comes_from_the_datamodule(tmp_path: Path) -> None:
    callback = AutoAnchor()
    trainer(tmp_path, callback).fit(TinyYolo(width=4), CountingData())
    assert callback.update is not None and callback.update.img_size == IMG


def test_warns_when_the_head_is_frozen(tmp_path: Path) -> None:
    model = TinyYolo(width=4)
    model.head.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        trainer(tmp_path, AutoAnchor(img_size=IMG)).fit(model, CountingData())


def test_disabled_does_nothing(tmp_path: Path) -> None:
    data, model, callback = CountingData(), TinyYolo(width=4), AutoAnchor(img_size=IMG, enabled=False)
    before = model.head.anchors.clone()
    trainer(tmp_path, callback).fit(model, data)
    assert callback.update is None and data.box_reads == 0 and torch.equal(model.head.anchors, before)


def test_boxes_from_an_annotation_file(tmp_path: Path) -> None:
    from lightning_autoanchor.demo.data import DEFAULT_ANNOTATIONS

    callback = AutoAnchor(img_size=IMG, annotations=str(DEFAULT_ANNOTATIONS))
    data = CountingData()
    trainer(tmp_path, callback).fit(TinyYolo(width=4), data)
    assert data.box_reads == 0
    assert callback.update is not None and callback.update.n_images == 1000


class YoloV5StyleDataset(torch.utils.data.Dataset):
    """A dataset describing its boxes the YOLOv5 way: ``shapes`` and ``labels``."""

    def __init__(self, boxes: BoxSet) -> None:
        self.shapes = boxes.image_sizes
        norm = boxes.wh / boxes.image_sizes[boxes.image_index]
        self.labels = [np.column_stack([np.zeros(k.sum()), np.full((k.sum(), 2), 0.5), norm[k]])
                       for k in (boxes.image_index == i for i in range(boxes.num_images))]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.zeros(3, IMG, IMG)


def test_boxes_from_a_yolov5_style_train_dataset(tmp_path: Path) -> None:
    boxes = CountingData().autoanchor_boxes()

    class Data(pl.LightningDataModule):
        img_size = IMG

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(YoloV5StyleDataset(boxes), batch_size=2)

    class Model(TinyYolo):
        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self(batch)[0].mean()

    callback = AutoAnchor(scale_jitter=0.0)
    trainer(tmp_path, callback).fit(Model(width=4), Data())
    assert callback.update is not None and callback.update.before.n_boxes == len(boxes) - int(
        ((boxes.scaled(IMG) < 2).all(1)).sum())


def test_interrupt_during_the_fit_leaves_the_head_bit_for_bit(tmp_path: Path) -> None:
    """A real Ctrl-C (SIGALRM raising KeyboardInterrupt) while the evolution runs."""
    model = TinyYolo(width=4)
    before = model.head.anchors.clone()
    seen: list[str] = []

    def interrupt(signum: int, frame: object) -> None:
        while frame is not None:
            seen.append(frame.f_code.co_name)  # type: ignore[attr-defined]
            frame = frame.f_back  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt), signal.getsignal(signal.SIGINT)
    signal.setitimer(signal.ITIMER_REAL, 3.0)  # well after the fit has reached the evolution
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on KeyboardInterrupt
            trainer(tmp_path, AutoAnchor(img_size=IMG, generations=10**8)).fit(model, CountingData())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert "evolve" in seen, "interrupted inside the optimiser"
    assert torch.equal(model.head.anchors, before)


def test_exception_during_the_fit_leaves_the_head_bit_for_bit(tmp_path: Path) -> None:
    model = TinyYolo(width=4)
    before = model.head.anchors.clone()

    def fail(signum: int, frame: object) -> None:
        raise RuntimeError("power cut")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, 3.0)  # well after the fit has reached the evolution
    try:
        with pytest.raises(RuntimeError, match="power cut"):
            trainer(tmp_path, AutoAnchor(img_size=IMG, generations=10**8)).fit(model, CountingData())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert torch.equal(model.head.anchors, before)


def test_a_failed_write_rolls_back_every_head() -> None:
    class Broken(YoloAnchors):
        def write_anchors(self, anchors: torch.Tensor) -> None:
            raise OSError("device lost")

    from lightning_autoanchor.heads import Heads, write_all

    first, second = YoloHead(1, [4], [[10.0, 10.0]], [8]), YoloHead(1, [4], [[10.0, 10.0]], [8])
    heads = Heads([YoloAnchors(first), Broken(second)], ["first", "second"])
    with pytest.raises(OSError, match="device lost"):
        write_all(heads, torch.tensor([[[50.0, 60.0]]]))
    assert torch.equal(first.anchors, torch.tensor([[[10.0 / 8, 10.0 / 8]]]))


class PixelAnchorHead(nn.Module):
    """A head outside the YOLOv5 convention: anchors kept in pixels as ``(levels * A, 4)`` corner boxes
    (torchvision-style), adapted by implementing the AnchorHead protocol on the module itself."""

    def __init__(self) -> None:
        super().__init__()
        self.strides = torch.tensor([8.0, 16.0, 32.0])
        sizes = torch.tensor(DEFAULT_PIXEL_ANCHORS).view(9, 2)
        self.register_buffer("cell_anchors", torch.cat([-sizes / 2, sizes / 2], dim=1))
        self.conv = nn.Conv2d(3, 3, 1)

    def read_anchors(self) -> torch.Tensor:
        return (self.cell_anchors[:, 2:] - self.cell_anchors[:, :2]).view(3, 3, 2).clone()

    def write_anchors(self, anchors: torch.Tensor) -> None:
        sizes = anchors.reshape(9, 2).to(self.cell_anchors)
        self.cell_anchors.copy_(torch.cat([-sizes / 2, sizes / 2], dim=1))


DEFAULT_PIXEL_ANCHORS = [[10.0, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


class AdaptedModel(TinyYolo):
    """TinyYolo plus a second, non-YOLO head that the callback is pointed at through autoanchor_heads()."""

    def __init__(self) -> None:
        super().__init__(width=4)
        self.retina = PixelAnchorHead()

    def autoanchor_heads(self) -> list[PixelAnchorHead]:
        return [self.retina]


def test_custom_heads_plug_in_through_the_protocol(tmp_path: Path) -> None:
    model = AdaptedModel()
    yolo_before, buffer = model.head.anchors.clone(), model.retina.cell_anchors
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(model, CountingData())
    assert callback.update is not None and callback.update.replaced
    assert model.retina.cell_anchors is buffer
    torch.testing.assert_close(model.retina.read_anchors(), callback.update.anchors_after)
    assert torch.equal(model.head.anchors, yolo_before), "only the head autoanchor_heads() names"
    named = AutoAnchor(img_size=IMG, head="retina")
    trainer(tmp_path, named).fit(AdaptedModel(), CountingData())
    assert named.update is not None and named.update.anchors_after.shape == (3, 3, 2)


def test_warns_when_kept_anchors_are_in_reverse_level_order(tmp_path: Path) -> None:
    data = CountingData()
    reversed_levels = fitted_anchors(data)[::-1]  # large anchors on the stride-8 level
    model = TinyYolo(width=4, anchors=reversed_levels)
    before = model.head.anchors.clone()
    callback = AutoAnchor(img_size=IMG)
    with pytest.warns(UserWarning, match="do not grow with the strides"):
        trainer(tmp_path, callback).fit(model, data)
    assert callback.update is not None and not callback.update.replaced
    assert torch.equal(model.head.anchors, before), "kept as they are: only a better fit is written"


def test_level_order_check() -> None:
    from lightning_autoanchor.refit import assign_to_levels, follows_strides

    anchors = torch.tensor([[10.0, 10], [20, 20], [40, 40], [80, 80]])
    strides = torch.tensor([32.0, 8.0])  # a head that lists its coarse level first
    laid_out = assign_to_levels(anchors, strides, 2)
    torch.testing.assert_close(laid_out[1], anchors[:2])  # small anchors on the stride-8 level
    assert follows_strides(laid_out, strides)
    assert not follows_strides(laid_out.flip(0), strides)


def test_an_unwritable_save_dir_only_warns(tmp_path: Path) -> None:
    model, callback = TinyYolo(width=4), AutoAnchor(img_size=IMG, save_dir="/proc/no-such-dir")
    run = trainer(tmp_path, callback)
    with pytest.warns(UserWarning, match="cannot write /proc/no-such-dir/autoanchor.yaml"):
        run.fit(model, CountingData())
    assert run.state.finished and callback.update is not None and callback.update.replaced


# ----------------------------------------------------------------- hardening (issue 9)


class IntegerAnchors(TinyYolo):
    """An int64 ``anchors`` buffer: ``copy_`` would truncate stride units (2.9 -> 2)."""

    def __init__(self) -> None:
        super().__init__(width=4)
        self.head.anchors = self.head.anchors.round().long()


def test_an_integer_anchors_buffer_is_refused(tmp_path: Path) -> None:
    model = IntegerAnchors()
    before = model.head.anchors.clone()
    with pytest.raises(HeadError, match=r"'anchors' buffer is torch\.int64"):
        trainer(tmp_path, AutoAnchor(img_size=IMG)).fit(model, CountingData())
    assert torch.equal(model.head.anchors, before)


class TruncatingHead(nn.Module):
    """A protocol head whose storage silently rounds to whole pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.strides = torch.tensor([8.0])
        self.register_buffer("sizes", torch.tensor([[[10, 13], [16, 30]]]))

    def read_anchors(self) -> torch.Tensor:
        return self.sizes.float().clone()

    def write_anchors(self, anchors: torch.Tensor) -> None:
        self.sizes.copy_(anchors)  # float -> int64: truncates


def test_anchors_are_read_back_after_every_write_all_heads_or_none() -> None:
    from lightning_autoanchor.heads import Heads, write_all

    good, truncating = YoloHead(1, [4], [[10.0, 13.0, 16.0, 30.0]], [8]), TruncatingHead()
    heads = Heads([YoloAnchors(good), truncating], ["good", "truncating"])  # type: ignore[list-item]
    with pytest.raises(HeadError, match="head truncating: anchors read back after the write differ"):
        write_all(heads, torch.tensor([[[10.5, 13.5], [16.5, 30.5]]]))
    torch.testing.assert_close(good.anchors * 8, torch.tensor([[[10.0, 13.0], [16.0, 30.0]]]))
    assert truncating.sizes.tolist() == [[[10, 13], [16, 30]]]


def test_a_second_fit_of_a_new_model_checks_again(tmp_path: Path) -> None:
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(TinyYolo(width=4), CountingData())
    first = callback.update
    data, model = CountingData(), TinyYolo(width=4)
    trainer(tmp_path, callback).fit(model, data)
    assert data.box_reads == 1, "a new fit is checked, not taken for a resume"
    assert callback.update is not None and callback.update is not first and callback.update.replaced
    torch.testing.assert_close(model.head.anchors * model.head.stride.view(-1, 1, 1), callback.update.anchors_after)


class VolatileAnchors(TinyYolo):
    """A head whose ``anchors`` buffer is not persistent: checkpoints do not hold it."""

    def __init__(self) -> None:
        super().__init__(width=4)
        anchors = self.head.anchors
        del self.head.anchors
        self.head.register_buffer("anchors", anchors, persistent=False)
        self.loss_fn.anchors = self.head.anchors


def test_a_resume_writes_back_anchors_the_checkpoint_did_not_hold(tmp_path: Path) -> None:
    first = AutoAnchor(img_size=IMG)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trained = VolatileAnchors()
    trainer(tmp_path, first, checkpoint, enable_checkpointing=True).fit(trained, CountingData())
    assert "head.anchors" not in torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]

    data, model, again = CountingData(), VolatileAnchors(), AutoAnchor(img_size=IMG)
    trainer(tmp_path, again, max_epochs=2, enable_checkpointing=True).fit(model, data,
                                                                          ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert data.box_reads == 0
    assert torch.equal(model.head.anchors, trained.head.anchors), "the first run's anchors, not the defaults"


def test_a_bf16_resume_does_not_warn_that_anchors_differ(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    first = AutoAnchor(img_size=IMG)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, first, checkpoint, enable_checkpointing=True, precision="bf16-true").fit(
        TinyYolo(width=4), CountingData())
    model, again = TinyYolo(width=4), AutoAnchor(img_size=IMG)
    trainer(tmp_path, again, max_epochs=2, precision="bf16-true").fit(model, CountingData(),
                                                                      ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert model.head.anchors.dtype == torch.bfloat16
    assert not [w for w in recwarn if "differ" in str(w.message) or "written back" in str(w.message)]


def test_validate_on_a_fresh_model_gets_the_fitted_anchors(tmp_path: Path) -> None:
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(VolatileAnchors(), CountingData())
    fresh = VolatileAnchors()
    trainer(tmp_path, callback, limit_val_batches=1).validate(fresh, CountingData())
    assert callback.update is not None
    torch.testing.assert_close(fresh.head.anchors * fresh.head.stride.view(-1, 1, 1), callback.update.anchors_after)


def test_yaml_and_plot_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        trainer(tmp_path, AutoAnchor(img_size=IMG, save_dir=str(tmp_path / "out"))).fit(TinyYolo(width=4),
                                                                                      CountingData())
    finally:
        os.umask(old)
    for name in (YAML_NAME, PLOT_NAME):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644


def test_fast_dev_run_writes_no_file(tmp_path: Path) -> None:
    callback = AutoAnchor(img_size=IMG, save_dir=str(tmp_path / "out"))
    trainer(tmp_path, callback, fast_dev_run=True).fit(TinyYolo(width=4), CountingData())
    assert callback.update is not None and callback.update.replaced
    assert not (tmp_path / "out").exists()


class NoneHeads(TinyYolo):
    def autoanchor_heads(self) -> None:
        return None


def test_autoanchor_heads_returning_none_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HeadError, match=r"autoanchor_heads\(\) must return a non-empty list of heads.*got None"):
        trainer(tmp_path, AutoAnchor(img_size=IMG)).fit(NoneHeads(), CountingData())


def test_on_error_warn_lets_go_of_the_boxes(tmp_path: Path) -> None:
    import gc
    import weakref

    class Data(CountingData):
        def autoanchor_boxes(self) -> BoxSet:
            boxes = super().autoanchor_boxes()
            self.seen = weakref.ref(boxes)
            return boxes

    data, callback = Data(), AutoAnchor(img_size=IMG, on_error="warn")
    with pytest.warns(UserWarning, match="positive and finite"):
        trainer(tmp_path, callback).fit(NanAnchors(), data)
    gc.collect()
    assert data.seen() is None, "the box set is not kept for the rest of the run"


class ModelEMA:
    """YOLOv5's EMA helper: a plain object (not a module) holding the averaged model in ``.ema``."""

    def __init__(self, model: nn.Module) -> None:
        import copy

        self.ema = copy.deepcopy(model)
        self.updates = 0


class WithPlainEma(TinyYolo):
    def __init__(self) -> None:
        super().__init__(width=4)
        self.ema = ModelEMA(nn.ModuleDict({"model": nn.ModuleDict({"24": self.head})}))


def test_an_ema_helper_that_is_not_a_module_is_written_too(tmp_path: Path) -> None:
    model = WithPlainEma()
    assert find_heads(model).names == ["head", "ema.ema.model.24"]
    callback = AutoAnchor(img_size=IMG)
    trainer(tmp_path, callback).fit(model, CountingData())
    assert callback.update is not None and callback.update.replaced
    assert torch.equal(model.ema.ema["model"]["24"].anchors, model.head.anchors)


def test_naming_only_the_model_warns_of_the_unwritten_ema_copy(tmp_path: Path) -> None:
    model = WithPlainEma()
    with pytest.warns(UserWarning, match=r"\['ema.ema.model.24'\] look like detection heads too but are not written"):
        trainer(tmp_path, AutoAnchor(img_size=IMG, head="head")).fit(model, CountingData())
    named = AutoAnchor(img_size=IMG, head=["head", "ema.ema.model.24"])
    trainer(tmp_path, named).fit(WithPlainEma(), CountingData())
    assert named.update is not None and named.update.replaced


def test_min_stride_ratio_holds_for_the_anchors_written(tmp_path: Path) -> None:
    model, callback = TinyYolo(width=4), AutoAnchor(img_size=IMG, min_stride_ratio=1.0)
    trainer(tmp_path, callback).fit(model, CountingData())
    assert callback.update is not None and callback.update.replaced
    written = model.head.anchors * model.head.stride.view(-1, 1, 1)  # (levels, per_level, 2) pixels
    sizes = written.prod(-1).sqrt()
    assert bool((sizes >= model.head.stride.view(-1, 1) * (1 - 1e-4)).all()), sizes


def test_the_report_says_when_the_count_is_far_from_the_knee(voc2007: BoxSet) -> None:
    anchors = torch.tensor(np.exp(np.linspace(np.log(8), np.log(300), 15)), dtype=torch.float32)
    anchors = anchors[:, None].repeat(1, 2).reshape(3, 5, 2)  # 15 square anchors, 5 per level
    update = refit_anchors(anchors, torch.tensor([8.0, 16.0, 32.0]), voc2007, img_size=640, advise_count=True,
                           generations=0)
    assert update.advice is not None and update.advice.startswith("the head has 15 anchors")
    assert update.advice in "\n".join(report_lines(update, ["head"], 0.98, "letterbox"))


def test_scale_aug_is_what_the_check_scores(tmp_path: Path) -> None:
    from lightning_autoanchor import score_anchors
    from lightning_autoanchor.optimizer import prepare_boxes

    data, callback = CountingData(), AutoAnchor(img_size=IMG, scale_aug=0.5, scale_jitter=0.0, generations=100)
    trainer(tmp_path, callback).fit(TinyYolo(width=4), data)
    update = callback.update
    assert update is not None and update.replaced
    wh, _ = prepare_boxes(data.autoanchor_boxes().scaled(IMG))
    augmented = score_anchors(wh, update.anchors_after.reshape(-1, 2), scale_aug=0.5)
    nominal = score_anchors(wh, update.anchors_after.reshape(-1, 2))
    assert update.after.fitness == pytest.approx(augmented.fitness, abs=1e-6)
    assert nominal.fitness != pytest.approx(augmented.fitness, abs=1e-3)
