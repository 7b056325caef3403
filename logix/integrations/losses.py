"""Per-example losses of a batch: what a logging pass backpropagates.

Every loss here is the **sum** over the batch's examples (and each example's label tokens), so
that the per-example gradients logix captures are those of each example's own loss, whatever
reduction the model or the Trainer would use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.errors import BatchError

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


def summed_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    sample_labels: bool = False,
    generator: torch.Generator | None = None,
    label_class: int | None = None,
    num_classes: int | None = None,
) -> Tensor:
    """Loss summed over the batch's examples and each example's label tokens.

    Causal LM (``labels`` shaped like ``input_ids``): next-token cross-entropy of
    ``logits[:, :-1]`` against ``labels[:, 1:]``, ``-100`` ignored. Classification
    (``labels`` of shape ``(batch,)``): cross-entropy of the logits. The model is called
    without ``labels`` so its own (mean) loss is never formed.

    Args:
        model: the model.
        batch: ``input_ids`` (and ``attention_mask`` ...) and ``labels``.
        sample_labels: replace every real label by one drawn from the model's own predictive
            distribution (same positions): the loss of a true-Fisher statistics pass
            (``Pass.sample_labels``).
        generator: random generator of the draws (on the model's device).
        label_class: classifiers only (``statistics.fisher: expected``): every example's label
            is this class and its loss is weighted by ``sqrt(C p_c)`` (``p`` detached, ``C`` the
            number of classes), so the mean over the ``C`` repeats of a pass (class ``0..C-1``)
            of any gradient second moment is exactly its expectation under the model's labels.
        num_classes: with ``label_class``, the classes the pass enumerates (``Pass.repeats``);
            checked against the logits.

    Raises:
        BatchError: the batch has no ``labels``; ``label_class`` with sequence labels, or with
            logits of another number of classes.
    """
    if "labels" not in batch:
        raise BatchError("summed_loss needs `labels` in the batch (use -100 for tokens without loss).")
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)}
    logits = model(**inputs).logits.float()
    if label_class is not None:
        return expected_class_loss(logits, labels, label_class, num_classes)
    if labels.dim() == 1:
        if sample_labels:
            labels = sample_from_logits(logits, generator)
        return F.cross_entropy(logits, labels, reduction="sum")
    logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    if sample_labels:
        labels = torch.where(labels == -100, labels, sample_from_logits(logits, generator))
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def expected_class_loss(logits: Tensor, labels: Tensor, label_class: int, num_classes: int | None) -> Tensor:
    """``sum_n sqrt(C p_nc) CE(logits_n, c)`` with ``p`` detached: the loss of repeat ``c`` of an
    expected-Fisher pass (see :func:`summed_loss`). Its per-example gradient is
    ``sqrt(C p_c) g_c``, so averaging ``g g^T`` over ``c = 0..C-1`` gives ``sum_c p_c g_c g_c^T``,
    which for softmax cross-entropy is the Gauss-Newton matrix ``J^T (diag p - p p^T) J``."""
    classes = logits.shape[-1]
    if labels.dim() != 1 or logits.dim() != 2:
        raise BatchError(
            "statistics.fisher: expected needs one label per example (a classifier, labels of shape "
            f"(batch,)); got labels of shape {tuple(labels.shape)}. With several label tokens per example "
            "(a language model) the per-example gradient mixes every token's class and enumerating "
            "classes is not exact: use statistics.fisher: true with fisher_samples draws."
        )
    if num_classes is not None and num_classes != classes:
        raise BatchError(
            f"statistics.fisher_classes is {num_classes} but the model outputs {classes} classes: set "
            f"statistics.fisher_classes: {classes}."
        )
    if not 0 <= label_class < classes:
        raise BatchError(f"label_class {label_class} is outside the model's {classes} classes.")
    target = torch.full((logits.shape[0],), label_class, dtype=torch.long, device=logits.device)
    with torch.no_grad():
        weight = (classes * logits.softmax(-1)[:, label_class]).sqrt()
    return (weight * F.cross_entropy(logits, target, reduction="none")).sum()


def sample_from_logits(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One class per row of ``logits`` (n, classes), drawn from ``softmax(logits)``.

    Args:
        logits: ``(n, classes)`` logits.
        generator: The random generator of the draw (None: torch's global one).

    Returns:
        ``(n,)`` class indices (the true Fisher's labels, sampled from the model).
    """
    with torch.no_grad():
        probs = logits.detach().float().softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
