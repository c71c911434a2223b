"""Refer-format reading, the shapes generator and the augmentation pipeline."""
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from tests.fixtures import coco_name, write_refcoco
from vglaw.data.datamodule import ReferDataModule
from vglaw.data.expressions import parse, resolve
from vglaw.data.refer import BadSampleError, ReferDataset, load_rgb
from vglaw.data.transforms import GroundingTransform, flip_text, has_direction_word
from vglaw.io.safe_pickle import UnsafePickleError
from vglaw.models.postprocess import boxes_to_original, mask_to_original

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def refcoco(tmp_path):
    return tmp_path, write_refcoco(tmp_path)


def test_counts_per_split(refcoco):
    root, _ = refcoco
    counts = {s: ReferDataset(root, "refcoco", s).counts() for s in ("train", "val", "testA", "testB")}
    assert counts["train"] == {"sentences": 4, "refs": 2, "images": 2}
    assert counts["val"] == {"sentences": 2, "refs": 1, "images": 1}
    assert counts["testB"]["refs"] == 2


def test_boxes_and_masks_match_pycocotools(refcoco):
    root, written = refcoco
    anns = {a["id"]: a for a in written["annotations"]}
    for split in ("train", "val", "testA", "testB"):
        ds = ReferDataset(root, "refcoco", split)
        for i in range(len(ds)):
            s = ds.load(i)
            ann = anns[ds.samples[i].ann_id]
            h, w = s["image"].shape[:2]
            seg = ann["segmentation"]
            rle = (mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list)
                   else mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list)
                   else {"size": seg["size"], "counts": seg["counts"].encode()})
            np.testing.assert_array_equal(s["mask"], mask_utils.decode(rle))
            np.testing.assert_allclose(s["bbox"], ann["bbox"])
            assert s["mask"].sum() > 100


def test_cached_dataset_gives_the_same_samples_and_private_copies(refcoco):
    root, _ = refcoco
    plain, cached = ReferDataset(root, "refcoco", "train"), ReferDataset(root, "refcoco", "train", cache=True)
    for _ in range(2):  # the second pass is served from the cache
        for i in range(len(plain)):
            a, b = plain.load(i), cached.load(i)
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["mask"], b["mask"])
            b["image"][:] = 0  # a transform changing its input in place must not reach the cache
            b["mask"][:] = 0
    assert len(cached._cache) == len({s.image_id for s in cached.samples}) + len({s.ann_id for s in cached.samples})


def test_unknown_split_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"refcoco/refs\(unc\)\.p.*data/README\.md"):
        ReferDataset(tmp_path, "refcoco", "val")
    with pytest.raises(ValueError, match="no split 'testA'"):
        ReferDataset(tmp_path, "refcocog", "testA")
    with pytest.raises(ValueError, match="no splitBy"):
        ReferDataset(tmp_path, "refcoco", "val", split_by="umd")


def test_bad_annotations_are_named_or_skipped(refcoco):
    root, written = refcoco
    refs = written["refs"]
    refs[0]["ann_id"] = 999999  # not in instances.json
    refs[1]["sentences"][0]["sent"] = "   "
    inst = json.loads((root / "refcoco" / "instances.json").read_text())
    inst["annotations"][2]["bbox"] = [3.0, 4.0, 0.5, 10.0]  # degenerate (val)
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs))
    with pytest.raises(BadSampleError, match="annotation 999999"):
        ReferDataset(root, "refcoco", "train")
    with pytest.raises(BadSampleError, match=r"annotation 1002 .*degenerate box"):
        ReferDataset(root, "refcoco", "val")
    with pytest.warns(UserWarning, match="skipped 2 bad samples"):
        ds = ReferDataset(root, "refcoco", "train", skip_invalid=True)
    assert len(ds) == 1 and ds.samples[0].text == "dog"


