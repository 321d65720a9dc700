"""Frozen backbone features of a labelled dataset, the one extractor k-NN and the linear probe share.

Features are the backbone's cls token (or cls token and mean patch token), fp32 on the CPU, in dataset order. Under
torchrun every rank extracts the features of a strided share of the images (rank r: images r, r + W, ...); the
shares are all-gathered back into dataset order, so the result equals a one-process run.

Also the one reader of what `--checkpoint` names for `ibot eval`, `ibot visualize` and `ibot export`
(`read_model_source`): one of our checkpoints (a run directory, a sharded checkpoint directory or a `.pt` file) is
tried first; anything else is read as released weights (`ibot_engine.model.released.read_released`: an iBOT, DINO,
DINOv2, DINOv3 or timm file, a Hugging Face folder, or one of our exports), whose backbone is built at the file's
own structure (`model_config_for`) with its position embedding fitted once to the evaluation size (`fit_state`).

Shapes: B images of a batch, T = 1 + R + N tokens (cls, R registers, N patches), D feature dim.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.data
from torch import Tensor, nn
from torchvision.transforms import v2

from ibot_engine.checkpoint import read_checkpoint, resolve_checkpoint_path
from ibot_engine.config import Config, ModelConfig
from ibot_engine.data.normalise import IMAGENET_MEAN, IMAGENET_STD
from ibot_engine.distributed import get_rank, get_world_size
from ibot_engine.model.ibot import IBOT, IBOTNetwork
from ibot_engine.model.released import ReleasedWeights, fit_state, model_config_for, read_released
from ibot_engine.preempt import stop_signal_safe_workers

FEATURES = ("cls", "cls+patch")


def eval_transform(image_size: int) -> v2.Compose:
    """PIL image -> normalised float tensor [3, image_size, image_size] (resize only, no crop)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _Transformed(torch.utils.data.Dataset):
    """Applies `transform` to the image of each `(image, label)` pair of `dataset`."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: v2.Compose) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: torch.utils.data.Dataset | Iterable[tuple[Tensor, Tensor]],
    *,
    image_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
    features: str = "cls",
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cls-token features of every image, L2-normalised.

    Args:
        backbone: `forward(images [B, 3, H, W]) -> tokens [B, 1 + R + N, D]` (final norm applied); token 0 is cls,
            the patch tokens start at its `num_prefix_tokens` (1 + R registers; 1 when it has no such attribute).
        data: a dataset of `(PIL image, label)` pairs, which gets the evaluation transform (resize to
            `image_size`, ImageNet normalisation), or an iterable of ready `(images [B, 3, H, W], labels [B])`
            batches, used as is.
        image_size: side the images are resized to (datasets only).
        batch_size: images per forward pass (datasets only).
        device: where the backbone runs.
        num_workers: DataLoader workers for datasets.
        autocast_dtype: e.g. torch.bfloat16 to run the forward under autocast on GPU; features are fp32 anyway.
        features: `cls` (the cls token, [N, D]) or `cls+patch` (cls token and mean patch token concatenated,
            [N, 2D]).
        normalize: L2-normalise each feature row (k-NN); the linear probe standardises raw features instead.

    Returns:
        `(features [N, D or 2D] fp32 on the CPU, unit L2 norm if normalize, labels [N] int64 on the CPU)`, in
        data order.
    """
    if features not in FEATURES:
        raise ValueError(f"features={features!r}: use one of {list(FEATURES)}")
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(
            _Transformed(data, eval_transform(image_size)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            worker_init_fn=stop_signal_safe_workers(),  # k-NN during training: a stop signal is the trainer's
        )
    device = torch.device(device)
    first_patch = getattr(backbone, "num_prefix_tokens", 1)
    was_training = backbone.training
    backbone.eval()
    out, labels = [], []
    try:
        for images, batch_labels in data:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                tokens_BTD = backbone(images.to(device, non_blocking=True))
            feats_BD = tokens_BTD[:, 0].float()
            if features == "cls+patch":
                feats_BD = torch.cat([feats_BD, tokens_BTD[:, first_patch:].float().mean(1)], dim=-1)
            out.append((F.normalize(feats_BD, dim=-1) if normalize else feats_BD).cpu())
            labels.append(torch.as_tensor(batch_labels, dtype=torch.long).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out), torch.cat(labels)


def teacher_backbone(cfg: Config, state: dict[str, Any] | None, device: torch.device,
                     which: str = "teacher") -> torch.nn.Module:
    """The teacher (or student) backbone of a checkpoint's model state, or of a fresh model (seeded by
    train.seed)."""
    torch.manual_seed(cfg.train.seed)
    model = IBOT(cfg.model, cfg.loss)
    if state is not None:
        model.load_state_dict(state)
    return getattr(model, which).backbone.to(device).eval()


@dataclass(frozen=True)
class ModelSource:
    """What `--checkpoint` named: one of our checkpoints (`state` and `cfg` set) or released weights (`released`)."""

    path: Path
    state: dict[str, Tensor] | None = None  # an `IBOT` model state (student.*, teacher.*, centres)
    cfg: Config | None = None  # the run's config
    released: ReleasedWeights | None = None


def _is_our_checkpoint(path: Path) -> bool:
    """A run or checkpoint directory we can resolve, or a file holding our `model` and `config` entries.

    The file is opened with mmap and weights_only, so telling a released file from ours reads no tensor data."""
    if path.is_dir():
        try:
            resolve_checkpoint_path(path)
        except ValueError:
            return False
        return True
    try:
        peek = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # safetensors, a legacy (unmappable) pickle, a damaged file: read_released says which
        return False
    return isinstance(peek, dict) and "model" in peek and "config" in peek


def read_model_source(checkpoint: str | Path, fmt: str = "auto") -> ModelSource:
    """Our checkpoint at `checkpoint` (when `fmt` is auto), else the released weights there.

    Args:
        checkpoint: a run directory, sharded checkpoint directory or `.pt` file of ours; or a released file
            (.pth / .safetensors / ...) or Hugging Face folder.
        fmt: `auto`, or the released format to read it as (one of `ibot_engine.model.released.FORMATS`; our
            checkpoints are then not looked for).

    Raises:
        ValueError: one line naming the file: it does not exist, or it is neither ours nor a released file we read
            (read_released's reason).
    """
    path = Path(checkpoint)
    if fmt == "auto":
        if not path.exists():
            raise ValueError(f"--checkpoint {str(checkpoint)!r}: no such file or folder (not a checkpoint or a run "
                             "directory with checkpoints, nor a released file)")
        if _is_our_checkpoint(path):
            state, cfg, found = read_checkpoint(path)
            return ModelSource(path=found, state=state, cfg=cfg)
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"--checkpoint {str(checkpoint)!r}: not a checkpoint or a run directory with "
                             "checkpoints, nor a Hugging Face folder (config.json + model.safetensors)")
    return ModelSource(path=path, released=read_released(path, fmt))


