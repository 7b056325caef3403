"""How each supported layer type exposes its per-token activations and output gradients.

For every supported layer the weight gradient of one example is a sum of outer
products over that example's *tokens* (sequence positions, image patches):

    G = sum_t g_t a_t^T          shape (d_out, d_in [+1 for the bias])

where ``a_t`` is the input the weight multiplies (with a constant 1 appended when
the layer has a bias) and ``g_t`` the gradient of the loss with respect to the
layer's output at that token. logix always stores gradients in this canonical
``(d_out, d_in + bias)`` orientation; :meth:`LayerAdapter.param_grad_to_canonical`
maps the layer's own parameter gradients to it (used by tests and docs).

Adapters live in a registry keyed by module class; ``register_layer`` adds one
(duplicates are rejected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logix.core.projection import ModuleProjection
from logix.errors import UnsupportedModuleError


@dataclass(frozen=True)
class LayerShape:
    """Canonical sizes of a captured layer: its weight as a ``d_out x d_in`` matrix.

    Attributes:
        d_in: The activation size, without the bias column.
        d_out: The output size.
        bias: Whether the layer has a bias (the activations gain a constant 1 column).
    """

    d_in: int  # activation size, without the bias column
    d_out: int
    bias: bool

    @property
    def d_in_aug(self) -> int:
        """Activation size including the appended constant 1 of the bias."""
        return self.d_in + int(self.bias)


class LayerAdapter:
    """Base adapter: override the hooks' view of one layer type."""

    kind: str = ""

    def shape(self, module: nn.Module) -> LayerShape:
        raise NotImplementedError

    def validate(self, name: str, module: nn.Module) -> None:
        """Raise ``UnsupportedModuleError`` for configurations we cannot capture exactly."""

    def activations(self, module: nn.Module, inputs: tuple) -> Tensor:
        """Input activations as ``(B, *token_dims, d_in)`` (no bias column)."""
        raise NotImplementedError

    def output_grad(self, module: nn.Module, grad: Tensor) -> Tensor:
        """Output gradient as ``(B, *token_dims, d_out)``."""
        return grad

    def project_activations(
        self, module: nn.Module, inputs: tuple, proj: ModuleProjection, dtype: torch.dtype
    ) -> Tensor:
        """``a_aug @ P_in`` as ``(B, *token_dims, k_in)`` (``a_aug`` itself without projection).

        The bias column is never materialised: ``a_aug @ P = a @ P[:-1] + P[-1]``.
        """
        a = self.activations(module, inputs)
        bias = self.shape(module).bias
        if proj.p_in is None:
            a = a.to(dtype)
            if not bias:
                return a
            return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        prep = proj.prepared(a.device, dtype, bias)
        return F.linear(a.to(dtype), prep.in_weight, prep.in_bias)

    def weights(self, module: nn.Module) -> list[nn.Parameter]:
        params = [module.weight]
        if getattr(module, "bias", None) is not None:
            params.append(module.bias)
        return params

    def param_grad_to_canonical(self, module: nn.Module, grads: list[Tensor]) -> Tensor:
        """Map parameter gradients (``weights`` order) to the canonical ``(d_out, d_in_aug)``."""
        w = grads[0].reshape(grads[0].shape[0], -1)
        if len(grads) == 1:
            return w
        return torch.cat([w, grads[1].reshape(-1, 1)], dim=1)


class LinearAdapter(LayerAdapter):
    kind = "linear"

    def shape(self, module: nn.Module) -> LayerShape:
        return LayerShape(module.in_features, module.out_features, module.bias is not None)

    def activations(self, module: nn.Module, inputs: tuple) -> Tensor:
        return inputs[0]


