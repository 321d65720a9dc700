"""The streaming training source of WebDataset shards (`data.shards`): every (rank, worker) slot reads its own
shards, decodes, augments and batches (resolve.py says which shards there are).

Order, for rank r of R and dataloader worker w of W (slot (r, w)); every seed comes from the run seed:
* exact (`data.shard_mode=exact`): the shards are dealt once to the R*W slots, largest first to the slot with the
  fewest samples (manifest counts), so that slots are balanced and the split is the same every epoch. In epoch e
  the worker reads its shards in an order seeded by (seed, e, r, w) through a shuffle buffer seeded the same way,
  and batches B samples at a time (its last incomplete batch is dropped). A rank yields S batches per epoch,
  S = min over ranks of sum over its workers of floor(samples of the slot / B), the same on every rank.
* resampled: each worker draws shards with replacement from all shards, seeded by (seed, e, start batch, r, w),
  and yields its share of the epoch's S = epoch_samples // (B*R) batches.
* A sample's views are seeded by (seed, e, key hash) and its official masks by (seed, e, key hash, view), so a
  sample gets the same views whatever the number of ranks and workers.

Resume: the stream's state is (epoch, batch, samples consumed, and per rank and worker the number of samples the
worker had taken from its shuffle buffer when it made its last consumed batch). In exact mode a resumed worker
re-reads its shards and drops that many samples without decoding them, then continues: across a stop and resume no
sample is lost or repeated. In resampled mode the stream restarts from a fresh deterministic point, seeded by
(seed, epoch, batch). A resume with another world size or worker count restarts the interrupted epoch (warned).

Faults: an unreadable or truncated shard, a corrupt image and a sample without an image are skipped, logged and
counted in `Batch.num_skipped`; an empty shard is logged and counted as one. Before training, local shards are
checked: a pattern matching nothing or shards that are all unreadable stop the run with one error naming them.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data

from ibot_engine.config import DataConfig, MaskConfig
from ibot_engine.data.augment import Augmenter
from ibot_engine.data.batch import Batch, Sample, SampleKey, sample_seed
from ibot_engine.data.masking import seeded_rng
from ibot_engine.data.shards.resolve import (
    IMAGE_KEYS,
    ShardSet,
    assign_shards,
    check_local_shards,
    key_hash,
    resolve_shards,
)
from ibot_engine.data.sources import StreamBase, StreamPlace
from ibot_engine.distributed import is_distributed
from ibot_engine.preempt import stop_signal_safe_workers

logger = logging.getLogger(__name__)

_TAG_SHARDS = 0x5348  # "SH": shard order, shuffle buffer and resampling of a worker


class SkipCounter:
    """Skipped items of one worker since its last batch (reset when a batch takes them); logs each one."""

    def __init__(self) -> None:
        self.count = 0

    def skip(self, what: str, err: object) -> None:
        self.count += 1
        logger.warning("data: skipping %s: %s", what, err)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


class _CheckedTarInfo(tarfile.TarInfo):
    """Notes how a tar stream ended: a proper archive ends with a zero block (EOFHeaderError); a truncated one runs
    out of data at or inside a header, which tarfile otherwise treats as a silent end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.ibot_end = type(err).__name__  # type: ignore[attr-defined]
            raise


def tar_members(stream: Any) -> Iterator[dict[str, Any]]:
    """{"fname", "data"} of the regular files of a tar stream; raises `tarfile.ReadError` when it is truncated
    (a member shorter than its header says, or no end-of-archive block)."""
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
        for info in tar:
            if not info.isreg() or Path(info.name).name.startswith("__"):
                continue
            member = tar.extractfile(info)
            data = member.read() if member is not None else b""
            if len(data) != info.size:
                raise tarfile.ReadError(f"truncated: member {info.name} has {len(data)} of {info.size} bytes")
            yield {"fname": info.name, "data": data}
        if getattr(tar, "ibot_end", None) != "EOFHeaderError":
            raise tarfile.ReadError("truncated: no end-of-archive block")


