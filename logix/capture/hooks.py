"""The hooks of one capture, attached and removed as one set."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.hooks import RemovableHandle


class HookSet:
    """Every hook handle of one capture: the module hooks and the tensor hooks they register.

    ``attach`` calls ``register`` once (it adds the module hooks with :meth:`add`) and does
    nothing while attached; hooks added while attached (tensor hooks registered by a forward
    hook) join the set; ``detach`` removes every handle, and the set can be attached again.
    As a context manager it attaches on entry and detaches on exit, also when the block raises.

    Args:
        register: called with the set on ``attach``; registers the module hooks.
    """

    def __init__(self, register: Callable[[HookSet], None]) -> None:
        self._register = register
        self._handles: list[RemovableHandle] = []
        self.attached = False

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def attach(self) -> HookSet:
        if self.attached:
            return self
        self.attached = True
        try:
            self._register(self)
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        self.attached = False
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self.attach()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.detach()
