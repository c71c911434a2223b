"""Generalised grounding: zero, one or many referred objects (gRefCOCO format, GRES/GREC metrics)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vglaw
from tests.fixtures import write_grefcoco
from vglaw.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gshapes_root(tmp_path_factory):
    from vglaw.data.shapes import generate

    root = tmp_path_factory.mktemp("gshapes")
    generate(root, seed=2, splits={"train": 16, "val": 5, "test": 4}, progress=False, generalised=True)
    return root


def test_generalised_shapes_refer_to_exactly_their_sets(gshapes_root):
    from vglaw.data.expressions import parse, parse_set, resolve

    inst = json.loads((gshapes_root / "gshapes" / "instances.json").read_text())
    refs = json.loads((gshapes_root / "gshapes" / "grefs(unc).json").read_text())
    by_image: dict[int, list] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    kinds = {"single": 0, "multi": 0, "none": 0}
    for ref in refs:
        anns = by_image[ref["image_id"]]
        objects = [{"kind": a["shape"], "color": a["color"], "size": a["size"], "cx": a["center"][0],
                    "cy": a["center"][1]} for a in anns]
        ids = [a["id"] for a in anns]
        assert isinstance(ref["ann_id"], list) and ref["no_target"] == (ref["ann_id"] == [-1])
        claimed = [] if ref["ann_id"] == [-1] else sorted(ids.index(i) for i in ref["ann_id"])
        kinds["none" if not claimed else "single" if len(claimed) == 1 else "multi"] += 1
        for sent in ref["sentences"]:
            if sent["type"] == "set":
                assert sorted(parse_set(sent["sent"]).resolve(objects)) == claimed, sent["sent"]
            else:
                assert resolve(parse(sent["sent"]), objects) == claimed, sent["sent"]
    assert all(kinds.values()), kinds
    texts = [s["sent"] for r in refs for s in r["sentences"]]
    assert any(t.startswith("both ") for t in texts) and any(t.startswith(("every ", "all the ")) for t in texts)


def test_generalised_shapes_are_deterministic(tmp_path):
    from vglaw.data.shapes import generate

    for d in ("a", "b"):
        generate(tmp_path / d, seed=4, splits={"train": 3, "val": 1, "test": 1}, progress=False, generalised=True)
    a, b = (tmp_path / d / "gshapes" / "grefs(unc).json" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_grefcoco_reader_gives_union_masks_and_box_sets(tmp_path):
    from vglaw.data.grefer import GReferDataset

    write_grefcoco(tmp_path)
    ds = GReferDataset(tmp_path, "grefcoco", "train")
    assert ds.counts() == {"sentences": 3, "refs": 3, "images": 1, "no_target": 1, "multi_target": 1}
    one, two, none = (ds.load(i) for i in range(3))
    assert one["bboxes"].shape == (1, 4) and two["bboxes"].shape == (2, 4) and none["bboxes"].shape == (0, 4)
    assert none["has_target"] is False and none["mask"].sum() == 0
    assert two["mask"].sum() == 2 * one["mask"].sum() > 0  # the union of two equal, disjoint rectangles
    from vglaw.data.transforms import GroundingTransform

    t = GroundingTransform(64, keep_original=True)
    out = t(two)
    assert out["boxes_set"].shape == (2, 4) and out["orig_boxes_set"].shape == (2, 4) and out["has_target"]
    x, y, w, h = two["bboxes"][1]
    torch.testing.assert_close(out["orig_boxes_set"][1], torch.tensor([x, y, x + w, y + h]))
    assert t(none)["boxes_set"].shape == (0, 4)


@pytest.mark.parametrize("break_it,needle", [
    (lambda refs, inst: refs[0].update(ann_id=[9999]), "ref 0 (sentences [0]) in"),
    (lambda refs, inst: refs[1].update(ann_id=[-1, 2001]), "mixes -1 (no target) with real annotation ids"),
    (lambda refs, inst: refs[0]["sentences"][0].update(sent="\u200b "), "sentence 0 of ref 0"),
    (lambda refs, inst: inst["annotations"][0].update(bbox=[4, 4, 0.5, 16]), "degenerate box"),
])
def test_grefcoco_bad_refs_are_named_or_counted(tmp_path, capsys, break_it, needle):
    from vglaw.data.grefer import GReferDataset
    from vglaw.errors import UserError

    write_grefcoco(tmp_path)
    refs_path, inst_path = tmp_path / "grefcoco" / "grefs(unc).json", tmp_path / "grefcoco" / "instances.json"
    refs, inst = json.loads(refs_path.read_text()), json.loads(inst_path.read_text())
    break_it(refs, inst)
    refs_path.write_text(json.dumps(refs))
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        GReferDataset(tmp_path, "grefcoco", "train")
    with pytest.warns(UserWarning, match="skipped 1 bad samples"):
        ds = GReferDataset(tmp_path, "grefcoco", "train", skip_invalid=True)
    assert len(ds) == 2
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "grefcoco"]) == 2
    assert "1 bad samples" in capsys.readouterr().err


# ---- metrics on cases worked by hand ------------------------------------------------------

def _update(metric, index, has_target, pred_mask, gt_mask, pred_boxes, gt_boxes, no_target=None):
    """One sentence; `no_target` is the model's no-target decision (default: the mask is empty)."""
    from vglaw.training.gmetrics import grec_correct

    p, g = torch.as_tensor(pred_mask, dtype=torch.bool), torch.as_tensor(gt_mask, dtype=torch.bool)
    pb = torch.as_tensor(pred_boxes, dtype=torch.float).reshape(-1, 4)
    gb = torch.as_tensor(gt_boxes, dtype=torch.float).reshape(-1, 4)
    no_target = (not p.any()) if no_target is None else no_target
    metric.update(torch.tensor([index]), torch.tensor([has_target]), torch.tensor([no_target]),
                  (p & g).sum()[None], (p | g).sum()[None], torch.tensor([grec_correct(pb, gb)]),
                  torch.tensor([grec_correct(pb, gb, giou=False)]), torch.tensor([len(pb) == 0]))


