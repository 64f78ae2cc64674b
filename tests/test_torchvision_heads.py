"""torchvision's anchor generators: found in a LightningModule, read, laid out as the model does, written in place.

Real detectors (weights=None) on small images: RetinaNet, Faster R-CNN (ResNet-50-FPN and MobileNetV3
FPN), SSD300 (VGG16) and SSDlite.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torchvision.models.detection as detection
import yaml
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

from lightning_autoanchor.errors import HeadError
from lightning_autoanchor.torchvision_heads import (
    AnchorGeneratorAnchors,
    DefaultBoxAnchors,
    TorchvisionAnchors,
    TorchvisionSettings,
    find_torchvision_anchors,
)

SMALL = {"min_size": 128, "max_size": 224}
RPN_SMALL = {"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50}
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "retinanet": lambda: detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                          min_size=(96, 128), max_size=224),
    "fasterrcnn": lambda: detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                            **SMALL, **RPN_SMALL),
    "fasterrcnn_mobile": lambda: detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, rpn_fg_iou_thresh=0.6, **SMALL, **RPN_SMALL),
    "ssd300": lambda: detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=3),
    "ssdlite": lambda: detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3),
}
_BUILT: dict[str, nn.Module] = {}


def shared(name: str) -> nn.Module:
    """A real torchvision detector in eval mode, built once per session (seeded without touching global RNG).

    Tests that write anchors take a :func:`detector` copy instead.
    """
    if name not in _BUILT:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _BUILT[name] = BUILDERS[name]().eval()
    return _BUILT[name]


def detector(name: str) -> nn.Module:
    """A fresh copy of :func:`shared`."""
    return copy.deepcopy(shared(name))


class Detection(pl.LightningModule):
    """How users hold a torchvision detector: ``self.model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