def test_truncated_image_is_named_and_skippable(refcoco):
    root, _ = refcoco
    path = root / "images" / "mscoco" / "images" / "train2014" / coco_name(100)
    path.write_bytes(path.read_bytes()[:200])
    ds = ReferDataset(root, "refcoco", "train")
    with pytest.raises(BadSampleError, match=coco_name(100)):
        ds[0]
    skipping = ReferDataset(root, "refcoco", "train", skip_invalid=True)
    with pytest.warns(UserWarning, match="skipped bad sample"):
        sample = skipping[0]
    assert sample["image_id"] == 101 and skipping.skipped == 2  # both sentences of image 100


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1", "CMYK"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    arr = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(10, 12)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)  # 16-bit grayscale
        assert img.mode.startswith("I;16")
    else:
        img = Image.fromarray(arr).convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    img.save(path)
    out = load_rgb(path)
    assert out.shape == (10, 12, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16"):
        np.testing.assert_allclose(out[..., 0].astype(int), arr.astype(int), atol=1)


def test_malicious_refs_pickle_is_refused(tmp_path, monkeypatch):
    write_refcoco(tmp_path)
    monkeypatch.chdir(tmp_path)

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, ("touch pwned",))

    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": Exploit()}]))
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p.*system"):
        ReferDataset(tmp_path, "refcoco", "train")
    assert not (tmp_path / "pwned").exists()


def test_flip_text_whole_words():
    assert flip_text("the bright dog left of the Right cat") == "the bright dog right of the Left cat"
    assert flip_text("leftmost, rightmost. copyright") == "rightmost, leftmost. copyright"
    assert has_direction_word("dog on the LEFT") and not has_direction_word("bright red cleft")


def test_flip_keeps_image_box_mask_and_text_consistent(refcoco):
    root, _ = refcoco
    ds = ReferDataset(root, "refcoco", "train")
    raw = ds.load(0)
    t = GroundingTransform(96, train=True, crop_p=0.0, flip_p=1.0, color_jitter_p=0.0)
    out = t(raw)
    plain = GroundingTransform(96)(raw)
    assert out["text"] == "the bright thing on the right"
    # wider than tall: the letterbox pads only top and bottom, so it commutes with a horizontal flip
    assert raw["image"].shape[1] > raw["image"].shape[0]
    torch.testing.assert_close(out["image"], plain["image"].flip(-1))
    # the box is the mask's bounding box after the flip
    ys, xs = torch.nonzero(out["mask"], as_tuple=True)
    cx, cy, bw, bh = (out["box"] * 96).tolist()
    assert abs((cx - bw / 2) - xs.min().item()) <= 1.5 and abs((cx + bw / 2) - (xs.max().item() + 1)) <= 1.5
    assert abs((cy - bh / 2) - ys.min().item()) <= 1.5


def test_category_maps_rank_categories_paint_small_on_top_and_ignore_crowds(refcoco):
    root, data = refcoco
    inst_path = root / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    image = inst["images"][0]  # 80 x 60, the first train ref's image
    h, w = image["height"], image["width"]

    def rect(ann_id, category, x0, y0, x1, y1, crowd=0):
        poly = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        return {"id": ann_id, "image_id": image["id"], "category_id": category, "segmentation": poly,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)), "iscrowd": crowd}

    # COCO-style ids with a gap: 90 ranks second. The large object lies under the referred one.
    inst["categories"] = [{"id": 90, "name": "table"}, {"id": 1, "name": "thing"}]
    inst["annotations"] += [rect(9001, 90, 0, 0, 60, 45), rect(9002, 1, 70, 50, 80, 60, crowd=1)]
    inst_path.write_text(json.dumps(inst))
    ds = ReferDataset(root, "refcoco", "train", categories=True)
    assert ds.num_categories == 3
    raw = ds.load(0)
    cats, mask = raw["categories"], raw["mask"].astype(bool)
    assert cats.shape == (h, w) and cats.dtype == np.uint8
    table = mask_utils.decode(mask_utils.frPyObjects([[0, 0, 60, 0, 60, 45, 0, 45]], h, w)).max(-1).astype(bool)
    assert (cats[mask] == 1).all()  # the smaller object is painted last
    assert (cats[table & ~mask] == 2).all()
    assert (cats[52:58, 72:78] == 255).all()  # crowd: ignored
    assert (cats[~table & ~mask & (cats != 255)] == 0).all() and (cats == 0).any()
    assert "categories" not in ReferDataset(root, "refcoco", "train").load(0)

    inst["annotations"][-1]["category_id"] = 7
    inst_path.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match=r"annotation 9002 in .*instances.json has category_id 7"):
        ReferDataset(root, "refcoco", "train", categories=True)