class Conv1DAdapter(LayerAdapter):
    """HF ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``(d_in, d_out)``."""

    kind = "conv1d"

    def shape(self, module: nn.Module) -> LayerShape:
        d_in, d_out = module.weight.shape
        return LayerShape(d_in, d_out, module.bias is not None)

    def activations(self, module: nn.Module, inputs: tuple) -> Tensor:
        return inputs[0]

    def param_grad_to_canonical(self, module: nn.Module, grads: list[Tensor]) -> Tensor:
        w = grads[0].T
        if len(grads) == 1:
            return w
        return torch.cat([w, grads[1].reshape(-1, 1)], dim=1)


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: the activation is the one-hot token, so ``a @ P_in`` is a row gather."""

    kind = "embedding"

    def shape(self, module: nn.Module) -> LayerShape:
        return LayerShape(module.num_embeddings, module.embedding_dim, False)

    def validate(self, name: str, module: nn.Module) -> None:
        if module.max_norm is not None:
            raise UnsupportedModuleError(
                f"Module {name!r}: nn.Embedding with max_norm renormalises weights in forward; "
                "logix cannot capture it exactly. Exclude it (capture.exclude) or drop max_norm."
            )
        if module.scale_grad_by_freq:
            raise UnsupportedModuleError(
                f"Module {name!r}: nn.Embedding with scale_grad_by_freq makes an example's gradient "
                "depend on the rest of its batch. Exclude it (capture.exclude) or disable the flag."
            )

    def _token_mask(self, module: nn.Module, idx: Tensor) -> Tensor | None:
        if module.padding_idx is None:
            return None
        return (idx != module.padding_idx).unsqueeze(-1)

    def activations(self, module: nn.Module, inputs: tuple) -> Tensor:
        idx = inputs[0]
        a = F.one_hot(idx, module.num_embeddings).to(torch.float32)
        mask = self._token_mask(module, idx)
        return a if mask is None else a * mask

    def project_activations(
        self, module: nn.Module, inputs: tuple, proj: ModuleProjection, dtype: torch.dtype
    ) -> Tensor:
        if proj.p_in is None:
            return self.activations(module, inputs).to(dtype)
        idx = inputs[0]
        a = proj.prepared(idx.device, dtype, False).p_in[idx]
        mask = self._token_mask(module, idx)
        return a if mask is None else a * mask

    def weights(self, module: nn.Module) -> list[nn.Parameter]:
        return [module.weight]

    def param_grad_to_canonical(self, module: nn.Module, grads: list[Tensor]) -> Tensor:
        return grads[0].T


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with ``groups=1``: tokens are output positions, activations unfolded patches."""

    kind = "conv2d"

    def shape(self, module: nn.Module) -> LayerShape:
        kh, kw = module.kernel_size
        return LayerShape(module.in_channels * kh * kw, module.out_channels, module.bias is not None)

    def validate(self, name: str, module: nn.Module) -> None:
        if module.groups != 1:
            raise UnsupportedModuleError(
                f"Module {name!r}: nn.Conv2d with groups={module.groups} is not supported "
                "(only groups=1). Exclude it with capture.exclude."
            )

    def activations(self, module: nn.Module, inputs: tuple) -> Tensor:
        x = inputs[0]
        if x.dim() == 3:
            raise UnsupportedModuleError("nn.Conv2d on unbatched input: pass a batch (B, C, H, W).")
        pad = module._reversed_padding_repeated_twice
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        if any(pad):
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return cols.transpose(1, 2)  # (B, L, C*kh*kw)

    def output_grad(self, module: nn.Module, grad: Tensor) -> Tensor:
        return grad.flatten(2).transpose(1, 2)  # (B, L, C_out)


_REGISTRY: dict[type, LayerAdapter] = {}


def register_layer(module_type: type, adapter: LayerAdapter) -> None:
    """Register how to capture ``module_type`` (its subclasses too, unless registered themselves).

    Args:
        module_type: The module class, e.g. a custom linear layer.
        adapter: How its activations, output gradients and shape are read.

    Raises:
        ValueError: An adapter is registered for ``module_type`` already (a type may be
            registered once).
    """
    if module_type in _REGISTRY:
        raise ValueError(f"A layer adapter for {module_type.__name__} is already registered.")
    _REGISTRY[module_type] = adapter


register_layer(nn.Linear, LinearAdapter())
register_layer(nn.Embedding, EmbeddingAdapter())
register_layer(nn.Conv2d, Conv2dAdapter())


def _register_optional() -> None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep the core importable without it
        return
    register_layer(Conv1D, Conv1DAdapter())


_register_optional()


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of the most specific registered class of ``module``, if any.

    Args:
        module: A module of the model.

    Returns:
        The adapter of the first class in ``type(module).__mro__`` that is registered; None when
        logix cannot capture the module.
    """
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def supported_kinds() -> list[str]:
    """The kinds of layer logix can capture (``capture.types`` takes these names).

    Returns:
        The sorted ``kind`` of every registered adapter: ``conv1d``, ``conv2d``, ``embedding``,
        ``linear`` and the kinds of adapters added with :func:`register_layer`.
    """
    return sorted({a.kind for a in _REGISTRY.values()})


def supported_type_names() -> list[str]:
    """The class names of the module types logix can capture (for messages and docs).

    Returns:
        The sorted names of the registered module types (``Conv1D``, ``Conv2d``, ``Embedding``,
        ``Linear``, and those added with :func:`register_layer`).
    """
    return sorted(t.__name__ for t in _REGISTRY)


ModuleFilter = Callable[[str, nn.Module], bool]
