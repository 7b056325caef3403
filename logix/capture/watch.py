"""Selecting the modules a run captures."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from logix.capture.engine import Watched
from logix.capture.layers import adapter_for, supported_kinds, supported_type_names
from logix.core.distributed import canonical_name
from logix.errors import UnsupportedModuleError, WatchError


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def select_modules(
    model: nn.Module,
    modules: Sequence[str] = (),
    exclude: Sequence[str] = (),
    kinds: Sequence[str] = (),
    trainable_only: bool = True,
) -> list[Watched]:
    """The supported modules of ``model`` that pass the filters, in ``named_modules`` order.

    Args:
        model: The model (module names are matched without the prefixes FSDP, activation
            checkpointing or ``torch.compile`` wrappers add).
        modules: Glob patterns of module names to capture; empty: every supported module.
        exclude: Glob patterns of module names never captured.
        kinds: Module kinds to capture (:func:`supported_kinds`); empty: all.
        trainable_only: Skip modules whose weight has ``requires_grad=False`` (e.g. frozen LoRA
            base layers).

    Returns:
        The modules to capture.

    Raises:
        UnsupportedModuleError: a ``modules`` pattern names a module of an unsupported type
            that no other pattern makes optional.
        WatchError: nothing matched (the message says what each filter removed).
    """
    unknown = sorted(set(kinds) - set(supported_kinds()))
    if unknown:
        raise WatchError(f"Unknown module kinds {unknown}. Choose between {supported_kinds()}.")
    selected: list[Watched] = []
    removed = {"name": 0, "exclude": 0, "kind": 0, "frozen": 0}
    unsupported_named: list[str] = []
    for raw_name, module in model.named_modules():
        name = canonical_name(raw_name)  # FSDP / checkpoint / compile wrappers are looked through
        if not name:
            continue
        adapter = adapter_for(module)
        named = bool(modules) and _matches(name, modules)
        if adapter is None:
            if named and not _has_children(module):
                unsupported_named.append(f"{name} ({type(module).__name__})")
            continue
        reason = _filter_reason(name, module, adapter.kind, modules, exclude, kinds, trainable_only)
        if reason:
            removed[reason] += 1
            continue
        adapter.validate(name, module)
        selected.append(Watched(name, module, adapter, adapter.shape(module)))
    if unsupported_named and not selected:
        raise UnsupportedModuleError(
            f"Modules {unsupported_named} are of a type logix cannot capture. "
            f"Supported types: {supported_type_names()}."
        )
    if not selected:
        raise WatchError(_nothing_matched(model, modules, exclude, kinds, removed))
    return selected


def _has_children(module: nn.Module) -> bool:
    return any(True for _ in module.children())


def _filter_reason(name, module, kind, modules, exclude, kinds, trainable_only) -> str | None:
    if modules and not _matches(name, modules):
        return "name"
    if exclude and _matches(name, exclude):
        return "exclude"
    if kinds and kind not in kinds:
        return "kind"
    if trainable_only and not module.weight.requires_grad:
        return "frozen"
    return None


def _nothing_matched(model, modules, exclude, kinds, removed) -> str:
    total = sum(removed.values())
    parts = [f"watch() matched no module of {type(model).__name__}."]
    if total == 0:
        parts.append(f"It has no supported module; supported types: {supported_type_names()}.")
        return " ".join(parts)
    parts.append(f"Of {total} supported modules:")
    if removed["name"]:
        parts.append(f"{removed['name']} did not match modules={list(modules)};")
    if removed["exclude"]:
        parts.append(f"{removed['exclude']} matched exclude={list(exclude)};")
    if removed["kind"]:
        parts.append(f"{removed['kind']} were not of kinds {list(kinds)};")
    if removed["frozen"]:
        parts.append(
            f"{removed['frozen']} have requires_grad=False (set capture.trainable_only=false "
            "to capture frozen modules whose outputs still require grad);"
        )
    return " ".join(parts).rstrip(";") + "."
