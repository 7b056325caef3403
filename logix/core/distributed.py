"""``torch.distributed`` support: who this process is, and the few collectives logix needs.

logix scales out on the engine users already launch with (``torchrun``, ``accelerate launch``):
when a default process group is initialised, a :class:`~logix.capture.run.Run` and the sharded scorer
pick it up automatically. Every collective here is a no-op in a single process, so the same
code runs unchanged with one process or many.

Rules the rest of the package follows:

* **Files of one writer.** Each rank writes only its own files (its store manifest and shards,
  its scoring parts); files every rank needs (``run.json``, statistics, projections) are
  written by rank 0 and read by the others after a barrier. The run root must therefore be a
  filesystem every rank sees (one node's disk, or NFS / Lustre across nodes).
* **Errors reach every rank.** Work done on rank 0 alone runs through :meth:`Dist.on_main`,
  which broadcasts either its result or its error, so a failure on one rank never leaves the
  others waiting at a barrier forever.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from logix.config.choices import ChoiceEnum
from logix.errors import DistributedError, LogixError

T = TypeVar("T")


class Backend(ChoiceEnum):
    """The ``torch.distributed`` backends logix starts a group with."""

    NCCL = "nccl"  # one GPU per local rank
    GLOO = "gloo"  # CPU


class _Outcome(enum.Enum):
    """What :meth:`Dist.on_main` sends from rank 0: a result or an error."""

    OK = "ok"
    ERROR = "error"
    NONE = ""  # what the other ranks hold before the broadcast


@dataclass(frozen=True)
class Dist:
    """The process group a run belongs to (``world_size == 1``: a single process)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls, enabled: bool | None = None) -> Dist:
        """The default process group when one is initialised (and ``enabled`` is not False)."""
        if enabled is False or not initialized():
            return cls()
        import torch.distributed as dist

        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops in one process) ------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The elementwise sum of ``tensor`` over ranks (a new CPU tensor of the same dtype)."""
        if not self.active:
            return tensor.clone()
        import torch.distributed as dist

        work = tensor.detach().to(collective_device(), copy=True).contiguous()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to("cpu")

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its (picklable) result on every rank.

        An exception on rank 0 is re-raised on every rank (same type when it can be rebuilt
        from its message, else :class:`DistributedError`), so no rank waits forever."""
        if not self.active:
            return fn()
        result: tuple[_Outcome, Any]
        if self.is_main:
            try:
                result = (_Outcome.OK, fn())
            except BaseException as exc:  # sent to the other ranks, then raised here too
                self.broadcast_object((_Outcome.ERROR, (type(exc), str(exc))))
                raise
        else:
            result = (_Outcome.NONE, None)
        result = self.broadcast_object(result)
        if result[0] is _Outcome.ERROR:
            raise _rebuild(*result[1], rank=0)
        return result[1]

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every rank unless ``value`` is equal on all ranks."""
        if not self.active:
            return
        values = self.all_gather_object(value)
        bad = [r for r, v in enumerate(values) if v != values[0]]
        if bad:
            raise DistributedError(
                f"The ranks disagree on {what}: rank 0 has {_short(values[0])}, rank {bad[0]} has "
                f"{_short(values[bad[0]])}. Every rank must run the same model and configuration."
            )

    def raise_anywhere(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank passes an error (the first one's)."""
        if not self.active:
            if error is not None:
                raise error
            return
        errors = self.all_gather_object(None if error is None else (type(error), str(error)))
        if error is not None:
            raise error
        for rank, item in enumerate(errors):
            if item is not None:
                raise _rebuild(*item, rank=rank)


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def collective_device() -> torch.device:
    """Where the default group's collectives run: the current CUDA device under NCCL, else CPU."""
    import torch.distributed as dist

    if initialized() and dist.get_backend() == Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rebuild(kind: type, message: str, rank: int) -> BaseException:
    text = f"(on rank {rank}) {message}"
    if isinstance(kind, type) and issubclass(kind, LogixError):
        try:
            return kind(text)
        except TypeError:  # a subclass whose constructor takes other arguments
            return DistributedError(f"{kind.__name__} {text}")
    return DistributedError(f"{getattr(kind, '__name__', kind)} {text}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


def shard_indices(n: int, rank: int | None = None, world_size: int | None = None) -> range:
    """This rank's contiguous share of ``range(n)``: every index on exactly one rank, no padding.

    Unlike ``DistributedSampler`` (which repeats examples so that every rank gets as many), a
    logged example must be logged once; ranks may get up to one example more than others.
    """
    if rank is None or world_size is None:
        d = Dist.current()
        rank, world_size = d.rank, d.world_size
    lo = n * rank // world_size
    hi = n * (rank + 1) // world_size
    return range(lo, hi)


def init_from_launcher(backend: Backend | str | None = None) -> bool:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (``WORLD_SIZE`` > 1); NCCL with one GPU per local rank when CUDA is available,
    else gloo. Returns whether a group of several processes is now initialised."""
    if initialized():
        return torch.distributed.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or (Backend.NCCL if torch.cuda.is_available() else Backend.GLOO)
    if backend == Backend.NCCL:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(str(backend))
    return True


def env_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the launcher's environment (before the group exists)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---- wrapped models --------------------------------------------------------------------------
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / ``torch.compile`` / accelerate wrappers.

    The inner model holds the very same modules (and parameters), so hooks attached to it see
    every forward and backward; calling it directly also skips DDP's gradient all-reduce, which
    logging does not need (and which would force every rank to run as many batches).
    """
    from torch.nn.parallel import DistributedDataParallel

    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
    return model


def canonical_name(name: str) -> str:
    """A module name without wrapper segments (``_fsdp_wrapped_module.`` ...), so that a run
    logged through FSDP names its modules as the plain model does."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    return ".".join(parts)


def check_wrapping(model: nn.Module) -> None:
    """Raise a clear error for wrapped models whose modules logix cannot capture.

    FSDP (``FullyShardedDataParallel``) is supported with ``use_orig_params=True``: the original
    modules and parameters stay visible. Without it, the wrapped modules' weights live in flat
    parameters and their ``requires_grad`` / shapes are not the model's.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDP) and not getattr(module, "_use_orig_params", True):
            raise DistributedError(
                "This model is wrapped by FullyShardedDataParallel with use_orig_params=False; logix "
                "needs the original parameters. Wrap it with FSDP(..., use_orig_params=True), or use "
                "FSDP2 (torch.distributed.fsdp.fully_shard), or log with DDP."
            )


def split_evenly(items: Sequence[T], parts: int) -> list[Sequence[T]]:
    """``items`` in ``parts`` contiguous pieces whose sizes differ by at most one."""
    return [items[len(items) * i // parts: len(items) * (i + 1) // parts] for i in range(parts)]
