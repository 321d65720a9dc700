"""Single-file checkpoints, written atomically; resume from the latest.

A checkpoint is `<run>/checkpoints/step_XXXXXXXX.pt`: student, teacher, centres, optimizer, grad scaler, step,
RNG states and the data position. It is written to a temporary file in the same directory, flushed and fsynced,
then renamed over its final name (atomic on POSIX), and only then does the `latest` pointer move (itself
replaced atomically). A process killed mid-save leaves at most a stray `*.tmp` file; the previous checkpoint and
pointer stay intact. Loading uses `weights_only=True`: no arbitrary unpickling.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write_fn) -> None:
    """Call `write_fn(file)` on a temporary file, fsync, then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        """The checkpoint named by the `latest` pointer, else the newest complete file."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            target = self.dir / pointer.read_text().strip()
            if target.is_file():
                return target
            log.warning("checkpoint pointer %s names a missing file %s; scanning instead", pointer, target)
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:08d}.pt"
        atomic_write(path, lambda f: torch.save(state, f))
        atomic_write(self.dir / "latest", lambda f: f.write(path.name.encode()))
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        log.info("checkpoint: saved %s", path)
        return path

    def resolve_resume(self, resume: str) -> Path | None:
        """`auto`: the latest checkpoint of this run, if any; '' / none: no resume; else the file (or run dir)."""
        if resume.lower() in ("", "none", "false"):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir():
            found = Checkpointer(path if (path / "checkpoints").is_dir() else path.parent, self.keep).latest()
            if found is None:
                raise ValueError(f"checkpoint.resume={resume!r}: no checkpoint found in that directory")
            return found
        if not path.is_file():
            raise ValueError(f"checkpoint.resume={resume!r}: file does not exist")
        return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {str(path)!r}: {err}") from err
