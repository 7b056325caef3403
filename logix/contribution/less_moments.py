"""LESS, optimizer side: the Adam moments of a checkpoint, by parameter name, and the Adam transform.

The optimizer's ``state_dict`` is keyed by position; :func:`optimizer_moments` matches each
parameter to its name in ``model.named_parameters()`` so that the moments survive in
``optimizer.safetensors`` next to the checkpoint (:func:`save_moments` / :func:`load_moments`).
:func:`adam_transform` is the step Adam would take on a gradient from those moments, in the
``paper`` or the ``code`` variant (:class:`LessVariant`; see :mod:`logix.contribution.less`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from logix.config.choices import ChoiceEnum
from logix.core.checksum import load_tensors, save_tensors
from logix.errors import ConfigError, StatisticsError

_META_KEY = "logix_moments"


class LessVariant(ChoiceEnum):
    """The two LESS formulas (see :mod:`logix.contribution.less`)."""

    PAPER = "paper"  # cosine to the subtask's mean gradient; eps outside the sqrt
    CODE = "code"  # the authors' code: mean of the per-example cosines; eps inside the sqrt


VARIANTS = tuple(LessVariant)
"""Every variant (what is logged by default)."""


def check_variant(variant: str) -> LessVariant:
    """``variant`` as a :class:`LessVariant`.

    Raises:
        ConfigError: not a variant.
    """
    try:
        return LessVariant(variant)
    except ValueError:
        raise ConfigError(f"Unknown LESS variant {variant!r}. Choose between {[v.value for v in LessVariant]}.") from None


@dataclass
class Moments:
    """Adam moments ``exp_avg`` (m) and ``exp_avg_sq`` (v) of each parameter, keyed by its name
    in ``model.named_parameters()``, with the step count and hyper-parameters of its group."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    step: dict[str, float]
    betas: dict[str, tuple[float, float]]
    eps: dict[str, float]
    optimizer: str = ""

    @property
    def names(self) -> list[str]:
        return list(self.exp_avg)


def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def optimizer_moments(model: nn.Module, optimizer: Any) -> Moments:
    """The Adam moments of ``model``'s parameters, keyed by parameter name.

    The optimizer's own ``state_dict`` is keyed by position; here each parameter of the
    optimizer's param groups is matched, by identity, to its name in ``model.named_parameters()``.
    Tensors are copied to the CPU (the optimizer keeps updating its own in place).

    Raises:
        StatisticsError: no optimizer, an optimizer without Adam moments (``exp_avg`` /
            ``exp_avg_sq``, e.g. SGD), or one that has not taken a step yet.
    """
    if optimizer is None:
        raise StatisticsError(
            "No optimizer to read Adam moments from: LESS needs the Trainer's optimizer (the callback "
            "receives it at each checkpoint) or pass one to optimizer_moments(model, optimizer)."
        )
    opt = _unwrap_optimizer(optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = Moments({}, {}, {}, {}, {}, type(opt).__name__)
    for group in opt.param_groups:
        betas = group.get("betas")
        for p in group["params"]:
            state = opt.state.get(p, {})
            name = names.get(id(p))
            if name is None or "exp_avg" not in state or "exp_avg_sq" not in state:
                continue
            if betas is None:
                raise StatisticsError(f"Optimizer {type(opt).__name__} keeps exp_avg but has no betas.")
            moments.exp_avg[name] = state["exp_avg"].detach().to("cpu", torch.float32, copy=True)
            moments.exp_avg_sq[name] = state["exp_avg_sq"].detach().to("cpu", torch.float32, copy=True)
            moments.step[name] = float(state.get("step", 0))
            moments.betas[name] = (float(betas[0]), float(betas[1]))
            moments.eps[name] = float(group.get("eps", 1e-8))
    if not moments.exp_avg:
        raise StatisticsError(
            f"Optimizer {type(opt).__name__} holds no Adam moments (exp_avg / exp_avg_sq) for the model's "
            "parameters: LESS needs Adam or AdamW (the Trainer's default) after at least one step."
        )
    return moments


def save_moments(path: str | Path, moments: Moments) -> None:
    """Write ``moments`` to a safetensors file (atomically); hyper-parameters in its metadata."""
    path = Path(path)
    tensors = {}
    for name in moments.names:
        tensors[f"{name}::exp_avg"] = moments.exp_avg[name].contiguous()
        tensors[f"{name}::exp_avg_sq"] = moments.exp_avg_sq[name].contiguous()
    meta = {"optimizer": moments.optimizer,
            "params": {n: {"step": moments.step[n], "betas": list(moments.betas[n]), "eps": moments.eps[n]}
                       for n in moments.names}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_tensors(tmp, tensors, metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)


def load_moments(path: str | Path) -> Moments:
    """Read moments written by :func:`save_moments`.

    Raises:
        StatisticsError: the file is missing (the checkpoint was logged without
            ``optimizer_states=True``) or is not a moments file.
    """
    path = Path(path)
    if not path.exists():
        raise StatisticsError(
            f"{path} is missing: this checkpoint was logged without the optimizer's Adam moments. Log it "
            "with less_callback(..., optimizer_states=True) (adam_rows=True implies it), or warmup_and_log()."
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = (fh.metadata() or {}).get(_META_KEY)
    if meta is None:
        raise StatisticsError(f"{path} is not a logix optimizer-moments file (no {_META_KEY!r} metadata).")
    meta = json.loads(meta)
    tensors = load_tensors(path)
    params = meta["params"]
    return Moments(
        {n: tensors[f"{n}::exp_avg"] for n in params},
        {n: tensors[f"{n}::exp_avg_sq"] for n in params},
        {n: float(p["step"]) for n, p in params.items()},
        {n: (float(p["betas"][0]), float(p["betas"][1])) for n, p in params.items()},
        {n: float(p["eps"]) for n, p in params.items()},
        meta.get("optimizer", ""),
    )


def adam_transform(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float,
                   eps: float, variant: str = LessVariant.PAPER) -> Tensor:
    """The Adam update direction of ``grad`` from the moments (no bias correction, as in LESS).

    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``; ``paper``: ``m' / (sqrt(v') + eps)``,
    ``code``: ``m' / sqrt(v' + eps)``. ``grad`` may have leading batch dimensions.
    """
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad.square()
    if check_variant(variant) is LessVariant.PAPER:
        return m / (v.sqrt() + eps)
    return m / (v + eps).sqrt()
