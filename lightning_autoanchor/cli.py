"""``lightning-autoanchor``: check or compute anchors for a dataset, without training anything.

    lightning-autoanchor check DATA --anchors "10,13, 16,30, 33,23, ..." [--img-size 640] [--json]
    lightning-autoanchor compute DATA [--n 9] [--out anchors.yaml] [--plot anchors.png] [--json]

DATA is a COCO JSON (``.json``/``.json.gz``), an Ultralytics dataset YAML, a YOLO labels folder or a
Pascal VOC folder. Errors in the input end the run with one line on stderr and exit status 1; Ctrl-C
ends it with one line and exit status 130.

This module imports only what Python has loaded anyway, so that :func:`console_main` takes over
Ctrl-C within milliseconds of the start; everything else is imported where it is used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import FrameType, TracebackType

    from jsonargparse import ArgumentParser, Namespace

    from lightning_autoanchor.boxes import BoxSet
    from lightning_autoanchor.settings import AnchorSettings

__all__ = ["PROG", "build_parser", "console_main", "main", "parse_anchors", "settings_of"]

PROG = "lightning-autoanchor"
_INTERRUPTED = b"lightning-autoanchor: interrupted\n"
_DEFAULT_LEVELS = 3  # YOLOv5's P3-P5


def _common(parser: ArgumentParser) -> None:
    from typing import Literal

    parser.add_argument("data", type=str, help="COCO .json/.json.gz, dataset .yaml, YOLO labels or VOC folder")
    parser.add_argument("--img-size", type=float, nargs="+", default=[640.0],
                        help="training image size in pixels (default 640), or W H for a non-square one")
    parser.add_argument("--resize", type=Literal["letterbox", "stretch"], default="letterbox",
                        help="how images are resized to --img-size: fitted in it keeping their aspect ratio "
                             "(letterbox: the longer side to a square size) or both sides (stretch)")
    parser.add_argument("--metric", type=Literal["ratio", "iou"], default="ratio",
                        help="match rule: YOLOv5 size ratio, or width/height IoU")
    parser.add_argument("--thr", type=float | None, default=None,
                        help="match threshold: max size ratio for 'ratio' (default 4.0), min IoU for 'iou' (0.5)")
    parser.add_argument("--split", type=str | None, default=None,
                        help="split of a dataset YAML (default train) or VOC ImageSets list")
    parser.add_argument("--strict", action="store_true", help="refuse bad annotations instead of skipping them")
    parser.add_argument("--list-small", action="store_true", help="list the images with boxes under 3 px")
    parser.add_argument("--scale-aug", type=float, default=0.0,
                        help="the training's scale augmentation: factors uniform on 1 +- this (YOLOv5's hyp "
                             "'scale', e.g. 0.5); scores (and the fit) cover it, beside the nominal scores")
    parser.add_argument("--device", type=str, default="cpu", help="torch device for the per-box work, e.g. cuda")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they show only on a terminal)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--family", type=Literal["yolo", "torchvision-retinanet", "torchvision-fasterrcnn",
                                                 "torchvision-ssd"], default="yolo",
                        help="the head: YOLO-style free anchors (default), or a torchvision detector's anchor "
                             "generator, placed on its grid and matched by IoU (--thr is then the IoU)")
    parser.add_argument("--min-size", type=int, nargs="+", default=None,
                        help="torchvision families: shorter-side target(s) of the resize (default: the model's)")
    parser.add_argument("--max-size", type=int | None, default=None,
                        help="torchvision families: longer-side cap of the resize (default: the model's)")


def build_parser() -> ArgumentParser:
    from typing import Literal

    from jsonargparse import ArgumentParser

    from lightning_autoanchor import __version__

    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], env_prefix="AUTOANCHOR",
                            default_env=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subcommands(dest="command")

    check = ArgumentParser(description="Score given anchors on a dataset: recall, anchors per box, fitness, IoU.")
    _common(check)
    check.add_argument("--anchors", type=str | None, default=None,
                       help='anchor widths and heights in pixels at --img-size: "10,13, 16,30, 33,23, ..." '
                            "(needed for --family yolo); torchvision families: a YAML file of the generator's "
                            "arguments as compute --out writes it (default: the model's own)")
    check.add_argument("--bpr-threshold", type=float, default=0.98,
                       help="the anchors fit when the best possible recall reaches this (default 0.98, as YOLOv5)")
    commands.add_subcommand("check", check, help="score given anchors on a dataset")

    compute = ArgumentParser(description="Fit new anchors to a dataset (k-means, evolution, coordinate search).")
    _common(compute)
    compute.add_argument("--n", type=anchor_count, default=None,
                         help="number of anchors, all levels together (default 9, or the sum of --levels counts); "
                              "'auto' (3-15) or a range such as 3-15 fits every count and recommends one")
    compute.add_argument("--levels", type=anchor_levels, default=None,
                         help="detection levels: a number sharing the anchors equally (default 3 when --n "
                              "divides by 3, else 1), or the anchors of each level, e.g. 3,3,4")
    compute.add_argument("--strides", type=str | None, default=None,
                         help="pixels per cell of each level, e.g. 8,16,32 (default 8,16,32,...)")
    compute.add_argument("--min-stride-ratio", type=float | None, default=None,
                         help="keep each anchor's sqrt(w*h) at or above this multiple of its level's stride")
    compute.add_argument("--objective", type=Literal["fitness", "avg_iou"], default="fitness",
                         help="what the fit maximises: YOLOv5's fitness under --metric, or the average IoU")
    compute.add_argument("--generations", type=int | None, default=None,
                         help="mutants the evolution scores (default 1000; with a range of --n, per count: 200)")
    compute.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    compute.add_argument("--init", type=Literal["log", "iou", "euclidean"], default="log",
                         help="k-means for the starting anchors (default log)")
    compute.add_argument("--out", type=str | None, default=None, help="write the anchors in --format here")
    compute.add_argument("--format", type=Literal["yolov5", "mmdet", "darknet", "torchvision"], default="yolov5",
                         help="config text of --out and the printed block: YOLOv5/v7 model YAML (default), "
                              "MMDetection/MMYOLO prior_generator, darknet [yolo] lines, torchvision AnchorGenerator")
    compute.add_argument("--plot", type=str | None, default=None, help="save a plot of boxes and anchors (PNG)")
    commands.add_subcommand("compute", compute, help="fit new anchors to a dataset")
    return parser


def anchor_count(value: Any) -> int | tuple[int, int] | None:
    """``--n``: ``"9"`` -> 9; ``"auto"`` -> ``(3, 15)``; ``"3-15"`` -> ``(3, 15)`` (a range of counts)."""
    if value is None or isinstance(value, int | tuple | list):  # the parser checks parsed values again
        return value if value is None or isinstance(value, int) else (int(value[0]), int(value[1]))
    text = str(value).strip().lower()
    if text == "auto":
        return (3, 15)
    low, dash, high = text.partition("-")
    if dash and low:
        return (int(low), int(high))
    return int(text)


def anchor_levels(value: Any) -> int | tuple[int, ...] | None:
    """``--levels``: ``"3"`` -> 3 levels; ``"3,3,4"`` -> the anchors of each level."""
    if value is None or isinstance(value, int | tuple | list):
        return value if value is None or isinstance(value, int) else tuple(int(v) for v in value)
    parts = [int(v) for v in str(value).replace(" ", "").split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _training_size(args: Namespace) -> float | tuple[float, float]:
    """``--img-size``: one number (square) or ``W H``."""
    from lightning_autoanchor.errors import ConfigError

    values = list(args.img_size) if isinstance(args.img_size, list | tuple) else [args.img_size]
    if len(values) not in (1, 2):
        raise ConfigError(f"--img-size takes one number or two (W H), got {len(values)}: {values}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def parse_anchors(text: str) -> Any:
    """``"10,13, 16,30"`` (commas and/or spaces) -> ``(K, 2)`` float tensor of positive sizes."""
    import torch

    from lightning_autoanchor.errors import ConfigError

    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--anchors must be numbers (w,h pairs), got {text!r}") from None
    if not values or len(values) % 2:
        raise ConfigError(f"--anchors needs an even count of numbers (w,h pairs), got {len(values)}")
    anchors = torch.tensor(values, dtype=torch.float32).reshape(-1, 2)
    if not bool((anchors > 0).all() & torch.isfinite(anchors).all()):
        raise ConfigError(f"--anchors must all be positive and finite, got {text!r}")
    return anchors


def _device(name: str) -> Any:
    """The torch device ``--device`` names, once a tensor could be made on it."""
    import torch

    from lightning_autoanchor.errors import ConfigError

    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:  # e.g. "Torch not compiled with CUDA enabled"
        why = str(err).strip().split("\n")[0] or type(err).__name__
        raise ConfigError(f"--device {name!r} cannot be used: {why}") from None
    return device


def settings_of(args: Namespace, **fields: Any) -> AnchorSettings:
    """The command's settings, validated as the callback's are: the options of ``args`` that are
    settings, with ``fields`` (named as settings) in place of some; a bad value names its option."""
    from lightning_autoanchor.errors import ConfigError
    from lightning_autoanchor.settings import AnchorSettings

    names = ("img_size", "resize", "metric", "thr", "bpr_threshold", "generations", "seed", "objective",
             "min_stride_ratio", "scale_aug")
    given = {name: args[name] for name in names if name in args and args[name] is not None}
    try:
        return AnchorSettings(**{**given, **fields})
    except ConfigError as err:
        name = str(err).split(" ", 1)[0]
        option = _OPTIONS.get(name, name).replace("_", "-")
        raise ConfigError(f"--{option}{str(err)[len(name):]}") from None


_OPTIONS = {"iou_threshold": "thr"}
"""Settings whose command-line option has another name (``--thr`` is the IoU of the torchvision families)."""


def _load(args: Namespace, device: Any) -> tuple[BoxSet, Any, int]:
    """DATA's boxes sized for training: (box set, kept wh on ``device``, number left out)."""
    from lightning_autoanchor.boxes import MIN_FIT_SIZE, describe_img_size
    from lightning_autoanchor.errors import ConfigError
    from lightning_autoanchor.optimizer import prepare_boxes
    from lightning_autoanchor.sources import load_boxes

    box_set = load_boxes(args.data, split=args.split, strict=args.strict, progress=not args.quiet)
    if len(box_set) == 0:
        raise ConfigError(f"{args.data}: no boxes to work with")
    wh, dropped = prepare_boxes(box_set.scaled(args.img_size, args.resize).to(device))
    if len(wh) == 0:
        raise ConfigError(f"{args.data}: every box is under {MIN_FIT_SIZE:g} px at img_size "
                          f"{describe_img_size(args.img_size)}")
    return box_set, wh, dropped


