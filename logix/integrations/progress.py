"""The HF Trainer's progress as logix shows it: on stderr, never on stdout.

The Trainer's own callbacks print its log dicts (``{'loss': ..., 'epoch': ...}``) to stdout
(``PrinterCallback``, or ``ProgressCallback`` through ``tqdm.write``), where they mix with a
command's results, and its bar writes cursor movements into a log file when a logging pass opens
a second bar. :func:`show_progress` replaces both by :class:`TrainerProgress`: a bar on a
terminal, plain lines elsewhere (:mod:`logix.core.progress`), the log dicts as lines on stderr;
without progress nothing is printed (the logs are still kept in ``state.log_history``).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from logix.core.progress import progress_bar, write


class TrainerProgress(TrainerCallback):
    """Training steps as a progress bar on stderr, and each log dict as a line on stderr."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.step = 0

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self.bar = progress_bar(total=state.max_steps, desc="train", unit="step", leave=True)
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.step)
        self.step = state.global_step

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in logs.items() if k != "total_flos")
        write(f"train step {state.global_step}/{state.max_steps}: {values}")

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def show_progress(trainer: Any, progress: bool) -> Any:
    """Route ``trainer``'s progress through :class:`TrainerProgress` (or silence it when not
    ``progress``): its stdout printers are removed. Returns ``trainer``."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if progress:
        trainer.add_callback(TrainerProgress())
    return trainer
