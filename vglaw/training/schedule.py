"""A run's schedule, seen from outside: one progress bar over the whole run with the time left,
and a loud word when fit stops before the steps it planned.

An epoch-based schedule (warm-up, learning-rate drops at given epochs) only gives the figures it
was tuned for when it runs to its end; a `trainer.max_time` cap or early stopping cuts it at a
point that depends on the machine's speed and load. (An interrupt ends the process; its
`last.ckpt` resumes the schedule with `--ckpt_path`.) `ScheduleCheck` records the
planned optimiser steps in every checkpoint (`checkpoint["schedule"]`) and prints a banner at the
end of a cut run, so nobody mistakes its figures for the full run's.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, Timer, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf


def planned_steps(trainer: pl.Trainer) -> int | None:
    """Optimiser steps the run's schedule plans (max_steps, or max_epochs x steps per epoch);
    None when it is open-ended."""
    steps = trainer.estimated_stepping_batches
    return None if steps is None or math.isinf(steps) else int(steps)


def schedule_summary(checkpoint: dict) -> tuple[int, int | None]:
    """(steps done, steps planned or None) from a training checkpoint's contents."""
    planned = (checkpoint.get("schedule") or {}).get("planned_steps")
    return int(checkpoint.get("global_step", 0)), (int(planned) if planned is not None else None)


def cut_short_message(done: int, planned: int, reason: str) -> str:
    """The banner of a run that stopped early."""
    line = "!" * 78
    return (f"\n{line}\n  TRAINING STOPPED EARLY: {done} of {planned} planned steps ({100 * done / planned:.0f}%), "
            f"{reason}.\n  The schedule did not complete, so these figures are not those of the full run.\n{line}")


class ScheduleCheck(pl.Callback):
    """Store the planned step count in every checkpoint and warn at the end of a fit that did
    not reach it (see the module docstring)."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":  # the plan is fit's; asking for it elsewhere would load the training data
            return
        planned = planned_steps(trainer)
        if planned is not None:
            checkpoint["schedule"] = {"planned_steps": planned}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        planned = planned_steps(trainer)
        if trainer.fast_dev_run or planned is None or trainer.global_step >= planned:
            return
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        reason = (f"the trainer.max_time cap ({timer._duration:.0f} s) was reached" if remaining is not None
                  and remaining <= 0 else "stopped by a callback (e.g. early stopping)")
        if trainer.is_global_zero:
            print(cut_short_message(trainer.global_step, planned, reason), file=sys.stderr)


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar, but the training bar spans the whole run in optimiser steps
    (not one epoch in batches), so its time left is the run's; the description names the epoch."""

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.total = convert_inf(planned_steps(trainer))
        bar.initial = bar.n = trainer.global_step  # a resumed run starts where it was; its rate counts its own steps
        bar.unit = "step"
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        epochs = "" if trainer.max_epochs in (None, -1) else f"/{trainer.max_epochs}"
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}{epochs}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and not bar.disable and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes


def use_run_progress_bar(trainer: pl.Trainer, configured: list | None) -> None:
    """Swap the progress bar the Trainer chose by default (Rich or tqdm) for `RunProgressBar`;
    a bar among the `configured` callbacks is the user's choice and stays."""
    if any(isinstance(c, ProgressBar) for c in configured or []):
        return
    for i, callback in enumerate(trainer.callbacks):
        if isinstance(callback, ProgressBar):
            trainer.callbacks[i] = RunProgressBar()