def _data_summary(args: Namespace, box_set: Any, dropped: int) -> dict[str, Any]:
    small = box_set.small_boxes(args.img_size, args.resize)
    summary: dict[str, Any] = {
        "source": str(args.data),
        "n_images": box_set.num_images,
        "n_boxes_read": len(box_set),
        "n_dropped": dropped,
        "n_small": small.count,
        "skipped": dict(box_set.skipped),
        "img_size": list(args.img_size) if isinstance(args.img_size, tuple) else args.img_size,
        "resize": args.resize,
        "metric": args.metric,
    }
    if args.list_small:
        summary["small_box_images"] = list(small.images)
    return summary


def _print_human(args: Namespace, box_set: Any, summary: dict[str, Any], lines: list[str]) -> None:
    from lightning_autoanchor.boxes import MIN_FIT_SIZE, describe_img_size

    small = box_set.small_boxes(args.img_size, args.resize)
    print(f"{args.data}: {len(box_set):,} boxes in {box_set.num_images:,} images, at img_size "
          f"{describe_img_size(args.img_size)} ({args.resize}); {summary['n_dropped']:,} under {MIN_FIT_SIZE:g} px "
          "left out")
    if small.count:
        print(f"note: {small.describe(max_images=10 if args.list_small else 0)}"
              + ("" if args.list_small else " (--list-small names them)"))
    for line in lines:
        print(line)


