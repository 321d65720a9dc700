"""What `data.shards` names: shard URLs, their sample counts and classes (from `manifest.json`), checked before
training; and how the shards are dealt to the (rank, worker) slots.

`data.shards` is a folder with a manifest, a brace pattern, or any webdataset URL. `pipe:CMD` URLs run
CMD through the shell (that is how object stores are streamed, e.g. `pipe:aws s3 cp s3://b/train-000001.tar -`),
so a shard spec must never come from an untrusted source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ibot-shards/1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def key_hash(key: str) -> int:
    """Stable non-negative 63-bit hash of a sample key: the sample's identity in seeds, masks and `Batch.indices`."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class ShardSet:
    """The shards of `data.shards`: URLs, per-shard sample counts when known, class names."""

    urls: list[str]
    counts: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    spec: str = ""

    @property
    def total(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None


def _is_local(url: str) -> bool:
    scheme = urllib.parse.urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> str:
    return url[len("file:") :] if url.startswith("file:") else url


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest.get("shards"), list)
        return manifest
    except (ValueError, AssertionError) as err:
        raise ValueError(f"shard manifest {str(path)!r} is not a valid {MANIFEST_FORMAT} manifest: {err}") from None


def resolve_shards(spec: str) -> ShardSet:
    """The shards named by `data.shards`: a folder (its manifest, else its *.tar), a brace pattern, or URLs.

    Several specs may be joined with `::` (webdataset's convention). Counts come from a manifest next to local
    shards. Raises ValueError when the spec is empty, a folder holds no shard, or a local pattern matches no file.
    """
    if not spec.strip():
        raise ValueError("data.shards is empty")
    urls: list[str] = []
    counts: list[int] | None = []
    classes: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if _is_local(part) and Path(_local_path(part)).is_dir():
            folder = Path(_local_path(part))
            manifest = _read_manifest(folder)
            if manifest is not None:
                urls += [str(folder / s["name"]) for s in manifest["shards"]]
                if counts is not None:
                    counts += [int(s["count"]) for s in manifest["shards"]]
                classes = classes or list(manifest.get("classes", []))
            else:
                found = sorted(str(p) for p in folder.glob("*.tar"))
                if not found:
                    raise ValueError(f"data.shards folder {part!r} holds no {MANIFEST} and no .tar shard")
                urls += found
                counts = None
            continue
        expanded = list(braceexpand(part))
        if _is_local(part):
            present = [u for u in expanded if Path(_local_path(u)).exists()]
            if not present:
                raise ValueError(
                    f"data.shards pattern {part!r} matches no file ({len(expanded)} names expanded, first "
                    f"{expanded[0]!r})"
                )
            if len(present) < len(expanded):
                logger.warning("data.shards: %d of %d shards of %s do not exist; they are skipped",
                               len(expanded) - len(present), len(expanded), part)
            folder = Path(_local_path(present[0])).parent
            manifest = _read_manifest(folder)
            known = {str(folder / s["name"]): int(s["count"]) for s in manifest["shards"]} if manifest else {}
            if counts is not None and all(_local_path(u) in known for u in present):
                counts += [known[_local_path(u)] for u in present]
            else:
                counts = None
            if manifest:
                classes = classes or list(manifest.get("classes", []))
            urls += present
        else:
            urls += expanded
            counts = None
    return ShardSet(urls, counts, classes, spec)


def check_local_shards(shards: ShardSet) -> ShardSet:
    """Raise if every local shard is missing, unreadable or empty (one error naming them); warn about some.

    The bad shards stay in the list: the stream skips and counts them when it reaches them. Remote and `pipe:`
    shards are not checked here (that would run the command or fetch the data); a rank that gets no complete
    batch in an epoch raises at run time instead.
    """
    bad = []
    for url in shards.urls:
        if not _is_local(url):
            continue
        try:
            with tarfile.open(_local_path(url), "r|*") as tar:
                if tar.next() is None:
                    bad.append((url, "empty tar"))
        except (OSError, tarfile.TarError) as err:
            bad.append((url, f"{type(err).__name__}: {err}"))
    if bad and len(bad) == len(shards.urls):
        listed = "; ".join(f"{u} ({e})" for u, e in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"data.shards {shards.spec!r}: no shard is readable: {listed}")
    for url, err in bad:
        logger.warning("data.shards: shard %s is unreadable (%s); it will be skipped", url, err)
    return shards


def assign_shards(counts: list[int], num_slots: int) -> list[list[int]]:
    """Shard indices of each slot: largest shard first to the slot with the fewest samples (ties: lowest index)."""
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    load = [0] * num_slots
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        target = min(range(num_slots), key=lambda s: (load[s], s))
        slots[target].append(i)
        load[target] += counts[i]
    return slots


def index_local_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of a local shard file, in archive order, without reading their data: `(key, {extension: (data
    offset, size)})`. Members group into samples as webdataset groups them (the member name up to the first dot of
    its base name); `__`-prefixed names and non-files are left out. `read_member` reads one member back."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            folder, _, name = info.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if info.isreg() and dot and not name.startswith("__"):
                samples.setdefault(f"{folder}/{stem}", {})[ext.lower()] = (info.offset_data, info.size)
    return list(samples.items())


def read_member(path: str | Path, offset: int, size: int) -> bytes:
    """The bytes of one member of a local shard, at the place `index_local_shard` gave."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)
