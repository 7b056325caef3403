"""The heads a :class:`~logix.contribution.selector.Selector` fits on standardized embeddings.

Each head of the registry is keyed by a :class:`~logix.config.choices.SelectorHead`:

* ``ridge``: closed form on centred data, the L2 strength chosen by exact leave-one-out error;
* ``logistic``: a linear classifier of the binary label (top ``label_top_p`` of the sample by score);
* ``mlp``: one hidden layer on the standardized scores, early-stopped on a validation split.

``register_head(SelectorHead.X, head)`` adds one (a kind is registered once); a head fits
``(options, z, y) -> fitted`` (a dict; ``options`` carries the selector's hyper-parameters) and
predicts ``(fitted, z) -> scores``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from logix.config.choices import SelectorHead
from logix.contribution.selector_report import top_labels


class HeadOptions(Protocol):
    """The hyper-parameters a head reads (a :class:`~logix.contribution.selector.Selector`'s)."""

    label_top_p: float
    alphas: tuple[float, ...]
    hidden: int
    epochs: int
    weight_decay: float
    seed: int


class Head(Protocol):
    def fit(self, options: HeadOptions, z: np.ndarray, y: np.ndarray) -> dict[str, Any]: ...

    def predict(self, fitted: dict[str, Any], z: np.ndarray) -> np.ndarray: ...


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation (1 where a feature is constant)."""
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-12, std, 1.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, float, float]:
    """Ridge on centred data with the alpha of least exact leave-one-out error.

    ``sklearn.linear_model.RidgeCV`` (efficient exact leave-one-out, the intercept's leverage
    included); returns ``(coefficients, alpha, leave-one-out mean squared error)``.
    """
    from sklearn.linear_model import RidgeCV  # scikit-learn loads on first use

    model = RidgeCV(alphas=np.asarray(alphas, np.float64), fit_intercept=True).fit(x, y)
    return model.coef_, float(model.alpha_), float(-model.best_score_)


class RidgeHead:
    """Ridge regression of the scores; ``alphas`` are relative to the mean squared singular value."""

    def fit(self, options: HeadOptions, z: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        y_mean = y.mean()
        scale = float(np.mean(z**2)) * z.shape[1]  # mean squared singular value
        w, alpha, err = ridge_fit(z, y - y_mean, [a * scale for a in options.alphas])
        return {"w": w, "b": y_mean, "alpha": alpha / scale, "loo_mse": err}

    def predict(self, fitted: dict[str, Any], z: np.ndarray) -> np.ndarray:
        return z @ fitted["w"] + fitted["b"]


class TorchHead:
    """A small network trained full batch with Adam (seeded; the global RNG state is left as it was)."""

    early_stopping = False  # hold out a tenth of the sample (from 20 examples) and stop on its loss

    def build(self, options: HeadOptions, d: int, y: np.ndarray) -> tuple[nn.Module, Tensor, nn.Module]:
        """``(net, target, loss_fn)`` for ``d`` features and the scores ``y``."""
        raise NotImplementedError

    def fit(self, options: HeadOptions, z: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return {"net": self._train(options, z, y), "y_mean": float(y.mean()), "y_std": float(y.std() or 1.0)}

    def _train(self, options: HeadOptions, z: np.ndarray, y: np.ndarray) -> nn.Module:
        gen = torch.Generator().manual_seed(options.seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(options.seed)
        try:
            net, target, loss_fn = self.build(options, z.shape[1], y)
        finally:
            torch.random.set_rng_state(torch_state)
        inputs = torch.tensor(z, dtype=torch.float32)
        n = inputs.shape[0]
        perm = torch.randperm(n, generator=gen)
        n_val = max(1, n // 10) if self.early_stopping and n >= 20 else 0
        val, tr = perm[:n_val], perm[n_val:]
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=options.weight_decay)
        best, best_state, patience = math.inf, None, 0
        for _ in range(options.epochs):
            opt.zero_grad()
            loss = loss_fn(net(inputs[tr]).squeeze(-1), target[tr])
            loss.backward()
            opt.step()
            if n_val:
                with torch.no_grad():
                    v = float(loss_fn(net(inputs[val]).squeeze(-1), target[val]))
                if v < best - 1e-6:
                    best, best_state, patience = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
                else:
                    patience += 1
                    if patience >= 30:
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        return net.eval()

    def predict(self, fitted: dict[str, Any], z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fitted["net"](torch.tensor(z, dtype=torch.float32)).squeeze(-1).double().numpy()


class LogisticHead(TorchHead):
    """Log-odds of the top ``label_top_p`` class."""

    def build(self, options: HeadOptions, d: int, y: np.ndarray) -> tuple[nn.Module, Tensor, nn.Module]:
        target = torch.tensor(top_labels(y, options.label_top_p), dtype=torch.float32)
        return nn.Linear(d, 1), target, nn.BCEWithLogitsLoss()


class MlpHead(TorchHead):
    """One hidden layer on the standardized scores; predictions on the scale of the training scores."""

    early_stopping = True

    def build(self, options: HeadOptions, d: int, y: np.ndarray) -> tuple[nn.Module, Tensor, nn.Module]:
        net = nn.Sequential(nn.Linear(d, options.hidden), nn.GELU(), nn.Linear(options.hidden, 1))
        target = torch.tensor((y - y.mean()) / (y.std() or 1.0), dtype=torch.float32)
        return net, target, nn.MSELoss()

    def predict(self, fitted: dict[str, Any], z: np.ndarray) -> np.ndarray:
        return super().predict(fitted, z) * fitted["y_std"] + fitted["y_mean"]


_REGISTRY: dict[SelectorHead, Head] = {}


def register_head(kind: SelectorHead, head: Head) -> None:
    """Register the head fitted for ``kind``.

    Args:
        kind: The selector head's name.
        head: Has ``fit(options, z, y) -> fitted`` (``options``: the selector's hyper-parameters,
            ``z`` the embeddings, ``y`` the 0/1 labels) and ``predict(fitted, z) -> scores``.

    Raises:
        ValueError: ``kind`` is registered already (a kind may be registered once).
    """
    if kind in _REGISTRY:
        raise ValueError(f"A selector head {kind.value!r} is already registered.")
    _REGISTRY[kind] = head


def registered_heads() -> tuple[SelectorHead, ...]:
    """The kinds a :class:`~logix.contribution.selector.Selector` can fit, in registration order."""
    return tuple(_REGISTRY)


def head_for(kind: SelectorHead) -> Head:
    """The head registered for ``kind`` (KeyError when none is)."""
    return _REGISTRY[kind]


for _kind, _head in (
    (SelectorHead.RIDGE, RidgeHead()),
    (SelectorHead.LOGISTIC, LogisticHead()),
    (SelectorHead.MLP, MlpHead()),
):
    register_head(_kind, _head)