def run_check(args: Namespace) -> dict[str, Any]:
    from lightning_autoanchor.metrics import score_anchors
    from lightning_autoanchor.reporting import describe_scores

    args.img_size = _training_size(args)
    settings = settings_of(args)
    if args.anchors is None:
        from lightning_autoanchor.errors import ConfigError

        raise ConfigError("check needs --anchors (w,h pairs in pixels at --img-size) for --family yolo")
    anchors = parse_anchors(args.anchors)
    thr, scale_aug = settings.thr, settings.scale_aug
    box_set, wh, dropped = _load(args, _device(args.device))
    scores = score_anchors(wh, anchors.to(wh.device), thr, args.metric, scale_aug=scale_aug)
    nominal = score_anchors(wh, anchors.to(wh.device), thr, args.metric) if scale_aug else None
    fits = scores.bpr >= args.bpr_threshold
    out = {"anchors": anchors.tolist(), **scores.as_dict(), "thr": thr, "fits": fits,
           "bpr_threshold": args.bpr_threshold, "scale_aug": scale_aug, **_sides(nominal, scores),
           **_data_summary(args, box_set, dropped)}
    if not args.json:
        pairs = "  ".join(f"{w:g},{h:g}" for w, h in anchors.tolist())
        verdict = (f"the anchors fit: best possible recall {scores.bpr:.4f} >= {args.bpr_threshold:g}" if fits else
                   f"a re-fit is advised: best possible recall {scores.bpr:.4f} < {args.bpr_threshold:g} "
                   f"({PROG} compute fits new anchors)")
        described = (_describe_side_by_side(nominal, scores, thr, args.metric, scale_aug) if nominal
                     else describe_scores(scores, thr, args.metric))
        _print_human(args, box_set, out, [f"anchors ({len(anchors)}): {pairs}", *described, verdict])
    return out


