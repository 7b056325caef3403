"""Hooks that capture per-example (projected) gradients from supported layers, and the run."""

from logix.capture.block import LogContext
from logix.capture.engine import BatchCapture, Watched
from logix.capture.hooks import HookSet
from logix.capture.layers import (
    LayerAdapter,
    LayerShape,
    adapter_for,
    register_layer,
    supported_kinds,
    supported_type_names,
)
from logix.capture.passes import Pass
from logix.capture.run import Run, init, load_run_store
from logix.capture.spec import PassName, PassSpec, Space
from logix.capture.watch import select_modules

__all__ = [
    "BatchCapture",
    "HookSet",
    "LayerAdapter",
    "LayerShape",
    "LogContext",
    "Pass",
    "PassName",
    "PassSpec",
    "Run",
    "Space",
    "Watched",
    "adapter_for",
    "init",
    "load_run_store",
    "register_layer",
    "select_modules",
    "supported_kinds",
    "supported_type_names",
]