def test_category_map_follows_flip_and_letterbox(refcoco):
    root, _ = refcoco
    dm = ReferDataModule(dataset="refcoco", data_root=str(root), img_size=96, batch_size=2, num_workers=0,
                         categories=True)
    raw = dm.split("train", train=True).load(0)
    flipped = GroundingTransform(96, train=True, crop_p=0.0, flip_p=1.0, color_jitter_p=0.0)(raw)
    plain = GroundingTransform(96)(raw)
    assert plain["categories"].dtype == torch.int64 and plain["categories"].shape == (96, 96)
    torch.testing.assert_close(flipped["categories"], plain["categories"].flip(-1))
    for out in (flipped, plain):  # resampled with the mask: the referred object keeps its category
        assert (out["categories"][out["mask"] > 0] == 1).all()
        assert (out["categories"][out["mask"] == 0] == 0).all()  # one object per image in this fixture
    batch = next(iter(dm.val_dataloader()[0]))
    assert batch["categories"].shape == (2, 96, 96)


def test_letterbox_inverse_within_one_pixel(refcoco):
    root, _ = refcoco
    ds = ReferDataset(root, "refcoco", "testB")
    for size in (64, 97, 128):
        t = GroundingTransform(size, keep_original=True)
        for i in range(len(ds)):
            s = t(ds.load(i))
            back = boxes_to_original(s["box"][None], s["scale"][None], s["pad"][None], s["orig_size"][None], size)[0]
            assert (back - s["orig_box"]).abs().max() <= 1.0, (size, back, s["orig_box"])
            m, _ = mask_to_original(s["mask"][None] * 20 - 10, s["scale"], s["pad"], s["orig_size"])
            iou = (m & s["orig_mask"].bool()).sum() / (m | s["orig_mask"].bool()).sum()
            assert iou > 0.8  # a 1 px boundary error on ~30 px objects costs ~10 points


def test_crop_never_applied_with_direction_word(refcoco):
    root, _ = refcoco
    raw = ReferDataset(root, "refcoco", "train").load(0)
    t = GroundingTransform(96, train=True, crop_p=1.0, flip_p=0.0, color_jitter_p=0.0)
    assert t(raw)["orig_size"].tolist() == list(raw["image"].shape[:2])  # "left": no crop
    raw["text"] = "dog"
    random.seed(0)
    sizes = {tuple(t(raw)["orig_size"].tolist()) for _ in range(5)}
    assert sizes != {tuple(raw["image"].shape[:2])}


def test_crop_p_zero_never_crops(refcoco):
    """Shapes trains with crop_p=0: a crop rescales the image, and "small" / "big" are absolute there."""
    root, _ = refcoco

    def cropped(crop_p):
        ds = ReferDataModule(dataset="refcoco", data_root=str(root), img_size=96, crop_p=crop_p).split("train", True)
        random.seed(0)
        return sum(ds[i]["orig_size"].tolist() != list(ds.load(i)["image"].shape[:2]) for i in range(len(ds)))

    assert cropped(1.0) > 0  # the check can fail: with crop_p=1 samples without direction words are cropped
    assert cropped(0.0) == 0
    with pytest.raises(ValueError, match="crop_p"):
        ReferDataModule(dataset="refcoco", data_root=str(root), crop_p=1.5)


def test_letterbox_pads_with_the_mean_colour_zero_after_normalisation(refcoco):
    root, _ = refcoco
    raw = ReferDataset(root, "refcoco", "train").load(0)  # 80 x 60: padded above and below at 96
    out = GroundingTransform(96)(raw)
    top = int(out["pad"][1])
    assert top > 0 and out["pad"][0] == 0
    assert (out["image"][:, :top] == 0).all() and (out["image"][:, top + 72 :] == 0).all()
    assert (out["image"][:, top : top + 72] != 0).any(dim=0).float().mean() > 0.99
    black = GroundingTransform(96, fill="black")(raw)  # the shapes demo's choice: black, normalised
    want = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])[:, None, None]
    torch.testing.assert_close(black["image"][:, :top], want.expand(3, top, 96))
    torch.testing.assert_close(black["image"][:, top : top + 72], out["image"][:, top : top + 72])


