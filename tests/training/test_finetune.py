"""Your own data end to end: fine-tuning from a model folder (`model.init_from`, `model.freeze`),
a single-target model on data with other target counts, predictions back to the annotation
tool, and the round trip import -> fit -> predict -> Label Studio -> import."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import vglaw
from vglaw.cli import main
from vglaw.data.datamodule import ReferDataModule
from vglaw.data.grefer import GReferDataset, SingleTargetGReferDataset
from vglaw.data.refer import BadSampleError
from vglaw.errors import UsageError, UserError
from vglaw.training.module import VGLAWModule

REPO = Path(__file__).resolve().parents[2]
TINY = dict(variant="vglaw_tiny_scratch", img_size=64, weight_seg=0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny from-scratch model with a live (non-zero) weight generator."""
    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny_scratch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("trained") / "model"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The new-colours shapes domain, written as Label Studio exports and imported."""
    from vglaw.data.shapes_domain import write_new_domain

    root = tmp_path_factory.mktemp("own")
    counts = write_new_domain(root / "ls", 3, {"train": 4, "val": 2, "test": 2})
    assert all(n > 0 for n in counts.values())
    args = ["data", "import", "--format", "labelstudio", "--images", str(root / "ls" / "images"), "--out",
            str(root / "data")]
    for split in counts:
        args += ["--input", f"{split}={root / 'ls' / f'labelstudio_{split}.json'}"]
    assert main(args) == 0
    return root / "data"


def test_init_from_loads_every_tensor_and_reports_what_it_left(tiny_folder):
    module = VGLAWModule(**TINY, init_from=str(tiny_folder))
    trained = vglaw.VGLAW.from_pretrained(tiny_folder)
    for k, v in trained.state_dict().items():
        assert torch.equal(module.model.state_dict()[k], v), k
    assert "tensors loaded" in module.init_report and "starting fresh" not in module.init_report


def test_init_from_a_single_target_model_starts_its_generalised_form(tiny_folder):
    module = VGLAWModule(**{**TINY, "variant": "vglaw_tiny_scratch_gref"}, init_from=str(tiny_folder))
    assert "starting fresh: centre_head" in module.init_report and "exist_head" in module.init_report
    assert "not used: box_head" in module.init_report  # the generalised model's boxes come from its centre head
    trained = vglaw.VGLAW.from_pretrained(tiny_folder).state_dict()
    assert torch.equal(module.model.state_dict()["weight_generator.P"], trained["weight_generator.P"])


def test_init_from_another_variant_or_architecture_is_one_clear_error(tiny_folder, tmp_path):
    with pytest.raises(UsageError, match="is a ScratchVGLAW .* configured model is a VGLAW"):
        VGLAWModule(**{**TINY, "variant": "vglaw_tiny"}, init_from=str(tiny_folder))
    with pytest.raises(UsageError, match="other settings .*stem_depth 1 there, 2 here"):
        VGLAWModule(**TINY, init_from=str(tiny_folder), model_args={"stem_depth": 2})
    with pytest.raises(UserError, match="model folder not found"):
        VGLAWModule(**TINY, init_from=str(tmp_path / "nothing"))


def test_frozen_parts_get_no_gradient_and_keep_their_statistics(tiny_folder, imported):
    module = VGLAWModule(**TINY, init_from=str(tiny_folder), freeze=["text", "backbone"], lr_visual=0.1,
                         lr_other=0.1)
    before = {k: v.clone() for k, v in module.model.backbone.state_dict().items()}  # BatchNorm statistics too
    head = module.model.box_head.mlp[0].weight.clone()
    dm = ReferDataModule(dataset="custom", data_root=str(imported), img_size=64, batch_size=4, num_workers=0)
    pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               accelerator="cpu").fit(module, dm)
    for k, v in module.model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(module.model.box_head.mlp[0].weight, head)
    with pytest.raises(UsageError, match="'eyes' is not a part"):
        VGLAWModule(**TINY, freeze=["eyes"])


def test_a_single_target_model_reads_only_single_target_expressions(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "text": "both", "box": [1, 1, 20, 20], "split": "train"},
             {"image": "a.png", "text": "both", "box": [30, 1, 50, 20], "split": "train"},
             {"image": "a.png", "text": "none here", "boxes": [], "split": "train"},
             {"image": "a.png", "text": "the left one", "box": [1, 1, 20, 20], "split": "train"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert main(["data", "import", "--format", "jsonl", "--input", str(tmp_path / "a.jsonl"), "--out",
                 str(tmp_path / "d")]) == 0
    assert len(GReferDataset(tmp_path / "d", "custom", "train")) == 3
    with pytest.raises(BadSampleError, match="names (2 objects|no object); a single-target model grounds exactly one"):
        SingleTargetGReferDataset(tmp_path / "d", "custom", "train")
    with pytest.warns(UserWarning, match="skipped 2 bad samples"):
        kept = SingleTargetGReferDataset(tmp_path / "d", "custom", "train", skip_invalid=True)
    assert [s.text for s in kept.samples] == ["the left one"] and kept.load(0)["bbox"].tolist() == [1, 1, 19, 19]


def test_import_fit_predict_labelstudio_and_import_again_gives_the_same_boxes(imported, tiny_folder, tmp_path):
    """The acceptance round trip: a tiny model fine-tuned for two steps on imported data through
    `vglaw fit`, its predictions on the test expressions written as Label Studio
    pre-annotations, accepted as annotations (what a reviewer does in Label Studio), imported
    again: the same boxes, to the precision of Label Studio's percent coordinates."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vglaw.cli", "fit", "--config", str(REPO / "configs" / "finetune.yaml"),
           f"--data.data_root={imported}", "--model.variant=vglaw_tiny_scratch", f"--model.init_from={tiny_folder}",
           "--data.img_size=64", "--data.batch_size=4", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
           f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
           "--trainer.logger.init_args.version=v"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensors loaded" in proc.stderr + proc.stdout
    model = out / "logs" / "v" / "model"
    test = GReferDataset(imported, "custom", "test")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"image": str(s.image_path), "text": s.text}) for s in test.samples))
    predictions = tmp_path / "pre.json"
    assert main(["predict", "--pairs", str(pairs), "--model", str(model), "--format", "labelstudio",
                 "--output", str(predictions)]) == 0
    jsonl = tmp_path / "pre.jsonl"
    assert main(["predict", "--pairs", str(pairs), "--model", str(model), "--output", str(jsonl)]) == 0
    want = {(Path(r["image"]).name, r["text"]): r["box"] for r in map(json.loads, jsonl.read_text().splitlines())}
    tasks = json.loads(predictions.read_text())
    for task in tasks:  # accepted in Label Studio: the prediction becomes the annotation
        task["annotations"] = [{"id": 1, "result": task.pop("predictions")[0]["result"]}]
    (tmp_path / "accepted.json").write_text(json.dumps(tasks))
    assert main(["data", "import", "--format", "labelstudio", "--input", f"test={tmp_path / 'accepted.json'}",
                 "--images", str(imported / "images" / "custom"), "--out", str(tmp_path / "again")]) == 0
    again = GReferDataset(tmp_path / "again", "custom", "test")
    got = {(s.image_path.name, s.text): s.bboxes for s in again.samples}
    assert got.keys() == want.keys()
    for key, (x1, y1, x2, y2) in want.items():
        assert len(got[key]) == 1  # the box's mask outline came back as its outline, not a second target
        assert got[key][0] == pytest.approx((x1, y1, x2 - x1, y2 - y1), abs=1e-6 * 200)
    # the masks went out as outlines inside their boxes, and came back as those boxes' masks
    assert any(x["type"] == "polygonlabels" for t in tasks for x in t["annotations"][0]["result"])


