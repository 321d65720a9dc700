"""Training-health metrics and the collapse detector.

Self-distillation fails quietly: the loss looks fine while every image gets the same teacher output (the centred
targets turn uniform, or one prototype takes the whole batch) and the features stop meaning anything. These
metrics show it as it happens; they are computed on the device, only on logging steps, from tensors the step
already has, and read back in the logging all-reduce (no extra host sync):

    teacher_cls_entropy        mean over rows of H(p_t), p_t = softmax((t - c) / tau_t), the targets the loss uses
    teacher_cls_entropy_frac   the same / ln K: 1 = uniform targets (collapse), small = confident targets
    teacher_cls_batch_entropy_frac   H(mean_rows p_t) / ln K: near 0 = one prototype takes the batch (collapse)
    teacher_cls_info_frac      batch entropy - mean row entropy, / ln K: the information the cls targets carry about
                               the image (the mutual information of image and prototype over the batch). 0 when every
                               image gets the same target distribution, whether uniform, one prototype or anything
                               in between: the cls term then teaches nothing about the image, however low the row
                               entropy is (a lagging centre leaves the same non-uniform targets for every image)
    teacher_cls_max_prob       mean over rows of max_k p_t
    teacher_patch_entropy(_frac), teacher_patch_max_prob   the same over the masked patch targets
    cls_center_norm, patch_center_norm   ||c||, ||c_patch|| (zero with Sinkhorn-Knopp targets)
    student_cls_std, teacher_cls_std   std over the batch of the L2-normalised backbone cls tokens of the global
                               crops, averaged over dimensions: about 1 / sqrt(D) for spread-out features, 0 when
                               every image has the same embedding (collapse); per rank, averaged over ranks

With Sinkhorn-Knopp targets, p_t is the Sinkhorn-Knopp target distribution.

`CollapseDetector` reads the logged values: when, for `PATIENCE` logging steps in a row, the teacher's targets are
near uniform (entropy above `UNIFORM_FRAC` of ln K) for the cls tokens and for the masked patch tokens alike (the
cls ones alone when the patch term is off), or one prototype takes the batch (batch entropy below `ONE_HOT_FRAC` of
ln K), or the student's or teacher's embedding spread falls below `STD_FRAC` / sqrt(D) and does not grow (at most
`STD_GROWTH` times its value `PATIENCE` - 1 logging steps before) while the cls targets carry no information about
the image (`teacher_cls_info_frac` below `CLS_INFO_FRAC`), it warns once, naming the metric, its value and
the step (`train.on_collapse=warn`), or stops the run with `TrainingCollapsedError` (`train.on_collapse=stop`; the
last checkpoint before it is kept). It starts watching at `start_step` (the trainer passes 10% of the run): a
freshly initialised network maps every image to nearly the same output (with LayerScale 1e-5 exactly the same), so
near-uniform targets in the first steps are the starting point, not a collapse. The same start makes the embedding
spread tiny: a network leaving it spreads its embeddings step by step (with LayerScale 1e-5 on the digits at 64 px,
the former `digits.yaml`, the teacher's std climbs from about 5e-4 at step 10 through the floor 3.6e-3 between steps
30 and 60 while the k-NN rises), so a spread under the floor that is still growing is not a collapse; one that has
fallen there, or stays there, is.
A quieter failure is a warning of its own, `cls_not_learning`: the teacher's cls targets carry no information about
the image (`teacher_cls_info_frac` below `CLS_INFO_FRAC`: every image gets the same target distribution, uniform or
not) for `CLS_WINDOW` logging steps in a row while the teacher's cls embeddings stay close together (spread below
`CLS_SPREAD_FRAC` / sqrt(D)). The patch term may still move and the loss looks healthy, but the cls term teaches
nothing (docs/learning.md: the 64 px digits runs of lightly's example and of `launch/configs/digits.yaml` before
2026-12-07, and the cls-only runs at 32 px, of the former recipe and of the small-data one). Uninformative cls
targets with a wide spread (the former demo recipe, where KoLeo spreads the embeddings and the patch term builds the
features) are not reported. tests/train/test_health.py replays recorded runs of both kinds.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

HEALTH_KEYS = (
    "teacher_cls_entropy", "teacher_cls_entropy_frac", "teacher_cls_batch_entropy_frac", "teacher_cls_info_frac",
    "teacher_cls_max_prob",
    "teacher_patch_entropy", "teacher_patch_entropy_frac", "teacher_patch_max_prob",
    "cls_center_norm", "patch_center_norm", "student_cls_std", "teacher_cls_std",
)

# Uniform: mean row entropy above 99.9% of ln K, i.e. the targets are uniform to three decimals and the term has
# nothing left to teach. Calibrated on 300-step digits runs (docs/learning.md): runs whose features
# unlearned had both targets there (e.g. no LayerScale at 32 px: cls and patch at 0.9999-1.0000, k-NN 65.8 -> 54.7%);
# the 64 px runs that learn, lightly's example and ours, have cls targets at 0.9995-0.9999 but patch targets at
# 0.87-0.96; the 32 px demo recipe keeps cls at 0.97-0.998. A short run's targets stay near uniform even when it
# learns, so 0.98 would flag them all.
UNIFORM_FRAC = 0.999
ONE_HOT_FRAC = 0.05  # entropy of the batch-mean target below 5% of ln K: one prototype for every image
STD_FRAC = 0.05  # embedding spread below 5% of a random direction's 1/sqrt(D): (almost) one embedding for all
# ... unless it is growing: more than this factor above its value PATIENCE - 1 logging steps before (a network leaving
# its near-identity LayerScale start: the former digits.yaml, seed 2, teacher std 1.8e-3 / 3.5e-3 / 3.6e-3 at steps
# 30 / 40 / 50, 7.0e-3 at 100, k-NN 57.8%; it fired there before this rule). A collapsed spread stays flat or falls.
STD_GROWTH = 1.25
PATIENCE = 3  # logging steps in a row
# The cls token is not learning: the cls targets carry almost no information about the image (batch entropy minus
# mean row entropy below 0.01 of ln K, 0.07 nats at K = 1024) while the teacher's spread stays below 0.25 / sqrt(D)
# (0.018 at D = 192), for 5 logging steps. From recorded runs (tests/train/fixtures/health): those whose cls term
# teaches nothing sit at 0.000 with a spread of 0.001-0.011, whether their targets are uniform (the former
# digits.yaml at 64 px, cls-only runs of the former recipe) or the same non-uniform distribution for every image
# (a cls-only run of the small-data recipe at 32 px: row entropy 0.65 of ln K, information 0.000); the small-data
# demo's targets carry 0.07-0.15 of ln K, the 64 px digits runs of the recipe 0.05-0.22, at a spread of 0.05-0.07.
# Row entropy alone cannot tell these apart.
CLS_INFO_FRAC = 0.01
CLS_SPREAD_FRAC = 0.25
CLS_WINDOW = 5


_SPREAD_OF = {"student_cls_std": "student_cls_std", "teacher_cls_std": "teacher_cls_std",
              "cls_not_learning": "teacher_cls_std"}  # detector kind -> the spread metric it watches


class TrainingCollapsedError(RuntimeError):
    """The collapse detector fired with `train.on_collapse=stop`."""


class NonFiniteLossError(RuntimeError):
    """The loss became inf or NaN; raised at the next logging or checkpoint step, before any save of that state."""


def _target_stats(logits: Tensor, center: Tensor, temp: float, chunk: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """(sum of row entropies, sum of row max probabilities, sum of the rows' probabilities [K]) of
    softmax((logits - center) / temp) in fp32, `chunk` rows at a time (bounded memory for many patch rows)."""
    entropy = logits.new_zeros((), dtype=torch.float32)
    max_prob = logits.new_zeros((), dtype=torch.float32)
    prob_sum = logits.new_zeros(logits.shape[-1], dtype=torch.float32)
    for part in logits.split(chunk):
        log_p = F.log_softmax((part.float() - center.float()) / temp, dim=-1)
        p = log_p.exp()
        entropy += -(p * log_p).sum()
        max_prob += p.amax(dim=-1).sum()
        prob_sum += p.sum(0)
    return entropy, max_prob, prob_sum


def embedding_std(tokens: Tensor) -> Tensor:
    """Std over rows of the L2-normalised rows, averaged over dimensions (fp32; 0 when all rows are equal)."""
    x = F.normalize(tokens.float(), dim=-1)
    return x.std(dim=0, correction=0).mean() if x.shape[0] > 1 else x.new_zeros(())


@torch.no_grad()
def health_metrics(
    teacher_cls: Tensor,
    teacher_patch: Tensor,
    cls_center: Tensor,
    patch_center: Tensor,
    teacher_temp: float,
    patch_teacher_temp: float,
    student_cls_tokens: Tensor,
    teacher_cls_tokens: Tensor,
) -> Tensor:
    """The `HEALTH_KEYS` values, in that order, as one fp32 device tensor (no host sync).

    Args:
        teacher_cls: [G*B, K] teacher cls logits (or Sinkhorn-Knopp log-targets with centre 0 and temperature 1).
        teacher_patch: [M, K] teacher logits of the masked tokens (M may be 0: the patch values are then NaN).
        cls_center, patch_center: [K] the centres the loss used.
        teacher_temp, patch_teacher_temp: the temperatures the loss used.
        student_cls_tokens, teacher_cls_tokens: [G*B, D] backbone cls tokens of the global crops.
    """
    log_k = math.log(teacher_cls.shape[-1])
    n_cls, n_patch = teacher_cls.shape[0], teacher_patch.shape[0]  # host ints: shapes, no sync
    cls_entropy, cls_max, cls_probs = _target_stats(teacher_cls, cls_center, teacher_temp)
    cls_entropy, cls_max = cls_entropy / n_cls, cls_max / n_cls
    mean_p = cls_probs / n_cls
    batch_entropy = -(mean_p * mean_p.clamp(min=1e-30).log()).sum()
    if n_patch:
        patch_entropy, patch_max, _ = _target_stats(teacher_patch, patch_center, patch_teacher_temp)
        patch_entropy, patch_max = patch_entropy / n_patch, patch_max / n_patch
    else:
        patch_entropy = patch_max = teacher_cls.new_full((), float("nan"), dtype=torch.float32)
    return torch.stack([
        cls_entropy, cls_entropy / log_k, batch_entropy / log_k, (batch_entropy - cls_entropy) / log_k, cls_max,
        patch_entropy, patch_entropy / log_k, patch_max,
        torch.linalg.vector_norm(cls_center.float()), torch.linalg.vector_norm(patch_center.float()),
        embedding_std(student_cls_tokens), embedding_std(teacher_cls_tokens),
    ])


class CollapseDetector:
    """Watches the logged health metrics (host floats, at logging steps) for a collapse that persists.

    Args:
        embed_dim: D of the backbone (the spread of random directions is 1 / sqrt(D)).
        on_collapse: `warn` (log one warning per kind of collapse) or `stop` (raise `TrainingCollapsedError`).
        patience: logging steps in a row a condition must hold.
        start_step: logging steps before this one are not watched (the network's starting point).
    """

    def __init__(self, embed_dim: int, on_collapse: str = "warn", patience: int = PATIENCE,
                 start_step: int = 0, patch_term: bool = True) -> None:
        if on_collapse not in ("warn", "stop"):
            raise ValueError(f"train.on_collapse={on_collapse!r}: warn or stop")
        self.min_std = STD_FRAC / math.sqrt(embed_dim)
        self.cls_spread = CLS_SPREAD_FRAC / math.sqrt(embed_dim)
        self.patch_term = patch_term
        self.on_collapse = on_collapse
        self.patience = patience
        self.start_step = start_step
        self.streaks: dict[str, int] = {}
        self.streak_values: dict[str, deque[float]] = {}  # std kinds: their last `patience` values in the streak
        self.fired: list[str] = []  # messages of the collapses reported so far
        self.fired_kinds: set[str] = set()

    def conditions(self, m: dict[str, float]) -> dict[str, str]:
        """The collapse conditions that hold in the metrics `m` of one logging step: {kind: description}."""
        found = {}
        if m["teacher_cls_entropy_frac"] > UNIFORM_FRAC:
            cls = f"teacher_cls_entropy_frac={m['teacher_cls_entropy_frac']:.4f} > {UNIFORM_FRAC}"
            patch = m.get("teacher_patch_entropy_frac", math.nan)  # NaN: no masked token this step
            if not self.patch_term:
                found["uniform"] = f"{cls}: the teacher's cls targets are near uniform"
            elif math.isnan(patch) or patch > UNIFORM_FRAC:
                found["uniform"] = (f"{cls}, teacher_patch_entropy_frac={patch:.4f}: the teacher's cls and patch "
                                    "targets are near uniform")
        # teacher_cls_info_frac, from the two entropies it is defined by (recordings from before it was logged too)
        info = m["teacher_cls_batch_entropy_frac"] - m["teacher_cls_entropy_frac"]
        if info < CLS_INFO_FRAC and m["teacher_cls_std"] < self.cls_spread:
            found["cls_not_learning"] = (
                f"teacher_cls_info_frac={info:.4f} < {CLS_INFO_FRAC} (row entropy "
                f"{m['teacher_cls_entropy_frac']:.4f} of ln K) and teacher_cls_std={m['teacher_cls_std']:.2e} < "
                f"{self.cls_spread:.2e}: the cls token is not learning (every image gets the same cls target "
                "distribution and the cls embeddings stay close together: the cls term teaches nothing)")
        if m["teacher_cls_batch_entropy_frac"] < ONE_HOT_FRAC:
            found["one_hot"] = (f"teacher_cls_batch_entropy_frac={m['teacher_cls_batch_entropy_frac']:.4f} < "
                                f"{ONE_HOT_FRAC}: one prototype takes the whole batch (near one-hot targets)")
        # A spread under the floor is a collapse only while the cls targets carry no information about the image:
        # while they do, the head still tells the images apart.
        uninformative = info < CLS_INFO_FRAC
        for who in ("student", "teacher") if uninformative else ():
            key = f"{who}_cls_std"
            if m[key] < self.min_std:
                found[key] = (f"{key}={m[key]:.2e} < {self.min_std:.2e}: the {who}'s cls embeddings are nearly the "
                              "same for every image")
        return found

    def update(self, step: int, m: dict[str, float]) -> list[str]:
        """Feed one logging step's metrics; returns the messages of collapses first reported now (each kind is
        reported once per run, as a warning). Call `stop_if_asked` with them once the step's record is written."""
        found = self.conditions(m) if step >= self.start_step else {}
        self.streaks = {kind: self.streaks.get(kind, 0) + 1 for kind in found}
        # The spread kinds keep their last values in the streak: a spread still growing is a network leaving its
        # start (STD_GROWTH), for the std floors and for the cls token alike.
        self.streak_values = {kind: self.streak_values.get(kind) or deque(maxlen=self.patience)
                              for kind in found if kind in _SPREAD_OF}
        for kind, values in self.streak_values.items():
            values.append(m[_SPREAD_OF[kind]])
        new = []
        for kind, why in found.items():
            values = self.streak_values.get(kind)
            if values and values[-1] > STD_GROWTH * values[0]:
                continue  # still spreading out over the last `patience` steps: leaving the start (STD_GROWTH)
            window = CLS_WINDOW if kind == "cls_not_learning" else self.patience
            if self.streaks[kind] >= window and kind not in self.fired_kinds:
                what = "the cls token is not learning" if kind == "cls_not_learning" else "training collapse"
                message = (f"[{kind}] {what} at step {step}: {why}, for {self.streaks[kind]} logging "
                           "steps in a row. The features are not learning; see docs/learning.md, 'Training health', "
                           "for the usual causes.")
                self.fired_kinds.add(kind)
                self.fired.append(message)
                new.append(message)
                log.warning(message)
        return new

    def stop_if_asked(self, messages: list[str]) -> None:
        """With `on_collapse=stop`, raise `TrainingCollapsedError` for the collapse `update` just reported."""
        if messages and self.on_collapse == "stop":
            raise TrainingCollapsedError(messages[0] + " Stopping (train.on_collapse=stop).")