def test_random_translation_moves_image_box_and_mask_together(refcoco):
    root, _ = refcoco
    raw = ReferDataset(root, "refcoco", "train").load(0)
    t = GroundingTransform(96, train=True, flip_p=0.0, translate_p=1.0)
    plain = GroundingTransform(96)(raw)
    random.seed(1)
    tops = set()
    for _ in range(6):
        out = t(raw)
        left, top = (int(v) for v in out["pad"])
        tops.add(top)
        assert left == 0 and 0 <= top <= 96 - 72
        shift = top - int(plain["pad"][1])
        torch.testing.assert_close(out["image"], plain["image"].roll(shift, dims=1))
        torch.testing.assert_close(out["mask"], plain["mask"].roll(shift, dims=0))
        torch.testing.assert_close(out["box"], plain["box"] + torch.tensor([0, shift / 96, 0, 0]))
        back = boxes_to_original(out["box"][None], out["scale"][None], out["pad"][None], out["orig_size"][None], 96)
        want = boxes_to_original(plain["box"][None], plain["scale"][None], plain["pad"][None],
                                 plain["orig_size"][None], 96)
        # float32 elementwise arithmetic on boxes of <= 96 / scale px: eps32 * 100 px ~ 1e-5 (seen 4e-6)
        torch.testing.assert_close(back, want, atol=1e-4, rtol=0)
    assert len(tops) > 1  # the offset is drawn, not fixed


@pytest.mark.parametrize("name", ["refcoco", "refcoco+", "refcocog", "refclef"])
def test_paper_configs_augment_with_the_flip_only(name, capsys):
    """The RefCOCO-family configs train with the paper's augmentation: horizontal flip (with
    the left/right word swap), nothing else; every probability is shown by --print_config."""
    import yaml

    from vglaw.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert (data["flip_p"], data["crop_p"], data["color_jitter_p"], data["translate_p"]) == (0.5, 0.0, 0.0, 0.0)
    assert data["letterbox_fill"] == "mean"
    dm = ReferDataModule(**{k: data[k] for k in ("flip_p", "crop_p", "color_jitter_p", "translate_p",
                                                   "letterbox_fill")})
    t = GroundingTransform(64, train=True, **dm.augmentation)
    steps = {type(step).__name__ for pipeline in t.augment.values() if pipeline for step in pipeline.transforms}
    assert steps == {"HorizontalFlip"}


def test_shapes_every_expression_is_unique(tmp_path):
    from vglaw.data.shapes import generate

    counts = generate(tmp_path, seed=3, splits={"train": 30, "val": 5, "test": 5}, progress=False)
    assert counts["train"]["images"] == 30 and counts["val"]["sentences"] > 5
    inst = json.loads((tmp_path / "shapes" / "instances.json").read_text())
    refs = pickle.loads((tmp_path / "shapes" / "refs(unc).p").read_bytes())
    by_image: dict[int, list] = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    types = set()
    for ref in refs:
        anns = by_image[ref["image_id"]]
        objects = [{"kind": a["shape"], "color": a["color"], "size": a["size"], "cx": a["center"][0],
                    "cy": a["center"][1]} for a in anns]
        target = [a["id"] for a in anns].index(ref["ann_id"])
        for sent in ref["sentences"]:
            assert resolve(parse(sent["sent"]), objects) == [target], sent["sent"]
            # the mirrored expression refers to the same object in the mirrored image
            w = next(im["width"] for im in inst["images"] if im["id"] == ref["image_id"])
            mirrored = [{**o, "cx": w - o["cx"]} for o in objects]
            assert resolve(parse(flip_text(sent["sent"])), mirrored) == [target]
            types.add(sent["type"])
    assert types == {"attribute", "position", "relation"}
    # masks are exact: they match the pixels drawn in the shape's colour family and never overlap
    ds = ReferDataset(tmp_path, "shapes", "val")
    s = ds.load(0)
    assert s["mask"].sum() > 50 and s["mask"].shape == s["image"].shape[:2]


def test_shapes_is_deterministic(tmp_path):
    from vglaw.data.shapes import generate

    generate(tmp_path / "a", seed=5, splits={"train": 3, "val": 1, "test": 1}, progress=False)
    generate(tmp_path / "b", seed=5, splits={"train": 3, "val": 1, "test": 1}, progress=False)
    for f in ("shapes/instances.json", "shapes/refs(unc).p", "images/shapes/train_000001.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_data_check_command(refcoco, capsys, tmp_path):
    from vglaw.cli import main as cli_main

    main = lambda argv: cli_main(["data", *argv])  # noqa: E731

    root, _ = refcoco
    assert main(["check", "--root", str(root), "--dataset", "refcoco", "--images"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "testB" in out and " 4" in out
    assert main(["check", "--root", str(tmp_path / "none"), "--dataset", "refcocog"]) == 2
    assert "refs(umd).p" in capsys.readouterr().err
