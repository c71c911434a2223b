"""`vglaw fit / validate / test`: LightningCLI with vglaw's model, data, callbacks and checks."""
from __future__ import annotations

import shutil
import sys

import torch
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.plugins.io import TorchCheckpointIO

from vglaw.data.datamodule import ReferDataModule
from vglaw.errors import UsageError
from vglaw.io.safe_pickle import load_torch_file
from vglaw.models.loading import is_generalised, monitor_metric
from vglaw.training.callbacks import AtomicCheckpointIO, Checkpoint, ExportModel, RNGState, run_files
from vglaw.training.module import VGLAWModule
from vglaw.training.preflight import check_run
from vglaw.training.schedule import ScheduleCheck, use_run_progress_bar


def count_devices(devices, accelerator: str = "auto") -> int:
    """Processes per node that Lightning will start for a `trainer.devices` value."""
    gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        return max(1, gpus) if text == "-1" or gpus else 1
    return int(text)


def monitor_key(task: str, val_splits: list[str] | None, variant: str | None = None) -> str:
    """The metric that picks the best checkpoint (`monitor_metric`), on the first validation split."""
    return f"{(val_splits or ['val'])[0]}/{monitor_metric(variant, task)}"


LOGGING_CALLBACKS = ("LearningRateMonitor",)  # callbacks that refuse a Trainer without a logger


def drop_logging_callbacks(trainer_cfg) -> list[str]:
    """With `trainer.logger` false or null, remove the configured callbacks that only log (the
    RefCOCO configs' `LearningRateMonitor`, which raises without a logger) and say so in one
    line; returns the names removed."""
    if trainer_cfg.logger not in (False, None) or not trainer_cfg.callbacks:
        return []
    kept, dropped = [], []
    for callback in trainer_cfg.callbacks:
        name = str(getattr(callback, "class_path", type(callback).__name__)).rsplit(".", 1)[-1]
        if name in LOGGING_CALLBACKS:
            dropped.append(name)
        else:
            kept.append(callback)
    if dropped:
        trainer_cfg.callbacks = kept
        print(f"vglaw: trainer.logger is off, so {', '.join(dropped)} (which only logs) is not used", file=sys.stderr)
    return dropped


def refuse_earlier_run(trainer, ckpt_path: str | None, overwrite: bool) -> None:
    """A `fit` that does not resume never mixes with, nor silently replaces, an earlier run's
    checkpoints and metrics in the folders it writes to: refused in one line, or with
    `--overwrite` those files are removed first (said on stderr)."""
    found = [] if ckpt_path else run_files(trainer)
    if not found:
        return
    if not overwrite:
        last = next((p for p in found if p.name == "last.ckpt"), None)
        resume = f"resume it with --ckpt_path {last}, " if last else ""
        raise UsageError(f"{found[0].parent} holds an earlier run ({', '.join(p.name for p in found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): {resume}write elsewhere (--trainer.default_root_dir "
                         "or another logger version), or add --overwrite to replace it")
    if trainer.is_global_zero:
        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"vglaw fit: --overwrite: removed the earlier run's {', '.join(str(p) for p in found)}", file=sys.stderr)


def main(args: list[str]) -> int:
    """`vglaw fit|validate|test ...` (args start with the subcommand)."""
    lightning_main(args)
    return 0


class VGLAWCLI(LightningCLI):
    """LightningCLI with the model and data linked, vglaw's callbacks, the run's checks before
    anything is built, and `--overwrite` (`overwrite`) for a fit into an earlier run's folder."""

    overwrite = False

    def add_arguments_to_parser(self, parser) -> None:
        # Settings the model and the data must agree on are given once, on one side.
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.text_encoder", "model.text_encoder")
        parser.link_arguments("model.weight_seg", "data.categories", compute_fn=lambda w: w > 0)
        parser.link_arguments("data.num_categories", "model.seg_classes", apply_on="instantiate")
        # a generalised model reads 0..N targets per expression; imported data serves either kind
        parser.link_arguments("model.variant", "data.generalised", compute_fn=is_generalised)
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.link_arguments(("model.task", "data.val_splits", "model.variant"), "checkpoint.monitor",
                              compute_fn=monitor_key)
        parser.set_defaults({
            "checkpoint.mode": "max", "checkpoint.save_last": True,
            "checkpoint.filename": "best-{epoch}", "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(RNGState, "rng_state")
        parser.add_lightning_class_args(ExportModel, "export_model")
        parser.add_lightning_class_args(ScheduleCheck, "schedule_check")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            refuse_earlier_run(trainer, self.config["fit"].get("ckpt_path"), self.overwrite)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        use_run_progress_bar(trainer, self._get(self.config_init, "trainer", default={}).get("callbacks"))
        return trainer

    def before_instantiate_classes(self) -> None:
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        cfg = self.config[self.subcommand]
        check_run(self.subcommand, cfg)
        drop_logging_callbacks(cfg.trainer)
        if cfg.data.global_batch_size:
            world = count_devices(cfg.trainer.devices, cfg.trainer.accelerator) * int(cfg.trainer.num_nodes)
            per_step = cfg.data.batch_size * world
            if cfg.data.global_batch_size % per_step:
                raise UsageError(
                    f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of "
                    f"data.batch_size x devices = {cfg.data.batch_size} x {world}; change data.batch_size"
                )
            cfg.trainer.accumulate_grad_batches = cfg.data.global_batch_size // per_step


def lightning_main(args: list[str]) -> None:
    # vglaw's own option, not Lightning's: `fit --overwrite` may replace an earlier run's files
    # in the checkpoint and log folders it writes to (refused otherwise).
    overwrite = "--overwrite" in args
    explicit = args != sys.argv[1:]
    args = [a for a in args if a != "--overwrite"]

    # LightningCLI opens --ckpt_path (for its hyperparameters) before any hook of ours runs:
    # refuse a file that is missing or would need code to load, before it gets there.
    for i, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else (
            args[i + 1] if arg == "--ckpt_path" and i + 1 < len(args) else None)
        if path and path.lower() not in ("null", "none", "last", "best", "hpc", "registry"):
            load_torch_file(path, "checkpoint (--ckpt_path)")
    # From the console LightningCLI reads sys.argv itself; explicit args are for calls from Python.
    if not explicit:  # from the console LightningCLI reads sys.argv itself: without our option
        sys.argv[1:] = args
    cli = type("VGLAWCLI", (VGLAWCLI,), {"overwrite": overwrite})
    cli(VGLAWModule, ReferDataModule, args=args if explicit else None, seed_everything_default=0,
        save_config_kwargs={"overwrite": True})
