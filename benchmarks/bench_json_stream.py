"""Reading a COCO JSON file into box columns: the streaming reader against whole-file decoders.

    python benchmarks/bench_json_stream.py [--boxes 1000000] [--real PATH.json.gz] [--ways ours,json,msgspec,ijson]

Each way reads the file in a fresh process and turns it into the columns a box set needs (image ids,
widths, heights, names; box image ids and ``[x, y, w, h]``); it prints the seconds the read takes
(imports excluded) and the process's peak resident memory (``ru_maxrss``; a process that only imports
what the ways import holds about 45 MB of it). The files: ``--real`` (default: the shared COCO val2017
boxes), and a synthetic COCO file of ``--boxes`` annotations written to a temporary folder, shaped as
real COCO files are (a polygon and an area per annotation, 7 boxes per image). ``ijson`` is measured
when it is installed (``pip install ijson``; not a dependency of the package).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REAL = Path(__file__).parents[1] / "shared" / "data" / "coco2017_val.json.gz"

READ = {
    "ours": """
from lightning_autoanchor.sources import read_coco
def read(path):
    return len(read_coco(path))
""",
    "json": """
import gzip, json
import numpy as np
def read(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        d = json.load(f)
    ids = np.array([im["id"] for im in d["images"]])
    sizes = np.array([(im["width"], im["height"]) for im in d["images"]], dtype=np.float64)
    names = [im.get("file_name") for im in d["images"]]
    box_ids = np.array([a["image_id"] for a in d["annotations"]])
    boxes = np.array([a["bbox"] for a in d["annotations"]], dtype=np.float32)
    return len(boxes)
""",
    "msgspec": """
import gzip
import msgspec
import numpy as np
class Image(msgspec.Struct, gc=False):
    id: int | str
    width: float | None = None
    height: float | None = None
    file_name: str | None = None
class Annotation(msgspec.Struct, gc=False):
    image_id: int | str
    bbox: tuple[float, float, float, float]
class Coco(msgspec.Struct, gc=False):
    images: list[Image]
    annotations: list[Annotation]
def read(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        d = msgspec.json.decode(f.read(), type=Coco)
    ids = np.array([im.id for im in d.images])
    sizes = np.array([(im.width, im.height) for im in d.images], dtype=np.float64)
    names = [im.file_name for im in d.images]
    box_ids = np.array([a.image_id for a in d.annotations])
    boxes = np.array([a.bbox for a in d.annotations], dtype=np.float32)
    return len(boxes)
""",
    "ijson": """
import gzip
import ijson
import numpy as np
def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:  # one pass per array
        images = [(im["id"], im["width"], im["height"], im.get("file_name"))
                  for im in ijson.items(f, "images.item", use_float=True)]
    with opener(path, "rb") as f:
        annotations = [(a["image_id"], a["bbox"]) for a in ijson.items(f, "annotations.item", use_float=True)]
    ids = np.array([im[0] for im in images])
    sizes = np.array([im[1:3] for im in images], dtype=np.float64)
    box_ids = np.array([a[0] for a in annotations])
    boxes = np.array([a[1] for a in annotations], dtype=np.float32)
    return len(boxes)
""",
}

RUN = """
import resource, sys, time
{code}
t0 = time.perf_counter()
n = read(sys.argv[1])
seconds = time.perf_counter() - t0
print(n, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def synthetic(path: Path, n_boxes: int) -> None:
    """A COCO file of ``n_boxes`` annotations (7 per image) with polygons and areas, written as a stream."""
    rng = random.Random(0)
    n_images = max(1, n_boxes // 7)
    with path.open("w") as f:
        f.write('{"info": {"description": "synthetic"}, "images": [')
        f.write(", ".join(json.dumps({"id": i, "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"})
                          for i in range(n_images)))
        f.write('], "annotations": [')
        for k in range(n_boxes):
            x, y, w, h = (round(rng.uniform(0, 300), 2), round(rng.uniform(0, 200), 2),
                          round(rng.uniform(2, 300), 2), round(rng.uniform(2, 250), 2))
            polygon = [round(v, 2) for v in (x, y, x + w, y, x + w, y + h, x, y + h) for _ in range(2)]
            f.write(("" if k == 0 else ", ") + json.dumps({"id": k, "image_id": k % n_images, "category_id": 1,
                                                           "segmentation": [polygon], "area": round(w * h, 2),
                                                           "bbox": [x, y, w, h], "iscrowd": 0}))
        f.write('], "categories": [{"id": 1, "name": "thing"}]}\n')


def measure(way: str, path: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", RUN.format(code=READ[way]), str(path)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"status {proc.returncode}"
        return f"{way:8s} failed: {last}"
    n, seconds, rss = proc.stdout.split()
    return f"{way:8s} {int(n):>10,} boxes {float(seconds):8.2f} s {float(rss):8.0f} MB peak RSS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=1_000_000, help="annotations in the synthetic file")
    parser.add_argument("--real", type=Path, default=REAL, help="a real COCO file to read too")
    parser.add_argument("--ways", default="ours,json,msgspec,ijson", help="comma-separated ways of reading")
    args = parser.parse_args()
    ways = args.ways.split(",")
    try:
        import ijson  # noqa: F401
    except ImportError:
        ways = [w for w in ways if w != "ijson"]
        print("ijson is not installed: not measured")
    with tempfile.TemporaryDirectory() as folder:
        big = Path(folder) / "synthetic.json"
        started = time.perf_counter()
        synthetic(big, args.boxes)
        print(f"wrote {big.stat().st_size / 2**20:,.0f} MiB ({args.boxes:,} boxes) in "
              f"{time.perf_counter() - started:.0f} s")
        for path in ([args.real] if args.real.exists() else []) + [big]:
            if path.suffix == ".gz":
                with gzip.open(path) as f:
                    size = len(f.read())
            else:
                size = path.stat().st_size
            print(f"\n{path.name} ({size / 2**20:,.1f} MiB of JSON)")
            for way in ways:
                print(measure(way, path), flush=True)


if __name__ == "__main__":
    main()