def test_generalised_metrics_by_hand():
    from vglaw.training.gmetrics import GeneralisedMetrics, grec_correct

    A, B = [0, 0, 10, 10], [20, 20, 30, 30]
    # an empty prediction on a no-target sample: right on every count
    assert grec_correct(torch.zeros(0, 4), torch.zeros(0, 4))
    # one extra box: F1 = 2/3
    assert not grec_correct(torch.tensor([A, B], dtype=torch.float), torch.tensor([A], dtype=torch.float))
    # a missed target: F1 = 2/3
    assert not grec_correct(torch.tensor([A], dtype=torch.float), torch.tensor([A, B], dtype=torch.float))
    # two targets found in the other order: still one-to-one, F1 = 1
    assert grec_correct(torch.tensor([B, A], dtype=torch.float), torch.tensor([A, B], dtype=torch.float))
    # IoU 100 / 160 = 0.625 passes 0.5; IoU 100 / 250 = 0.4 does not
    assert grec_correct(torch.tensor([[0, 0, 10, 16]], dtype=torch.float), torch.tensor([A], dtype=torch.float))
    assert not grec_correct(torch.tensor([[0, 0, 10, 25]], dtype=torch.float), torch.tensor([A], dtype=torch.float))

    m = GeneralisedMetrics()
    z = np.zeros((4, 4), bool)
    full, half = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    half[:2] = True
    # ReLA's rules (refer_evaluation.py): the no-target decision, not the mask, says "no target"
    _update(m, 0, False, z, z, [], [])  # no target, predicted no-target: IoU 1, N-acc hit, GREC correct
    _update(m, 1, False, half, z, [A], [])  # no target, predicted 8 px: IoU 0, adds 8 to ΣU
    _update(m, 2, True, half, full, [A], [A])  # IoU 0.5, GREC correct
    _update(m, 3, True, z, full, [], [A], no_target=True)  # targeted, predicted no-target: T-acc miss, IoU 0
    _update(m, 3, True, full, full, [A], [A])  # a repeat of sentence 3 (DDP padding) counts once
    _update(m, 4, True, full, full, [A], [A])  # IoU 1, GREC correct
    # predicted no-target while the mask head drew 8 px: I = 0, U = the 16 px union stays
    _update(m, 5, True, half, full, [], [A], no_target=True)
    _update(m, 6, False, z, z, [], [], no_target=False)  # no target, an empty mask but not predicted no-target: IoU 0
    # no target and predicted no-target while the mask head drew 8 px: IoU 1, adds nothing
    _update(m, 7, False, half, z, [], [], no_target=True)
    out = m.compute()
    assert out["giou"].item() == pytest.approx((1 + 0 + 0.5 + 0 + 1 + 0 + 0 + 1) / 8)
    assert out["ciou"].item() == pytest.approx((0 + 0 + 8 + 0 + 16 + 0 + 0 + 0) / (0 + 8 + 16 + 16 + 16 + 16 + 0 + 0))
    assert out["n_acc"].item() == pytest.approx(2 / 4) and out["t_acc"].item() == pytest.approx(2 / 4)
    assert out["grec_prec@f1"].item() == pytest.approx(5 / 8) and out["grec_n_acc"].item() == pytest.approx(3 / 4)
    # Pr@X over the 4 targeted expressions only (IoUs 0.5, 0, 1, 0): ReLA divides by the targeted count
    assert out["pr@0.7"].item() == pytest.approx(1 / 4) and out["pr@0.9"].item() == pytest.approx(1 / 4)


