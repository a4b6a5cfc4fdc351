"""Small pieces every converter shares: the error type, atomic output, progress.

An interrupted conversion must never leave a file that looks finished, because
the build step skips artifacts that exist and match their recorded hash.  So
every output is written to a hidden temp file in the destination folder and
``os.replace``d into place only after it has been written, synced and
validated.  Same folder, so the rename is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import EdgeFSLMError

__all__ = ["ConvertError", "Progress", "atomic_output", "fsync_file", "output_path"]

#: ``progress(done, total, what)``: units are bytes unless the caller says otherwise.
Progress = Callable[[int, int, str], None]


class ConvertError(EdgeFSLMError):
    """A checkpoint, adapter or setting the converters cannot turn into a GGUF."""


def output_path(out_path: str | os.PathLike[str], what: str = "output") -> Path:
    """Check that ``out_path`` can be written as a file before hours of work go into it."""
    p = Path(out_path).expanduser()
    if p.is_dir():
        raise ConvertError(f"{p}: {what} path is a directory — name the .gguf file to write")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConvertError(f"{p}: folder {parent} does not exist — create it first")
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"{p}: folder {parent} is not writable — choose another output path")
    return p


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Push a finished file to disk so the rename after it cannot expose a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which would race with other threads later.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_output(out_path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``out_path``; rename it over ``out_path`` on success.

    On any exception (including KeyboardInterrupt) the temp file is removed and
    ``out_path`` is left as it was.
    """
    final = Path(out_path)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise
