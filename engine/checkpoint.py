"""Checkpoints, written atomically; resume from the latest; a consolidated load for eval and export.

The trainer writes sharded checkpoints with `torch.distributed.checkpoint` (DCP): `<run>/checkpoints/step_XXXXXXXX/`
holds one `.distcp` file per rank, DCP's `.metadata`, and `meta.json` (step, config). Every rank writes its own
shards into `.step_XXXXXXXX.tmp/`; when the save is complete (all ranks done, metadata written) rank 0 renames the
directory to its final name and only then moves the `latest` pointer. The state holds tensors only (student,
teacher, centres, the optimizer's per-parameter state, grad scaler, step, RNG, data position): DCP reshards on
load, so a run saved at 2 ranks resumes at 1 or 4 (same global batch), with DDP, FSDP2 or one process.
`load_consolidated(path)` reads full, unsharded model tensors on the CPU without a process group.

Single-file format (`Checkpointer.save` / `load_checkpoint`; evaluation, export and visualisation read it, the
trainer neither writes nor resumes it): a checkpoint is `<run>/checkpoints/step_XXXXXXXX.pt`, any dict of tensors
(e.g. step, model, config). It is written to a temporary file in the same directory, flushed and fsynced,
then renamed over its final name (atomic on POSIX), and only then does the `latest` pointer move (itself
replaced atomically). A process killed mid-save leaves at most a stray `*.tmp` file; the previous checkpoint and
pointer stay intact. Loading uses `weights_only=True`: no arbitrary unpickling.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ibot_engine.config import Config, config_from_dict
from ibot_engine.distributed import barrier, get_rank

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")
META = "meta.json"  # written last into a sharded checkpoint directory, before its rename


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
        return sorted(
            (p for p in self.dir.iterdir() if _NAME.match(p.name) and (p.is_file() or (p / META).is_file())),
            key=lambda p: (int(_NAME.match(p.name).group(1)), p.name),
        )

    def latest(self) -> Path | None:
        """The checkpoint named by the `latest` pointer, else the newest complete file."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            target = self.dir / pointer.read_text().strip()
            if target.is_file() or (target / META).is_file():
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
        if is_sharded_checkpoint(path):
            return path
        if path.is_dir():
            found = Checkpointer(path if (path / "checkpoints").is_dir() else path.parent, self.keep).latest()
            if found is None:
                raise ValueError(f"checkpoint.resume={resume!r}: no checkpoint found in that directory")
            return found
        if not path.is_file():
            raise ValueError(f"checkpoint.resume={resume!r}: file does not exist")
        return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A legacy single-file checkpoint, or the consolidated model of a sharded one (`load_consolidated`)."""
    if Path(path).is_dir():
        return load_consolidated(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {str(path)!r}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Sharded (DCP) checkpoints


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns at every save / load without a process group that it assumes one process: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META).is_file()


class ShardedCheckpointer(Checkpointer):
    """DCP checkpoints of a (possibly) multi-rank run; `save` is called on every rank with its own shards.

    With `async_save`, the state is staged on the CPU and written by a background thread (its collectives on a
    dedicated gloo group, apart from the training's); `wait()` blocks until the pending save is finalised. Rank 0
    finalises (meta.json, rename, `latest`, pruning) only after DCP reports the whole save complete.
    """

    def __init__(self, run_dir: str | Path, keep: int = 3, *, async_save: bool = False) -> None:
        super().__init__(run_dir, keep)
        self.async_save = async_save
        self._pending = None
        self._group = None
        # The background save stages the state on the CPU and needs a CPU-capable group for its collectives; the
        # training's group is NCCL on GPUs, even with one rank (FSDP2 in one process makes a one-rank group).
        if async_save and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # collective: every rank builds it at the same time

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:  # type: ignore[override]
        """Collective: every rank passes its state (DTensors for its shards); returns the final directory."""
        import torch.distributed.checkpoint as dcp

        self.wait()  # one save in flight at a time
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".step_{step:08d}.tmp"
        if get_rank() == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        barrier()
        meta = {"step": step, **(meta or {})}
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        if self.async_save:
            self._pending = dcp.async_save(state, storage_writer=writer, process_group=self._group)
            self._pending_args = (tmp, final, meta)
        else:
            with _single_process_quiet():
                dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
            if get_rank() == 0:
                self._finalize(tmp, final, meta)
            barrier()  # nobody reads `latest` before it names this save
        return final

    def wait(self) -> None:
        """Block until a pending async save is written; rank 0 then finalises it."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.result()  # raises if the background save failed: the previous `latest` stays
        if get_rank() == 0:
            self._finalize(*self._pending_args)

    def _finalize(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        atomic_write(tmp / META, lambda f: f.write(json.dumps(meta).encode()))
        if final.exists():  # a rerun from an older checkpoint overwrites this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        atomic_write(self.dir / "latest", lambda f: f.write(final.name.encode()))
        for old in self.checkpoints()[: -self.keep]:
            if old != final:
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        log.info("checkpoint: saved %s", final)


# DCP's `.metadata` index is a pickle, which `FileSystemReader` reads with plain `pickle.load`: a crafted checkpoint
# could run code on load. The tensors themselves are read with `torch.load(weights_only=True)`. So the index is read
# with an unpickler that only builds DCP's own metadata classes, torch sizes / dtypes / layouts and paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"), ("builtins", "set"), ("builtins", "frozenset")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        listed = (module, name) in _ALLOWED_GLOBALS
        obj = super().find_class(module, name) if listed or module in _DCP_MODULES or module == "torch" else None
        if listed or (module in _DCP_MODULES and isinstance(obj, type)) or (
                module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))):
            return obj
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not DCP metadata")