# ---- model, losses, decoding -----------------------------------------------------------

def _centre_targets_per_object(boxes_set, size):
    """The former one-object-at-a-time construction (a host round trip per object), kept as the
    reference the batched `centre_targets` must equal."""
    H2, W2 = size
    heat = torch.zeros(len(boxes_set), H2, W2, dtype=torch.float64)
    ys, xs = torch.arange(H2, dtype=torch.float64)[:, None], torch.arange(W2, dtype=torch.float64)[None, :]
    cells = []
    for b, boxes in enumerate(boxes_set):
        row = (boxes[:, 1] * H2).long().clamp(0, H2 - 1)
        col = (boxes[:, 0] * W2).long().clamp(0, W2 - 1)
        cells.append(torch.stack([row, col], dim=1))
        for (_, _, w, h), r, c in zip(boxes.tolist(), row.tolist(), col.tolist()):
            sx, sy = max(0.5, w * W2 / 6), max(0.5, h * H2 / 6)
            heat[b] = torch.maximum(heat[b], torch.exp(-((xs - c) ** 2) / (2 * sx**2) - ((ys - r) ** 2) / (2 * sy**2)))
    return heat, cells


def test_batched_centre_targets_and_set_loss_equal_the_per_object_construction():
    from vglaw.training.losses import centre_focal_loss, centre_targets, set_losses

    g = torch.Generator().manual_seed(0)
    sizes = [3, 0, 1, 5, 2, 0, 4, 1]  # overlapping Gaussians, empty samples, several per sample
    boxes_set = [torch.cat([torch.rand(n, 2, generator=g), 0.05 + 0.6 * torch.rand(n, 2, generator=g)], 1)
                 for n in sizes]
    heat, sample, cells = centre_targets(boxes_set, (16, 12))
    ref_heat, ref_cells = _centre_targets_per_object(boxes_set, (16, 12))
    assert sample.tolist() == [b for b, n in enumerate(sizes) for _ in range(n)]
    assert cells.tolist() == torch.cat(ref_cells).tolist()
    # float32 Gaussians against a float64 reference: values in [0, 1], a few ulps of float32
    torch.testing.assert_close(heat.double(), ref_heat, atol=1e-6, rtol=0)
    assert (heat == 1).sum() == sum(sizes)  # each centre cell exactly 1, as the focal loss needs
    # the loss on a fixed batch is the one the former targets give
    outputs = {"centre_logits": torch.randn(8, 16, 12, generator=g),
               "box_params": torch.randn(8, 16, 12, 4, generator=g),
               "exist_logits": torch.randn(8, generator=g)}
    has_target = torch.tensor([n > 0 for n in sizes])
    terms = set_losses(outputs, boxes_set, has_target)
    torch.testing.assert_close(terms["centre"].double(), centre_focal_loss(outputs["centre_logits"].double(), ref_heat),
                               atol=1e-5, rtol=1e-5)
    from vglaw.models.generalised import decode_boxes

    decoded = decode_boxes(outputs["box_params"])
    pred = torch.cat([decoded[b, c[:, 0], c[:, 1]] for b, c in enumerate(ref_cells)])
    assert torch.equal(terms["l1"], (pred - torch.cat(boxes_set)).abs().sum(1).mean())