EXPECTED = {
    "retinanet": ("model.anchor_generator", TorchvisionSettings("retinanet", (96, 128), 224, 32, None, 0.5, True, 0.0),
                  (9,) * 5, (((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812)),
                             ((0.5, 1.0, 2.0),) * 5)),
    "fasterrcnn": ("model.rpn.anchor_generator", TorchvisionSettings("fasterrcnn", (128,), 224, 32, None, 0.7, True,
                                                                     0.0),
                   (3,) * 5, (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)),
    "fasterrcnn_mobile": ("model.rpn.anchor_generator", TorchvisionSettings("fasterrcnn", (128,), 224, 32, None, 0.6,
                                                                            True, 0.0),
                          (15,) * 3, (((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)),
    "ssd300": ("model.anchor_generator", TorchvisionSettings("ssd", (300,), 300, 1, (300, 300), 0.5, True, 0.5),
               (4, 6, 6, 6, 4, 4), ((0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05),
                                    ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)))),
    "ssdlite": ("model.anchor_generator", TorchvisionSettings("ssd", (320,), 320, 1, (320, 320), 0.5, True, 0.5),
                (6,) * 6, ((0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0), ((2, 3),) * 6)),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_found_in_a_lightning_module_with_what_the_model_does(name: str) -> None:
    path, settings, counts, structure = EXPECTED[name]
    anchors = find_torchvision_anchors(Detection(shared(name)))
    assert anchors.path == path
    assert anchors.settings == settings  # Faster R-CNN: the RPN's matcher (0.7 / 0.6), not roi_heads' 0.5
    assert anchors.num_anchors_per_location() == counts
    assert anchors.read_structure() == structure
    assert isinstance(anchors, DefaultBoxAnchors if settings.family == "ssd" else AnchorGeneratorAnchors)


def test_named_by_the_generator_or_a_module_holding_it() -> None:
    model = Detection(shared("fasterrcnn_mobile"))
    for name in ("model.rpn.anchor_generator", "model.rpn", "model", None):
        assert find_torchvision_anchors(model, name).path == "model.rpn.anchor_generator"
    retinanet = shared("retinanet")
    assert find_torchvision_anchors(Detection(retinanet), "model.anchor_generator").generator is \
        retinanet.anchor_generator


def test_clear_errors_name_the_paths_and_the_protocol() -> None:
    with pytest.raises(HeadError, match=r"no torchvision AnchorGenerator.*AnchorHead protocol"):
        find_torchvision_anchors(nn.Sequential(nn.Conv2d(3, 8, 3)))
    two = nn.ModuleDict({"a": shared("fasterrcnn_mobile"), "b": shared("ssdlite")})
    with pytest.raises(HeadError, match=r"2 torchvision anchor generators.*'a.rpn.anchor_generator', "
                                        r"'b.anchor_generator'"):
        find_torchvision_anchors(two)
    assert find_torchvision_anchors(two, "b").path == "b.anchor_generator"
    with pytest.raises(HeadError, match=r"'a.rpn.nope' not found.*a.rpn.anchor_generator"):
        find_torchvision_anchors(two, "a.rpn.nope")
    with pytest.raises(HeadError, match=r"no torchvision .* in ModuleDict.a.backbone"):
        find_torchvision_anchors(two, "a.backbone")
    loose = nn.ModuleDict({"generator": AnchorGenerator()})
    with pytest.raises(HeadError, match=r"AnchorGenerator at 'generator' is not the anchor generator .*AnchorHead"):
        find_torchvision_anchors(loose)
    fcos = detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(HeadError, match="FCOS, which assigns boxes by centre sampling"):
        find_torchvision_anchors(fcos)


def test_an_ema_copy_is_not_a_second_candidate() -> None:
    model = shared("fasterrcnn_mobile")
    holder = nn.ModuleDict({"model": model, "ema": AveragedModel(model)})
    assert find_torchvision_anchors(holder).path == "model.rpn.anchor_generator"
    assert find_torchvision_anchors(holder, "ema.module.rpn.anchor_generator").generator is \
        holder["ema"].module.rpn.anchor_generator


def _new_structure(anchors: TorchvisionAnchors) -> tuple:
    """Different values with the same count per location on every level."""
    first, ratios = anchors.read_structure()
    new_ratios = tuple(tuple(r * (1.3 if j % 2 else 0.85) + 0.01 * level for j, r in enumerate(level_ratios))
                       for level, level_ratios in enumerate(ratios))
    if isinstance(anchors, DefaultBoxAnchors):
        return tuple(s * 0.9 for s in first), new_ratios
    return tuple(tuple(s * 1.37 + level for s in sizes) for level, sizes in enumerate(first)), new_ratios


def _head_channels(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "head" in n]


def _placed(anchors: TorchvisionAnchors, padded_wh: tuple[int, int]) -> Tensor:
    """``(N, 4)`` corner boxes from ``layout``, ``cell_wh`` and ``center_offset``, in torchvision's order."""
    grids, strides = anchors.layout(np.array([padded_wh]))
    out = []
    for (gw, gh), (sw, sh), wh in zip(grids[0], strides[0], anchors.cell_wh(padded_wh), strict=True):
        cx = (np.arange(gw) + anchors.settings.center_offset) * sw
        cy = (np.arange(gh) + anchors.settings.center_offset) * sh
        centres = np.stack(np.meshgrid(cx, cy, indexing="xy"), axis=-1).reshape(-1, 1, 2)  # rows of y, then x
        out.append(np.concatenate([centres - wh / 2, centres + wh / 2], axis=-1).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out)).to(torch.float32)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_written_anchors_are_what_the_next_forward_places(name: str) -> None:
    model = detector(name)
    anchors = find_torchvision_anchors(Detection(model))
    counts, channels = anchors.num_anchors_per_location(), _head_channels(model)
    new = _new_structure(anchors)
    anchors.write_structure(*new)
    assert anchors.read_structure() == new
    assert anchors.num_anchors_per_location() == counts
    assert _head_channels(model) == channels

    seen = {}
    anchors.generator.register_forward_hook(lambda m, args, out: seen.update(args=args, anchors=out))
    image = torch.rand(3, 100, 125, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        detections = model([image])
    assert set(detections[0]) == {"boxes", "scores", "labels"}  # an eval forward runs on the new anchors

    image_list, features = seen["args"]
    if isinstance(anchors, DefaultBoxAnchors):
        own = DefaultBoxGenerator([list(r) for r in new[1]], scales=list(new[0]), steps=anchors.generator.steps)
    else:
        own = AnchorGenerator(new[0], new[1])
    assert torch.equal(seen["anchors"][0], own(image_list, features)[0])  # torchvision's own, built with the values

    padded = (image_list.tensors.shape[-1], image_list.tensors.shape[-2])
    if name in ("retinanet", "fasterrcnn", "fasterrcnn_mobile"):
        assert padded == (160, 128)  # 100x125 resized to 128x160: 3 cells of 53 px (not 53.3) on stride-64 levels
    torch.testing.assert_close(seen["anchors"][0], _placed(anchors, padded), rtol=0, atol=1e-3)


def test_cell_wh_are_the_rounded_corners_in_the_generators_dtype() -> None:
    anchors = find_torchvision_anchors(detector("fasterrcnn"))
    anchors.generator.set_cell_anchors(torch.float64, torch.device("cpu"))  # what a forward in float64 leaves
    anchors.write_structure(((33.3,), (64.9,), (120.5,), (250.2,), (500.7,)), (0.37, 1.0, 2.71))  # shared ratios
    assert anchors.read_structure()[1] == ((0.37, 1.0, 2.71),) * 5
    wh = anchors.cell_wh()
    expected_w = [2 * round(s / math.sqrt(r) / 2) for r in (0.37, 1.0, 2.71) for s in (33.3,)]
    assert wh[0][:, 0].tolist() == expected_w  # whole-pixel corners, as generate_anchors rounds them
    assert all(np.array_equal(w, np.round(w)) for w in wh)
    assert {c.dtype for c in anchors.generator.cell_anchors} == {torch.float64}


def test_layout_leaves_the_model_untouched() -> None:
    model = detector("fasterrcnn_mobile").train()  # BatchNorm would update its statistics in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_torchvision_anchors(model).layout(np.array([[224, 128], [320, 320]]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def _closed_form_resnet_fpn(padded: np.ndarray) -> np.ndarray:
    """ResNet-50-FPN with P6/P7: level k (strides 8..128) has ceil(x / 2**k) cells; ``(P, 5, 2)``."""
    return np.stack([-(-padded // 2**k) for k in range(3, 8)], axis=1)


def test_layout_of_many_sizes_uses_a_verified_rule() -> None:
    anchors = find_torchvision_anchors(shared("retinanet"))
    padded = np.array([[32 * (4 + i % 7), 32 * (3 + (5 * i) % 11)] for i in range(30)])
    grids, strides = anchors.layout(padded)
    assert np.array_equal(grids, _closed_form_resnet_fpn(padded))
    assert np.array_equal(strides, (padded[:, None, :] // grids).astype(np.float64))  # AnchorGenerator's own //
    assert strides[padded[:, 0] == 224][0, -1, 0] == 112.0  # 224 // 2, not 128
    assert anchors._grids.probes <= 8  # not one per distinct size


class _PooledBackbone(nn.Module):
    """Two levels: a stride-8 convolution and a fixed 3x3 average pool (not a chain of convolutions)."""

    out_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=8, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.conv(x)
        return {"0": y, "1": self.pool(y)}


def test_layout_probes_every_size_when_the_rule_does_not_hold() -> None:
    generator = AnchorGenerator(((16,), (64,)), ((1.0,),) * 2)
    model = detection.RetinaNet(_PooledBackbone(), num_classes=3, anchor_generator=generator, min_size=64, max_size=96)
    anchors = find_torchvision_anchors(model)
    padded = np.array([[32 * (2 + i), 32 * (2 + i // 2)] for i in range(12)])
    grids, _ = anchors.layout(padded)
    assert np.array_equal(grids[:, 0], -(-padded // 8))
    assert (grids[:, 1] == 3).all()
    assert anchors._grids.probes == 2 + len(padded)  # two probes found no rule, then each size


@pytest.mark.parametrize("name", ["retinanet", "ssdlite"])
def test_a_failed_write_leaves_the_generator_bit_for_bit(name: str) -> None:
    model = shared(name)
    anchors = find_torchvision_anchors(model)
    generator, attrs = anchors.generator, anchors._ATTRS
    objects = {a: getattr(generator, a) for a in attrs}
    values = {a: copy.deepcopy(v) for a, v in objects.items()}
    channels = _head_channels(model)
    first, ratios = anchors.read_structure()
    ssd = isinstance(anchors, DefaultBoxAnchors)
    bad = [  # (first, ratios, message)
        (first, (*ratios[:2], (*ratios[2], 4.0), *ratios[3:]), r"anchors per location.*keep it on every level"),
        (first, ratios[:-1], r"aspect_ratios has \d levels, the generator has \d"),
        (first, (*ratios[:-1], (float("nan"),) * len(ratios[-1])), r"aspect_ratios\[\d\] must be positive and finite"),
    ]
    if ssd:
        bad += [((*first, 1.2), ratios, "needs 7 scales"), ((0.0, *first[1:]), ratios, "scales must be positive")]
    else:
        bad += [(((*first[0], 64.0), *first[1:]), ratios, "anchors per location"),
                ((*first[:-1], (-1.0,) * len(first[-1])), ratios, r"sizes\[4\] must be positive")]
    for new_first, new_ratios, message in bad:
        with pytest.raises(HeadError, match=message):
            anchors.write_structure(new_first, new_ratios)
        for a in attrs:
            assert getattr(generator, a) is objects[a]
            now, before = getattr(generator, a), values[a]
            if isinstance(before, list) and before and isinstance(before[0], Tensor):
                assert all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(now, before, strict=True))
            else:
                assert now == before
        assert _head_channels(model) == channels


@pytest.mark.parametrize("name", ["retinanet", "ssd300"])
def test_constructor_args_rebuild_the_written_generator(name: str) -> None:
    anchors = find_torchvision_anchors(detector(name))
    anchors.write_structure(*_new_structure(anchors))
    args = anchors.constructor_args()
    rebuilt = eval(args["python"], {"AnchorGenerator": AnchorGenerator, "DefaultBoxGenerator": DefaultBoxGenerator})
    cls = AnchorGenerator if args["class_path"].endswith(".AnchorGenerator") else DefaultBoxGenerator
    from_yaml = cls(**yaml.safe_load(yaml.safe_dump(args["init_args"])))
    attr = "_wh_pairs" if cls is DefaultBoxGenerator else "cell_anchors"
    for other in (rebuilt, from_yaml):
        assert all(torch.equal(x, y) for x, y in zip(getattr(other, attr), getattr(anchors.generator, attr),
                                                      strict=True))
        assert getattr(other, "steps", None) == getattr(anchors.generator, "steps", None)


def test_layout_rejects_sizes_that_are_not_pixels() -> None:
    anchors = find_torchvision_anchors(shared("ssdlite"))
    for bad in (np.array([[0, 320]]), np.array([[320.5, 320]]), np.array([320, 320])):
        with pytest.raises(HeadError, match="positive integer widths and heights"):
            anchors.layout(bad)


def test_the_package_imports_and_searches_without_torchvision() -> None:
    code = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ImportError("no torchvision here")
sys.meta_path.insert(0, Refuse())
from torch import nn
from lightning_autoanchor import HeadError
from lightning_autoanchor.torchvision_heads import find_torchvision_anchors
try:
    find_torchvision_anchors(nn.Sequential(nn.Conv2d(3, 8, 3)))
except HeadError as err:
    print("AnchorHead" in str(err), "torchvision" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["True", "False"]
