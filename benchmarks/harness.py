"""The benchmark's harness: measured processes, the machine's quietness, data on demand, tables and targets.

Sections (``benchmarks/sections/*.py``) get a :class:`Bench`: it builds the data sets they ask for,
runs our measurements in fresh processes (:meth:`Bench.worker`, the kinds each section registers in
its ``WORKERS``), YOLOv5's optimiser (:meth:`Bench.peer`) and the CLI (:meth:`Bench.compute_cli`),
and keeps the :class:`Report` (tables, PASS/FAIL target lines, ``--json-out``).

Peak memory is the peak resident set size (RSS) of each measured command, its child processes
included (see :data:`_LAUNCHER`); every measurement of ours runs in its own process.

Timings on a shared machine are noisy, and a process that competes for the cores slows down
PyTorch's thread pool badly. So each measured process starts only once other processes have left
the machine idle for a second, and is measured again (up to ``--retries`` times) when they used
more than ``--quiet-cores`` while it ran; every row reports, in "other cores", how many cores other
processes kept busy on average during the kept run. The header gives the load average at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from synthetic import JITTER, Pool, write_coco

__all__ = [
    "GENERATIONS",
    "IMG_SIZE",
    "N_ANCHORS",
    "REAL_SETS",
    "YOLOV5_P3_P5",
    "Bench",
    "CpuWatch",
    "QuietPolicy",
    "Report",
    "Run",
    "Target",
    "heading",
    "ints",
    "main",
    "mb",
    "median",
    "num",
    "run_measured",
    "sec",
    "table",
]

REPO = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).with_name("bench_anchors.py")
"""The script every measured process of ours runs (``--worker``)."""
IMG_SIZE = 640
N_ANCHORS = 9
GENERATIONS = 1000

REAL_SETS = {"VOC2012 trainval": "voc2012_trainval.json.gz", "COCO val2017": "coco2017_val.json.gz"}
YOLOV5_P3_P5 = [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198], [373, 326]]


def _default_shared(sub: str) -> Path:
    """``shared/<sub>`` of the checkout, or of the folder the checkout sits in."""
    for base in (REPO, REPO.parent):
        if (base / "shared" / sub).is_dir():
            return base / "shared" / sub
    return REPO.parent / "shared" / sub


# ---------------------------------------------------------------------------------------------------------------------
# Measuring processes


@dataclass
class Run:
    """One finished process: wall time, peak RSS, exit status, output, and how busy the machine was."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    foreign_cores: float = float("nan")
    """Average number of cores other processes kept busy while it ran (see :class:`CpuWatch`)."""
    attempts: int = 1

    def json(self) -> dict[str, Any]:
        """The last stdout line as JSON (our workers, the CLI and the peer all print one object last)."""
        if self.returncode != 0:
            raise RuntimeError(f"process failed with exit status {self.returncode}:\n{self.stderr[-3000:]}")
        return json.loads(self.stdout.strip().splitlines()[-1])


_LAUNCHER = """
import json, os, sys, threading, time
cmd, report = json.loads(sys.argv[1]), sys.argv[2]
page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
tree_peak_kb, done = 0, threading.Event()

def tree_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * page_kb
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return rss + sum(tree_rss_kb(int(c)) for c in f.read().split())
    except (OSError, ValueError, IndexError):
        return 0

def sample(pid):
    global tree_peak_kb
    while not done.wait(0.01):
        tree_peak_kb = max(tree_peak_kb, tree_rss_kb(pid))

started = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
sampler = threading.Thread(target=sample, args=(pid,), daemon=True)
sampler.start()
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
done.set()
sampler.join()
with open(report, "w") as f:
    json.dump({"seconds": seconds, "status": status, "maxrss_kb": usage.ru_maxrss, "tree_peak_kb": tree_peak_kb}, f)
"""
"""Starts the measured command from a small process and reports its wall time and peak RSS.

Linux counts, in a process's peak RSS, the peak of the process it was forked from, up to the
``exec``: a command started straight from this (large) process would report this process's
memory. Started from a bare interpreter (about 10 MB), it reports its own. ``os.wait4`` gives the
peak of the largest single process (the command or a child it waited for); a thread samples the
sum over the command's process tree every 10 ms, for commands whose processes overlap (the CLI
reads in a child while it imports torch).
"""


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion: wall time from start to exit, and peak RSS.

    The peak is the larger of the largest single process's (``os.wait4``, exact) and the sum over
    the command's processes running at once (sampled every 10 ms, see :data:`_LAUNCHER`).
    Output goes to temporary files (not pipes), so nothing in this process competes with the command.
    """
    with (tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err,
          tempfile.NamedTemporaryFile(suffix=".json") as report):
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, json.dumps(list(cmd)), report.name]
        proc = subprocess.Popen(launcher, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            proc.wait()
        except BaseException:  # interrupted: leave no measured process behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"cannot start {cmd[0]}: {stderr[-2000:]}")
        result = json.loads(Path(report.name).read_text())
        peak_kb = max(result["maxrss_kb"], result["tree_peak_kb"])
        return Run(result["seconds"], peak_kb / 1024, os.waitstatus_to_exitcode(result["status"]),
                   stdout, stderr)


class CpuWatch:
    """CPU time used by other processes since the watch started: how quiet the machine was.

    Machine-wide busy time from ``/proc/stat``, minus the CPU time of this process and of its
    children that have ended.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as f:
                fields = [float(v) for v in f.readline().split()[1:]]
            busy = (sum(fields) - fields[3] - fields[4]) / ticks  # all but idle and iowait
        except (OSError, IndexError, ValueError):
            busy = float("nan")
        own = sum(os.times()[:4])  # user + system, self + children
        return time.perf_counter(), busy, own

    def foreign_cores(self) -> float:
        """Average number of cores other processes kept busy since the watch started."""
        wall, busy, own = (b - a for a, b in zip(self.start, self._sample(), strict=True))
        return max(busy - own, 0.0) / wall if wall > 0 else float("nan")


