"""Training objectives: focal loss, supervised contrastive loss and their weighted sum (MAL).

Why these three:

* **Focal loss** (Lin et al. 2017) down-weights easy examples; emotion corpora are heavily
  imbalanced (MELD is ~47 % neutral), and a per-class ``alpha`` re-balances further.
* **Supervised contrastive loss** (Khosla et al. 2020, ``L^sup_out``, eq. 2) pulls utterance
  embeddings of the same emotion together.  It needs many negatives, so under data parallelism
  every rank contrasts its anchors against the features of *all* ranks.
* **MALoss** ("multi-objective affective learning") adds them to the LLM's language-model loss.

All three compute in at least float32: fp16/bf16 logits are up-cast first, because ``log(1-p)``
style terms and ``exp(z/t)`` with ``t = 0.07`` lose most of their precision in half formats.
Float64 inputs stay float64 (gradcheck).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import LossConfig

__all__ = [
    "focal_loss",
    "FocalLoss",
    "supcon_loss",
    "SupConLoss",
    "MALoss",
    "MALOutput",
]

_REDUCTIONS = ("mean", "sum", "none")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half/bf16/float32, float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _alpha_tensor(alpha, num_classes: int, device, dtype) -> torch.Tensor | float | None:
    """Normalise ``alpha`` to None, a python float, or a [num_classes] tensor."""
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        return float(alpha)
    a = torch.as_tensor(alpha, dtype=dtype, device=device)
    if a.ndim == 0:
        return float(a)
    if a.ndim != 1 or a.numel() != num_classes:
        raise ValueError(
            f"focal_loss: alpha has {a.numel()} entries (shape {tuple(a.shape)}) but the logits have "
            f"{num_classes} classes; give one weight per class, a single float, or None"
        )
    return a


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha=None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Multi-class softmax focal loss ``FL_i = -alpha[y_i] (1 - p_i)^gamma log p_i``.

    ``p_i`` is the plain softmax probability of the true class, taken from ``log_softmax`` (stable),
    and never recovered from an alpha-weighted cross-entropy (``exp(-alpha*CE)`` is not ``p`` and
    silently corrupts the modulating factor).  ``1 - p`` is computed as ``-expm1(log p)`` so it keeps
    its precision when ``p`` is close to 1.

    Args:
        logits: ``[..., C]`` scores (any float dtype; computed in >= float32).
        target: ``[...]`` class ids; rows equal to ``ignore_index`` contribute nothing.
        gamma: focusing parameter >= 0 (0 with ``alpha=None`` is cross-entropy).
        alpha: None (1 for all classes), a float, or a per-class sequence/tensor of length C.
        reduction: ``"mean"`` (plain mean over non-ignored rows; 0.0, still differentiable, when all
            rows are ignored), ``"sum"`` or ``"none"`` (shape of ``target``, 0 at ignored rows).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"focal_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"focal_loss: logits {tuple(logits.shape)} must be target {tuple(target.shape)} + [num_classes]"
        )
    out_shape = target.shape
    num_classes = logits.shape[-1]
    dtype = _compute_dtype(logits)
    logits = logits.reshape(-1, num_classes).to(dtype)
    target = target.reshape(-1).to(logits.device)

    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = F.log_softmax(logits, dim=-1).gather(1, safe_target[:, None]).squeeze(1)
    loss = -logp
    if gamma != 0:
        # (1-p)^gamma via expm1. gamma == 0 is skipped so that 0**0 never enters the graph; the clamp to
        # the smallest normal float keeps d/dx x^gamma finite for 0 < gamma < 1 when p rounds to 1.
        one_minus_p = (-torch.expm1(logp)).clamp_min(torch.finfo(dtype).tiny)
        loss = loss * one_minus_p.pow(gamma)
    a = _alpha_tensor(alpha, num_classes, logits.device, dtype)
    if isinstance(a, torch.Tensor):
        loss = loss * a[safe_target]
    elif a is not None:
        loss = loss * a
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1).to(dtype)


class FocalLoss(nn.Module):
    """Module form of :func:`focal_loss`.

    A per-class ``alpha`` is a non-persistent buffer: it follows ``.to(device)`` but stays out of
    ``state_dict`` (it comes from the config, and keeping it out lets checkpoints load under a
    different class weighting).
    """

    alpha: torch.Tensor | None

    def __init__(self, gamma: float = 2.0, alpha=None, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"FocalLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.gamma = float(gamma)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.alpha_scalar: float | None = None
        buf = None
        if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
            self.alpha_scalar = float(alpha)
        elif alpha is not None:
            buf = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
            if buf.ndim != 1:
                raise ValueError(
                    f"FocalLoss: alpha must be a float or 1-D per-class weights, got {tuple(buf.shape)}"
                )
        self.register_buffer("alpha", buf, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha if self.alpha is not None else self.alpha_scalar
        return focal_loss(logits, target, self.gamma, alpha, self.reduction, self.ignore_index)

    def extra_repr(self) -> str:
        alpha = self.alpha.tolist() if self.alpha is not None else self.alpha_scalar
        return f"gamma={self.gamma}, alpha={alpha}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------- supervised contrastive


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns this rank's slice.

    Rank r's loss depends on the features of rank s (as contrast/positives), so the exact gradient
    for rank s's features is ``sum_r dL_r/df_s``.  The common "replace the gathered local slice
    with the local tensor" trick keeps only ``dL_s/df_s``; summing in backward (SimCLR's
    GatherLayer) keeps all terms, so after DDP averages parameter gradients the result equals the
    gradient of the mean of the per-rank losses.  Backward is a collective: every rank must
    backpropagate through it (guaranteed by :func:`supcon_loss`, whose result always depends on it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x: [max_n, ...] padded local block
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def _pad_rows(x: torch.Tensor, n: int, value=0) -> torch.Tensor:
    if x.shape[0] == n:
        return x
    pad = x.new_full((n - x.shape[0], *x.shape[1:]), value)
    return torch.cat([x, pad], dim=0)


def _gather_across_ranks(feats: torch.Tensor, labels: torch.Tensor):
    """Gather possibly unequal-sized batches from all ranks (pad to the max, gather sizes, trim).

    Returns ``(all_feats, all_labels, offset, anchor)`` where ``offset`` is the index of this rank's
    first row in the gathered batch and ``anchor`` a graph-connected tensor that must enter the loss.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    n = torch.tensor([feats.shape[0]], device=feats.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    max_n = max(sizes)
    gathered = _AllGatherWithGrad.apply(_pad_rows(feats, max_n))  # [W, max_n, V, D]
    lab = [torch.empty(max_n, dtype=labels.dtype, device=labels.device) for _ in range(world)]
    dist.all_gather(lab, _pad_rows(labels, max_n).contiguous())
    all_feats = torch.cat([gathered[r, : sizes[r]] for r in range(world)])
    all_labels = torch.cat([lab[r][: sizes[r]] for r in range(world)])
    return all_feats, all_labels, sum(sizes[:rank]), gathered


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def supcon_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    *,
    ignore_index: int | None = -100,
    distributed: bool = True,
) -> torch.Tensor:
    """Supervised contrastive loss ``L^sup_out`` (Khosla et al. 2020, eq. 2), no base-temperature factor.

    Every view of every (local) sample is an anchor ``i``; its positives ``P(i)`` are all other views
    with the same label (other views of the same sample included); the denominator runs over all
    views except the anchor itself::

        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t) )

    The loss is the mean of ``l_i`` over anchors that have at least one positive (a class seen once,
    with one view, has none: it only serves as a negative).  If no anchor has a positive the result
    is 0.0, still connected to the graph.  ``log_softmax``-style log-sum-exp subtracts the row max.

    Args:
        features: ``[N, D]`` or ``[N, V, D]`` (V views); L2-normalised here.
        labels: ``[N]`` integer labels; rows equal to ``ignore_index`` are dropped entirely (neither
            anchors nor contrast).
        temperature: ``t`` above.
        distributed: when torch.distributed is initialised with world size > 1 (and this is True),
            features/labels of all ranks are gathered (unequal batch sizes are fine) and serve as
            positives/negatives, while anchors stay the local samples; gradients flow back to the
            owning rank (see :class:`_AllGatherWithGrad`).  Every rank must then call this function
            and backpropagate.  Pass False to compute a purely local loss (e.g. rank-0-only eval).
    """
    if temperature <= 0:
        raise ValueError(f"supcon_loss: temperature must be > 0, got {temperature}")
    if features.ndim == 2:
        features = features[:, None, :]
    if features.ndim != 3:
        raise ValueError(f"supcon_loss: features must be [N, D] or [N, V, D], got {tuple(features.shape)}")
    labels = labels.reshape(-1).to(features.device)
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"supcon_loss: {features.shape[0]} feature rows but {labels.shape[0]} labels")

    feats = F.normalize(features.to(_compute_dtype(features)), dim=-1)
    if ignore_index is not None:
        keep = labels != ignore_index
        feats, labels = feats[keep], labels[keep]
    zero = feats.sum() * 0.0  # keeps the result connected to the graph in every branch

    if distributed and _distributed():
        all_feats, all_labels, offset, gathered = _gather_across_ranks(feats, labels)
        zero = zero + gathered.sum() * 0.0  # every rank must run the gather's backward collective
    else:
        all_feats, all_labels, offset = feats, labels, 0

    n, v, d = feats.shape
    if n == 0:
        return zero
    anchors = feats.reshape(n * v, d)
    anchor_labels = labels.repeat_interleave(v)
    contrast = all_feats.reshape(-1, d)
    contrast_labels = all_labels.repeat_interleave(v)
    self_idx = offset * v + torch.arange(n * v, device=feats.device)

    not_self = torch.ones(n * v, contrast.shape[0], dtype=torch.bool, device=feats.device)
    not_self[torch.arange(n * v, device=feats.device), self_idx] = False
    positive = (anchor_labels[:, None] == contrast_labels[None, :]) & not_self
    num_pos = positive.sum(1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return zero

    # Only anchors with a positive are scored: their non-self set is never empty, so no -inf rows.
    anchors, positive, not_self, num_pos = (
        anchors[has_pos],
        positive[has_pos],
        not_self[has_pos],
        num_pos[has_pos],
    )
    logits = anchors @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_denominator = torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    log_prob = (logits - log_denominator).masked_fill(~positive, 0.0)
    per_anchor = -log_prob.sum(1) / num_pos.to(log_prob.dtype)
    return per_anchor.mean() + zero


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss`."""

    def __init__(self, temperature: float = 0.07, ignore_index: int | None = -100, distributed: bool = True):
        super().__init__()
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.distributed = distributed

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(
            features, labels, self.temperature, ignore_index=self.ignore_index, distributed=self.distributed
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# ----------------------------------------------------------------------------- multi-objective


@dataclass
class MALOutput:
    """Total loss and its (unweighted) components; a component is None when it was not computed."""

    loss: torch.Tensor
    focal: torch.Tensor | None = None
    supcon: torch.Tensor | None = None
    lm: torch.Tensor | None = None


class MALoss(nn.Module):
    """Multi-objective affective learning: ``w_f * focal + w_s * supcon + w_lm * lm``.

    A term whose weight is 0 or whose inputs are missing is skipped (component None).  Rows with
    label -100 are ignored by both focal and supcon, so the LLM collator's padding convention
    carries through.  Components are reported unweighted so logs stay comparable across weightings.
    """

    IGNORE_INDEX = -100

    def __init__(
        self,
        focal_weight: float = 1.0,
        supcon_weight: float = 0.5,
        lm_weight: float = 1.0,
        focal_gamma: float = 2.0,
        focal_alpha=None,
        temperature: float = 0.07,
    ):
        super().__init__()
        self.focal_weight = float(focal_weight)
        self.supcon_weight = float(supcon_weight)
        self.lm_weight = float(lm_weight)
        self.focal = FocalLoss(gamma=focal_gamma, alpha=focal_alpha, ignore_index=self.IGNORE_INDEX)
        self.supcon = SupConLoss(temperature=temperature, ignore_index=self.IGNORE_INDEX)

    @classmethod
    def from_config(cls, config: LossConfig, **overrides) -> MALoss:
        """The loss of a run config's `loss:` section (the same names, nothing renamed on the way)."""
        return cls(**{**dataclasses.asdict(config), **overrides})

    def forward(
        self,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        lm_loss: torch.Tensor | None = None,
    ) -> MALOutput:
        focal = supcon = lm = None
        terms = []
        if self.focal_weight != 0 and logits is not None and labels is not None:
            focal = self.focal(logits, labels)
            terms.append(self.focal_weight * focal)
        if self.supcon_weight != 0 and features is not None and labels is not None:
            supcon = self.supcon(features, labels)
            terms.append(self.supcon_weight * supcon)
        if self.lm_weight != 0 and lm_loss is not None:
            lm = lm_loss
            terms.append(self.lm_weight * lm_loss.float())
        if not terms:
            raise ValueError(
                "MALoss: nothing to compute; give logits+labels (focal), features+labels (supcon) or lm_loss "
                f"with a non-zero weight (weights: focal={self.focal_weight}, supcon={self.supcon_weight}, "
                f"lm={self.lm_weight})"
            )
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return MALOutput(loss=total, focal=focal, supcon=supcon, lm=lm)

    def extra_repr(self) -> str:
        return f"focal_weight={self.focal_weight}, supcon_weight={self.supcon_weight}, lm_weight={self.lm_weight}"


def heads_outside_loss(loss, classifier: nn.Module, contrastive_head: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The MAL heads that a loss configuration never trains: the classifier without focal loss, the contrastive
    head without SupCon (by name, with their parameters)."""
    parts = {}
    if loss.focal_weight == 0:
        parts["classifier"] = list(classifier.parameters())
    if loss.supcon_weight == 0:
        parts["contrastive_head"] = list(contrastive_head.parameters())
    return parts