def test_generalised_model_outputs_losses_and_decoding(tokenizer):
    from vglaw.models.generalised import decode_boxes, decode_sets
    from vglaw.training.losses import centre_targets, grounding_loss

    torch.manual_seed(0)
    m = vglaw.create_model("vglaw_tiny_scratch_gref").train()
    t = tokenizer(["the red shapes", "the purple elephant"], padding=True, return_tensors="pt")
    out = m(torch.randn(2, 3, 64, 64), t["input_ids"], t["attention_mask"])
    assert out["centre_logits"].shape == (2, 8, 8) and out["box_params"].shape == (2, 8, 8, 4)
    assert out["exist_logits"].shape == (2,) and out["mask_logits"].shape == (2, 1, 64, 64) and "boxes" not in out
    boxes_set = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.25, 0.3]]), torch.zeros(0, 4)]
    heat, sample, cells = centre_targets(boxes_set, (8, 8))
    assert sample.tolist() == [0, 0] and cells.tolist() == [[2, 2], [4, 5]]
    assert heat[0, 2, 2] == 1 and heat[0, 4, 5] == 1
    assert (heat[0] == 1).sum() == 2 and heat[1].max() == 0
    terms = grounding_loss(out, torch.zeros(2, 4), torch.zeros(2, 64, 64),
                           {"l1": 1, "giou": 1, "focal": 4, "dice": 4, "centre": 1, "exist": 1},
                           boxes_set=boxes_set, has_target=torch.tensor([True, False]))
    assert {"centre", "exist", "l1", "giou", "focal", "dice"} <= set(terms) and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    assert m.centre_head.box.weight.grad.abs().sum() > 0 and m.exist_head.mlp[0].weight.grad.abs().sum() > 0
    # decoding: a single sharp peak gives one box with the regressed size, at the peak's cell
    logits = torch.full((1, 8, 8), -9.0)
    logits[0, 4, 5] = 3.0
    params = torch.zeros(1, 8, 8, 4)
    params[0, 4, 5] = torch.tensor([0.0, 0.0, -1.0, 0.5])
    m.centre_head.score_calibration.copy_(torch.tensor([2.0, -1.0]))
    outputs = {"centre_logits": logits, "score_logits": m.centre_head.score_logits(logits), "box_params": params,
               "exist_logits": torch.tensor([2.0])}
    sets = decode_sets(outputs)
    assert len(sets[0]["scores"]) == 1 and sets[0]["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)))
    assert sets[0]["centre_logits"].tolist() == [3.0]
    torch.testing.assert_close(sets[0]["boxes"][0], decode_boxes(params)[0, 4, 5])
    torch.testing.assert_close(sets[0]["boxes"][0, :2], torch.tensor([5.5 / 8, 4.5 / 8]))


def test_peak_labels_match_greedily_in_score_order():
    from vglaw.training.calibration import peak_labels

    targets = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],  # target 0, exactly
                          [0.5, 0.5, 10.0, 10.0],  # target 0 again: a duplicate, so 0
                          [21.0, 21.0, 30.0, 30.0],  # target 1
                          [50.0, 50.0, 60.0, 60.0]])  # nothing
    assert peak_labels(boxes, torch.tensor([0.9, 0.8, 0.3, 0.95]), targets).tolist() == [1, 0, 1, 0]
    # the duplicate scoring higher takes the target instead
    assert peak_labels(boxes, torch.tensor([0.7, 0.8, 0.3, 0.95]), targets).tolist() == [0, 1, 1, 0]
    assert peak_labels(boxes, torch.ones(4), torch.zeros(0, 4)).tolist() == [0, 0, 0, 0]


def test_platt_fit_recovers_a_known_scaling():
    from vglaw.training.calibration import fit_platt

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, generator=g) * 2
    labels = (torch.rand(20000, generator=g) < torch.sigmoid(3.0 * logits + 1.0)).float()
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(3.0, abs=0.15) and b == pytest.approx(1.0, abs=0.1)
    assert fit_platt(logits[:50], torch.zeros(50)) is None  # one class only: nothing to fit
    assert fit_platt(logits, (logits < 0).float()) is None  # an order-reversing fit is refused


