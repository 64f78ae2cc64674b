"""``lightning-autoanchor``: check or compute anchors for a dataset, without training anything.

    lightning-autoanchor check DATA --anchors "10,13, 16,30, 33,23, ..." [--img-size 640] [--json]
    lightning-autoanchor compute DATA [--n 9] [--out anchors.yaml] [--plot anchors.png] [--json]

DATA is a COCO JSON (``.json``/``.json.gz``), an Ultralytics dataset YAML, a YOLO labels folder or a
Pascal VOC folder. Errors in the input end the run with one line on stderr and exit status 1.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from jsonargparse import ArgumentParser, Namespace

from lightning_autoanchor import __version__
from lightning_autoanchor._forked import ForkedCall
from lightning_autoanchor.errors import AutoAnchorError, ConfigError, DataError

if TYPE_CHECKING:
    from lightning_autoanchor.boxes import BoxSet

PROG = "lightning-autoanchor"


def _common(parser: ArgumentParser) -> None:
    parser.add_argument("data", type=str, help="COCO .json/.json.gz, dataset .yaml, YOLO labels or VOC folder")
    parser.add_argument("--img-size", type=float, default=640, help="training image size in pixels (default 640)")
    parser.add_argument("--resize", type=Literal["letterbox", "stretch"], default="letterbox",
                        help="how images are resized to --img-size: longer side (letterbox) or both sides")
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], env_prefix="AUTOANCHOR",
                            default_env=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subcommands(dest="command")

    check = ArgumentParser(description="Score given anchors on a dataset: recall, anchors per box, fitness, IoU.")
    _common(check)
    check.add_argument("--anchors", type=str, required=True,
                       help='anchor widths and heights in pixels at --img-size: "10,13, 16,30, 33,23, ..."')
    commands.add_subcommand("check", check, help="score given anchors on a dataset")

    compute = ArgumentParser(description="Fit new anchors to a dataset (k-means, evolution, coordinate search).")
    _common(compute)
    compute.add_argument("--n", type=int, default=9, help="number of anchors, all levels together (default 9)")
    compute.add_argument("--levels", type=int, default=3, help="detection levels for --out (default 3: P3-P5)")
    compute.add_argument("--generations", type=int, default=1000, help="mutants the evolution scores (default 1000)")
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


def parse_anchors(text: str) -> Any:
    """``"10,13, 16,30"`` (commas and/or spaces) -> ``(K, 2)`` float tensor of positive sizes."""
    import torch

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


def _read_boxes(args: Namespace) -> BoxSet:
    from lightning_autoanchor.sources import load_boxes

    return load_boxes(args.data, split=args.split, strict=args.strict, progress=not args.quiet)


def _load(args: Namespace, reading: ForkedCall[BoxSet]) -> tuple[BoxSet, Any, int]:
    """DATA's boxes (from ``reading``) sized for training: (box set, kept wh, number left out)."""
    import torch

    from lightning_autoanchor.optimizer import prepare_boxes

    try:
        box_set = reading.result()
    except ChildProcessError as err:  # e.g. the reading process was killed for lack of memory
        raise DataError(f"{args.data}: cannot be read: {err}") from None
    if len(box_set) == 0:
        raise ConfigError(f"{args.data}: no boxes to work with")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ConfigError(f"--device {args.device!r}: {err}") from None
    wh, dropped = prepare_boxes(box_set.scaled(args.img_size, args.resize).to(device))
    if len(wh) == 0:
        raise ConfigError(f"{args.data}: every box is under 2 px at img_size {args.img_size:g}")
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
        "img_size": args.img_size,
        "resize": args.resize,
        "metric": args.metric,
    }
    if args.list_small:
        summary["small_box_images"] = list(small.images)
    return summary


def _print_human(args: Namespace, box_set: Any, summary: dict[str, Any], lines: list[str]) -> None:
    small = box_set.small_boxes(args.img_size, args.resize)
    print(f"{args.data}: {len(box_set):,} boxes in {box_set.num_images:,} images, at img_size {args.img_size:g} "
          f"({args.resize}); {summary['n_dropped']:,} under 2 px left out")
    if small.count:
        print(f"note: {small.describe(max_images=10 if args.list_small else 0)}"
              + ("" if args.list_small else " (--list-small names them)"))
    for line in lines:
        print(line)


