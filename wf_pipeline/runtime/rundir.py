"""The run directory artifacts/<run-name>/: resolved recipe, environment, logs, metrics, checkpoints.

One process owns a run directory at a time: it holds an exclusive ``flock`` on ``<root>/.<run>.lock``
for as long as it works on the run. The kernel drops the lock when the process dies, however it
dies, so a killed run never blocks the next one, while a live one (a second ``--resume`` beside it,
or torchrun workers orphaned by a killed launcher) refuses every other writer. Under torchrun only
the main rank opens, locks and writes the directory; the other ranks get a read-only handle.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wf_pipeline
from wf_pipeline import __version__
from wf_pipeline.errors import RunAlreadyFinished, WFError
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.runtime.atomic_io import (
    append_jsonl,
    read_jsonl,
    remove_stale_temp_files,
    write_json,
    write_text,
    write_yaml,
)

if TYPE_CHECKING:
    from wf_pipeline.runtime.distributed import DistContext

STATUS_FILE = "status.json"  # written last, when a compress run has finished
# Every run folder holds these from the moment it exists (written before its atomic rename into place).
RUN_MARKERS = ("recipe.yaml", "environment.json")


def is_run_folder(path: Path) -> bool:
    """A real run folder: a folder, not a symbolic link, holding the files every run is created with."""
    return (not path.is_symlink() and path.is_dir()
            and all(not (path / name).is_symlink() and (path / name).is_file() for name in RUN_MARKERS))


def require_run_folder(path: Path, what: str, hint: str) -> Path:
    """`path` if it is a real run folder (see `is_run_folder`), else one-line WFError naming `what`."""
    if path.is_symlink():
        raise WFError(f"{what}: {path} is a symbolic link, not a run folder", hint)
    if not path.exists():
        raise WFError(f"{what}: run folder not found: {path}", hint)
    if not is_run_folder(path):
        raise WFError(f"{what}: {path} is not a run folder (no {' or '.join(RUN_MARKERS)})", hint)
    return path


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(seed: int) -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {
        "wf_pipeline": __version__,
        "git_commit": _git_commit(),
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
        "openmp_wait": wf_pipeline.OPENMP_WAIT,
    }


class RunLock:
    """An exclusive, non-blocking flock on a lock file, held until `release` or the process's end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                raise WFError(f"output: run directory {what} is in use by {owner}",
                              "wait for that run to finish or stop it (two processes must never write one run), "
                              "or choose another --set output.run_name=NEW") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the file was removed (a refused run cleaning up) while we waited: lock the new one
        # Who holds it, for the message a second process prints (informational: the flock decides).
        os.ftruncate(fd, 0)
        owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        os.pwrite(fd, owner.encode(), 0)
        self._fd = fd

    def remove(self) -> None:
        """Delete the lock file while holding it (whoever opened it meanwhile retries on the new one)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


@dataclass
class RunDir:
    """A run directory. `writer` is False for torchrun's non-main ranks: they read, never write."""

    path: Path
    writer: bool = True
    lock: RunLock | None = field(default=None, repr=False, compare=False)
    created: bool = False  # made by this process (not reopened by --resume)
    root_created: bool = False  # its output.root too

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def history_path(self) -> Path:
        return self.path / "history.jsonl"

    def append_history(self, record: dict[str, Any]) -> None:
        # A line-per-event journal (one write per line; a torn tail is cut off and never read).
        if self.writer:
            append_jsonl(self.history_path, record)

    def read_history(self) -> list[dict[str, Any]]:
        records, bad = read_jsonl(self.history_path)
        if bad and self.writer:
            self.logger().warning("history.jsonl: skipped %d unreadable line(s)", bad)
        return [r for r in records if isinstance(r, dict)]

    def rewrite_history(self, records: list[dict[str, Any]]) -> None:
        if self.writer:
            write_text(self.history_path, "".join(json.dumps(r, default=float) + "\n" for r in records))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        if self.writer:
            write_json(self.path / "metrics.json", metrics)

    def mark_finished(self, gates_passed: bool | None, failed_gates: list[str] | None = None) -> None:
        """Record that the run finished (the last file written), so `--resume` knows there is nothing left."""
        if self.writer:
            write_json(self.path / STATUS_FILE, {"state": "finished", "gates_passed": gates_passed,
                                                 "failed_gates": list(failed_gates or []),
                                                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def finished_status(self) -> dict[str, Any] | None:
        try:
            status = json.loads((self.path / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return status if isinstance(status, dict) and status.get("state") == "finished" else None

    def logger(self) -> logging.Logger:
        log = logging.getLogger(f"wf_pipeline.run.{self.path.resolve()}")
        if not log.handlers:
            handler: logging.Handler = logging.NullHandler()
            if self.writer:
                handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        return log

    def log_crash(self, exc: BaseException) -> Path | None:
        """Write `exc`'s traceback to log.txt; returns the log's path (None when the run folder is gone).

        A read-only handle (torchrun's other ranks) appends its own traceback too, under its rank, so that
        every rank's terminal shows one line and log.txt the whole story.
        """
        if not self.path.is_dir():
            return None
        text = "".join(traceback.format_exception(exc))
        if not self.writer:
            rank = os.environ.get("RANK", "?")
            with open(self.path / "log.txt", "a", encoding="utf-8") as handle:  # one write: lines stay whole
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR rank {rank} crashed (exit code 3); "
                             f"please report this with the traceback:\n{text}")
            return self.path / "log.txt"
        self.logger().error("crashed (exit code 3); please report this with the traceback:\n%s", text.rstrip())
        return self.path / "log.txt"

    def release(self) -> None:
        """Close the log and drop the lock (also dropped by the kernel when the process ends)."""
        log = logging.getLogger(f"wf_pipeline.run.{self.path.resolve()}")
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
        if self.lock is not None:
            self.lock.release()
            _held.pop(self.lock.path, None)
        _opened[:] = [run for run in _opened if run is not self]


# Runs this process opened (newest last) and the locks it holds, for crash logs and release.
_opened: list[RunDir] = []
_held: dict[Path, RunLock] = {}


def opened_runs() -> list[RunDir]:
    return list(_opened)


def release_all() -> None:
    for run in list(_opened):
        run.release()


def _check_root(root: Path) -> None:
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise WFError(f"output.root: {folder} is a file, not a folder",
                              "remove or rename it, or set output.root to a folder")
            if folder == root and not os.access(folder, os.W_OK | os.X_OK):
                raise WFError(f"output.root: folder {folder} is not writable", "set output.root to a writable folder")
            return


def check_run_location(recipe: Recipe, *, resume: bool | None = None, overwrite: bool = False) -> Path:
    """The run directory the recipe names, after checking it can be created or reopened (nothing is written).

    Whatever is at that path must be a real run folder (never a link or a folder of something else, which
    `--resume` would write into and `--overwrite` delete). With `resume` given (a command about to open
    the run, not `recipe check`), the folder must also exist for `--resume` and not exist for a new run.
    """
    root = Path(recipe.output.root).expanduser()
    _check_root(root)
    final = root / recipe.run_name()
    other = "choose another --set output.run_name=NEW"
    if final.is_symlink() or final.exists():
        require_run_folder(final, "output", f"move it away or {other}")
        if resume is False and not overwrite:
            raise WFError(f"output: run directory {final} already exists",
                          "pass --resume to continue it, --overwrite to replace it, or --set output.run_name=NEW")
    elif resume:
        raise WFError(f"--resume: no run directory {final} to resume", "run without --resume to start it")
    return final


def _lock_for(root: Path, name: str) -> RunLock:
    path = root / f".{name}.lock"
    if path in _held:  # this process already owns the run (e.g. the Python API opening it twice)
        return _held[path]
    lock = RunLock(path)
    lock.acquire(str(root / name))
    _held[path] = lock
    return lock


def _remove_leftovers(root: Path, name: str) -> None:
    """Staging and trash folders of a creation that was killed (we hold the run's lock)."""
    for leftover in root.glob(f".{name}~*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def open_run_dir(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, kind: str = "compress") -> RunDir:
    """Lock, then create artifacts/<run-name>/ atomically (a temp folder renamed into place) or reopen it.

    Refuses (WFError) a run directory another live process holds. On resume, temp files a killed
    writer left behind are deleted; a finished compress run raises RunAlreadyFinished. The lock is
    held until `RunDir.release()` or the end of the process.
    """
    final = check_run_location(recipe, resume=resume, overwrite=overwrite)  # refusals before anything exists
    root = final.parent
    root_created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock_for(root, final.name)
    try:
        run = _open_locked(recipe, final, lock, resume=resume, overwrite=overwrite, kind=kind)
    except BaseException:
        if lock.path in _held and not any(r.lock is lock for r in _opened):
            lock.release()
            _held.pop(lock.path, None)
        raise
    run.root_created = run.created and root_created
    if run not in _opened:
        _opened.append(run)
    return run


def _open_locked(recipe: Recipe, final: Path, lock: RunLock, *, resume: bool, overwrite: bool, kind: str) -> RunDir:
    root = final.parent
    _remove_leftovers(root, final.name)
    if final.exists():
        require_run_folder(final, "output", "choose another --set output.run_name=NEW")  # checked again under the lock
        if resume:
            run = next((r for r in _opened if r.path == final), None) or RunDir(final, lock=lock)
            status = run.finished_status()
            if status is not None and kind == "compress":
                raise RunAlreadyFinished(str(final), status)
            remove_stale_temp_files(final)
            return run
        if not overwrite:
            raise WFError(f"output: run directory {final} already exists",
                          "pass --resume to continue it, --overwrite to replace it, or --set output.run_name=NEW")
    elif resume:
        raise WFError(f"--resume: no run directory {final} to resume", "run without --resume to start it")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}~new-", dir=root))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700 folders; a run folder is as readable as any other
    try:
        write_yaml(staging / "recipe.yaml", recipe.to_dict())
        write_json(staging / "environment.json", {**environment_info(recipe.seed), "kind": kind})
        (staging / "checkpoints").mkdir()
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}~old-", dir=root))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return RunDir(final, lock=lock, created=True)


def discard_refused_runs(exc: WFError) -> None:
    """A run refused after its folder was made: remove a folder this process made that holds no work yet
    (nothing in its history), so the plain re-run is not blocked; otherwise write the refusal into its log.txt."""
    for run in list(_opened):
        if not run.writer or not run.path.is_dir():
            continue
        if run.created and not run.read_history() and not run.file(STATUS_FILE).exists():
            lock = run.lock
            shutil.rmtree(run.path, ignore_errors=True)
            if lock is not None:
                lock.remove()  # still held: nobody else has the run
            run.release()
            if run.root_created and not any(run.path.parent.iterdir()):
                run.path.parent.rmdir()
            continue
        run.logger().error("refused (exit code 2): %s", exc)


def open_shared_run_dir(recipe: Recipe, dist: DistContext, *, resume: bool = False, overwrite: bool = False,
                        kind: str = "compress") -> RunDir:
    """Every rank calls this: the main rank opens and locks the run directory, the others get a
    read-only handle to it, or every rank raises the main rank's input error (exit code 2 everywhere)."""
    from wf_pipeline.runtime.distributed import broadcast_object

    if not dist.enabled:
        return open_run_dir(recipe, resume=resume, overwrite=overwrite, kind=kind)
    run: RunDir | None = None
    error: Exception | None = None
    outcome: dict[str, Any] = {}
    if dist.is_main:
        try:
            run = open_run_dir(recipe, resume=resume, overwrite=overwrite, kind=kind)
            outcome = {"path": str(run.path)}
        except WFError as exc:
            error, outcome = exc, {"error": "input", "message": exc.message, "hint": exc.hint}
        except RunAlreadyFinished as exc:
            error, outcome = exc, {"error": "finished", "run_dir": exc.run_dir, "status": exc.status}
    shared = broadcast_object(outcome)
    if error is not None:
        raise error
    if shared.get("error") == "input":
        raise WFError(shared["message"], shared["hint"])
    if shared.get("error") == "finished":
        raise RunAlreadyFinished(shared["run_dir"], shared["status"])
    if run is None:
        run = RunDir(Path(shared["path"]), writer=False)
        _opened.append(run)  # for its crash log (see RunDir.log_crash)
    return run