def released_backbone_state(released: ReleasedWeights, which: str = "teacher") -> dict[str, Tensor]:
    """`VisionTransformer` keys of the file's teacher backbone (`which="teacher"`) or student backbone. A file with one
    network (every backbone-only release) holds it as the student, and serves both. The mask token is kept when the
    file has one."""
    if which not in ("teacher", "student"):
        raise ValueError(f"--which {which!r}: use teacher or student")
    network = released.teacher if which == "teacher" and released.teacher is not None else released.student
    return {k.removeprefix("backbone."): v for k, v in network.items() if k.startswith("backbone.")}


def released_model_config(released: ReleasedWeights, base: ModelConfig, img_size: int | None = None,
                          option: str = "--img-size") -> ModelConfig:
    """`base` with the file's arch, patch size and structure (registers, RoPE, norm eps, ...), at `img_size` (default:
    the file's native size, e.g. 518 for DINOv2's hub files, 224 for RoPE files).

    Raises:
        ValueError: `img_size` (the command's `option`) is not a positive multiple of the file's patch size.
    """
    patch = released.model["patch_size"]
    size = img_size or released.model["img_size"]
    if size <= 0 or size % patch:
        raise ValueError(f"{option} {size} is not a positive multiple of the patch size {patch} of {released.path}")
    base = dataclasses.replace(base, arch=released.model["arch"], patch_size=patch, img_size=size)
    return model_config_for(released, base)


def released_backbone(released: ReleasedWeights, model_cfg: ModelConfig, device: torch.device | str = "cpu",
                      which: str = "teacher") -> torch.nn.Module:
    """The file's backbone (see `released_backbone_state`) as our `VisionTransformer` of `model_cfg`
    (`released_model_config`), fp32, in eval mode, without a mask token; the position embedding is resampled once
    to model_cfg.img_size (`fit_state`).

    Built on the meta device and given the file's tensors (`assign`): no random init of weights that are replaced
    at once (seconds for a ViT-L on the CPU), and no second copy of tensors that are already fp32."""
    state = released_backbone_state(released, which)
    state.pop("mask_token", None)  # a teacher-side backbone: built without one
    state = {k: v.float() for k, v in fit_state(state, model_cfg).items()}
    with torch.device("meta"):
        backbone = IBOTNetwork(model_cfg, student=False).backbone  # the head stays on the meta device, unused
    backbone.load_state_dict(state, strict=True, assign=True)
    return backbone.to(device).eval()


def gather_in_order(local: Tensor, total: int, device: torch.device) -> Tensor:
    """Rows of rank r are items r, r + W, r + 2W, ... of `total`; returns all `total` rows in item order."""
    world = get_world_size()
    if world == 1:
        return local
    per_rank = math.ceil(total / world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    padded = padded.to(device)  # NCCL gathers device tensors; gloo CPU ones
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded)
    # stack -> [per_rank, W, ...]: row j of rank r is item j * W + r; the padding lands past `total`.
    return torch.stack(shards, dim=1).flatten(0, 1)[:total].cpu()


def dataset_features(backbone: torch.nn.Module, dataset: torch.utils.data.Dataset, *, image_size: int,
                     batch_size: int, device: torch.device, amp: torch.dtype | None, features: str = "cls",
                     normalize: bool = True, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """`extract_features` of the whole dataset, split over the ranks of the process group (if any)."""
    rank, world = get_rank(), get_world_size()
    total = len(dataset)  # type: ignore[arg-type]
    if total < world:
        raise ValueError(f"{total} images cannot be split over {world} ranks")
    # Every rank embeds the same number of images (the last one repeated where the split is uneven, then dropped),
    # so every rank runs the same forwards: an FSDP-sharded teacher gathers its parameters in each of them.
    per_rank, own = math.ceil(total / world), len(range(rank, total, world))
    shard = dataset if world == 1 else torch.utils.data.Subset(
        dataset, [min(i, total - 1) for i in range(rank, per_rank * world, world)])
    feats, labels = extract_features(backbone, shard, image_size=image_size, batch_size=batch_size, device=device,
                                     autocast_dtype=amp, features=features, normalize=normalize,
                                     num_workers=num_workers)
    feats, labels = feats[:own], labels[:own]
    return gather_in_order(feats, total, device), gather_in_order(labels, total, device)


def split_features(backbone: nn.Module, datasets: dict[str, torch.utils.data.Dataset], **kwargs: Any
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """`dataset_features` (same keyword arguments) of each named dataset, e.g. the train and val splits."""
    return {name: dataset_features(backbone, dataset, **kwargs) for name, dataset in datasets.items()}
