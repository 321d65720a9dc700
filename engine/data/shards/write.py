"""`ibot shards write`: `write_shards(src, out)` turns an image folder (class sub-folders: labels kept), a flat
folder, or a file list into tar shards written by webdataset's `ShardWriter`, several processes in parallel, and a
`manifest.json`:

    {"format": "ibot-shards/1", "total": N, "classes": [...], "shards": [{"name": "shard-000000.tar",
     "count": n}, ...], "skipped": [{"path": ..., "error": ...}]}

Each sample is `<key>.jpg` (JPEG bytes; other formats and images re-encoded by --max-side are written as JPEG)
plus `<key>.cls` (the label, only when the source has classes). Keys are the source position, zero-padded, so
they are unique in the dataset: the reader derives each sample's augmentation seed and masks from the key.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ibot_engine.data.folder import ImageFolderDataset
from ibot_engine.data.shards.resolve import MANIFEST, MANIFEST_FORMAT
from ibot_engine.data.synthetic import builtin_folder

logger = logging.getLogger(__name__)


def list_source(src: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and class names of an image folder, a flat folder or a file list.

    A file list is a text file with one image path per line, optionally followed by whitespace and an integer
    label; relative paths are relative to the list's folder. `builtin:digits[:train|val]` names the folder of
    scikit-learn's digit scans (engine/data/digits.py).
    """
    if str(src).startswith("builtin:"):
        folder = builtin_folder(str(src))
        if folder is None:
            raise ValueError(f"shard source {str(src)!r}: only the folder-backed built-in datasets (builtin:digits) "
                             "can be written to shards; the generated ones are made on the fly")
        src = folder
    src = Path(src)
    if src.is_dir():
        folder = ImageFolderDataset(src)
        return [(str(p), label) for p, label in folder.samples], list(folder.classes)
    if src.is_file():
        items = []
        for line in src.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            label = -1
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                path, label = parts[0], int(parts[1])
            else:
                path = line.strip()
            full = Path(path) if Path(path).is_absolute() else src.parent / path
            items.append((str(full), label))
        if not items:
            raise ValueError(f"file list {str(src)!r} names no image")
        return items, []
    raise ValueError(f"shard source {str(src)!r} is neither a folder nor a file list")


def encode_image(path: str, max_side: int = 0, quality: int = 90) -> bytes:
    """The JPEG bytes to store for `path`: the file itself when it is an RGB/grey JPEG no larger than `max_side`,
    else a re-encoding (quality `quality`). Decodes the whole image, so unreadable files raise here."""
    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        fmt, mode = image.format, image.mode
        too_big = max_side > 0 and max(image.size) > max_side
        if fmt == "JPEG" and mode in ("RGB", "L") and not too_big:
            return raw
        image = image.convert("RGB")
        if too_big:
            image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return out.getvalue()


_progress_counter: Any = None


def _init_writer(counter: Any) -> None:
    global _progress_counter
    _progress_counter = counter


def _write_part(task: tuple[int, list[tuple[int, str, int]], str, int, float, int, bool]) -> dict[str, Any]:
    """One writer process: items (global index, path, label) into `<out>/.part-<p>-%06d.tar`."""
    import webdataset as wds

    part, items, out, max_count, max_size, max_side, labelled = task
    pattern = str(Path(out) / f".part-{part:04d}-%06d.tar")
    counts: dict[str, int] = {}
    skipped = []
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0) as writer:
        for index, path, label in items:
            try:
                sample = {"__key__": f"{index:09d}", "jpg": encode_image(path, max_side)}
            except Exception as err:  # any decoder error means: list it, skip it
                skipped.append({"path": path, "error": f"{type(err).__name__}: {err}"})
            else:
                if labelled:
                    sample["cls"] = str(label).encode()
                writer.write(sample)
                name = Path(writer.fname).name
                counts[name] = counts.get(name, 0) + 1
            if _progress_counter is not None:
                with _progress_counter.get_lock():
                    _progress_counter.value += 1
    return {"part": part, "counts": counts, "skipped": skipped}