@dataclass
class QuietPolicy:
    """Take timings only while other processes leave the machine (nearly) idle.

    Before each measured process: wait, up to ``timeout`` seconds, for a one-second window in
    which other processes use at most ``max_cores``. After it: if they used more than that while it
    ran, measure again, up to ``retries`` times, and keep the least disturbed attempt; every row
    reports how busy the machine was. ``max_cores <= 0`` turns all this off.
    """

    max_cores: float = 0.25
    timeout: float = 600.0
    retries: int = 2

    def wait(self) -> None:
        if self.max_cores <= 0:
            return
        deadline = time.monotonic() + self.timeout
        told = False
        while True:
            watch = CpuWatch()
            time.sleep(1.0)
            busy = watch.foreign_cores()
            if busy <= self.max_cores:
                return
            if time.monotonic() > deadline:
                print(f"  (machine still busy after {self.timeout:g} s: other processes use {busy:.2f} cores; "
                      "measuring anyway)", flush=True)
                return
            if not told:
                print(f"  (waiting for a quiet machine: other processes use {busy:.2f} cores)", flush=True)
                told = True

    def measure(self, cmd: Sequence[str], env: dict[str, str] | None = None) -> Run:
        """:func:`run_measured`, on a quiet machine, again if it was disturbed."""
        attempts = 1 + max(self.retries, 0) if self.max_cores > 0 else 1
        kept: Run | None = None
        for attempt in range(1, attempts + 1):
            self.wait()
            watch = CpuWatch()
            run = run_measured(cmd, env)
            run.foreign_cores, run.attempts = watch.foreign_cores(), attempt
            if run.returncode != 0:
                return run
            if kept is None or run.foreign_cores < kept.foreign_cores:
                kept = run
            if self.max_cores <= 0 or run.foreign_cores <= self.max_cores:
                break
        assert kept is not None
        kept.attempts = attempt
        return kept



# ---------------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class Target:
    section: str
    what: str
    value: float
    target: str
    passed: bool

    def line(self) -> str:
        value = f"{self.value:.0f}" if abs(self.value) >= 1e4 else f"{self.value:.4g}"
        return f"{'PASS' if self.passed else 'FAIL'}  {self.what}: {value} (target {self.target})"


@dataclass
class Report:
    """Everything printed, kept for ``--json-out``."""

    header: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def target(self, section: str, what: str, value: float, target: str, passed: bool) -> None:
        item = Target(section, what, float(value), target, bool(passed))
        self.targets.append(item)
        print(item.line())

    def as_dict(self) -> dict[str, Any]:
        return {"header": self.header, "sections": self.sections, "targets": [asdict(t) for t in self.targets]}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table, numbers right-aligned."""
    text = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
    lines = []
    for j, row in enumerate(text):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def num(value: float | None, decimals: int = 4) -> str:
    """A score for a table (``-`` when missing)."""
    return "-" if value is None else f"{value:.{decimals}f}"


def sec(value: float | None) -> str:
    """Seconds or a ratio for a table: 3 significant digits, no exponent (``-`` when missing)."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def heading(title: str) -> None:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n== {title} ==  (load average {load})", flush=True)


