"""Loggers that keep what a run already wrote.

Lightning's `CSVLogger` deletes `metrics.csv` when its version folder exists, so a run resumed
into the same version (`--trainer.logger.init_args.version`, as `make demo` pins it) loses every
row written before the interruption. vglaw's configs use `CSVLogger` from here, which appends.
"""
from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing `metrics.csv` is kept and continued: its columns
    join the header and new rows follow the old ones."""

    def _check_log_dir_exists(self) -> None:
        self._continues = self._fs.isfile(self.metrics_file_path)
        if self._continues:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(set(next(csv.reader(file), [])) - {""})

    def save(self) -> None:
        if self._continues and self.metrics:
            # once, with the union of old and new columns, in the writer's own (sorted) order
            self._record_new_keys()
            self._rewrite_with_new_header(self.metrics_keys)
            self._continues = False
        super().save()


class CSVLogger(LightningCSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` whose `metrics.csv` survives a resume into the same
    version (rows are appended). Same arguments."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