def write_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_count: int = 10000,
    max_size: float = 1e9,
    max_side: int = 0,
    workers: int = 0,
    prefix: str = "shard",
    progress: bool = True,
) -> dict[str, Any]:
    """Write the images of `src` as WebDataset shards `<out>/<prefix>-NNNNNN.tar` plus `<out>/manifest.json`.

    Args:
        src: image folder (class sub-folders give labels), flat folder, or file list (see `list_source`).
        out: output folder (created; must not hold shards already).
        max_count, max_size: per-shard limits in samples and bytes (webdataset's ShardWriter).
        max_side: re-encode images whose longer side exceeds this (0: keep every JPEG as it is).
        workers: writer processes (0: one per CPU, at most 16); the source is cut into that many contiguous parts.
        prefix: shard file name prefix.
        progress: show a progress bar (rich) on a terminal.

    Returns the manifest. Unreadable source files are skipped and listed under "skipped" (and logged).
    """
    items, classes = list_source(src)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.tar")) or (out / MANIFEST).exists():
        raise ValueError(f"output folder {str(out)!r} already holds shards or a manifest; use an empty folder")
    labelled = bool(classes) or any(label >= 0 for _, label in items)
    workers = workers or min(os.cpu_count() or 1, 16)
    workers = max(1, min(workers, len(items)))
    bounds = np.linspace(0, len(items), workers + 1).astype(int)
    tasks = [
        (p, [(i, *items[i]) for i in range(bounds[p], bounds[p + 1])], str(out), max_count, max_size, max_side,
         labelled)
        for p in range(workers)
    ]
    results = _run_writers(tasks, total=len(items), progress=progress)
    shards, skipped = _rename_parts(results, out, prefix)
    for entry in skipped:
        logger.warning("shards: skipped unreadable source file %s (%s)", entry["path"], entry["error"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "total": sum(s["count"] for s in shards),
        "classes": classes,
        "shards": shards,
        "skipped": skipped,
        "source": str(src),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    logger.info("shards: %d images in %d shards under %s, %d unreadable files skipped", manifest["total"],
                len(shards), out, len(skipped))
    return manifest


def _run_writers(tasks: list[Any], *, total: int, progress: bool) -> list[dict[str, Any]]:
    """Run `_write_part` on every task (in this process for one task, else in a pool of one process per task),
    with a progress bar over the `total` items when `progress`; the parts' results."""
    ctx = multiprocessing.get_context("fork")  # workers only read, decode and write files
    counter = ctx.Value("q", 0)
    results = []
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar.start()
        task_id = bar.add_task("", total=total)
    try:
        if len(tasks) == 1:
            _init_writer(counter)
            results = [_write_part(tasks[0])]
        else:
            with ctx.Pool(len(tasks), initializer=_init_writer, initargs=(counter,)) as pool:
                pending = pool.map_async(_write_part, tasks)
                while not pending.ready():
                    if bar is not None:
                        bar.update(task_id, completed=counter.value)
                    pending.wait(0.2)
                results = pending.get()
    finally:
        if bar is not None:
            bar.update(task_id, completed=counter.value)
            bar.stop()
        _init_writer(None)
    return results


def _rename_parts(results: list[dict[str, Any]], out: Path, prefix: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Rename the parts' tar files to `<prefix>-NNNNNN.tar` in source order; (manifest shard entries, skipped)."""
    shards, skipped = [], []
    for result in sorted(results, key=lambda r: r["part"]):
        skipped += result["skipped"]
        for part_name in sorted(result["counts"]):
            name = f"{prefix}-{len(shards):06d}.tar"
            os.replace(out / part_name, out / name)
            shards.append({"name": name, "count": result["counts"][part_name]})
    for stray in out.glob(".part-*.tar"):  # a part ShardWriter opened but never wrote to
        stray.unlink()
    return shards, skipped
