"""The training recipe against the official port, the run's schedule, and runs without logging."""
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import vglaw
from vglaw.cli import main
from vglaw.models.config import ModelArgs
from vglaw.training.module import VGLAWModule, no_weight_decay_names

REPO = Path(__file__).resolve().parents[2]


def test_low_rank_factors_start_as_the_port_initialises_them():
    """P (3C, d_w) and Q (C, d_w) uniform in ±1/sqrt(fan-in), as the port's HeUniform(a=sqrt5)."""
    torch.manual_seed(0)
    gen = vglaw.create_model("vglaw_vitb", text_pretrained=False).weight_generator
    for factor, fan_in in ((gen.P, 32), (gen.Q, 768)):
        bound = 1 / math.sqrt(fan_in)
        assert factor.abs().max() <= bound
        # U(-b, b) has std b / sqrt(3); the former normal init had std b (sqrt(3) larger)
        assert factor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert gen.phi_weight.abs().max() == 0 and gen.phi_bias.abs().max() == 0


def test_weight_decay_spares_stacked_biases_norms_queries_and_position_tables():
    model = vglaw.create_model("vglaw_tiny")
    names = no_weight_decay_names(model)
    stacked = {"aggregator.queries", "aggregator.reduce_bias", "aggregator.norm_weight", "aggregator.norm_bias",
               "weight_generator.phi_bias", "backbone.pos_embed", "backbone.blocks.0.attn.rel_pos_h"}
    assert stacked <= names
    assert not {"weight_generator.P", "weight_generator.Q", "weight_generator.phi_weight",
                "aggregator.reduce_weight", "backbone.blocks.0.attn.qkv.weight"} & names
    module = VGLAWModule(variant="vglaw_tiny", img_size=64)
    decayed = {id(p) for g in module.param_groups() if g["weight_decay"] > 0 for p in g["params"]}
    by_name = dict(module.model.named_parameters())
    assert all(id(by_name[n]) not in decayed for n in stacked)
    assert id(by_name["weight_generator.P"]) in decayed
    assert module.hparams.adam_eps == 1e-6  # the port's AdamW epsilon by default


def test_warm_up_is_linear_from_one_percent_then_steps_down_at_milestones():
    from functools import partial

    from vglaw.training.module import lr_factor

    f = partial(lr_factor, steps_per_epoch=10, warmup_steps=4, warmup_start=0.01, milestones=(1, 2), gamma=0.1)
    assert [f(s) for s in (0, 2, 4, 9, 10, 19, 20)] == pytest.approx([0.01, 0.01 + 0.99 * 2 / 4, 1, 1, 0.1, 0.1, 0.01])
    with pytest.raises(vglaw.errors.UsageError, match="warmup_start"):
        VGLAWModule(variant="vglaw_tiny", img_size=64, warmup_start=-0.1)


def test_the_refcoco_configs_carry_the_port_warm_up_and_epsilon():
    import yaml

    for name in ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco"):
        model = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())["model"]
        assert (model["warmup_steps"], model["warmup_start"], model["adam_eps"]) == (125, 0.01, 1e-6), name


class _StopAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_a_run_cut_short_says_so_and_its_checkpoint_knows_the_plan(shapes_root, tmp_path, capsys):
    from vglaw.data.datamodule import ReferDataModule
    from vglaw.training.schedule import RunProgressBar, ScheduleCheck, schedule_summary

    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=4, num_workers=0)
    bar = RunProgressBar()
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         callbacks=[ScheduleCheck(), _StopAt(2), bar], default_root_dir=tmp_path)
    trainer.fit(VGLAWModule(variant="vglaw_tiny", img_size=64), dm)
    planned = 3 * trainer.num_training_batches
    assert bar.train_progress_bar.total == planned and bar.train_progress_bar.n == 2  # one bar for the run
    err = capsys.readouterr().err
    assert f"TRAINING STOPPED EARLY: 2 of {planned} planned steps" in err
    trainer.save_checkpoint(tmp_path / "cut.ckpt")
    assert schedule_summary(torch.load(tmp_path / "cut.ckpt", weights_only=True)) == (2, planned)


def test_a_run_without_a_logger_drops_the_learning_rate_monitor(shapes_root, tmp_path, capsys):
    main(["fit", "--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
          "--model.variant=vglaw_tiny", "--model.model_args=null", "--model.weight_lap=0", "--model.weight_seg=0",
          "--data.img_size=64", "--data.batch_size=4", "--data.num_workers=0", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
          "--trainer.callbacks+=LearningRateMonitor"])
    assert "trainer.logger is off, so LearningRateMonitor (which only logs) is not used" in capsys.readouterr().err


def test_resuming_into_the_same_logger_version_keeps_the_metrics_already_written(shapes_root, tmp_path):
    import csv

    args = ["--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
            "--model.variant=vglaw_tiny", "--model.model_args=null", "--model.weight_lap=0", "--model.weight_seg=0",
            "--data.img_size=64", "--data.batch_size=4", "--data.num_workers=0", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.version=pinned"]
    assert main(["fit", *args, "--trainer.max_epochs=1"]) == 0
    log = tmp_path / "logs" / "pinned"
    first = list(csv.DictReader(open(log / "metrics.csv")))
    assert main(["fit", *args, "--trainer.max_epochs=2", f"--ckpt_path={log / 'checkpoints' / 'last.ckpt'}"]) == 0
    rows = list(csv.DictReader(open(log / "metrics.csv")))
    assert rows[: len(first)] == [{**r, **{k: "" for k in rows[0].keys() - r.keys()}} for r in first]
    assert {r["epoch"] for r in rows if r.get("val/prec@0.5")} == {"0", "1"}  # both epochs' validation kept


def test_model_args_are_checked_field_by_field_when_the_command_line_is_parsed(tmp_path, capsys):
    """`model.model_args` is a typed `ModelArgs`: an unknown field or a wrong type stops the run
    at parsing, naming it, before any data or model is touched."""
    config = str(REPO / "configs" / "shapes.yaml")
    for bad, needle in (("--model.model_args.colour=1", "colour"), ("--model.model_args.text_cache_size=abc", "abc")):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", config, f"--data.data_root={tmp_path / 'none'}", bad, "--print_config"])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
    # A checkpoint holds plain data: the fields set, as a dict.
    module = VGLAWModule(variant="vglaw_tiny_scratch", img_size=64,
                         model_args=ModelArgs(text_cache_size=7, stem_depth=2))
    assert module.hparams.model_args == {"text_cache_size": 7, "stem_depth": 2}
    assert module.model.config.text_cache_size == 7 and module.model.config.stem_depth == 2
