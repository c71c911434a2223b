"""LightningModule, metrics, CLI, resume, DDP and prediction."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.ops import box_iou

from tests.conftest import TINY_ARGS
from vglaw.cli import main
from vglaw.data.datamodule import ReferDataModule
from vglaw.training.callbacks import RNGState
from vglaw.training.losses import category_loss, lap_attention_loss
from vglaw.training.metrics import GroundingMetrics, box_iou_pairwise
from vglaw.training.module import VGLAWModule

REPO = Path(__file__).resolve().parents[2]


def test_metrics_on_a_case_worked_by_hand():
    m = GroundingMetrics()
    # box IoUs 0.49, 0.5, 0.7: two of three reach 0.5
    m.update(torch.tensor([0, 1, 2]), box_iou=torch.tensor([0.49, 0.5, 0.7]))
    # masks: 10/20 = 0.5 and 90/100 = 0.9 -> mIoU 0.7, but oIoU = 100/120
    m.update(torch.tensor([0, 1]), inter=torch.tensor([10.0, 90.0]), union=torch.tensor([20.0, 100.0]))
    # a repeated sentence (as a distributed sampler pads) counts once
    m.update(torch.tensor([2]), box_iou=torch.tensor([0.1]))
    out = m.compute()
    assert out["prec@0.5"].item() == pytest.approx(2 / 3)
    assert out["miou"].item() == pytest.approx(0.7)
    assert out["oiou"].item() == pytest.approx(100 / 120)
    assert out["miou"].item() != pytest.approx(out["oiou"].item())
    assert out["mask_prec@0.5"].item() == 1.0 and out["mask_prec@0.6"].item() == 0.5
    assert out["mask_prec@0.9"].item() == 0.5


def test_pairwise_box_iou_matches_torchvision():
    torch.manual_seed(0)
    a = torch.rand(6, 2) * 50
    b = torch.rand(6, 2) * 50
    boxes_a = torch.cat([a, a + torch.rand(6, 2) * 30 + 1], 1)
    boxes_b = torch.cat([b, b + torch.rand(6, 2) * 30 + 1], 1)
    torch.testing.assert_close(box_iou_pairwise(boxes_a, boxes_b), box_iou(boxes_a, boxes_b).diagonal())


def test_measure_in_original_pixels(shapes_root):
    """A prediction equal to the letterboxed target scores IoU 1 against the original box and mask."""
    # 144 px: at least the images' size, so the letterbox loses nothing and IoU isolates the mapping
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=144, batch_size=5, num_workers=0)
    batch = next(iter(dm.val_dataloader()[0]))
    module = VGLAWModule(**{**TINY_ARGS, "img_size": 144})
    outputs = {"boxes": batch["boxes"], "mask_logits": (batch["masks"][:, None] - 0.5) * 20}
    got = module.measure(outputs, batch)
    assert got["box_iou"].min() > 0.95
    assert (got["inter"] / got["union"]).min() > 0.9


def test_lap_attention_loss_by_hand():
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1  # exactly the top-left token of a 2x2 grid
    masks[1, :4, :] = 1  # the two top tokens, half each
    uniform = torch.full((2, 2, 2), 0.25)
    assert lap_attention_loss(uniform, masks).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[0.97, 0.01], [0.01, 0.01]], [[0.5, 0.5], [0.0, 0.0]]])
    expected = (-math.log(0.97) + -math.log(0.5)) / 2
    assert lap_attention_loss(peaked, masks).item() == pytest.approx(expected, rel=1e-5)


def test_lap_supervision_is_a_logged_term_that_trains_the_box_head(shapes_root):
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=2, num_workers=0)
    batch = next(iter(dm.val_dataloader()[0]))
    module = VGLAWModule(**TINY_ARGS, weight_lap=2.0)
    outputs = module.model(batch["images"], batch["input_ids"], batch["attention_mask"], return_attention=True)
    terms = module._losses(outputs, batch)
    plain = VGLAWModule(**TINY_ARGS)._losses(outputs, batch)
    assert "lap" in terms and "lap" not in plain
    assert terms["loss"].item() == pytest.approx(plain["loss"].item() + 2.0 * terms["lap"].item(), rel=1e-5)
    terms["lap"].backward()
    assert module.model.box_head.visual_proj.weight.grad.abs().sum() > 0
    assert module.model.box_head.mlp[0].weight.grad is None  # the term reaches the attention only
    with pytest.raises(ValueError, match="weight_lap"):
        VGLAWModule(**{**TINY_ARGS, "task": "mask"}, weight_lap=1.0)


def test_category_loss_by_hand_ignores_crowds_and_names_a_too_small_classifier():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, :, 0, 0] = torch.tensor([0.0, math.log(3.0), 0.0])  # p(class 1) = 3 / 5
    categories = torch.tensor([[[1, 255]]])
    assert category_loss(logits, categories).item() == pytest.approx(-math.log(3 / 5))
    logits[0, :, 0, 1] = torch.tensor([50.0, -50.0, 3.0])  # an ignored pixel changes nothing
    assert category_loss(logits, categories).item() == pytest.approx(-math.log(3 / 5))
    with pytest.raises(ValueError, match="holds class 3 but the model classifies 3"):
        category_loss(logits, torch.tensor([[[3, 0]]]))


def test_category_supervision_is_a_logged_term_and_is_checked(shapes_root):
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=2, num_workers=0,
                         categories=True)
    batch = next(iter(dm.val_dataloader()[0]))
    assert dm.num_categories == dm.split("val").num_categories == 5
    args = {**TINY_ARGS, "variant": "vglaw_tiny_scratch", "seg_classes": dm.num_categories}
    module = VGLAWModule(**args, weight_seg=0.5)
    outputs = module(batch)
    terms = module._losses(outputs, batch)
    plain = VGLAWModule(**args)._losses(outputs, batch)
    assert "seg" in terms and "seg" not in plain
    assert terms["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * terms["seg"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="data.categories: true"):
        module._losses(outputs, {k: v for k, v in batch.items() if k != "categories"})
    with pytest.raises(ValueError, match="from-scratch variant with a category classifier"):
        VGLAWModule(**TINY_ARGS, weight_seg=0.5)
    with pytest.raises(ValueError, match="takes no argument seg_classes"):
        VGLAWModule(**TINY_ARGS, seg_classes=5)


def test_nan_loss_stops_with_step_and_term(shapes_root):
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=2, num_workers=0)
    batch = next(iter(dm.val_dataloader()[0]))
    module = VGLAWModule(**TINY_ARGS)
    with torch.no_grad():
        module.model.box_head.mlp[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"global step 0 .*l1=nan.*giou=nan"):
        module.training_step(batch, 0)


def test_cli_fast_dev_run_and_print_config(shapes_root, tmp_path, capsys):
    args = ["--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
            "--model.variant=vglaw_tiny_scratch", "--data.img_size=64", "--data.batch_size=2", "--data.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    main(["fit", *args, "--trainer.fast_dev_run=2"])
    with pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "variant: vglaw_tiny_scratch" in printed and "img_size: 64" in printed


@pytest.mark.parametrize("name", ["refcoco", "refcoco+", "refcocog", "refclef", "shapes"])
def test_every_config_parses(name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert done.value.code == 0
    assert "dataset: " + name in capsys.readouterr().out


def test_global_batch_size_sets_accumulation(shapes_root, tmp_path, capsys):
    from vglaw.training.lightning import count_devices

    assert count_devices(2, "cpu") == 2 and count_devices("0,1,3") == 3 and count_devices([0]) == 1
    args = ["--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
            "--model.variant=vglaw_tiny_scratch", "--data.img_size=64", "--data.batch_size=2",
            "--data.num_workers=0", "--data.global_batch_size=8", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.fast_dev_run=1"]
    main(["fit", *args])  # 8 = 2 per step x 1 device x 4 accumulated
    assert main(["fit", *args[:-1], "--data.global_batch_size=7", "--trainer.fast_dev_run=1"]) == 2
    assert "not a multiple" in capsys.readouterr().err


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _fit(shapes_root, root, epochs, ckpt_path=None):
    pl.seed_everything(0, workers=True)
    rec = LossRecorder()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=4, num_workers=0)
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=0, logger=False,
                         enable_progress_bar=False, callbacks=[rec, ckpt, RNGState()], default_root_dir=root)
    trainer.fit(VGLAWModule(**TINY_ARGS), dm, ckpt_path=ckpt_path)
    return rec.losses


def test_resume_gives_the_same_next_step_loss(shapes_root, tmp_path):
    straight = _fit(shapes_root, tmp_path / "a", epochs=2)
    _fit(shapes_root, tmp_path / "b", epochs=1)
    resumed = _fit(shapes_root, tmp_path / "c", epochs=2, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert len(straight) == 6 and len(resumed) == 3
    assert resumed[0] == pytest.approx(straight[3], rel=1e-5, abs=1e-6)
    assert resumed == pytest.approx(straight[3:], rel=1e-4, abs=1e-6)


def _metrics_csv(path):
    rows = list(csv.DictReader(open(path)))
    return {k: float(v) for r in rows for k, v in r.items() if v not in ("", None) and "/" in k}


def test_ddp_two_processes_equal_single_process(shapes_root, tiny_ckpt, tmp_path):
    # Two ranks batch other sentences together than one process does: in float32 the outputs then
    # differ by ~1e-5 (other BLAS kernels), which can flip a mask pixel at the threshold and move
    # mIoU far past 1e-9. Validated in float64, where the metrics can only agree exactly.
    base = [sys.executable, "-m", "vglaw.cli", "validate", "--config", str(REPO / "configs" / "shapes.yaml"),
            f"--data.data_root={shapes_root}", "--model.variant=vglaw_tiny", "--model.model_args=null",
            "--model.weight_seg=0", "--data.img_size=64", "--data.batch_size=3", "--data.num_workers=0",
            "--trainer.accelerator=cpu", "--trainer.precision=64-true", f"--ckpt_path={tiny_ckpt}"]
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        cmd = [*base, f"--trainer.devices={devices}", f"--trainer.default_root_dir={out}",
               f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.version=v"]
        if devices == 2:
            cmd.append("--trainer.strategy=ddp")
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = _metrics_csv(out / "logs" / "v" / "metrics.csv")
    keys = [k for k in results[1] if not k.endswith("/loss")]
    assert "val/prec@0.5" in keys and "val/miou" in keys
    for k in keys:
        assert results[2][k] == pytest.approx(results[1][k], abs=1e-9), k


def test_predict_end_to_end(shapes_root, tiny_ckpt, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    out = tmp_path / "overlay.png"
    rc = main(["predict", "--image", str(image), "--text", "the red circle", "--text", "the leftmost square",
               "--ckpt", str(tiny_ckpt), "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    w, h = Image.open(image).size
    assert (result["width"], result["height"]) == (w, h) and len(result["results"]) == 2
    for r in result["results"]:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        assert r["mask_rle"]["size"] == [h, w] and 0 <= r["score"] <= 1
    zoom = -(-512 // max(w, h))  # small images are drawn enlarged so the text fits
    assert Image.open(out).size == (w * zoom, h * zoom)


def test_predict_honours_exif_orientation(tiny_ckpt, tmp_path, capsys):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 24), (120, 30, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(path, exif=exif)
    assert main(["predict", "--image", str(path), "--text", "the circle", "--ckpt", str(tiny_ckpt),
                 "--out", str(tmp_path / "o.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["width"], result["height"]) == (24, 40)


def test_predict_errors(shapes_root, tiny_ckpt, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    assert main(["predict", "--image", str(tmp_path / "none.jpg"), "--text", "x", "--ckpt", str(tiny_ckpt)]) == 2
    assert "none.jpg" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert main(["predict", "--image", str(tmp_path / "broken.jpg"), "--text", "x", "--ckpt", str(tiny_ckpt)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["predict", "--image", str(image), "--text", "  ", "--ckpt", str(tiny_ckpt)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["predict", "--image", str(image), "--text", "x", "--ckpt", str(tmp_path / "no.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    state = torch.load(tiny_ckpt, weights_only=False)
    state["state_dict"]["model.box_head.mlp.0.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "other.ckpt")
    assert main(["predict", "--image", str(image), "--text", "x", "--ckpt", str(tmp_path / "other.ckpt")]) == 2
    assert "shape mismatch for box_head.mlp.0.weight" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    assert main(["predict", "--image", str(image), "--text", "x", "--ckpt", str(tmp_path / "foreign.ckpt")]) == 2
    assert "not a vglaw training checkpoint" in capsys.readouterr().err


def test_learning_curve_is_a_png_of_every_series(tmp_path):
    from vglaw.viz.plots import line_chart

    png = line_chart({"val/miou": [(1.0, 0.2), (2.0, 0.9)], "val/prec@0.5": [(1.0, 0.1), (2.0, 0.5)]},
                     tmp_path / "c.png", "t", y_range=(0, 1))
    assert Image.open(png).size == (640, 360)
    with pytest.raises(ValueError, match="nothing to plot"):
        line_chart({"val/miou": []}, tmp_path / "d.png", "t")


def test_l1_is_summed_over_coordinates_and_averaged_over_the_batch():
    from vglaw.training.losses import box_losses

    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.4, 0.6, 0.3, 0.1]])
    target = torch.tensor([[0.6, 0.5, 0.2, 0.4], [0.4, 0.6, 0.3, 0.1]])
    # sample 0: |0.1| + 0 + 0 + |0.2| = 0.3; sample 1: 0 -> (0.3 + 0) / 2 = 0.15 (a mean over
    # coordinates would give 0.0375)
    assert box_losses(pred, target)["l1"].item() == pytest.approx(0.15)


@pytest.mark.parametrize("task,monitor", [("mask", "val/miou"), ("both", "val/prec@0.5")])
def test_paper_config_trains_each_task_and_logs_to_tensorboard(tmp_path, monkeypatch, task, monitor):
    """`configs/refcoco.yaml` with the tiny model on a refer fixture, two epochs: the checkpoint
    follows the task's metric (a mask-only model logs no Prec@0.5), and TensorBoard receives the
    per-split metrics and each parameter group's learning rate."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.fixtures import write_refcoco

    write_refcoco(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # the config logs under runs/refcoco
    main(["fit", "--config", str(REPO / "configs" / "refcoco.yaml"), "--data.data_root=data",
          "--model.variant=vglaw_tiny", "--model.visual_weights=null", "--model.model_args=null",
          f"--model.task={task}",
          "--data.text_encoder=minilm", "--data.img_size=64", "--data.batch_size=2", "--data.global_batch_size=null",
          "--data.num_workers=0", "--trainer.precision=32-true", "--trainer.max_epochs=2", "--model.warmup_steps=1",
          "--trainer.log_every_n_steps=1"])
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "refcoco" / "logs" / "version_0" / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(p.startswith("best-") for p in ckpts)
    state = torch.load(tmp_path / "runs" / "refcoco" / "logs" / "version_0" / "checkpoints" / "last.ckpt",
                       weights_only=False)
    assert state["epoch"] == 1 and any(monitor in str(k) for k in state["callbacks"])
    rows = list(csv.DictReader(open(tmp_path / "runs" / "refcoco" / "logs" / "version_0" / "metrics.csv")))
    assert sum(1 for r in rows if r.get(monitor)) == 2  # both epochs validated
    events = EventAccumulator(str(next((tmp_path / "runs" / "refcoco" / "tensorboard").rglob("events.*")))).Reload()
    tags = set(events.Tags()["scalars"])
    assert monitor in tags and "train/loss" in tags
    assert {"lr-AdamW/visual", "lr-AdamW/text", "lr-AdamW/other"} <= tags


class _Interrupt(pl.Callback):
    """Ctrl+C at a given step, as Lightning sees it."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def _fit_scratch(shapes_root, root, epochs, ckpt_path=None, interrupt_at=None):
    from vglaw.training.callbacks import Checkpoint

    pl.seed_everything(0, workers=True)
    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=4, num_workers=0,
                         color_jitter_p=0.8)
    module = VGLAWModule(variant="vglaw_tiny_scratch", img_size=64, warmup_steps=2, milestones=[100], weight_lap=1.0,
                         model_args={"text_cache_size": 1000})
    callbacks = [Checkpoint(dirpath=root, save_last=True, monitor="val/prec@0.5", mode="max"), RNGState()]
    if interrupt_at is not None:
        callbacks.append(_Interrupt(interrupt_at))
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=root)
    try:
        trainer.fit(module, dm, ckpt_path=ckpt_path)
    except SystemExit:  # Lightning's graceful shutdown after Ctrl+C
        assert interrupt_at is not None
    return module.state_dict()


def test_interrupted_run_resumes_from_last_ckpt_exactly(shapes_root, tmp_path):
    """last.ckpt is the last completed epoch even when no new best was saved (val Prec@0.5 of a
    4-step model stays flat), and a run interrupted mid-epoch and resumed from it ends with
    exactly the uninterrupted run's weights (text cache, colour jitter and dropout included)."""
    straight = _fit_scratch(shapes_root, tmp_path / "a", epochs=4)
    _fit_scratch(shapes_root, tmp_path / "b", epochs=4, interrupt_at=10)  # during epoch 2 (4 steps each)
    last = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and last["global_step"] == 8
    resumed = _fit_scratch(shapes_root, tmp_path / "c", epochs=4, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