def run_check(args: Namespace, reading: ForkedCall[BoxSet]) -> dict[str, Any]:
    from lightning_autoanchor.augment import check_scale_aug
    from lightning_autoanchor.metrics import DEFAULT_THR, score_anchors
    from lightning_autoanchor.reporting import describe_scores

    anchors = parse_anchors(args.anchors)
    thr = DEFAULT_THR[args.metric] if args.thr is None else args.thr
    scale_aug = check_scale_aug(args.scale_aug)
    box_set, wh, dropped = _load(args, reading)
    scores = score_anchors(wh, anchors.to(wh.device), thr, args.metric, scale_aug=scale_aug)
    nominal = score_anchors(wh, anchors.to(wh.device), thr, args.metric) if scale_aug else None
    out = {"anchors": anchors.tolist(), **scores.as_dict(), "thr": thr, "scale_aug": scale_aug,
           **_sides(nominal, scores), **_data_summary(args, box_set, dropped)}
    if not args.json:
        pairs = "  ".join(f"{w:g},{h:g}" for w, h in anchors.tolist())
        described = (_describe_side_by_side(nominal, scores, thr, args.metric, scale_aug) if nominal
                     else describe_scores(scores, thr, args.metric))
        _print_human(args, box_set, out, [f"anchors ({len(anchors)}): {pairs}", *described])
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


@contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turn a failure to write ``path`` into a one-line error naming it."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None


def run_compute(args: Namespace, reading: ForkedCall[BoxSet]) -> dict[str, Any]:
    from lightning_autoanchor.augment import check_scale_aug, scale_range
    from lightning_autoanchor.formats import anchors_per_level, default_strides, export_anchors
    from lightning_autoanchor.optimizer import fit_anchors
    from lightning_autoanchor.reporting import (
        describe_scores,
        header_comments,
        plot_anchors,
        write_text_atomic,
    )

    if args.n < 1 or args.levels < 1:
        raise ConfigError(f"--n and --levels must be at least 1, got {args.n} and {args.levels}")
    if args.n % args.levels:
        raise ConfigError(f"--n {args.n} anchors cannot be split evenly over --levels {args.levels}")
    scale_aug = check_scale_aug(args.scale_aug)
    box_set, wh, dropped = _load(args, reading)
    result = fit_anchors(wh, args.n, thr=args.thr, metric=args.metric, generations=args.generations,
                         seed=args.seed, init=args.init, scale_aug=scale_aug, progress=not args.quiet)
    out = {**result.as_dict(), **_data_summary(args, box_set, dropped), "format": args.format}
    out["anchors"] = result.anchors.tolist()
    comments = header_comments(str(args.data), args.img_size, args.resize, args.metric, result.thr, result.scores,
                               args.seed)
    if result.nominal:
        comments.append(f"scores above: expected under scale augmentation {scale_range(scale_aug)}; nominal: "
                        f"fitness {result.nominal.fitness:.4f}, best possible recall {result.nominal.bpr:.4f}")
    text = export_anchors(args.format, anchors_per_level(result.anchors, args.levels), default_strides(args.levels),
                          comments)
    if args.out:
        with _writing(args.out):
            out["out"] = str(write_text_atomic(args.out, text))
    if args.plot:
        with _writing(args.plot):
            out["plot"] = str(plot_anchors(wh, result.anchors, args.plot, thr=result.thr, metric=args.metric,
                                           title=f"{args.data} at {args.img_size:g} px"))
    if not args.json:
        described = (_describe_side_by_side(result.nominal, result.scores, result.thr, args.metric, scale_aug)
                     if result.nominal else describe_scores(result.scores, result.thr, args.metric))
        _print_human(args, box_set, out, [*described, f"fitted in {result.seconds:.2f} s (seed {args.seed})", "",
                                          text.rstrip()])
        for key, what in (("out", "anchors YAML" if args.format == "yolov5" else f"anchors ({args.format})"),
                          ("plot", "plot")):
            if key in out:
                print(f"wrote {what}: {out[key]}")
    return out


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    """Warnings (e.g. skipped annotations) as one ``lightning-autoanchor: warning:`` line each, on stderr."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lightning-autoanchor`` command with ``argv`` (default: the process's); returns the exit status.

    When torch is not loaded yet, the annotations are read in a forked child process while this one
    imports torch, so a short run pays about the longer of the two instead of their sum.
    """
    args = build_parser().parse_args(argv)
    command = args.command
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            run = run_check if command == "check" else run_compute
            with ForkedCall(_read_boxes, args[command], fork="torch" not in sys.modules) as reading:
                out = run(args[command], reading)
    except AutoAnchorError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    if args[command].json:
        print(json.dumps(out))
    return 0


def console_main() -> NoReturn:
    """The installed ``lightning-autoanchor`` command: :func:`main`, then an immediate exit.

    A run of the command is short and makes no reference cycles worth collecting, so the garbage
    collector stays off (its passes cost about 0.3 s while torch is imported and annotations are
    read); once the output is flushed the process ends without the interpreter's teardown of torch's
    modules (another 0.3 s). Every file the run writes is closed before :func:`main` returns.
    """
    gc.disable()
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:  # e.g. piped into `head`
        status = status or 1
    os._exit(status)


if __name__ == "__main__":
    console_main()