def safe_reader(path: str | Path) -> Any:
    """A DCP `FileSystemReader` of `path` whose `.metadata` is unpickled with the restricted unpickler above."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def load_sharded(path: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """Fill `state` (this rank's tensors / DTensors, in place) from the DCP checkpoint at `path`; collective."""
    import torch.distributed.checkpoint as dcp

    try:
        reader = safe_reader(path)
        reader.read_metadata()  # fails here with a clear reason (DCP would wrap it in a per-rank exception)
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {str(path)!r}: {err}") from err
    return state


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint (DCP directory or legacy .pt file), or the latest one of a run or checkpoints directory."""
    p = Path(path)
    if p.is_file() or is_sharded_checkpoint(p):
        return p
    if p.is_dir():
        found = Checkpointer(p if (p / "checkpoints").is_dir() else p.parent).latest()
        if found is None and p.name == "checkpoints":
            found = Checkpointer(p.parent).latest()
        if found is not None:
            return found
    raise ValueError(f"checkpoint {str(path)!r}: not a checkpoint or a run directory with checkpoints")


def read_checkpoint(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], Config, Path]:
    """The model state dict, config (a `Config`) and path of a checkpoint, or of a run directory's latest one.

    The one place the evaluation, export and visualisation commands read a checkpoint, so a change of checkpoint
    format changes one function.
    """
    try:
        path = resolve_checkpoint_path(checkpoint)
    except ValueError:
        raise ValueError(f"--checkpoint {str(checkpoint)!r}: not a checkpoint or a run directory with checkpoints"
                         ) from None
    ckpt = load_consolidated(path)  # full tensors on the CPU, whatever strategy and world size saved it
    for key in ("model", "config"):
        if not ckpt.get(key):
            raise ValueError(f"checkpoint {str(path)!r} has no {key!r} entry")
    return ckpt["model"], config_from_dict(ckpt["config"]), path


def load_consolidated(path: str | Path, prefixes: tuple[str, ...] = ("model.",)) -> dict[str, Any]:
    """Full (unsharded) state of a checkpoint on the CPU, without a process group: for eval and export.

    `path`: a sharded checkpoint directory, a legacy `.pt` file, or a run / checkpoints directory (its latest).
    Returns {"step": int, "config": dict, "path": str, "model": {name: tensor}} with the IBOT module's names
    (`student.*`, `teacher.*`, `cls_center`, `patch_center`), whatever strategy and world size saved it.
    Only the tensors under `prefixes` of the sharded checkpoint are read (not the optimizer state).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve_checkpoint_path(path)
    if path.is_file():
        return {**load_checkpoint(path), "path": str(path)}
    reader = safe_reader(path)
    try:
        metadata = reader.read_metadata()
        template = {
            key: torch.empty(md.size, dtype=md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata) and key.startswith(prefixes)
        }
        with _single_process_quiet():
            dcp.load(template, storage_reader=reader, no_dist=True)
        meta = json.loads((path / META).read_text())
    except Exception as err:
        raise ValueError(f"cannot load checkpoint {str(path)!r}: {err}") from err
    out: dict[str, Any] = {"step": int(meta["step"]), "config": meta.get("config", {}), "path": str(path)}
    for prefix in prefixes:
        out[prefix.rstrip(".")] = {k[len(prefix):]: v for k, v in template.items() if k.startswith(prefix)}
    return out
