"""Lightning callbacks and plugins vglaw always installs: exact resume, a `last.ckpt` of every
epoch, atomic checkpoint files, and a model folder at the end of fit."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import TrainerFn

from vglaw.io.atomic import atomic_write
from vglaw.models.loading import export_checkpoint


class RNGState(pl.Callback):
    """Save the torch / NumPy / Python (and CUDA) random states in every checkpoint and restore
    them on resume: shuffling, augmentation and dropout draw from them, so a run resumed from
    an epoch-end checkpoint continues exactly as the uninterrupted one would.

    Only tensors and plain values are stored, so checkpoints stay loadable with
    `torch.load(weights_only=True)`.
    """

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                    "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get("rng_states")
        if not states:
            return
        torch.set_rng_state(states["torch"])
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])


class Checkpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `last.ckpt` is always the last completed epoch.

    Lightning writes `last.ckpt` only in an epoch that also saved a top-k checkpoint, so after
    an epoch without a new best, `last.ckpt` is older than the run, and resuming from it would
    silently redo epochs. Here it is written at the end of every epoch (after validation when
    there is one); an interrupted run leaves the last completed epoch in it.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step = -1

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _ensure_last(self, trainer: pl.Trainer) -> None:
        if (not self.save_last or trainer.fast_dev_run or trainer.sanity_checking
                or trainer.state.fn != TrainerFn.FITTING or self._last_written_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and self._is_epoch_end(trainer):
            self._ensure_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._ensure_last(trainer)

    @staticmethod
    def _is_epoch_end(trainer: pl.Trainer) -> bool:
        """Validation that closes an epoch (not one run every n steps inside it)."""
        loop = trainer.fit_loop.epoch_loop
        return loop.batch_progress.current.ready >= trainer.num_training_batches or loop.done


class ExportModel(pl.Callback):
    """At the end of `fit`, write the best checkpoint (the last if none was ranked) as a model
    folder `model/` beside the logs, for `vglaw predict` and `from_pretrained`."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or trainer.checkpoint_callback is None:
            return
        # Every process asks: under DDP `log_dir` is a broadcast, which rank 0 alone would wait on.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
        if not ckpt or not Path(ckpt).is_file():
            return

        out = Path(log_dir) / "model"
        export_checkpoint(ckpt, out)
        print(f"model folder written to {out} (from {Path(ckpt).name})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but a checkpoint is written to a temporary name beside its
    destination and renamed into place: a full disk, a crash or a second writer never leave a
    truncated `last.ckpt` that looks valid. Remote paths (s3://, ...) go to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)

        with atomic_write(path) as f:
            torch.save(checkpoint, f)


def run_files(trainer: pl.Trainer) -> list[Path]:
    """What an earlier run left where this `fit` will write: checkpoints in the checkpoint
    folder, `metrics.csv` and the exported `model/` in the log folder. Empty for a new folder
    (Lightning's default: a new `version_N` per run); not empty when the version or the
    checkpoint folder is fixed (e.g. `make demo`'s)."""
    cb = trainer.checkpoint_callback
    logger = trainer.loggers[0] if trainer.loggers else None
    log_dir = Path(getattr(logger, "log_dir", None) or trainer.default_root_dir)
    ckpt_dir = Path(cb.dirpath) if cb is not None and cb.dirpath else log_dir / "checkpoints"
    found = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    found += [p for p in (log_dir / "metrics.csv", log_dir / "model") if p.exists()]
    return found