def _sides(nominal: Any, augmented: Any) -> dict[str, Any]:
    """``nominal`` and ``augmented`` score dicts for ``--json`` when a scale augmentation is given, else none."""
    return {"nominal": nominal.as_dict(), "augmented": augmented.as_dict()} if nominal else {}


def _describe_side_by_side(nominal: Any, augmented: Any, thr: float, metric: str, scale_aug: float) -> list[str]:
    """Console lines with the nominal scores and those under the scale augmentation in two columns."""
    from lightning_autoanchor.augment import scale_range

    rule = f"both sides within {thr:g}x of an anchor" if metric == "ratio" else f"width/height IoU above {thr:g}"
    rows = [("best possible recall", "bpr", "{:.4f}", f"share of boxes with {rule}"),
            ("anchors per target", "aat", "{:.2f}", ""),
            ("fitness", "fitness", "{:.4f}", "YOLOv5's anchor fitness"),
            ("average IoU", "avg_iou", "{:.4f}", "")]
    head = f"scale {scale_range(scale_aug)}"
    lines = [f"{'':21}{'nominal':>9}  {head:>13}"]
    for label, key, number, note in rows:
        values = (number.format(getattr(nominal, key)), number.format(getattr(augmented, key)))
        lines.append(f"{label:21}{values[0]:>9}  {values[1]:>13}" + (f"  ({note})" if note else ""))
    return lines


