"""Settings are refused when they are made (callback, LightningCLI YAML, API), with the argument and its range."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning.cli import LightningCLI

from lightning_autoanchor import AnchorSettings, AutoAnchor, ConfigError, fit_anchors, refit_anchors
from lightning_autoanchor.demo import RenderedBoxesDataModule, TinyYolo

BAD = [
    ({"resize": "strech"}, "resize must be one of 'letterbox', 'stretch'"),
    ({"sigma": -1}, "sigma must be a number in [0, 10]"),
    ({"mutation_prob": 7}, "mutation_prob must be a probability in [0, 1]"),
    ({"seed": None}, "seed must be an integer in [0, 9223372036854775807]"),
    ({"seed": -1}, "seed must be an integer in [0,"),
    ({"seed": 2**64}, "seed must be an integer in [0,"),
    ({"img_size": math.inf}, "img_size must be a number of pixels in (0, 100000]"),
    ({"img_size": 1e300}, "img_size must be a number of pixels in (0, 100000]"),
    ({"img_size": 0}, "img_size must be a number of pixels"),
    ({"generations": 2.5}, "generations must be an integer in [0,"),
    ({"generations": True}, "generations must be an integer"),
    ({"bpr_threshold": 1.5}, "bpr_threshold must be a number in [0, 1]"),
    ({"scale_jitter": 1.0}, "scale_jitter must be a number in [0, 1)"),
    ({"metric": "giou"}, "metric must be one of 'ratio', 'iou'"),
    ({"thr": 0.5}, "thr must be a side ratio"),
    ({"metric": "iou", "thr": 4.0}, "thr must be an IoU (metric='iou') in [0, 1)"),
    ({"thr": math.nan}, "thr must be a side ratio"),
]


@pytest.mark.parametrize(("options", "message"), BAD)
def test_the_callback_refuses_bad_settings_when_it_is_made(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AutoAnchor(on_error="warn", **options)  # warn never hides a mistake in the settings
    assert message in str(caught.value)


@pytest.mark.parametrize(("options", "message"), BAD)
def test_every_entry_point_refuses_them_the_same_way(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        AnchorSettings(**options)
    assert message in str(caught.value)
    wh = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    fit_options = {k: v for k, v in options.items() if k not in ("img_size", "bpr_threshold", "scale_jitter", "resize")}
    if fit_options:
        with pytest.raises(ConfigError):
            fit_anchors(wh, 2, **fit_options)
    with pytest.raises(ConfigError):
        refit_anchors(torch.ones(1, 2, 2) * 10, torch.tensor([8.0]), None, **{"img_size": 64, **options})  # type: ignore[arg-type]


def test_other_callback_arguments_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="on_error must be 'raise' or 'warn'"):
        AutoAnchor(on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="head must be a module path"):
        AutoAnchor(head=[])


def test_a_lightning_cli_yaml_is_refused_when_the_callback_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning_autoanchor.AutoAnchor", "init_args": {"img_size": 64, "sigma": -1}}]}}))
    with pytest.raises(ValueError, match=r"sigma must be a number in \[0, 10\], got -1"):  # ConfigError is one
        LightningCLI(TinyYolo, RenderedBoxesDataModule, run=False, args=["--config", str(config)])


def test_settings_are_frozen_and_changed_by_copy() -> None:
    settings = AnchorSettings(metric="ratio")
    assert settings.thr == 4.0
    iou = settings.but(metric="iou")
    assert (iou.metric, iou.thr, settings.metric) == ("iou", 0.5, "ratio")
    with pytest.raises(AttributeError):
        settings.seed = 3  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown setting"):
        settings.but(seeds=3)
