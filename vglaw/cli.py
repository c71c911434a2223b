"""`vglaw` command line: Lightning's fit / validate / test, plus predict, data and bench."""
from __future__ import annotations

import errno
import os
import sys

USAGE = """usage: vglaw <command> [options]

  fit | validate | test   Lightning CLI: --config configs/<dataset>.yaml, --print_config, overrides
  predict                 ground expressions: --image x.jpg --text "left dog" [--model DIR|HUB_ID|CKPT],
                          or many pairs: --pairs pairs.jsonl; --explain draws which words drive which block
  export                  a training checkpoint -> a model folder (--onnx: an ONNX file)
  ablate                  what the language-adaptive weights do: a split evaluated with the language removed
  data shapes             generate the synthetic shapes dataset in the refer format
  data check              check a prepared refer-format folder and print per-split counts
  bench                   parameters, FLOPs, latency, throughput and memory (writes bench/results.json)

Run `vglaw <command> --help` for the options of each. A mistake in what you give (a file, a field,
a value) is reported in one line per problem, with exit code 2."""


# Failures of the place a command works in (a full disk, a quota, a read-only mount, a folder
# that vanished under it), found at the end of the work: one line, not a traceback.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENOENT)


def count_devices(devices, accelerator: str = "auto") -> int:
    """Processes per node that Lightning will start for a `trainer.devices` value."""
    import torch

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
    """The metric that picks the best checkpoint, on the first validation split: gIoU for a
    generalised model, Prec@0.5 for one with a box head, mIoU for a mask-only model (which logs
    no Prec@0.5)."""
    from vglaw.models.factory import is_generalised

    split = (val_splits or ["val"])[0]
    metric = "giou" if variant and is_generalised(variant) else "miou" if task == "mask" else "prec@0.5"
    return f"{split}/{metric}"


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
    import shutil

    from vglaw.errors import UsageError
    from vglaw.training.callbacks import run_files

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


def lightning_main(args: list[str]) -> None:
    from pytorch_lightning.cli import LightningCLI

    # vglaw's own option, not Lightning's: `fit --overwrite` may replace an earlier run's files
    # in the checkpoint and log folders it writes to (refused otherwise).
    overwrite = "--overwrite" in args
    explicit = args != sys.argv[1:]
    args = [a for a in args if a != "--overwrite"]

    from vglaw.data.datamodule import ReferDataModule
    from vglaw.training.callbacks import Checkpoint, ExportModel, RNGState
    from vglaw.training.module import VGLAWModule
    from vglaw.training.schedule import ScheduleCheck, use_run_progress_bar

    class VGLAWCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # Settings the model and the data must agree on are given once, on one side.
            parser.link_arguments("data.img_size", "model.img_size")
            parser.link_arguments("data.text_encoder", "model.text_encoder")
            parser.link_arguments("model.weight_seg", "data.categories", compute_fn=lambda w: w > 0)
            parser.link_arguments("data.num_categories", "model.seg_classes", apply_on="instantiate")
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
            from pytorch_lightning.plugins.io import TorchCheckpointIO

            from vglaw.training.callbacks import AtomicCheckpointIO

            trainer = super().instantiate_trainer(**kwargs)
            if self.subcommand == "fit":
                refuse_earlier_run(trainer, self.config["fit"].get("ckpt_path"), overwrite)
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            use_run_progress_bar(trainer, self._get(self.config_init, "trainer", default={}).get("callbacks"))
            return trainer

        def before_instantiate_classes(self) -> None:
            import torch

            from vglaw.errors import UsageError
            from vglaw.preflight import check_run

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

    # LightningCLI opens --ckpt_path (for its hyperparameters) before any hook of ours runs:
    # refuse a file that is missing or would need code to load, before it gets there.
    for i, arg in enumerate(args):
        path = arg.split("=", 1)[1] if arg.startswith("--ckpt_path=") else (
            args[i + 1] if arg == "--ckpt_path" and i + 1 < len(args) else None)
        if path and path.lower() not in ("null", "none", "last", "best", "hpc", "registry"):
            from vglaw.safe_pickle import load_torch_file

            load_torch_file(path, "checkpoint (--ckpt_path)")
    # From the console LightningCLI reads sys.argv itself; explicit args are for calls from Python.
    VGLAWCLI(VGLAWModule, ReferDataModule, args=args if explicit or overwrite else None, seed_everything_default=0,
             save_config_kwargs={"overwrite": True})


COMMANDS = {
    "predict": "vglaw.predict",
    "data": "vglaw.data.commands",
    "bench": "vglaw.bench",
    "export": "vglaw.export",
    "ablate": "vglaw.ablate",
    "serve": "vglaw.serve",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    from vglaw.errors import UserError

    try:
        if command in ("fit", "validate", "test"):
            lightning_main(argv)
            return 0
        if command in COMMANDS:
            import importlib

            return importlib.import_module(COMMANDS[command]).main(rest)
    except UserError as err:
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"vglaw {command}: error: {line}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        print(f"vglaw {command}: error: {where}{err.strerror or err} (outputs are written whole or not at all: no "
              "file was left half-written)", file=sys.stderr)
        return 2
    print(f"vglaw: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
