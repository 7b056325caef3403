"""The exceptions logix raises.

Every error a user can cause derives from :class:`LogixError`; each subclass also
inherits the built-in exception a caller would naturally catch (``ValueError``,
``TypeError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LogixError(Exception):
    """Base class of every error raised by logix."""


class ConfigError(LogixError, ValueError):
    """A configuration value or key is invalid."""


class RunDirectoryError(LogixError, ValueError):
    """The run directory holds a run that conflicts with the requested one."""


class WatchError(LogixError, ValueError):
    """``Run.watch`` matched nothing, or a matched module cannot be logged."""


class UnsupportedModuleError(WatchError, TypeError):
    """A module type that logix cannot capture."""


class BatchError(LogixError, ValueError):
    """``data_id`` or ``mask`` do not agree with the batch that ran."""


class DuplicateIdError(LogixError, ValueError):
    """An example id was logged twice."""


class CaptureError(LogixError, RuntimeError):
    """Capture did not complete (for example, no gradient reached a module)."""


class PlanError(LogixError, RuntimeError):
    """The run's passes were used out of order."""


class StoreError(LogixError, RuntimeError):
    """The store could not be written or read."""


class StatisticsError(LogixError, RuntimeError):
    """Statistics are missing, frozen, or numerically invalid."""


class DataError(LogixError, ValueError):
    """A data file, record, tokenizer or batch cannot be turned into training examples."""


class DistributedError(LogixError, RuntimeError):
    """A collective failed, or the ranks of a distributed run disagree."""