def test_coco_results_hold_a_box_score_and_mask_per_prediction(imported, tiny_folder, tmp_path):
    test = GReferDataset(imported, "custom", "test")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"image": str(s.image_path), "text": s.text}) for s in test.samples[:3]))
    out = tmp_path / "coco.json"
    assert main(["predict", "--pairs", str(pairs), "--model", str(tiny_folder), "--format", "coco",
                 "--output", str(out)]) == 0
    entries = json.loads(out.read_text())
    assert len(entries) == 3 and {e["category_id"] for e in entries} == {1}
    images = {s.image_path.name for s in test.samples[:3]}
    assert len({e["image_id"] for e in entries}) == len(images)
    from pycocotools import mask as mask_utils

    for e in entries:
        x, y, w, h = e["bbox"]
        assert w > 0 and h > 0 and 0 <= e["score"] <= 1
        rle = {"size": e["segmentation"]["size"], "counts": e["segmentation"]["counts"].encode()}
        assert mask_utils.decode(rle).shape == tuple(e["segmentation"]["size"])
    assert main(["predict", "--image", str(test.samples[0].image_path), "--text", "x", "--model", str(tiny_folder),
                 "--format", "coco"]) == 2


def test_a_missing_init_from_folder_is_named_before_anything_runs(imported, tmp_path, capsys):
    rc = main(["fit", "--config", str(REPO / "configs" / "finetune.yaml"), f"--data.data_root={imported}",
               f"--model.init_from={tmp_path / 'nothing'}", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"model.init_from {tmp_path / 'nothing'}: no model folder there" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