def test_generalised_fit_predict_and_no_target(gshapes_root, tmp_path, capsys):
    args = ["--config", str(REPO / "configs" / "gshapes.yaml"), f"--data.data_root={gshapes_root}",
            "--model.variant=vglaw_tiny_scratch_gref", "--data.img_size=64", "--data.batch_size=4",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1"]
    assert main(["fit", *args]) == 0
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("val/giou", "val/ciou", "val/n_acc", "val/t_acc", "val/pr@0.7", "val/grec_prec@f1",
                "train/centre", "train/exist"):
        assert key in rows, key
    ckpts = list((tmp_path / "logs" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    assert ckpts and torch.load(ckpts[0], weights_only=True)["callbacks"]
    assert "val/giou" in str(torch.load(ckpts[0], weights_only=True)["callbacks"])
    # the box scores were calibrated (on the held-out training image), and the checkpoint carries the fit
    assert "val/score_scale" in rows
    scale_bias = torch.load(ckpts[0], weights_only=True)["state_dict"]["model.centre_head.score_calibration"]
    logged = [line.split(",") for line in rows.splitlines()]
    header = logged[0]
    scales = [float(r[header.index("val/score_scale")]) for r in logged[1:] if r[header.index("val/score_scale")]]
    assert scales and scale_bias[0].item() == pytest.approx(scales[-1])
    model_dir = tmp_path / "logs" / "version_0" / "model"
    assert (model_dir / "config.json").is_file()
    image = next((gshapes_root / "images" / "gshapes").glob("test_*.png"))
    capsys.readouterr()
    assert main(["predict", "--image", str(image), "--text", "the red shapes", "--text", "the purple elephant",
                 "--model", str(model_dir), "--out", str(tmp_path / "o.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for r in report["results"]:
        assert {"no_target", "exists", "boxes", "box_scores", "mask_rle"} <= set(r)
        assert len(r["boxes"]) == len(r["box_scores"])
        if r["no_target"]:
            assert r["boxes"] == [] and r["mask_area"] == 0
    from vglaw.inference.results import Grounding
    from vglaw.viz.overlay import draw_overlay

    results = [Grounding("x", (10, 20), exists=0.9, no_target=False, mask=np.zeros((10, 20), bool),
                         boxes=[[1, 1, 5, 5], [10, 2, 18, 8]], box_scores=[0.9, 0.8]),
               Grounding("y", (10, 20), exists=0.1, no_target=True, mask=np.zeros((10, 20), bool),
                         boxes=[], box_scores=[])]
    picture = np.asarray(draw_overlay(np.zeros((10, 20, 3), np.uint8), results))
    assert picture.any()  # both boxes drawn and the labels


def test_calibration_gathers_the_peaks_of_every_process(gshapes_root, tmp_path):
    """Two DDP processes with different numbers of validation peaks: the padded gather works,
    training goes on, and the run ends with its model folder (rank 0 alone once waited there on
    a broadcast the other process never joined)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vglaw.cli", "fit", "--config", str(REPO / "configs" / "gshapes.yaml"),
           f"--data.data_root={gshapes_root}", "--model.variant=vglaw_tiny_scratch_gref", "--data.img_size=64",
           "--data.batch_size=3", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
           f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
           "--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert rows.count("\n") >= 3 and "val/score_scale" in rows
    assert (tmp_path / "logs" / "version_0" / "model" / "model.safetensors").is_file()


def test_variant_and_dataset_must_agree(gshapes_root, tmp_path, capsys):
    assert main(["fit", "--config", str(REPO / "configs" / "gshapes.yaml"), f"--data.data_root={gshapes_root}",
                 "--model.variant=vglaw_tiny_scratch", "--data.img_size=64", f"--trainer.default_root_dir={tmp_path}",
                 "--trainer.logger=false"]) == 2
    assert "do not go together" in capsys.readouterr().err


def test_box_scores_are_calibrated_on_held_out_training_images_never_on_val(gshapes_root, monkeypatch):
    from torch import nn

    from vglaw.data.datamodule import CALIBRATION, ReferDataModule
    from vglaw.training.gmetrics import GeneralisedMetrics
    from vglaw.training.module import VGLAWModule

    def datamodule(holdout):
        return ReferDataModule(dataset="gshapes", data_root=str(gshapes_root), img_size=64, batch_size=4,
                               num_workers=0, calibration_holdout=holdout)

    dm = datamodule(0.25)
    full = {s.image_id for s in datamodule(0.0).split("train", train=True).samples}
    train = {s.image_id for s in dm.split("train", train=True).samples}
    held = {s.image_id for s in dm.split(CALIBRATION).samples}
    assert len(held) == 4 and not train & held and train | held == full  # by image: no image in both
    assert held == {s.image_id for s in datamodule(0.25).split(CALIBRATION).samples}  # the same draw every run
    assert len(dm.val_dataloader()) == 1  # outside fit the slice is not evaluated
    # while fitting, the calibration reads the slice's peaks, and is fitted before val is scored
    module = VGLAWModule(variant="vglaw_tiny_scratch_gref", img_size=64)
    fits = []
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "_calibrate", lambda: fits.append(len(module.calibration_peaks.logits)) or
                        setattr(module, "_calibrating", False))
    module._stage_splits, module._calibrating = [CALIBRATION, "val"], True
    module.metrics = nn.ModuleDict({"val": GeneralisedMetrics()})
    module._eval_step(next(iter(dm._loader(CALIBRATION, train=False))), 0)
    assert len(module.calibration_peaks.logits) == 1 and fits == []  # one batch's peaks
    module._eval_step(next(iter(dm._loader("val", train=False))), 1)
    module._eval_step(next(iter(dm._loader("val", train=False))), 1)
    assert fits == [1] and len(module.metrics["val"].index) == 2  # fitted once, on the slice's batch only
    with pytest.raises(vglaw.errors.UsageError, match="shapes is not read for a generalised model"):
        ReferDataModule(dataset="shapes", calibration_holdout=0.1)
