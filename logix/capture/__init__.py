"""Hooks that capture per-example (projected) gradients from supported layers."""

from logix.capture.engine import BatchCapture, PassSpec, Watched
from logix.capture.layers import (
    LayerAdapter,
    LayerShape,
    adapter_for,
    register_layer,
    supported_kinds,
    supported_type_names,
)
from logix.capture.watch import select_modules

__all__ = [
    "BatchCapture",
    "LayerAdapter",
    "LayerShape",
    "PassSpec",
    "Watched",
    "adapter_for",
    "register_layer",
    "select_modules",
    "supported_kinds",
    "supported_type_names",
]