class _Writing:
    """Around writing ``path``: a failure becomes a one-line error naming it; and a Ctrl-C that code
    called earlier swallowed still stops the run before anything is written."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> None:
        _ctrl_c.check()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        from lightning_autoanchor.errors import ConfigError

        if isinstance(err, OSError):
            raise ConfigError(f"cannot write {self.path}: {err.strerror or err}") from None


def _level_settings(args: Namespace, n: int | None) -> tuple[tuple[int, ...] | int | None, list[float] | None]:
    """``--levels`` (one level per stride when only ``--strides`` is given) checked against ``n``
    (``None``: a range of counts), and ``--strides`` as numbers."""
    from lightning_autoanchor.errors import ConfigError

    strides = None
    if args.strides is not None:
        try:
            strides = [float(v) for v in args.strides.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(f"--strides must be numbers, e.g. 8,16,32, got {args.strides!r}") from None
    levels = len(strides) if args.levels is None and strides else args.levels
    if (isinstance(levels, int) and levels < 1) or (n is not None and n < 1):
        raise ConfigError(f"--n and --levels must be at least 1, got {n} and {levels}")
    if isinstance(levels, tuple) and n is not None and sum(levels) != n:
        raise ConfigError(f"--levels {','.join(map(str, levels))} holds {sum(levels)} anchors, but --n is {n}")
    if isinstance(levels, int) and n is not None and n % levels:
        raise ConfigError(f"--n {n} anchors cannot be split evenly over --levels {levels}: give the anchors of "
                          f"each level instead, e.g. --levels {','.join(map(str, _uneven(n, levels)))}")
    return levels, strides


def _uneven(n: int, levels: int) -> list[int]:
    """``n`` anchors over ``levels`` levels as evenly as possible, the larger counts on the coarser levels."""
    return [n // levels + (i >= levels - n % levels) for i in range(levels)]


def _level_lines(wh: Any, result: Any, metric: str) -> tuple[list[str], list[float]]:
    """Who owns the boxes (the share whose best anchor sits on each level), and the limits kept, as text;
    the shares as numbers, in the order of the levels."""
    from lightning_autoanchor.levels import anchor_levels, level_shares

    level = anchor_levels(result.levels, result.strides)
    shares = level_shares(wh, result.anchors, level, metric).tolist()
    parts = [f"stride {stride:g}: {share:.1%}" for stride, share in zip(result.strides, shares, strict=True)]
    lines = [f"boxes per level (share whose best anchor is there): {', '.join(parts)}"]
    if result.min_stride_ratio is not None:
        size = result.anchors.prod(dim=1).sqrt()
        smallest = [f"{float(size[level == i].min()):.1f} px >= {result.min_stride_ratio:g} x {stride:g}"
                    for i, stride in enumerate(result.strides)]
        lines.append(f"smallest anchor size sqrt(w*h) per level: {', '.join(smallest)}")
    return lines, shares


def run_compute(args: Namespace) -> dict[str, Any]:
    from lightning_autoanchor.augment import scale_range
    from lightning_autoanchor.formats import anchors_per_level, export_anchors
    from lightning_autoanchor.optimizer import fit_anchors
    from lightning_autoanchor.reporting import describe_scores, header_comments, write_text_atomic

    args.img_size = _training_size(args)
    settings = settings_of(args)
    counts = args.n if isinstance(args.n, tuple) else None
    n = None if counts else args.n if args.n is not None else sum(args.levels) if isinstance(args.levels, tuple) else 9
    levels, strides = _level_settings(args, n)
    box_set, wh, dropped = _load(args, _device(args.device))
    out: dict[str, Any] = {}
    notes: list[str] = []
    curve = None
    if counts:
        curve = _run_counts(args, settings, wh, counts, levels, strides)
        result = curve.row(curve.recommended)
        out.update(recommended=curve.recommended, curve=curve.as_dict())
        notes = _count_lines(curve)
    else:
        result = fit_anchors(wh, n, settings, levels=levels, strides=strides, init=args.init, progress=not args.quiet)
    if args.levels is None and args.strides is None:
        notes.append(f"note: {result.n} anchors on {len(result.levels)} level{'s' * (len(result.levels) > 1)} "
                     "(--levels not given: 3 levels when the count divides by 3, else 1)")
    level_lines, shares = _level_lines(wh, result, args.metric)
    out.update({**result.as_dict(), **_data_summary(args, box_set, dropped), "level_shares": shares})
    out["anchors"] = result.anchors.tolist()
    out["format"] = args.format
    comments = header_comments(str(args.data), args.img_size, args.resize, args.metric, result.thr, result.scores,
                               args.seed)
    if result.nominal:
        comments.append(f"scores above: expected under scale augmentation {scale_range(result.scale_aug)}; "
                        f"nominal: fitness {result.nominal.fitness:.4f}, best possible recall {result.nominal.bpr:.4f}")
    text = export_anchors(args.format, anchors_per_level(result.anchors, result.levels), result.strides, comments)
    if args.out:
        with _Writing(args.out):
            out["out"] = str(write_text_atomic(args.out, text))
    if args.plot:
        with _Writing(args.plot):
            out["plot"] = str(_plot(args, wh, result, curve))
    if not args.json:
        described = (_describe_side_by_side(result.nominal, result.scores, result.thr, args.metric,
                                            result.scale_aug)
                     if result.nominal else describe_scores(result.scores, result.thr, args.metric))
        _print_human(args, box_set, out, [*notes, *described, *level_lines,
                                          f"fitted in {result.seconds:.2f} s (seed {args.seed})", "", text.rstrip()])
        for key, what in (("out", "anchors YAML" if args.format == "yolov5" else f"anchors ({args.format})"),
                          ("plot", "plot")):
            if key in out:
                print(f"wrote {what}: {out[key]}")
    return out


def _run_counts(args: Namespace, settings: AnchorSettings, wh: Any, counts: tuple[int, int], levels: Any,
                strides: list[float] | None) -> Any:
    """The anchor-count curve over ``counts`` (``--n auto`` or a range)."""
    from lightning_autoanchor.anchor_count import CURVE_GENERATIONS, fit_anchor_counts
    from lightning_autoanchor.errors import ConfigError

    low, high = counts
    if not 1 <= low <= high:
        raise ConfigError(f"--n range must run from at least 1 up, e.g. 3-15, got {low}-{high}")
    if isinstance(levels, tuple):
        raise ConfigError("--n auto or a range needs --levels as a number of levels (each count is shared "
                          f"equally), not the anchors of each level ({','.join(map(str, levels))})")
    if levels is not None and high // levels * levels < low:
        raise ConfigError(f"--n {low}-{high} holds no multiple of --levels {levels}")
    if levels is None and args.min_stride_ratio is not None:
        raise ConfigError("--min-stride-ratio with a range of --n needs --levels (a number of levels), so that "
                          "every count is laid out over the same levels")
    generations = CURVE_GENERATIONS if args.generations is None else args.generations
    return fit_anchor_counts(wh, range(low, high + 1), settings.but(generations=generations), levels=levels,
                             strides=strides, init=args.init, progress=not args.quiet)


def _count_lines(curve: Any) -> list[str]:
    """The curve as a table, the recommended count marked."""
    from lightning_autoanchor.anchor_count import KNEE_TOLERANCE

    lines = [f"{'':2}{'n':>3}  {'BPR':>6}  {'fitness':>7}  {'avg IoU':>7}  {'anchors/target':>14}"]
    for row in curve.rows:
        mark = "*" if row.n == curve.recommended else ""
        s = row.scores
        lines.append(f"{mark:2}{row.n:>3}  {s.bpr:>6.4f}  {s.fitness:>7.4f}  {s.avg_iou:>7.4f}  {s.aat:>14.2f}")
    lines.append(f"recommended: {curve.recommended} anchors (*): the knee of the {curve.objective} curve, the count "
                 f"farthest above the line from the first count to the last on 0-1 scales (ties within "
                 f"{KNEE_TOLERANCE:g}: the smallest), with BPR >= {curve.min_bpr:g} where a count reaches it")
    return [*lines, f"curve fitted in {curve.seconds:.2f} s; the recommended count:", ""]


def _plot(args: Namespace, wh: Any, result: Any, curve: Any) -> Any:
    from lightning_autoanchor.boxes import describe_img_size
    from lightning_autoanchor.reporting import plot_anchor_counts, plot_anchors

    title = f"{args.data} at {describe_img_size(args.img_size)} px"
    if curve is not None:
        return plot_anchor_counts(curve, args.plot, title=title)
    return plot_anchors(wh, result.anchors, args.plot, thr=result.thr, metric=args.metric, title=title)


def _run(args: Namespace, command: str) -> dict[str, Any]:
    from lightning_autoanchor.cli_torchvision import FAMILY_PREFIX, run_family

    torchvision_family = args.family.startswith(FAMILY_PREFIX)
    with _sigint_held():
        import torch  # noqa: F401
        if torchvision_family:
            with contextlib.suppress(ImportError):  # the family's own import says what to install
                import torchvision  # noqa: F401
    if torchvision_family:
        return run_family(args, command)
    return (run_check if command == "check" else run_compute)(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-autoanchor`` command with ``argv`` (default: the process's); returns the exit status.

    The annotations are read in this process; folders with worker processes that never outlive it.
    """
    import json
    import warnings

    try:
        args = build_parser().parse_args(argv)
        command = args.command
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            out = _run(args[command], command)
        _ctrl_c.check()
        if args[command].json:
            print(json.dumps(out))
        sys.stdout.flush()
    except BaseException as err:
        return _failed(err)
    return 0


