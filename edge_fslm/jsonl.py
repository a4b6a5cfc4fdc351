"""Resumable JSONL files: one set of rules for every file edge-fslm appends to and resumes from.

* A record is one line, appended and fsync'd before the caller goes on (``Appender``).
* A kill can only tear the last line, and a torn line has no newline: on resume that
  tail, and only that, is cut off (``read_records``). Any other line that is not one
  of our records means the file is someone else's, and it is refused untouched.
* Reads are bounded (per line and per file) and refuse FIFOs and devices, which would
  block or never end.
* One writer at a time: ``Appender`` holds an flock on its file, ``folder_lock`` on a
  folder of files written together.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import stat
from pathlib import Path
from typing import Iterator

from .errors import DataError, EdgeFSLMError

MAX_INPUT_BYTES = 1 << 30  # a whole file
MAX_LINE_BYTES = 16 << 20  # one JSONL line, in either direction


def regular_file(p: Path, what: str) -> bool:
    """Whether ``p`` exists; a FIFO, device, socket or folder is refused (reading one can hang)."""
    try:
        st = p.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise EdgeFSLMError(f"{p}: cannot read the {what} ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise EdgeFSLMError(f"{p}: is a directory — pass a JSONL file for the {what}")
    if not stat.S_ISREG(st.st_mode):
        raise EdgeFSLMError(f"{p}: is not a regular file (a pipe or device) — pass a JSONL file for the {what}")
    return True


def lines(p: Path, what: str) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without its newline, whether a newline ended it), read in bounded pieces."""
    try:
        with open(p, "rb") as f:
            total = 0
            for n in itertools.count(1):
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                total += len(line)
                if len(line) > MAX_LINE_BYTES:
                    raise EdgeFSLMError(f"{p}:{n}: a line over {MAX_LINE_BYTES >> 20} MiB — is this the {what}?")
                if total > MAX_INPUT_BYTES:
                    raise EdgeFSLMError(f"{p}: over {MAX_INPUT_BYTES >> 30} GiB — split the {what} into smaller files")
                ended = line.endswith(b"\n")
                yield n, line[:-1] if ended else line, ended
    except OSError as exc:
        raise EdgeFSLMError(f"{p}: cannot read the {what} ({exc.strerror})") from None


def read_records(path: Path, keys: tuple[str, ...], what: str) -> list[dict]:
    """Every record of a resumable file; a torn last line (a kill) is cut off the file.

    Only a last line with no newline can be torn by a kill, so that is the only thing cut;
    any other line that is not one of our records means the file is not ours, and nothing
    is touched.
    """
    if not regular_file(path, what):
        return []
    records: list[dict] = []
    torn_at = None
    pos = 0
    for n, line, ended in lines(path, what):
        if not ended:
            torn_at = pos
            break
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            raise EdgeFSLMError(f"{path}:{n}: not an edge-fslm {what} line — this file is not one edge-fslm"
                                " wrote; choose another output (nothing was changed)")
        records.append(rec)
    if torn_at is not None:
        try:
            with open(path, "r+b") as f:
                f.truncate(torn_at)
        except OSError as exc:
            raise EdgeFSLMError(f"{path}: cannot cut the torn last line ({exc.strerror})") from None
    return records


class Appender:
    """Append one JSON line and make it durable before returning; holds a lock so two runs never interleave."""

    def __init__(self, path: Path):
        try:
            self.f = open(path, "ab")
        except OSError as exc:
            raise EdgeFSLMError(f"{path}: cannot open for writing ({exc.strerror})") from None
        self.path = path
        try:
            fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise EdgeFSLMError(f"{path}: another run is writing to this file — wait for it, or stop it first") from None

    def write(self, obj: dict) -> None:
        try:
            self.f.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as exc:
            raise EdgeFSLMError(f"{self.path}: write failed ({exc.strerror}) — free space, then re-run to resume") from None

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:
            pass


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so two runs never append to the same files."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{folder}: another {what} is writing to this folder — wait for it, or stop it first") from None
        yield
    finally:
        os.close(fd)