def median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, versions and load, for the header."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    mem_gib = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    import torch

    import lightning_autoanchor

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} ({torch.get_num_threads()} threads)",
        "numpy": np.__version__,
        "lightning_autoanchor": lightning_autoanchor.__version__,
        "load_average": ", ".join(f"{v:.2f}" for v in os.getloadavg()),
    }



# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's context, handed to every section


class Bench:
    """Builds the data sets on demand and runs the measured processes for the sections."""

    def __init__(self, args: argparse.Namespace, tmp: Path, report: Report):
        self.args, self.tmp, self.report = args, tmp, report
        self.quiet = QuietPolicy(args.quiet_cores, args.quiet_timeout, args.retries)
        self.data_dir = Path(args.data_dir)
        self.bench_dir = Path(args.bench_dir)
        self._pool: Pool | None = None
        self._files: dict[str, Path] = {}
        self._judge_wh: dict[Path, np.ndarray] = {}
        peer = args.peer_python
        self.peer_python = peer if peer and Path(peer).exists() else None
        if peer and not self.peer_python:
            print(f"note: peer python {peer} not found: peer rows are skipped")
        elif not peer:
            print("note: no --peer-python (or PEER_PYTHON): peer rows are skipped")
        self.cli = self._cli_command()

    # -- data ---------------------------------------------------------------------------------------------------------

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool.load([self.data_dir / f for f in REAL_SETS.values()], IMG_SIZE)
        return self._pool

    def synthetic(self, n_boxes: int, group: int = 1) -> Path:
        """COCO JSON of about ``n_boxes`` resampled boxes (built once per size, kept until dropped)."""
        name = f"resampled_{n_boxes}_g{group}"
        if name not in self._files:
            started = time.perf_counter()
            rng = np.random.default_rng([self.args.data_seed, n_boxes, group])
            sizes, boxes, index = self.pool.sample_boxes(n_boxes, group, rng)
            path = write_coco(self.tmp / f"{name}.json", sizes, boxes, index,
                              f"{len(boxes)} boxes in {len(sizes)} images resampled from COCO val2017 + VOC2012 "
                              f"trainval with per-image scale jitter {JITTER}")
            print(f"built {path.name}: {len(boxes):,} boxes in {len(sizes):,} images, "
                  f"{path.stat().st_size / 2**20:.0f} MiB, in {time.perf_counter() - started:.1f} s", flush=True)
            self._files[name] = path
        return self._files[name]

    def drop(self, path: Path) -> None:
        """Delete a synthetic set that no later section needs."""
        self._files = {name: p for name, p in self._files.items() if p != path}
        self._judge_wh.pop(path, None)
        path.unlink(missing_ok=True)

    def judge_score(self, path: Path, anchors: Sequence[Sequence[float]]) -> dict[str, float]:
        """``judge.score`` of ``anchors`` on ``path`` (boxes loaded by ``judge.load_wh`` once per file)."""
        sys.path.insert(0, str(self.bench_dir))
        try:
            import judge
        finally:
            sys.path.pop(0)
        if path not in self._judge_wh:
            self._judge_wh[path] = judge.load_wh(str(path), IMG_SIZE)
        return judge.score(self._judge_wh[path], anchors)

    def _cli_command(self) -> list[str]:
        script = Path(sys.executable).with_name("lightning-autoanchor")
        if script.exists():
            return [str(script)]
        found = shutil.which("lightning-autoanchor")
        return [found] if found else [sys.executable, "-m", "lightning_autoanchor.cli"]

    # -- measured processes -------------------------------------------------------------------------------------------

    def worker(self, spec: dict[str, Any], timed: bool = True) -> tuple[dict[str, Any], Run]:
        """Run a section's worker ``spec["kind"]`` in a fresh process (on a quiet machine when ``timed``).

        See :class:`QuietPolicy`.
        """
        cmd = [sys.executable, str(ENTRY), "--worker", json.dumps(spec)]
        run = self.quiet.measure(cmd) if timed else run_measured(cmd)
        return run.json(), run

    def peer(self, path: Path, seed: int) -> tuple[dict[str, Any], Run]:
        """YOLOv5's ``kmean_anchors`` through ``peer_yolov5.py``: its own timing and the judge's scores."""
        cmd = [self.peer_python, str(self.bench_dir / "peer_yolov5.py"), str(path), "--seed", str(seed),
               "--generations", str(GENERATIONS), "--n", str(N_ANCHORS), "--img-size", str(IMG_SIZE)]
        run = self.quiet.measure(cmd, env={**os.environ, "TQDM_DISABLE": "1"})
        return run.json(), run

    def compute_cli(self, path: Path, *options: str) -> tuple[dict[str, Any], Run]:
        """The whole ``lightning-autoanchor compute PATH --json [options]`` process."""
        run = self.quiet.measure([*self.cli, "compute", str(path), "--json", *options])
        return run.json(), run