def _failed(err: BaseException) -> int:
    """The exit status for an exception that ended the run, once its one line is said; others are raised.

    Whatever a Ctrl-C set off (an import it cut short can fail with another exception) counts as the
    Ctrl-C: status 130.
    """
    from lightning_autoanchor.errors import AutoAnchorError

    if isinstance(err, KeyboardInterrupt) or _ctrl_c.raised:
        _say_interrupted()
        return 130
    if isinstance(err, AutoAnchorError):
        with contextlib.suppress(BrokenPipeError):
            sys.stderr.write(f"{PROG}: error: {err}\n")
            sys.stderr.flush()
        return 1
    if isinstance(err, BrokenPipeError):  # e.g. piped into `head`, which has read what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that no later flush fails
        return 1
    raise err


class _CtrlC:
    """What :func:`console_main`'s SIGINT handler has done: raised ``KeyboardInterrupt``; said so."""

    raised = False
    said = False

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` again if code the run called swallowed it: nothing is written after it."""
        if self.raised:
            raise KeyboardInterrupt


_ctrl_c = _CtrlC()


def _say_interrupted() -> None:
    """The one line a Ctrl-C gives, said once (straight to the file descriptor: a signal handler may be
    running in the middle of a write to ``sys.stderr``)."""
    if not _ctrl_c.said:
        _ctrl_c.said = True
        with contextlib.suppress(OSError):
            os.write(2, _INTERRUPTED)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT held back (blocked, kept pending) in this thread while the block runs, then delivered.

    For importing torch and torchvision: their C++ (pybind11) initialisers call back into Python, and a
    ``KeyboardInterrupt`` raised there cannot unwind through them: the process aborts (status -6,
    ``terminate called after throwing an instance of 'pybind11::error_already_set'``; Python's own
    handler does the same). The signal sweep of ``tests/test_cli_signals.py`` met it once, a Ctrl-C
    0.63 s into a run, in ``torch.distributed.autograd``'s import. Held, a Ctrl-C waits for the end of
    the import (about 1 s at most) and then ends the run as usual. Threads started meanwhile inherit the
    block, so the signal can only reach this one. Where there is no ``pthread_sigmask`` (Windows), nothing
    is held.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """The first Ctrl-C raises ``KeyboardInterrupt``, so that the run unwinds (files being written are
    removed, worker processes stopped and reaped); a second one ends the process here and now."""
    if _ctrl_c.raised:
        _exit_interrupted()
    _ctrl_c.raised = True
    raise KeyboardInterrupt


def _on_unraisable(unraisable: Any) -> None:
    """A ``KeyboardInterrupt`` raised where it cannot propagate (a destructor, a callback) ends the run."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _exit_interrupted()
    sys.__unraisablehook__(unraisable)


def _exit_interrupted() -> NoReturn:
    """End the process now, with the one line and status 130, once its worker processes are killed and
    reaped (were it killed itself, they would die with it: see ``sources._workers``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None:
        for child in multiprocessing.active_children():
            child.kill()
            child.join()
    _say_interrupted()
    os._exit(130)


def console_main() -> NoReturn:
    """The installed ``lightning-autoanchor`` command: :func:`main`, then an immediate exit.

    From its first line, a Ctrl-C (SIGINT) at any moment ends the run with one line on stderr,
    ``lightning-autoanchor: interrupted``, and exit status 130 (:func:`_on_sigint`); before it, while
    Python starts, Python's own handling applies; while torch (and torchvision) are imported, it waits for
    the import to end (:func:`_sigint_held`). A run of the command is short and makes no
    reference cycles worth collecting, so the garbage collector stays off (its passes cost about
    0.3 s while torch is imported and annotations are read); once the output is flushed the process
    ends without the interpreter's teardown of torch's modules (another 0.3 s). Every file the run
    writes is closed, and every worker process reaped, before :func:`main` returns.
    """
    try:  # from here on, Python's KeyboardInterrupt or ours: caught below
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored, as by `nohup` or `&`
            signal.signal(signal.SIGINT, _on_sigint)
        sys.unraisablehook = _on_unraisable
        import gc

        gc.disable()
        status = main()
        if _ctrl_c.raised:  # whatever ended the run, a Ctrl-C came first
            _exit_interrupted()
        os._exit(status)
    except BaseException:
        if _ctrl_c.raised or sys.exc_info()[0] is KeyboardInterrupt:
            _exit_interrupted()
        raise


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """Warnings (e.g. skipped annotations) as one ``lightning-autoanchor: warning:`` line each, on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    console_main()
