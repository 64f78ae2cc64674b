"""Signals to the ``lightning-autoanchor`` command at every moment of a run; and its output cut short by a pipe.

Each run starts the installed console script (``python -m lightning_autoanchor.cli`` where it is not
installed) in a session of its own, on a cold YOLO folder of 2,400 label files, which its worker
processes read; then a signal goes to the process group (as Ctrl-C on a terminal does) or to the
main process only, after a delay taken from a sweep over the whole run. Required:

- SIGINT: one line, ``lightning-autoanchor: interrupted``, on stderr, nothing on stdout, exit status
  130. The one exception is a SIGINT that arrives while Python starts and imports the command, before
  :func:`~lightning_autoanchor.cli.console_main` runs: Python handles that one itself, and the process
  ends by SIGINT, or with Python's ``KeyboardInterrupt`` traceback (status 1 or death by SIGINT), with
  no frame of ``console_main`` in it (about 0.1 s with this editable install's ``site`` import). A SIGINT
  while torch or torchvision is imported is held until the import is over (their C++ initialisers abort
  the process if a ``KeyboardInterrupt`` is raised inside them).
- SIGINT, SIGTERM and SIGKILL: no process of the session is left afterwards (zombies, dead processes
  their new parent has not reaped yet, are not processes left), and no temporary file in the dataset.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import DATA

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see processes")

PROG = "lightning-autoanchor"
INTERRUPTED = f"{PROG}: interrupted\n"
N_FILES = 2_400
TIMEOUT_S = 120
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command() -> list[str]:
    script = Path(sys.executable).with_name(PROG)
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_autoanchor.cli"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YOLO dataset folder of 2,400 tiny JPEG images with one label file each: enough for worker processes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("signals") / "data"
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    jpeg = io.BytesIO()
    Image.new("L", (64, 48), 114).save(jpeg, "JPEG")
    for i in range(N_FILES):
        (images / f"{i:04d}.jpg").write_bytes(jpeg.getvalue())
        (labels / f"{i:04d}.txt").write_text(f"0 0.5 0.5 {0.1 + (i % 37) / 50:.4f} {0.1 + (i % 23) / 30:.4f}\n")
    return root


def leftovers(root: Path) -> list[Path]:
    """The cache and any temporary file beside the dataset (removed before each run: every read is cold)."""
    return sorted(p for p in root.parent.iterdir() if p.name.startswith("."))


def start(root: Path, sigint: signal.Handlers = signal.SIG_DFL) -> subprocess.Popen[str]:
    """The command on ``root`` in a session of its own, SIGINT's disposition set to ``sigint`` (as a terminal
    sets it: tests may run with SIGINT ignored, as a shell's background job, which the command would inherit)."""
    for path in leftovers(root):
        path.unlink()
    return subprocess.Popen([*command(), "check", str(root), "--anchors", "10,13, 16,30, 33,23", "--json",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


def state(pid: int) -> str:
    """The process's state letter ('R', 'S', 'Z', ...), '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return ""


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        return []


def session(sid: int) -> list[str]:
    """The live processes (not zombies) of session ``sid``, as 'pid state command' strings."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(f"{entry.name} {fields[0]} {cmdline[:120]}")
    return found


def assert_nothing_left(proc: subprocess.Popen[str], root: Path, why: str) -> None:
    deadline = time.monotonic() + 10
    while (left := session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert left == [], f"{why}: processes left in the session:\n" + "\n".join(left)
    assert [p.name for p in leftovers(root) if not p.name.endswith(".npz")] == [], f"{why}: temporary files left"


def wait_for_workers(proc: subprocess.Popen[str]) -> list[int]:
    deadline = time.monotonic() + TIMEOUT_S
    while not (workers := children(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    if not workers:
        proc.kill()
        pytest.fail(f"no worker process was started:\n{proc.communicate()[1]}")
    return workers


def assert_interrupted(proc: subprocess.Popen[str], stdout: str, stderr: str, why: str, starting: bool,
                       ending: bool = False) -> str:
    """One line and status 130; or, if the command may still be ``starting``, Python's own handling of
    SIGINT before ``console_main`` runs; or, if it may be ``ending``, a whole run that was over (its one
    JSON line out, status 0) when the signal came, too late to be seen from outside. Returns which."""
    if (proc.returncode, stdout, stderr) == (130, "", INTERRUPTED):
        return "one line"
    if ending and proc.returncode == 0 and stderr == "" and stdout.count("\n") == 1 and stdout.endswith("}\n"):
        return "already over"
    pythons = proc.returncode in (1, -signal.SIGINT) and stdout == "" and ", in console_main" not in stderr and (
        stderr == "" or stderr.rstrip().endswith("KeyboardInterrupt"))
    assert starting and pythons, f"{why}: status {proc.returncode}, stdout {stdout[:200]!r}, stderr:\n{stderr}"
    return "Python starting"


@pytest.fixture(scope="module")
def start_time() -> float:
    """Seconds of a whole ``--version`` run: more than Python needs to start and import the command."""
    t0 = time.monotonic()
    proc = subprocess.run([*command(), "--version"], capture_output=True, env=ENV, timeout=TIMEOUT_S)
    assert proc.returncode == 0
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def run_time(dataset: Path) -> float:
    """Seconds of one undisturbed cold run (which also warms the file cache)."""
    t0 = time.monotonic()
    proc = start(dataset)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0 and stderr == "", stderr
    assert f'"n_images": {N_FILES}' in stdout
    return seconds


def test_sigint_at_every_moment(dataset: Path, run_time: float, start_time: float) -> None:
    """SIGINT after delays from 0 to the end of the run, to the group and to the main process in turn."""
    delays = [0.0, 0.003, 0.01, 0.03, 0.06, 0.1, 0.15] + [run_time * k / 12 for k in range(2, 12)]
    seen = []
    for i, delay in enumerate(delays):
        to_group = i % 2 == 0
        proc = start(dataset)
        time.sleep(delay)
        if state(proc.pid) in ("", "Z"):  # the run is over: nothing left to interrupt
            proc.communicate(timeout=TIMEOUT_S)
            continue
        (os.killpg if to_group else os.kill)(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        why = f"SIGINT to the {'group' if to_group else 'main process'} after {delay:.3f} s"
        seen.append((round(delay, 3), assert_interrupted(proc, stdout, stderr, why, starting=delay < start_time,
                                                         ending=delay > 0.75 * run_time)))
        assert_nothing_left(proc, dataset, why)
    print("SIGINT outcomes by delay:", seen)
    assert [outcome for _, outcome in seen].count("one line") >= len(delays) // 2, seen


AT_IMPORT = """
import os, signal, sys
def at_import(event, args):
    if event == "import" and args[0] in ("torch", "torchvision", "torch.distributed.autograd"):
        held = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, ())
        os.write(2, f"{args[0]} held={held}\\n".encode())
        if args[0] == os.environ.get("SIGINT_AT"):
            os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(at_import)
from lightning_autoanchor.cli import console_main
console_main()
"""


def run_with_import_hook(*args: str, sigint_at: str = "") -> subprocess.CompletedProcess[str]:
    """The command (``console_main``, as installed) with an audit hook that says, as torch, torchvision and
    ``torch.distributed.autograd`` start to import, whether SIGINT is held, and sends SIGINT at ``sigint_at``."""
    return subprocess.run([sys.executable, "-c", AT_IMPORT, *args], capture_output=True, text=True,
                          env={**ENV, "SIGINT_AT": sigint_at}, timeout=TIMEOUT_S)


@pytest.mark.parametrize("family", [["--anchors", "10,13, 16,30, 33,23"], ["--family", "torchvision-ssd"]],
                         ids=["yolo", "torchvision"])
def test_torch_is_imported_with_sigint_held(family: list[str]) -> None:
    """torch's and torchvision's C++ initialisers cannot unwind a KeyboardInterrupt (a Ctrl-C 0.63 s into a
    run once aborted the process, status -6, in ``torch.distributed.autograd``'s import): they are imported
    with SIGINT held."""
    proc = run_with_import_hook("check", str(DATA / "coco2017_val_150.json.gz"), *family, "--quiet")
    assert proc.returncode == 0, proc.stderr
    imported = ["torch", "torch.distributed.autograd"] + (["torchvision"] if "--family" in family else [])
    assert sorted(proc.stderr.splitlines()) == sorted(f"{name} held=True" for name in imported)


def test_a_sigint_during_torch_s_import_ends_the_run_after_it() -> None:
    """A Ctrl-C deep in torch's import waits for the import to end, then gives the one line and status 130."""
    proc = run_with_import_hook("check", str(DATA / "coco2017_val_150.json.gz"), "--anchors", "10,13",
                                sigint_at="torch.distributed.autograd")
    assert (proc.returncode, proc.stdout) == (130, "")
    assert proc.stderr == f"torch held=True\ntorch.distributed.autograd held=True\n{INTERRUPTED}"


@pytest.mark.parametrize("to_group", [True, False], ids=["group", "main process"])
def test_sigint_while_workers_read(to_group: bool, dataset: Path) -> None:
    """Ctrl-C while the worker processes read: one line, status 130, every worker stopped and reaped."""
    proc = start(dataset)
    wait_for_workers(proc)
    (os.killpg if to_group else os.kill)(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert (proc.returncode, stdout, stderr) == (130, "", INTERRUPTED)
    assert_nothing_left(proc, dataset, "SIGINT while workers read")


def test_an_ignored_sigint_stays_ignored(dataset: Path) -> None:
    """Started with SIGINT ignored (``nohup``, a background job of a script), the command lets Ctrl-C pass."""
    proc = start(dataset, sigint=signal.SIG_IGN)
    wait_for_workers(proc)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert (proc.returncode, stderr) == (0, "") and f'"n_images": {N_FILES}' in stdout
    assert_nothing_left(proc, dataset, "SIGINT ignored")


@pytest.mark.parametrize("how", ["SIGTERM to the main process", "SIGTERM to the group",
                                 "SIGKILL to the main process", "SIGKILL to the group"])
def test_sigterm_and_sigkill_leave_no_process(how: str, dataset: Path) -> None:
    """The command killed while its workers read: they die with it (their parent-death signal)."""
    sig = signal.SIGTERM if "SIGTERM" in how else signal.SIGKILL
    proc = start(dataset)
    workers = wait_for_workers(proc)
    (os.killpg if "group" in how else os.kill)(proc.pid, sig)
    proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == -sig
    assert_nothing_left(proc, dataset, how)
    assert all(state(pid) in ("", "Z") for pid in workers)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_sigterm_at_other_moments(fraction: float, dataset: Path, run_time: float) -> None:
    """SIGTERM to the main process while torch loads or anchors are scored: no process left either."""
    proc = start(dataset)
    time.sleep(run_time * fraction)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode in (-signal.SIGTERM, 0)
    assert_nothing_left(proc, dataset, f"SIGTERM after {fraction:.0%} of a run")


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
def test_output_into_a_closed_pipe(buffered: bool, dataset: Path) -> None:
    """stdout a pipe whose reader is gone (``... | head -n 1`` once head has its line): no traceback, status 1,
    also where every print is written at once (``PYTHONUNBUFFERED=1``, as many container images set)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    env = ENV if buffered else {**ENV, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*command(), "check", str(dataset), "--anchors", "10,13", "--quiet"], stdout=write,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=TIMEOUT_S)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (1, "")


def test_head_n_1(dataset: Path) -> None:
    """A real ``| head -n 1`` shell pipeline gives the first line and no traceback."""
    proc = subprocess.run(f"{' '.join(command())} check {dataset} --anchors 10,13 --quiet | head -n 1", shell=True,
                          capture_output=True, text=True, env={**ENV, "PYTHONUNBUFFERED": "1"}, timeout=TIMEOUT_S)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"{dataset}: {N_FILES:,} boxes in {N_FILES:,} images")
    assert proc.stdout.count("\n") == 1
