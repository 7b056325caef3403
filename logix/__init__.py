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

from logix.capture.run import LogContext, Pass, Run, init, load_run_store
from logix.config import (
    CaptureConfig,
    Config,
    ProjectionConfig,
    ProjectionType,
    StatisticsConfig,
    StoreConfig,
    StoreDtype,
)
from logix.core.statistics import Statistics
from logix.errors import LogixError
from logix.store import Store, load_store

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
    "__version__",
]