def read_shard_files(urls: Iterator[str], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Files of each shard, an empty dict after each shard (webdataset's end-of-shard marker).

    Shards are opened by webdataset's `gopen` (local files, http(s), `pipe:` commands). Opening and reading
    failures (a truncated or corrupt tar, a failed command) skip the rest of that shard, counted; so does a shard
    holding nothing."""
    from webdataset.gopen import gopen

    for url in urls:
        files = 0
        stream = None
        try:
            stream = gopen(url)
            for f in tar_members(stream):
                f["__url__"] = url
                files += 1
                yield f
            if files == 0:
                skips.skip(f"empty shard {url}", "no file in it")
        except Exception as err:  # truncated tar, unreadable file, failed pipe command, ...
            skips.skip(f"rest of shard {url} (after {files} files)", f"{type(err).__name__}: {err}")
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception as err:  # a pipe: command that exited non-zero reports here
                    skips.skip(f"shard {url} on close", err)
        yield {}


def shard_samples(urls: Iterator[str], skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples (dicts of key -> bytes, with __key__ and __url__) of the shards, in order."""
    from webdataset.tariterators import group_by_keys

    def handler(err: Exception) -> bool:
        skips.skip("malformed file in a shard", err)
        return True

    return group_by_keys(read_shard_files(urls, skips), handler=handler)


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def _label(sample: dict[str, Any]) -> int:
    raw = sample.get("cls")
    if raw is None:
        return -1
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        return -1


class ShardSamples(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch; each dataloader worker reads its own shards (see the module docstring).

    Yields `(batch, worker, cursor, skipped)`: `batch` what the augmenter's collate makes (a `Batch`, or a
    `RawBatch` the device finishes) with its skip count, `cursor` the number of samples the worker had taken from
    its shuffle buffer when it finished that batch; a last `(None, worker, cursor, skipped)` reports skips after
    the worker's last batch.
    """

    def __init__(self, stream: ShardStream, epoch: int, start_batch: int, cursors: list[int]) -> None:
        self.s = stream
        self.epoch = epoch
        self.start_batch = start_batch
        self.cursors = cursors

    def _urls(self, worker: int, num_workers: int, rng: np.random.Generator) -> Iterator[str]:
        s = self.s
        if s.mode == "exact":
            mine = s.slots[s.rank * num_workers + worker]
            for i in rng.permutation(len(mine)):
                yield s.shards.urls[mine[i]]
        else:
            while True:
                yield s.shards.urls[int(rng.integers(len(s.shards.urls)))]

    def __iter__(self) -> Iterator[tuple[Any, int, int, int]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks its workers in turn from worker 0; a stream resumed after batch k continues with the
        # slot that would have made batch k, so the order is the one of an uninterrupted run.
        worker = (worker + self.start_batch) % num_workers
        s = self.s
        skips = SkipCounter()
        if s.mode == "exact":
            rng = seeded_rng(_TAG_SHARDS, s.seed, self.epoch, s.rank, worker)
            budget = None
        else:
            rng = seeded_rng(_TAG_SHARDS, s.seed, self.epoch, self.start_batch, s.rank, worker)
            remaining = s.steps_per_epoch - self.start_batch
            budget = remaining // num_workers + (worker < remaining % num_workers)
        samples = shard_samples(self._urls(worker, num_workers, rng), skips)
        if s.shuffle_buffer > 1:
            import webdataset as wds

            pyrng = random.Random(int(rng.integers(2**63)))
            samples = wds.filters.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=pyrng)(iter(samples))
        cursor = 0
        skip_until = self.cursors[worker] if s.mode == "exact" else 0
        made = 0
        pending: list[Any] = []
        for sample in samples:
            cursor += 1
            if cursor <= skip_until:  # resume: already consumed before the stop; not decoded
                continue
            item = s.process(sample, self.epoch, skips)
            if item is None:
                continue
            pending.append(item)
            if len(pending) == s.batch_size:
                key = SampleKey(self.epoch, self.start_batch + made * num_workers + worker, 0)
                items = [it._replace(key=key._replace(index=it.index)) for it in pending]
                yield s.augmenter.collate(items, skips.take()), worker, cursor, 0
                pending = []
                made += 1
                if budget is not None and made == budget:
                    return
        yield None, worker, cursor, skips.take()  # skips after the last batch still get counted


class ShardStream(StreamBase):
    """Endless iterable of `Batch` for one rank from WebDataset shards: the shard source of the `BatchStream`
    contract (engine/data/stream.py).

    Attributes: num_samples (samples per epoch), steps_per_epoch, classes, epoch, batch (position of the next
    batch), state_dict() / load_state_dict().
    """

    def __init__(self, shards: ShardSet, data_cfg: DataConfig, mask_cfg: MaskConfig, place: StreamPlace,
                 augmenter: Augmenter | None = None) -> None:
        super().__init__(data_cfg, mask_cfg, place, augmenter)
        self.shards = shards
        self.mode = data_cfg.shard_mode
        self.shuffle_buffer = data_cfg.shuffle_buffer
        self.classes = shards.classes
        self.slots, self.steps_per_epoch, self.num_samples = self._deal(shards, data_cfg)
        self.cursors = [0] * max(self.num_workers, 1)
        self.skipped_total = 0
        self._carried_skips = 0  # reported by workers after their last batch; added to the next batch
        self.skipped_by_epoch: dict[int, int] = {}  # skips this rank's workers reported, by epoch
        logger.info(
            "data: %d shards (%s), %s mode, %d samples/epoch, %d steps per epoch of %d x %d, %d workers, "
            "augment on %s", len(shards.urls), shards.spec, self.mode, self.num_samples, self.steps_per_epoch,
            self.batch_size, self.world_size, self.num_workers,
            "the device" if self.augmenter.on_device else "the CPU workers",
        )

    def _deal(self, shards: ShardSet, data_cfg: DataConfig) -> tuple[list[list[int]], int, int]:
        """(shard indices of each (rank, worker) slot, steps per epoch, samples per epoch); see the module docstring.

        Raises:
            ValueError: some rank gets no full batch, or the sample count is unknown or below one global batch.
        """
        workers = max(self.num_workers, 1)
        global_batch = self.batch_size * self.world_size
        if self.mode == "exact" and shards.counts is not None:
            slots = assign_shards(shards.counts, self.world_size * workers)
            per_rank = [sum(sum(shards.counts[i] for i in slots[r * workers + w]) // self.batch_size
                            for w in range(workers)) for r in range(self.world_size)]
            if min(per_rank) == 0:
                raise ValueError(
                    f"data.shards {shards.spec!r}: {len(shards.urls)} shards of {shards.total} samples give some rank "
                    f"no full batch of {self.batch_size} with {self.world_size} ranks x {workers} workers; "
                    "use more (smaller) shards, fewer workers or a smaller train.batch_size"
                )
            return slots, min(per_rank), data_cfg.epoch_samples or int(shards.total or 0)
        total = data_cfg.epoch_samples or shards.total
        if not total:
            raise ValueError(
                f"data.shards {shards.spec!r} has no manifest giving the number of samples; set data.epoch_samples"
            )
        if int(total) < global_batch:
            raise ValueError(f"data.epoch_samples {total} is less than one global batch of {global_batch}")
        slots = [list(range(s, len(shards.urls), self.world_size * workers)) for s in range(self.world_size * workers)]
        return slots, int(total) // global_batch, int(total)

    # ---- in the workers

    def process(self, sample: dict[str, Any], epoch: int, skips: SkipCounter) -> Sample | None:
        """A raw shard sample -> a `Sample` holding the augmenter's views (its key's batch is set by the collate
        caller); None, counted and logged, when it has no image or the image is corrupt."""
        key = sample.get("__key__", "?")
        where = f"sample {key} of {sample.get('__url__', '?')}"
        data = _image_bytes(sample)
        if data is None:
            skips.skip(where, f"no image ({', '.join(IMAGE_KEYS)}) among {sorted(k for k in sample if k[0] != '_')}")
            return None
        h = key_hash(key)
        try:
            views = self.augmenter.from_bytes(data, sample_seed(self.seed, epoch, h))
        except Exception as err:  # corrupt or truncated image: any decoder error means skip it
            skips.skip(where, f"{type(err).__name__}: {err}")
            return None
        return Sample(views, _label(sample), h, 0, SampleKey(epoch, 0, h))

    # ---- in the training process

    def _start(self) -> Iterator[tuple[Any, int, int, int]]:
        dataset = ShardSamples(self, self.epoch, self.batch, list(self.cursors))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(self.seed), worker_init_fn=stop_signal_safe_workers(),
        )
        return iter(loader)

    def _next_raw(self) -> tuple[Any, tuple[int, int]]:
        """The next (batch, (worker, cursor)) of this epoch; moves to the next epoch when a rank's data runs out."""
        for _ in range(2):
            if self._batches is None:
                self._batches = self._start()
            try:
                while True:
                    batch, worker, cursor, skipped = next(self._batches)
                    skipped += batch.num_skipped if batch is not None else 0
                    self.skipped_by_epoch[self.epoch] = self.skipped_by_epoch.get(self.epoch, 0) + skipped
                    if batch is not None:
                        batch.num_skipped += self._carried_skips
                        self._carried_skips = 0
                        return batch, (worker, cursor)
                    self._carried_skips += skipped  # the worker's skips after its last batch
            except StopIteration:
                if self.batch == 0:
                    raise RuntimeError(
                        f"data.shards {self.shards.spec!r}: rank {self.rank} got no complete batch in epoch "
                        f"{self.epoch}; its shards are unreadable or too small"
                    ) from None
                logger.warning("data: rank %d ran out of samples after %d of %d batches of epoch %d (skipped "
                               "samples); starting epoch %d", self.rank, self.batch, self.steps_per_epoch,
                               self.epoch, self.epoch + 1)
                self._end_epoch()
        raise AssertionError("unreachable")

    def _end_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0
        self.cursors = [0] * max(self.num_workers, 1)
        self.close()  # before the next epoch's workers are forked

    def _advance(self, batch: Batch, token: tuple[int, int]) -> None:
        worker, cursor = token
        self.cursors[worker] = cursor
        self.skipped_total += batch.num_skipped
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self._end_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch to be yielded. With several ranks this gathers every rank's worker cursors
        (a collective: call it on all ranks, as the trainer does)."""
        cursors = [list(self.cursors)]
        if self.world_size > 1 and is_distributed():
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, list(self.cursors))
            cursors = gathered
        return {
            "epoch": self.epoch, "batch": self.batch, "seed": self.seed, "mode": self.mode,
            "samples": self.batch * self.batch_size * self.world_size, "world_size": self.world_size,
            "num_workers": max(self.num_workers, 1), "cursors": cursors,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: exact mode drops the samples already consumed in the epoch, without decoding."""
        if not 0 <= int(state["batch"]) < self.steps_per_epoch:
            raise ValueError(f"data state batch {state['batch']} is outside the {self.steps_per_epoch} batches per "
                             "epoch of these shards and batch size")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.cursors = [0] * max(self.num_workers, 1)
        self.close()
        layout = (state.get("world_size"), state.get("num_workers"), state.get("mode"))
        if layout != (self.world_size, max(self.num_workers, 1), self.mode) or "cursors" not in state:
            if self.batch:
                logger.warning("data: the checkpoint's stream had (world size, workers, mode) %s, now %s: restarting "
                               "epoch %d from its start", layout, (self.world_size, max(self.num_workers, 1),
                                                                  self.mode), self.epoch)
            self.batch = 0
            return
        if self.mode == "exact":
            self.cursors = [int(c) for c in state["cursors"][self.rank if len(state["cursors"]) > 1 else 0]]


def build_shard_stream(data_cfg: DataConfig, mask_cfg: MaskConfig, place: StreamPlace,
                       augmenter: Augmenter | None = None) -> ShardStream:
    """The `ShardStream` of `data.shards` for one rank; checks local shards before any training starts.
    `augmenter`: None for the one `data.augment` names (see `StreamBase`).

    Raises:
        ValueError: the spec matches nothing, no local shard is readable, or the data is smaller than a batch.
    """
    return ShardStream(check_local_shards(resolve_shards(data_cfg.shards)), data_cfg, mask_cfg, place, augmenter)
