"""``lightning-autoanchor check|compute DATA --family torchvision-retinanet|torchvision-fasterrcnn|torchvision-ssd``:
the command line for torchvision's IoU-matching detectors.

The stock model of the family is built (no weights) so that the resize, the grid of every level and the
matcher's threshold are the model's own; ``--min-size``, ``--max-size`` and ``--thr`` (an IoU here)
replace the model's. ``check`` scores the model's default anchors by placed recall, or those of
``--anchors FILE`` (the YAML ``compute --out`` and the callback write: ``class_path`` and ``init_args``);
``compute`` fits the generator's arguments in the model's structure and prints them, ready for its constructor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsonargparse import Namespace

    from lightning_autoanchor.torchvision_heads import TorchvisionAnchors

__all__ = ["FAMILY_PREFIX", "run_family"]

FAMILY_PREFIX = "torchvision-"

_WRITTEN = {"AnchorGenerator": ("sizes", "aspect_ratios"), "DefaultBoxGenerator": ("scales", "aspect_ratios")}
"""Per generator class, the constructor arguments ``--anchors`` writes into the stock model's generator."""


def run_family(args: Namespace, command: str) -> dict[str, Any]:
    """Run ``check`` or ``compute`` for ``args.family``; returns the JSON object (printed unless ``--json``)."""
    import yaml

    from lightning_autoanchor.cli import settings_of
    from lightning_autoanchor.errors import ConfigError
    from lightning_autoanchor.placed import place_boxes
    from lightning_autoanchor.refit_grid import refit_grid_anchors
    from lightning_autoanchor.reporting import grid_report_lines, write_text_atomic
    from lightning_autoanchor.sources import load_boxes

    try:
        from lightning_autoanchor.torchvision_heads import default_anchors
    except ImportError as err:  # pragma: no cover - torchvision is an optional extra
        raise ConfigError(f"--family {args.family} needs torchvision: pip install 'lightning-autoanchor[torchvision]' "
                          f"({err})") from None
    settings = settings_of(args, img_size=None, thr=None, iou_threshold=args.thr, min_size=args.min_size,
                           max_size=args.max_size)
    adapter = default_anchors(args.family[len(FAMILY_PREFIX):], settings.min_size, settings.max_size)
    if command == "check" and args.anchors is not None:
        _write_given_anchors(adapter, args.anchors, args.family)
    boxes = load_boxes(args.data, split=args.split, strict=args.strict, progress=not args.quiet)
    placed = place_boxes(boxes, adapter.detector_resize(settings.min_size, settings.max_size), adapter.layout,
                         adapter.settings.center_offset)
    thr = adapter.settings.iou_threshold if settings.iou_threshold is None else settings.iou_threshold
    update = refit_grid_anchors(adapter.structure(), placed, thr, bpr_threshold=settings.bpr_threshold,
                                seed=settings.seed, fit=command == "compute", n_images=boxes.num_images,
                                source=str(args.data))
    if update.replaced:
        adapter.write(update.anchors_after)
    constructor = adapter.constructor_args()
    out = {"family": args.family, **update.as_dict(), "constructor": constructor,
           "fits": update.before.recall >= settings.bpr_threshold, "n_images": boxes.num_images,
           "n_boxes_read": len(boxes), "skipped": dict(boxes.skipped)}
    if command == "compute" and args.out:
        text = yaml.safe_dump({"class_path": constructor["class_path"], "init_args": constructor["init_args"]},
                              sort_keys=False, default_flow_style=None)
        out["out"] = str(write_text_atomic(args.out, f"# {constructor['python']}\n{text}"))
    if not args.json:
        for line in grid_report_lines(update, [adapter.path], adapter.settings):
            print(line)
        if command == "compute":
            print(f"paste: {constructor['python']}")
        if "out" in out:
            print(f"wrote anchors YAML: {out['out']}")
    return out


def _write_given_anchors(adapter: TorchvisionAnchors, path: str, family: str) -> None:
    """Write the generator arguments of the YAML file ``path`` into the stock model's generator, all or nothing.

    The file holds ``class_path`` and ``init_args`` (as ``compute --out`` and the callback save them) or the
    ``init_args`` alone. Other arguments the file gives (SSD's ``steps``, ``clip``) must be the model's: they
    set the grid, which ``--anchors`` does not change.

    Raises:
        ConfigError: naming the file, when it is not such a YAML, is for another generator, or holds
            arguments the model cannot take (e.g. another count of anchors per location).
    """
    import yaml

    from lightning_autoanchor.errors import ConfigError, HeadError

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--anchors for --family {family} is a YAML file of the anchor generator's arguments "
                          f"(as compute --out writes it), got {path!r}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot be read as YAML ({err})") from None
    model = adapter.constructor_args()
    expected = model["class_path"].rsplit(".", 1)[-1]
    if isinstance(data, dict) and ("class_path" in data or "init_args" in data):
        given = str(data.get("class_path", expected)).rsplit(".", 1)[-1]
        if given != expected:
            raise ConfigError(f"{path}: holds the arguments of {given}, but the {family} model's anchors come from "
                              f"{expected}")
        data = data.get("init_args")
    written = _WRITTEN[expected]
    if not isinstance(data, dict) or not set(written) <= set(data):
        raise ConfigError(f"{path}: needs the {expected} arguments {' and '.join(written)} (as compute --out "
                          f"writes them), got {data!r}")
    fixed = {name: value for name, value in model["init_args"].items() if name not in written}
    if expected == "DefaultBoxGenerator":
        fixed.setdefault("clip", True)  # written into init_args only when False
    for name, value in data.items():
        if name in written:
            continue
        if name not in fixed:
            raise ConfigError(f"{path}: {name!r} is not an argument --anchors sets ({expected}: "
                              f"{' and '.join(written)})")
        if value != fixed[name]:
            raise ConfigError(f"{path}: {name}={value!r} is not the model's ({fixed[name]!r}); --anchors sets only "
                              f"{' and '.join(written)}, the model keeps its grid")
    try:
        adapter.write_structure(*(data[name] for name in written))
    except HeadError as err:
        raise ConfigError(f"{path}: {err}") from None
