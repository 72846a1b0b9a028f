"""Atomic file writes: a reader never sees a half-written file, even after a crash.

Whole files are written to a temporary sibling (``.<name>.<random>.tmp``) and renamed into place.
Journals (``*.jsonl``) are appended one whole line per ``write`` call, and their readers drop a
torn last line, so a kill at any moment leaves a journal that still reads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

TEMP_SUFFIX = ".tmp"
# mkstemp's names: "." + target name + "." + 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over the target on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    # mkstemp makes 0600 files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(target: str | Path, obj: Any) -> None:
    write_text(target, yaml.safe_dump(obj, sort_keys=False))


def torch_save(target: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files that a killed writer left under `folder` (recursively); returns them.

    Only call this while no other process writes into `folder` (the caller holds the run lock).
    """
    removed = []
    for path in sorted(Path(folder).rglob(f"*{TEMP_SUFFIX}")):
        if not _TEMP_NAME.match(path.name) or not path.exists():
            continue
        if path.is_dir() and not path.is_symlink():  # a work folder (temp_dir) a killed writer left
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    return removed


@contextmanager
def temp_dir(beside: str | Path) -> Iterator[Path]:
    """A work folder next to `beside` (`.<name>.<random>.tmp`), removed afterwards; after a kill,
    `remove_stale_temp_files` of the run folder removes it."""
    beside = Path(beside)
    path = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=TEMP_SUFFIX, dir=beside.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def append_jsonl(target: str | Path, record: Any) -> None:
    """Append one JSON record as one line, in a single write, after cutting off any torn last line.

    A kill before or after the write leaves whole lines only; a partial write (full disk, power
    loss) leaves a torn tail that `read_jsonl` drops and the next append cuts off.
    """
    line = (json.dumps(record, default=float) + "\n").encode("utf-8")
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.ftruncate(fd, _end_of_last_whole_line(fd, size))
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {target}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_of_last_whole_line(fd: int, size: int, chunk: int = 65536) -> int:
    end = size
    while end > 0:
        start = max(0, end - chunk)
        block = os.pread(fd, end - start, start)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def read_jsonl(path: str | Path) -> tuple[list[Any], int]:
    """Records of a JSON-lines journal and the number of lines skipped as unreadable.

    A torn last line (no newline at the end: a write cut short) is dropped silently: it is the
    expected trace of a kill. Other unreadable lines are skipped and counted.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    lines.pop()  # the text after the last newline: empty, or a torn line
    records, bad = [], 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError:
            bad += 1
    return records, bad
