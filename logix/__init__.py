"""logix: which training data made your model do what it does.

Public API::

    run = logix.init("project", config="configs/logix.yaml")
    run.watch(model)
    for pass_ in run.plan():
        for batch in loader:
            with run(data_id=batch["id"], mask=batch["attention_mask"]):
                model_loss_summed_over_examples(batch).backward()
    store = run.finalize()
"""

from typing import TYPE_CHECKING

from logix.core.install import warn_on_conflicts
from logix.errors import LogixError

warn_on_conflicts()  # another distribution (logix-ai, logix) also installs a top-level `logix`

if TYPE_CHECKING:  # the names below load their modules (and torch) on first use: `logix --help` stays fast
    from logix.capture.block import LogContext
    from logix.capture.passes import Pass
    from logix.capture.run import Run, init, load_run_store
    from logix.config.choices import ProjectionType, StoreDtype
    from logix.config.logger import CaptureConfig, ProjectionConfig, StatisticsConfig, StoreConfig
    from logix.config.root import Config
    from logix.core.statistics import Statistics
    from logix.integrations.score import score
    from logix.store.reader import Store, load_store

_LAZY = {
    "LogContext": "logix.capture.block", "Pass": "logix.capture.passes", "Run": "logix.capture.run",
    "init": "logix.capture.run", "load_run_store": "logix.capture.run", "ProjectionType": "logix.config.choices",
    "StoreDtype": "logix.config.choices", "CaptureConfig": "logix.config.logger",
    "ProjectionConfig": "logix.config.logger", "StatisticsConfig": "logix.config.logger",
    "StoreConfig": "logix.config.logger", "Config": "logix.config.root", "Statistics": "logix.core.statistics",
    "Store": "logix.store.reader", "load_store": "logix.store.reader", "score": "logix.integrations.score",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'logix' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = [
    "CaptureConfig",
    "Config",
    "LogContext",
    "LogixError",
    "Pass",
    "ProjectionConfig",
    "ProjectionType",
    "Run",
    "Statistics",
    "StatisticsConfig",
    "Store",
    "StoreConfig",
    "StoreDtype",
    "init",
    "load_run_store",
    "load_store",
    "score",
    "__version__",
]
