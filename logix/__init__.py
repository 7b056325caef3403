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

from logix.capture.block import LogContext
from logix.capture.passes import Pass
from logix.capture.run import Run, init, load_run_store
from logix.config.choices import ProjectionType, StoreDtype
from logix.config.logger import CaptureConfig, ProjectionConfig, StatisticsConfig, StoreConfig
from logix.config.root import Config
from logix.core.statistics import Statistics
from logix.errors import LogixError
from logix.store.reader import Store, load_store

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
