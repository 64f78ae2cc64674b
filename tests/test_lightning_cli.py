"""LightningCLI configs, in both namespaces: ``pytorch_lightning`` and the unified ``lightning``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI as UnifiedCLI
from pytorch_lightning.cli import LightningCLI

import lightning_autoanchor.lightning
from lightning_autoanchor import AutoAnchor
from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo
from lightning_autoanchor.demo.data import DEFAULT_ANNOTATIONS
from lightning_autoanchor.demo.model import DEFAULT_ANCHORS

ROOT = Path(__file__).parents[1]
DEMO_CONFIG = ROOT / "example_configs" / "demo.yaml"
UNIFIED_CONFIG = ROOT / "example_configs" / "lightning_namespace.yaml"


def default_anchors_px() -> torch.Tensor:
    return torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32).view(3, 3, 2)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each CLI in a fresh folder (its logs land there), with no pytest arguments in ``sys.argv``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli"])


def test_demo_config_fast_dev_run_fires_the_callback() -> None:
    cli = LightningCLI(TinyYolo, RenderedBoxesDataModule, args=[
        "fit", "--config", str(DEMO_CONFIG), "--trainer.fast_dev_run=true", "--model.width=4"])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, AutoAnchor))
    settings = callback.settings
    assert (settings.img_size, settings.bpr_threshold, settings.thr, settings.generations) == (160, 0.98, 4.0, 1000)
    assert callback.update is not None and callback.update.replaced
    head = cli.model.head
    torch.testing.assert_close(head.anchors * head.stride.view(-1, 1, 1), callback.update.anchors_after)
    assert not torch.allclose(callback.update.anchors_after, default_anchors_px())


class UnifiedYolo(L.LightningModule):
    """A ``lightning.pytorch`` module around the demo network (its head is ``net.head``)."""

    def __init__(self, img_size: int = 64) -> None:
        super().__init__()
        self.net = TinyYolo(width=4)
        self.data = RenderedBoxesDataModule(img_size=img_size, batch_size=8)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        return self.net.loss_fn(self.net(images), targets)[0]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.data.train_dataloader()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_unified_namespace_config() -> None:
    cli = UnifiedCLI(UnifiedYolo, args=[
        "fit", "--config", str(UNIFIED_CONFIG), "--trainer.fast_dev_run=true",
        "--trainer.callbacks.init_args.img_size=64",
        f"--trainer.callbacks.init_args.annotations={DEFAULT_ANNOTATIONS}"])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, lightning_autoanchor.lightning.AutoAnchor))
    assert isinstance(callback, L.Callback)
    assert callback.update is not None and callback.update.replaced and callback.update.img_size == 64
    head = cli.model.net.head
    torch.testing.assert_close(head.anchors * head.stride.view(-1, 1, 1), callback.update.anchors_after)


def test_the_unified_cli_needs_its_own_class(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        UnifiedCLI(UnifiedYolo, run=False, args=["--trainer.callbacks=lightning_autoanchor.AutoAnchor"])
    assert "AutoAnchor" in capsys.readouterr().err
    # pytorch_lightning's CLI takes either class: the unified one is a pytorch_lightning callback too
    for class_path in ("lightning_autoanchor.AutoAnchor", "lightning_autoanchor.lightning.AutoAnchor"):
        own = LightningCLI(TinyYolo, RenderedBoxesDataModule, run=False, args=[
            f"--trainer.callbacks={class_path}", "--trainer.callbacks.img_size=160"])
        assert any(isinstance(c, AutoAnchor) for c in own.trainer.callbacks)


def test_the_demo_runs_in_the_unified_namespace(tmp_path: Path) -> None:
    from lightning_autoanchor.demo import lightning as demo

    callback = lightning_autoanchor.lightning.AutoAnchor(img_size=64)
    model = demo.TinyYolo(width=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback])
    trainer.fit(model, demo.RenderedBoxesDataModule(img_size=64, batch_size=8))
    assert trainer.state.finished and callback.update is not None and callback.update.replaced
    assert "val/match_rate" in trainer.callback_metrics


def test_main_job_entry_point_runs(tmp_path: Path) -> None:
    """``python -m lightning_autoanchor.demo fit --config example_configs/demo.yaml``, shortened."""
    done = subprocess.run([sys.executable, "-m", "lightning_autoanchor.demo", "fit", "--config", str(DEMO_CONFIG),
                           "--trainer.fast_dev_run=true", "--model.width=4"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout + done.stderr
    assert "AutoAnchor:" in report and "written into head" in report