# ---------------------------------------------------------------------------------------------------------------------
# Command line: common arguments here, each section adds its own (``add_arguments``)


def ints(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (``1e6`` allowed), for list arguments."""
    return [int(float(v)) for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None, sections: Mapping[str, ModuleType], description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description,
                                epilog="benchmarks/sections/<name>.py says what each section measures.")
    p.add_argument("--sections", default=",".join(sections), help=f"comma-separated, from {', '.join(sections)}")
    p.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON"),
                   help="python of a virtualenv with yolov5==7.0.14 (default: $PEER_PYTHON); peer rows are skipped "
                        "without it")
    p.add_argument("--data-dir", default=str(_default_shared("data")), help="folder of the real *.json.gz sets")
    p.add_argument("--bench-dir", default=str(_default_shared("bench")), help="folder of judge.py and peer_yolov5.py")
    p.add_argument("--seeds", type=ints, default=[0, 1, 2, 3, 4], help="seeds of the speed runs (default 0,1,2,3,4)")
    p.add_argument("--big-boxes", type=int, default=1_000_000, help="boxes of the large set (default 1M)")
    p.add_argument("--repeats", type=int, default=3, help="whole-process runs per set, median taken (default 3)")
    for module in sections.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the resampled sets")
    p.add_argument("--quiet-cores", type=float, default=0.25,
                   help="time only while other processes use at most this many cores, measuring again when they "
                        "used more (default 0.25; 0: measure regardless)")
    p.add_argument("--quiet-timeout", type=float, default=600.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--retries", type=int, default=2, help="extra attempts of a disturbed measurement (default 2)")
    p.add_argument("--tmp-dir", default=None, help="where to build the synthetic sets (default: system temp)")
    p.add_argument("--json-out", default=None, help="also write the results here as JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(sections)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(sections)}")
    if not args.worker and not all((Path(args.data_dir) / f).exists() for f in REAL_SETS.values()):
        p.error(f"--data-dir {args.data_dir} lacks {' or '.join(REAL_SETS.values())}")
    if not args.worker and "speed" in args.sections and not (Path(args.bench_dir) / "judge.py").exists():
        p.error(f"--bench-dir {args.bench_dir} has no judge.py (the speed section scores anchors with it)")
    return args


def main(argv: Sequence[str] | None, sections: Mapping[str, ModuleType], description: str) -> int:
    """Run the chosen ``sections`` (modules with ``run(bench)``, ``add_arguments(parser)`` and ``WORKERS``), or,
    with ``--worker SPEC``, one measurement in this process (its numbers printed as one JSON line)."""
    args = parse_args(argv, sections, description)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (temporary files, child) when killed
    if args.worker:
        spec = json.loads(args.worker)
        workers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            kind: fn for module in sections.values() for kind, fn in getattr(module, "WORKERS", {}).items()}
        if spec["kind"] not in workers:
            raise ValueError(f"unknown worker kind {spec['kind']!r}")
        print(json.dumps(workers[spec["kind"]](spec)))
        return 0
    header = machine()
    if args.peer_python and Path(args.peer_python).exists():
        probe = subprocess.run([args.peer_python, "-c", "import importlib.metadata as m, torch; "
                                "print(f\"yolov5 {m.version('yolov5')}, torch {torch.__version__}\")"],
                               capture_output=True, text=True)
        header["peer"] = probe.stdout.strip() if probe.returncode == 0 else f"cannot import yolov5: {probe.stderr}"
    header["command"] = " ".join([sys.executable, *sys.argv])
    print("lightning-autoanchor benchmark: fast at any scale")
    for key, value in header.items():
        print(f"  {key}: {value}")
    report = Report(header)
    tmp = Path(tempfile.mkdtemp(prefix="autoanchor-bench-", dir=args.tmp_dir))
    try:
        bench = Bench(args, tmp, report)
        for name, module in sections.items():
            if name in args.sections:
                module.run(bench)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    heading("targets")
    print("\n".join(t.line() for t in report.targets))
    failed = sum(not t.passed for t in report.targets)
    print(f"{len(report.targets) - failed} of {len(report.targets)} targets met")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report.as_dict(), indent=1))
        print(f"wrote {args.json_out}")
    return 0
