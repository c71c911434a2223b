"""`vglaw data import`: MDETR, ODVG, Label Studio and jsonl annotations in, a gRefCOCO-format
"custom" dataset out (`vglaw.data.importing`, `vglaw.data.formats`).

Every test writes its own 64x48 PNG images and annotation files under tmp_path and runs the
command in-process (`vglaw.cli.main`), then reads the result back the way training does
(`GReferDataset`, `SingleTargetGReferDataset`, `vglaw data check`). Covered per format: exact
COCO boxes and outlines; one expression with several targets (never several samples); splits by
image; Label Studio's rotations, upload names, multi-line text areas and choice of annotation;
every bad input as one error line (exit 2, nothing written) or, with --skip-invalid, a counted
skip; --overwrite; the summary table.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vglaw.cli import main
from vglaw.data.grefer import GReferDataset, SingleTargetGReferDataset
from vglaw.data.refer import BadSampleError

W, H = 64, 48  # every test image, in pixels
GOOD_TEXT = "the good one"  # the valid record next to each bad one

# ---- helpers: images, the four formats, the command ----------------------------------------


def make_images(folder: Path, *names: str, size: tuple[int, int] = (W, H)) -> Path:
    """PNG files of `size` (w, h) named `names` under `folder` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10 * k % 255, 80, 160)).save(folder / name)
    return folder


def write_lines(path: Path, records: list) -> Path:
    """jsonl and ODVG: one JSON object a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, obj) -> Path:
    """MDETR and Label Studio: one JSON document."""
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_input(path: Path, fmt: str, content) -> Path:
    return write_lines(path, content) if fmt in ("jsonl", "odvg") else write_json(path, content)


def odvg(filename: str, regions: list[tuple[list, str]], width=W, height=H, caption="a caption") -> dict:
    """An ODVG visual-grounding record; regions are ([x1, y1, x2, y2], phrase)."""
    return {"filename": filename, "width": width, "height": height,
            "grounding": {"caption": caption, "regions": [{"bbox": b, "phrase": p} for b, p in regions]}}


def mdetr(entries: list[dict], annotations: list[dict]) -> dict:
    """MDETR's refexp JSON; entries default to a 64x48 image."""
    return {"images": [{"height": H, "width": W, **e} for e in entries], "annotations": annotations,
            "categories": [{"id": 1, "name": "object"}]}


def ls_rect(rid: str, x, y, width, height, rotation=0, ow=W, oh=H) -> dict:
    """A Label Studio rectangle result (percent of the image)."""
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": ow, "original_height": oh, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation,
                      "rectanglelabels": ["object"]}}


def ls_polygon(rid: str, points: list[list[float]], ow=W, oh=H) -> dict:
    return {"id": rid, "type": "polygonlabels", "from_name": "label", "to_name": "image",
            "original_width": ow, "original_height": oh,
            "value": {"points": points, "closed": True, "polygonlabels": ["object"]}}


def ls_text(rid: str, *texts: str) -> dict:
    """A per-region text area (it shares its region's id) holding one line per expression."""
    return {"id": rid, "type": "textarea", "from_name": "expression", "to_name": "image",
            "original_width": W, "original_height": H, "value": {"text": list(texts)}}


def ls_task(tid, image: str, results: list[dict] | None = None, annotations: list[dict] | None = None) -> dict:
    """A task of Label Studio's JSON export; `image` as Label Studio stores it."""
    if annotations is None:
        annotations = [ls_annotation(results or [])]
    return {"id": tid, "data": {"image": image}, "annotations": annotations, "predictions": []}


def ls_annotation(results: list[dict], aid=1, ground_truth=False, was_cancelled=False) -> dict:
    return {"id": aid, "completed_by": 1, "result": results, "ground_truth": ground_truth,
            "was_cancelled": was_cancelled}


def upload(name: str, prefix: str = "1a2b3c4d") -> str:
    """An uploaded file's path in a Label Studio export."""
    return f"/data/upload/3/{prefix}-{name}"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """`vglaw <argv>` in-process: exit code, stdout, stderr."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_import(capsys, fmt: str, inputs: list, out: Path, images: Path | None = None, *extra: str):
    argv = ["data", "import", "--format", fmt, "--out", str(out)]
    for i in inputs:
        argv += ["--input", str(i)]
    if images is not None:
        argv += ["--images", str(images)]
    return run(capsys, *argv, *extra)


def imported(capsys, fmt: str, inputs: list, out: Path, images: Path | None = None, *extra: str) -> str:
    """Import that must succeed; its stdout."""
    code, stdout, err = run_import(capsys, fmt, inputs, out, images, *extra)
    assert code == 0, err
    assert "Traceback" not in err
    return stdout


def one_error(code: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one stderr line `vglaw data: error: ...` naming every needle."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vglaw data: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def summary(stdout: str) -> tuple[dict, dict]:
    """The printed table: {split: {column: n}} and the skips {reason: (n, first message)}."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["split", "images", "expressions", "0", "targets", "1", "2", "3+"], lines[0]
    rows = {}
    for line in lines[1:4]:
        split, *nums = line.split()
        rows[split] = dict(zip(("images", "expressions", 0, 1, 2, 3), map(int, nums)))
    assert list(rows) == ["train", "val", "test"]
    skipped = {}
    for line in lines[4:]:
        m = re.match(r"^\s+(\d+)\s+(.+?) \(first: (.*)\)$", line)
        if m:
            skipped[m.group(2)] = (int(m.group(1)), m.group(3))
    assert ("skipped: none" in lines) == (not skipped), stdout
    return rows, skipped


def grefs(out: Path) -> list[dict]:
    return json.loads((out / "custom" / "grefs(unc).json").read_text())


def instances(out: Path) -> dict:
    return json.loads((out / "custom" / "instances.json").read_text())


def samples(out: Path, split: str = "train") -> dict:
    """{text: sample} of one split as a generalised model reads it (texts unique in these tests)."""
    ds = GReferDataset(out, "custom", split)
    by_text = {s.text: s for s in ds.samples}
    assert len(by_text) == len(ds.samples), [s.text for s in ds.samples]
    return by_text


def rect_polygon(x, y, w, h) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def checks_ok(capsys, out: Path) -> None:
    """`vglaw data check --dataset custom` accepts the import."""
    code, stdout, err = run(capsys, "data", "check", "--root", str(out), "--dataset", "custom")
    assert code == 0, err
    assert "bad sample" not in err


# ---- 1 & 2: correct files, exact boxes, several targets ---------------------------------------


def test_jsonl_boxes_polygons_masks_and_no_target(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png")
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[6:30, 4:20] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": "a.png", "text": "the red box", "box": [4, 6, 20, 30]},
        {"image": "a.png", "text": "the blue triangle", "box": [30, 10, 50, 40], "polygon": [[30, 10, 50, 10, 40, 40]]},
        {"image": "b.png", "text": "the masked thing", "box": [4, 6, 20, 30], "mask_rle": rle},
        {"image": "b.png", "text": "a unicorn", "boxes": []},
        {"image": "b.png", "text": "both squares", "boxes": [[0, 0, 10, 10], [20, 20, 40, 40]]},
    ])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [src], out, images)

    by_text = samples(out)  # two images: both in train
    assert set(by_text) == {"the red box", "the blue triangle", "the masked thing", "a unicorn", "both squares"}
    anns = {a["id"]: a for a in instances(out)["annotations"]}
    red = by_text["the red box"]
    assert red.bboxes == ((4.0, 6.0, 16.0, 24.0),)
    assert anns[red.ann_ids[0]]["segmentation"] == rect_polygon(4, 6, 16, 24)  # a box alone: its rectangle
    assert anns[red.ann_ids[0]]["area"] == 16 * 24
    tri = by_text["the blue triangle"]
    assert tri.bboxes == ((30.0, 10.0, 20.0, 30.0),)
    assert anns[tri.ann_ids[0]]["segmentation"] == [[30, 10, 50, 10, 40, 40]]
    masked = by_text["the masked thing"]
    assert masked.bboxes == ((4.0, 6.0, 16.0, 24.0),)
    assert anns[masked.ann_ids[0]]["segmentation"] == rle
    assert by_text["a unicorn"].ann_ids == () and by_text["a unicorn"].bboxes == ()
    assert sorted(by_text["both squares"].bboxes) == [(0.0, 0.0, 10.0, 10.0), (20.0, 20.0, 20.0, 20.0)]
    refs = {r["sentences"][0]["sent"]: r for r in grefs(out)}
    assert refs["a unicorn"]["ann_id"] == [-1] and refs["a unicorn"]["category_id"] == [-1]

    # read back as training does: the images link, the masks
    assert (out / "images" / "custom").is_symlink()
    assert (out / "images" / "custom").resolve() == images.resolve()
    assert sorted(im["file_name"] for im in instances(out)["images"]) == ["a.png", "b.png"]
    assert all((im["width"], im["height"]) == (W, H) for im in instances(out)["images"])
    ds = GReferDataset(out, "custom", "train")
    loaded = ds.load(next(i for i, s in enumerate(ds.samples) if s.text == "the masked thing"))
    assert loaded["image"].shape == (H, W, 3)
    np.testing.assert_array_equal(loaded["mask"], mask)
    none = ds.load(next(i for i, s in enumerate(ds.samples) if s.text == "a unicorn"))
    assert not none["has_target"] and none["mask"].sum() == 0 and none["bboxes"].shape == (0, 4)
    checks_ok(capsys, out)


def test_jsonl_same_expression_on_two_regions_is_one_expression_with_two_targets(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": "a.png", "text": "the dogs", "box": [4, 6, 20, 30]},
        {"image": "a.png", "text": "the dogs", "box": [30, 10, 50, 40]},
        {"image": "a.png", "text": "the dogs", "box": [4, 6, 20, 30]},  # the same region again: once
        {"image": "a.png", "text": "the left dog", "box": [4, 6, 20, 30]},
    ])
    out = tmp_path / "out"
    stdout = imported(capsys, "jsonl", [src], out, images)
    ds = GReferDataset(out, "custom", "train")
    assert sorted(s.text for s in ds.samples) == ["the dogs", "the left dog"]
    dogs = samples(out)["the dogs"]
    assert len(dogs.ann_ids) == 2
    assert sorted(dogs.bboxes) == [(4.0, 6.0, 16.0, 24.0), (30.0, 10.0, 20.0, 30.0)]
    assert samples(out)["the left dog"].ann_ids[0] in dogs.ann_ids  # one annotation per region of the image
    assert len(instances(out)["annotations"]) == 2
    mask = ds.load(next(i for i, s in enumerate(ds.samples) if s.text == "the dogs"))["mask"]
    assert mask[18, 12] and mask[25, 40] and not mask[2, 2]  # the union of both
    rows, _ = summary(stdout)
    assert rows["train"] == {"images": 1, "expressions": 2, 0: 0, 1: 1, 2: 1, 3: 0}
    checks_ok(capsys, out)


def test_odvg_regions_and_shared_phrases(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png")
    src = write_lines(tmp_path / "odvg.jsonl", [
        odvg("a.png", [([4, 6, 20, 30], "a dog"), ([30, 10, 50, 40], "a dog"), ([10, 10, 20, 20], "the ball")],
             caption="a dog and a dog with the ball"),
        odvg("b.png", [([0.5, 1.5, 10.25, 11], "the cat")]),
    ])
    out = tmp_path / "out"
    stdout = imported(capsys, "odvg", [src], out, images)
    by_text = samples(out)
    assert set(by_text) == {"a dog", "the ball", "the cat"}  # one sample per phrase, not per region
    assert sorted(by_text["a dog"].bboxes) == [(4.0, 6.0, 16.0, 24.0), (30.0, 10.0, 20.0, 30.0)]
    assert by_text["the ball"].bboxes == ((10.0, 10.0, 10.0, 10.0),)
    assert by_text["the cat"].bboxes == ((0.5, 1.5, 9.75, 9.5),)
    anns = {a["id"]: a for a in instances(out)["annotations"]}
    assert anns[by_text["the ball"].ann_ids[0]]["segmentation"] == rect_polygon(10, 10, 10, 10)
    rows, skipped = summary(stdout)
    assert rows["train"] == {"images": 2, "expressions": 3, 0: 0, 1: 2, 2: 1, 3: 0} and not skipped
    checks_ok(capsys, out)


def test_mdetr_entries_annotations_and_outlines(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png")
    src = write_json(tmp_path / "final_refexp.json", mdetr(
        [{"id": 1, "file_name": "a.png", "caption": "two dogs"},
         {"id": 2, "file_name": "b.png", "caption": "the cat"},
         {"id": 3, "file_name": "a.png", "caption": "a unicorn"},
         # the same caption of one image in two entries: one expression, both targets
         {"id": 4, "file_name": "b.png", "caption": "the birds"},
         {"id": 5, "file_name": "b.png", "caption": "the birds"}],
        [{"id": 11, "image_id": 1, "bbox": [4, 6, 16, 24], "category_id": 1},
         {"id": 12, "image_id": 1, "bbox": [30, 10, 20, 30], "segmentation": [[30, 10, 50, 10, 40, 40]]},
         {"id": 13, "image_id": 2, "bbox": [1.5, 2, 3, 4.5]},
         {"id": 14, "image_id": 4, "bbox": [10, 10, 5, 5]},
         {"id": 15, "image_id": 5, "bbox": [40, 20, 5, 5]}]))
    out = tmp_path / "out"
    imported(capsys, "mdetr", [src], out, images)
    by_text = samples(out)
    assert set(by_text) == {"two dogs", "the cat", "a unicorn", "the birds"}
    assert sorted(by_text["two dogs"].bboxes) == [(4.0, 6.0, 16.0, 24.0), (30.0, 10.0, 20.0, 30.0)]
    assert by_text["the cat"].bboxes == ((1.5, 2.0, 3.0, 4.5),)
    assert by_text["a unicorn"].ann_ids == ()
    assert sorted(by_text["the birds"].bboxes) == [(10.0, 10.0, 5.0, 5.0), (40.0, 20.0, 5.0, 5.0)]
    anns = {tuple(a["bbox"]): a for a in instances(out)["annotations"]}
    assert anns[(30.0, 10.0, 20.0, 30.0)]["segmentation"] == [[30, 10, 50, 10, 40, 40]]
    assert anns[(4.0, 6.0, 16.0, 24.0)]["segmentation"] == rect_polygon(4, 6, 16, 24)
    checks_ok(capsys, out)


def test_labelstudio_percent_boxes_polygons_uploads_and_multiline_text(tmp_path, capsys):
    images = make_images(tmp_path / "img", "photo.png", "9f8e7d6c-other.png")
    src = write_json(tmp_path / "export.json", [
        ls_task(1, upload("photo.png"), [  # the images folder holds photo.png: the prefix is dropped
            ls_rect("r1", 10, 25, 50, 50), ls_text("r1", "the left car", "a red car"),
            ls_polygon("r2", [[50, 10], [90, 10], [70, 60]]), ls_text("r2", "the sign"),
            {"id": "c1", "type": "choices", "from_name": "quality", "to_name": "image",
             "value": {"choices": ["good"]}}]),  # task-level controls are ignored
        ls_task(2, upload("other.png", "9f8e7d6c"), [  # ... holds the upload's own name
            ls_rect("r3", 0, 0, 25, 25), ls_text("r3", "the birds"),
            ls_rect("r4", 50, 50, 25, 25), ls_text("r4", "the birds")]),
    ])
    out = tmp_path / "out"
    stdout = imported(capsys, "labelstudio", [src], out, images)
    by_text = samples(out)
    assert set(by_text) == {"the left car", "a red car", "the sign", "the birds"}
    car, red = by_text["the left car"], by_text["a red car"]
    assert car.bboxes[0] == pytest.approx((6.4, 12.0, 32.0, 24.0))
    assert car.ann_ids == red.ann_ids and len(car.ann_ids) == 1  # two expressions of one region
    assert car.ref_id == red.ref_id and car.sent_id != red.sent_id
    assert by_text["the sign"].bboxes[0] == pytest.approx((32.0, 4.8, 25.6, 24.0))
    anns = {a["id"]: a for a in instances(out)["annotations"]}
    assert anns[by_text["the sign"].ann_ids[0]]["segmentation"][0] == pytest.approx(
        [32.0, 4.8, 57.6, 4.8, 44.8, 28.8])
    assert anns[car.ann_ids[0]]["segmentation"][0] == pytest.approx([6.4, 12, 38.4, 12, 38.4, 36, 6.4, 36])
    birds = by_text["the birds"]
    assert len(birds.ann_ids) == 2
    assert sorted(birds.bboxes) == [pytest.approx((0, 0, 16, 12)), pytest.approx((32, 24, 16, 12))]
    files = {im["id"]: im["file_name"] for im in instances(out)["images"]}
    assert files[birds.image_id] == "9f8e7d6c-other.png" and files[car.image_id] == "photo.png"
    rows, _ = summary(stdout)
    assert rows["train"] == {"images": 2, "expressions": 4, 0: 0, 1: 3, 2: 1, 3: 0}
    checks_ok(capsys, out)


def test_labelstudio_rotated_rectangle_is_bounded(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    # x=32, y=4.8, w=16, h=12 px turned 90 degrees clockwise about (32, 4.8): it now spans
    # x 20..32 and y 4.8..20.8
    src = write_json(tmp_path / "export.json", [
        ls_task(1, upload("a.png"), [ls_rect("r1", 50, 10, 25, 25, rotation=90), ls_text("r1", "the turned box")])])
    out = tmp_path / "out"
    imported(capsys, "labelstudio", [src], out, images)
    s = samples(out)["the turned box"]
    assert s.bboxes[0] == pytest.approx((20.0, 4.8, 12.0, 16.0))
    seg = instances(out)["annotations"][0]["segmentation"]
    assert len(seg) == 1 and len(seg[0]) == 8  # the turned rectangle, not its bounds
    corners = sorted(zip(seg[0][0::2], seg[0][1::2]))
    assert corners == [pytest.approx(p) for p in [(20, 4.8), (20, 20.8), (32, 4.8), (32, 20.8)]]
    checks_ok(capsys, out)


def test_labelstudio_polygon_inside_a_same_text_rectangle_is_its_outline(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_json(tmp_path / "export.json", [ls_task(1, upload("a.png"), [
        ls_rect("r1", 10, 10, 50, 50), ls_text("r1", "the car"),  # 6.4..38.4 x 4.8..28.8 px
        ls_polygon("r2", [[15, 15], [55, 15], [35, 55]]), ls_text("r2", "the car"),  # inside r1: its outline
        ls_polygon("r3", [[70, 70], [90, 70], [80, 90]]), ls_text("r3", "the car"),  # outside: another car
        ls_polygon("r4", [[20, 20], [30, 20], [25, 30]]), ls_text("r4", "the wheel")])])  # inside, other text
    out = tmp_path / "out"
    imported(capsys, "labelstudio", [src], out, images)
    by_text = samples(out)
    anns = {a["id"]: a for a in instances(out)["annotations"]}
    car = sorted((anns[i] for i in by_text["the car"].ann_ids), key=lambda a: a["bbox"][0])
    assert len(car) == 2
    assert car[0]["bbox"] == pytest.approx([6.4, 4.8, 32.0, 24.0])  # the rectangle's box ...
    assert car[0]["segmentation"][0] == pytest.approx([9.6, 7.2, 35.2, 7.2, 22.4, 26.4])  # ... r2's outline
    assert car[1]["bbox"] == pytest.approx([44.8, 33.6, 12.8, 9.6])
    assert car[1]["segmentation"][0] == pytest.approx([44.8, 33.6, 57.6, 33.6, 51.2, 43.2])
    wheel = anns[by_text["the wheel"].ann_ids[0]]
    assert wheel["bbox"] == pytest.approx([12.8, 9.6, 6.4, 4.8])
    checks_ok(capsys, out)


def test_labelstudio_takes_ground_truth_else_last_not_cancelled(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png", "c.png")

    def said(text, **kw):
        return ls_annotation([ls_rect("r1", 10, 10, 20, 20), ls_text("r1", text)], **kw)

    src = write_json(tmp_path / "export.json", [
        ls_task(1, upload("a.png"), annotations=[said("marked truth", aid=1, ground_truth=True),
                                                 said("a later review", aid=2)]),
        ls_task(2, upload("b.png"), annotations=[said("first try", aid=3), said("second try", aid=4),
                                                 said("cancelled one", aid=5, was_cancelled=True)]),
        ls_task(3, upload("c.png"), annotations=[said("only cancelled", aid=6, was_cancelled=True)]),
        ls_task(4, upload("c.png"), annotations=[]),  # not annotated yet: nothing, no error, counted
    ])
    out = tmp_path / "out"
    stdout = imported(capsys, "labelstudio", [src], out, images)
    assert set(samples(out)) == {"marked truth", "second try"}
    _, skipped = summary(stdout)
    assert {k: n for k, (n, _) in skipped.items()} == {"task not annotated": 2}


# ---- 3: splits by image ---------------------------------------------------------------------


def twenty_images(tmp_path: Path) -> tuple[Path, Path]:
    names = [f"im{k:02d}.png" for k in range(20)]
    images = make_images(tmp_path / "img", *names)
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": n, "text": t, "box": [4, 6, 20, 30]} for n in names for t in ("the box", "that thing")])
    return images, src


def split_of_images(out: Path) -> dict[str, str]:
    """file name -> split, checking every ref of an image is in that one split."""
    files = {im["id"]: im["file_name"] for im in instances(out)["images"]}
    splits: dict[str, set] = {}
    for r in grefs(out):
        splits.setdefault(files[r["image_id"]], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values()), splits
    return {name: s.pop() for name, s in splits.items()}


def test_seeded_split_by_image(tmp_path, capsys):
    images, src = twenty_images(tmp_path)
    outs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8), ("d", 9), ("e", 10)):
        outs[name] = tmp_path / name
        stdout = imported(capsys, "jsonl", [src], outs[name], images, "--seed", str(seed))
    rows, _ = summary(stdout)
    assert {s: r["images"] for s, r in rows.items()} == {"train": 16, "val": 2, "test": 2}
    assert {s: r["expressions"] for s, r in rows.items()} == {"train": 32, "val": 4, "test": 4}

    ids = {split: {s.image_id for s in GReferDataset(outs["a"], "custom", split).samples}
           for split in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert len(ids["train"] | ids["val"] | ids["test"]) == 20

    for f in ("grefs(unc).json", "instances.json"):  # the same seed: the same files, byte for byte
        assert (outs["a"] / "custom" / f).read_bytes() == (outs["b"] / "custom" / f).read_bytes()
    a = split_of_images(outs["a"])
    assert any(split_of_images(outs[k]) != a for k in "cde")  # another seed draws another split
    for k in "abcde":
        checks_ok(capsys, outs[k])


def test_three_images_give_val_and_test_one_each(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png", "c.png")
    src = write_lines(tmp_path / "ann.jsonl", [{"image": n, "text": "x", "box": [4, 6, 20, 30]}
                                               for n in ("a.png", "b.png", "c.png")])
    rows, _ = summary(imported(capsys, "jsonl", [src], tmp_path / "out", images))
    assert [rows[s]["images"] for s in ("train", "val", "test")] == [1, 1, 1]


def test_default_images_folder_and_images_elsewhere(tmp_path, capsys):
    folder = make_images(tmp_path / "project", "a.png", "sub/b.png")
    elsewhere = make_images(tmp_path / "elsewhere", "c.png")
    src = write_lines(folder / "ann.jsonl", [  # no --images: the input's folder
        {"image": "a.png", "text": "in the folder", "box": [4, 6, 20, 30]},
        {"image": "sub/b.png", "text": "in a subfolder", "box": [4, 6, 20, 30]},
        {"image": str(elsewhere / "c.png"), "text": "elsewhere", "box": [4, 6, 20, 30]}])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [src], out, None, "--seed", "1")
    names = sorted(im["file_name"] for im in instances(out)["images"])
    assert names == sorted(["a.png", "sub/b.png", str((elsewhere / "c.png").resolve())])
    assert (out / "images" / "custom").resolve() == folder.resolve()
    for split in ("train", "val", "test"):
        ds = GReferDataset(out, "custom", split)
        for i in range(len(ds)):
            assert ds.load(i)["image"].shape == (H, W, 3)
    checks_ok(capsys, out)


def test_given_splits_are_kept(tmp_path, capsys):
    names = [f"im{k:02d}.png" for k in range(6)]
    images = make_images(tmp_path / "img", *names)
    split_field = write_lines(tmp_path / "fields.jsonl", [
        {"image": n, "text": "the box", "box": [4, 6, 20, 30], "split": s}
        for n, s in zip(names, ["train", "val", "test", "val", "val", "test"])])
    out = tmp_path / "fields"
    imported(capsys, "jsonl", [split_field], out, images, "--seed", "3")
    assert split_of_images(out) == dict(zip(names, ["train", "val", "test", "val", "val", "test"]))

    # SPLIT=FILE puts all of a file's records in SPLIT
    train = write_lines(tmp_path / "train.jsonl", [{"image": n, "text": "the box", "box": [4, 6, 20, 30]}
                                                    for n in names[:4]])
    val = write_lines(tmp_path / "val.jsonl", [{"image": n, "text": "the box", "box": [4, 6, 20, 30]}
                                                for n in names[4:]])
    out = tmp_path / "files"
    stdout = imported(capsys, "jsonl", [f"train={train}", f"val={val}"], out, images)
    assert split_of_images(out) == {**{n: "train" for n in names[:4]}, **{n: "val" for n in names[4:]}}
    rows, _ = summary(stdout)
    assert [rows[s]["images"] for s in ("train", "val", "test")] == [4, 2, 0]
    checks_ok(capsys, out)


def test_an_image_given_two_splits_is_an_error(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": "a.png", "text": "red", "box": [4, 6, 20, 30], "split": "train"},
        {"image": "a.png", "text": "blue", "box": [1, 1, 20, 30], "split": "val"}])
    out = tmp_path / "out"
    one_error(*run_import(capsys, "jsonl", [src], out, images)[::2], "ann.jsonl:2", "a.png", "'val' here",
              "'train' elsewhere")
    assert not out.exists()


@pytest.mark.parametrize("second_split", ["val", "dev"])
def test_a_record_skipped_for_its_split_is_not_imported(tmp_path, capsys, second_split):
    images = make_images(tmp_path / "img", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": "a.png", "text": "red", "box": [4, 6, 20, 30], "split": "train"},
        {"image": "a.png", "text": "blue", "box": [1, 1, 20, 30], "split": second_split}])
    out = tmp_path / "out"
    rows, skipped = summary(imported(capsys, "jsonl", [src], out, images, "--skip-invalid"))
    assert sum(n for n, _ in skipped.values()) == 1
    assert sum(r["expressions"] for r in rows.values()) == 1  # 2 records, 1 skipped


def test_split_prefix_with_an_equals_sign_in_the_path(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    folder = tmp_path / "k=v"
    folder.mkdir()
    src = write_lines(folder / "a.jsonl", [{"image": "a.png", "text": "red", "box": [4, 6, 20, 30]}])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [f"val={src}"], out, images)
    assert split_of_images(out) == {"a.png": "val"}


# ---- single-target reading ------------------------------------------------------------------


def test_single_target_reader_takes_only_one_target_expressions(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": "a.png", "text": "nothing", "boxes": []},
        {"image": "a.png", "text": "one", "box": [4, 6, 20, 30]},
        {"image": "a.png", "text": "two", "boxes": [[4, 6, 20, 30], [30, 10, 50, 40]]}])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [src], out, images)
    with pytest.raises(BadSampleError, match="names (no object|2 objects)"):
        SingleTargetGReferDataset(out, "custom", "train")
    with pytest.warns(UserWarning, match="skipped 2 bad samples"):
        ds = SingleTargetGReferDataset(out, "custom", "train", skip_invalid=True)
    assert [s.text for s in ds.samples] == ["one"]
    assert isinstance(ds.samples[0].ann_id, int) and ds.samples[0].bbox == (4.0, 6.0, 16.0, 24.0)
    assert ds.load(0)["mask"].sum() > 0


# ---- 5: bad input, per format ---------------------------------------------------------------

GOOD = {
    "jsonl": [{"image": "a.png", "text": GOOD_TEXT, "box": [4, 6, 20, 30]}],
    "odvg": [odvg("a.png", [([4, 6, 20, 30], GOOD_TEXT)])],
    "mdetr": ([{"id": 1, "file_name": "a.png", "caption": GOOD_TEXT}],
              [{"id": 1, "image_id": 1, "bbox": [4, 6, 16, 24]}]),
    "labelstudio": [ls_task(1, upload("a.png"), [ls_rect("r1", 10, 10, 20, 20), ls_text("r1", GOOD_TEXT)])],
}


def with_good(fmt: str, bad):
    """The format's one valid record, then the bad one(s)."""
    if fmt == "mdetr":
        entries, anns = bad
        return mdetr(GOOD["mdetr"][0] + entries, GOOD["mdetr"][1] + anns)
    return GOOD[fmt] + (bad if isinstance(bad, list) else [bad])


def bad_ls(*results, image="b.png", tid=2):
    return ls_task(tid, upload(image), list(results))


# (format, the bad record(s), the reason --skip-invalid counts, what the error line names)
BAD = [
    # jsonl: the second line is bad
    ("jsonl", {"image": "b.png", "text": "far", "box": [10, 10, 70, 20]}, "box outside the image", [":2", "64x48"]),
    ("jsonl", {"image": "b.png", "text": "flat", "box": [10, 10, 10, 20]}, "zero-area box", [":2"]),
    ("jsonl", {"image": "b.png", "text": "neg", "box": [-5, 10, 20, 20]}, "box outside the image", [":2"]),
    ("jsonl", {"image": "gone.png", "text": "lost", "box": [1, 1, 5, 5]}, "missing image", [":2", "gone.png"]),
    ("jsonl", {"image": "b.png", "text": " \u200b\n ", "box": [1, 1, 5, 5]}, "empty expression", [":2"]),
    # ODVG
    ("odvg", odvg("b.png", [([0, 0, 10, 60], "tall")]), "box outside the image", [":2, region 0"]),
    ("odvg", odvg("b.png", [([5, 5, 5, 9], "flat")]), "zero-area box", [":2, region 0"]),
    ("odvg", odvg("b.png", [([1, 1, 5, 5], "x")], width=640, height=480), "image size disagrees",
     [":2", "640x480"]),
    ("odvg", odvg("gone.png", [([1, 1, 5, 5], "x")]), "missing image", [":2", "gone.png"]),
    ("odvg", odvg("b.png", [([1, 1, 5, 5], "")]), "empty expression", [":2, region 0"]),
    ("odvg", {"filename": "b.png", "height": H, "width": W, "detection": {"instances": [
        {"bbox": [1, 1, 5, 5], "label": 0, "category": "dog"}]}}, "not a grounding record", [":2", "detection"]),
    # MDETR: image entry 2 is bad
    ("mdetr", ([{"id": 2, "file_name": "b.png", "caption": "far"}],
               [{"id": 2, "image_id": 2, "bbox": [60, 0, 10, 10]}]),
     "box outside the image", ["image entry 2", "annotation 2"]),
    ("mdetr", ([{"id": 2, "file_name": "b.png", "caption": "flat"}], [{"id": 2, "image_id": 2, "bbox": [5, 5, 0, 10]}]),
     "zero-area box", ["image entry 2"]),
    ("mdetr", ([{"id": 2, "file_name": "b.png", "caption": "big", "width": 100}], []), "image size disagrees",
     ["image entry 2", "100x48"]),
    ("mdetr", ([{"id": 2, "file_name": "gone.png", "caption": "lost"}], []), "missing image",
     ["image entry 2", "gone.png"]),
    ("mdetr", ([{"id": 2, "file_name": "b.png", "caption": "   "}], []), "empty expression", ["image entry 2"]),
    ("mdetr", ([{"id": 1, "file_name": "b.png", "caption": "again"}], []), "duplicate id", ["image entry 1", "twice"]),
    # Label Studio: task 2 is bad
    ("labelstudio", bad_ls(ls_rect("r9", 90, 10, 20, 20), ls_text("r9", "far")), "box outside the image",
     ["task 2, region r9"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 0, 20), ls_text("r9", "flat")), "zero-area box",
     ["task 2, region r9"]),
    ("labelstudio", bad_ls(ls_rect("r9", 120, 10, 20, 20), ls_text("r9", "x")), "percent out of range",
     ["task 2, region r9", "x = 120"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, -5, 20, 20), ls_text("r9", "y")), "percent out of range",
     ["task 2, region r9", "y = -5"]),
    ("labelstudio", bad_ls(ls_polygon("r9", [[10, 10], [150, 10], [10, 50]]), ls_text("r9", "p")),
     "percent out of range", ["task 2, region r9"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 20, 20, ow=640, oh=480), ls_text("r9", "x")),
     "image size disagrees", ["task 2, region r9", "640x480"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 20, 20), ls_text("r9", "x"), image="gone.png"), "missing image",
     ["task 2", "gone.png"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 20, 20), ls_text("r9", "  ")), "empty expression",
     ["task 2, region r9"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 20, 20)), "region without a text", ["task 2, region r9"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 20, 20), ls_text("r9", "x"), ls_text("zz", "stray")),
     "text without a region", ["task 2", "'zz'"]),
    ("labelstudio", bad_ls(ls_rect("r1", 10, 10, 20, 20), ls_text("r1", "again"), tid=1), "duplicate id",
     ["task 1", "task id 1 appears twice"]),
    ("labelstudio", bad_ls(ls_rect("r9", 10, 10, 20, 20), ls_rect("r9", 50, 50, 20, 20), ls_text("r9", "x")),
     "duplicate id", ["task 2, region r9"]),
    ("labelstudio", bad_ls({"id": "r9", "type": "brushlabels", "from_name": "brush", "to_name": "image",
                            "original_width": W, "original_height": H,
                            "value": {"format": "rle", "rle": [0, 1, 2], "brushlabels": ["object"]}},
                           ls_text("r9", "painted")),
     "brush mask", ["task 2, region r9", "brush masks", "not supported"]),
]


@pytest.mark.parametrize("fmt,bad,reason,needles", BAD,
                         ids=[f"{c[0]}-{c[2].replace(' ', '-')}-{k}" for k, c in enumerate(BAD)])
def test_bad_input_is_one_error_line_or_a_counted_skip(tmp_path, capsys, fmt, bad, reason, needles):
    images = make_images(tmp_path / "img", "a.png", "b.png")
    name = {"jsonl": "ann.jsonl", "odvg": "odvg.jsonl", "mdetr": "refexp.json", "labelstudio": "export.json"}[fmt]
    src = write_input(tmp_path / name, fmt, with_good(fmt, bad))
    out = tmp_path / "out"

    code, _, err = run_import(capsys, fmt, [src], out, images)
    one_error(code, err, str(src), *needles)
    assert not out.exists()  # nothing written

    stdout = imported(capsys, fmt, [src], out, images, "--skip-invalid")
    rows, skipped = summary(stdout)
    assert list(skipped) == [reason], stdout
    n, first = skipped[reason]
    assert n == 1 and str(src) in first and all(needle in first for needle in needles)
    assert sum(r["expressions"] for r in rows.values()) == 1
    assert set(samples(out)) == {GOOD_TEXT}
    checks_ok(capsys, out)


def test_skips_are_counted_by_reason(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png")
    src = write_lines(tmp_path / "ann.jsonl", GOOD["jsonl"] + [
        {"image": "b.png", "text": "far", "box": [10, 10, 70, 20]},
        {"image": "b.png", "text": "farther", "box": [10, 10, 80, 20]},
        {"image": "gone.png", "text": "lost", "box": [1, 1, 5, 5]}])
    out = tmp_path / "out"
    _, skipped = summary(imported(capsys, "jsonl", [src], out, images, "--skip-invalid"))
    assert {k: n for k, (n, _) in skipped.items()} == {"box outside the image": 2, "missing image": 1}
    assert ":2" in skipped["box outside the image"][1]  # the first one


@pytest.mark.parametrize("fmt,content,needles", [
    ("foo", GOOD["jsonl"], ["--format 'foo'", "jsonl", "labelstudio"]),
    # Label Studio's JSON-MIN export: flat tasks, no "annotations"
    ("labelstudio", [{"id": 1, "image": upload("a.png"), "annotator": 1, "annotation_id": 1,
                      "label": [{"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["object"]}],
                      "expression": "the good one"}], ["export.json", "JSON-MIN"]),
    ("labelstudio", "not an export", ["export.json", "not a Label Studio JSON export"]),
    # a COCO detection file given as MDETR
    ("mdetr", {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
               "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 6, 16, 24], "category_id": 1}],
               "categories": [{"id": 1, "name": "dog"}]}, ["export.json", "COCO detection"]),
    ("mdetr", ["a", "list"], ["export.json", "not MDETR's refexp format"]),
])
def test_unknown_format_or_format_version_is_refused_even_with_skip_invalid(tmp_path, capsys, fmt, content,
                                                                            needles):
    images = make_images(tmp_path / "img", "a.png")
    src = write_json(tmp_path / "export.json", content)
    out = tmp_path / "out"
    for extra in ((), ("--skip-invalid",)):
        code, _, err = run_import(capsys, fmt, [src], out, images, *extra)
        one_error(code, err, *needles)
        assert not out.exists()


def test_invalid_json_and_missing_files(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = tmp_path / "broken.json"
    src.write_text("[{", encoding="utf-8")
    out = tmp_path / "out"
    for fmt in ("mdetr", "labelstudio"):
        one_error(*run_import(capsys, fmt, [src], out, images)[::2], "broken.json", "not valid JSON")
    lines = write_lines(tmp_path / "ann.jsonl", GOOD["jsonl"])
    with open(lines, "a") as f:
        f.write("{not json\n")
    one_error(*run_import(capsys, "jsonl", [lines], out, images)[::2], "ann.jsonl:2", "not a JSON object")
    one_error(*run_import(capsys, "jsonl", [tmp_path / "nope.jsonl"], out, images)[::2], "nope.jsonl", "no such file")
    one_error(*run_import(capsys, "jsonl", [lines], out, tmp_path / "noimages")[::2], "noimages", "no such folder")
    assert not out.exists()


def test_everything_skipped_is_an_error(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [{"image": "gone.png", "text": "lost", "box": [1, 1, 5, 5]}])
    out = tmp_path / "out"
    one_error(*run_import(capsys, "jsonl", [src], out, images, "--skip-invalid")[::2], "nothing to import")
    assert not out.exists()


def test_jsonl_malformed_records(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    for record, needle in (
            ({"image": "a.png", "text": "x", "boxes": 5, "polygon": [[1, 1, 5, 1, 5, 5]]}, "must be a list"),
            ({"image": "a.png", "text": "x", "boxes": [[1, 1, 5, 5]], "polygon": []}, "one outline per box"),
            ({"image": "a.png", "text": "x", "box": [1, 1, 5, 5], "boxes": []}, "exactly one of"),
            ({"image": "a.png", "text": "x", "box": [1, 1, 5]}, "[x1, y1, x2, y2]"),
            ({"image": "a.png", "text": "x", "box": [1, 1, 5, 5], "polygon": [[1, 1, 5, 1]]}, "at least 3 points"),
            ({"image": "a.png", "text": "x", "box": [1, 1, 5, 5], "colour": "red"}, "unknown field colour")):
        src = write_lines(tmp_path / "ann.jsonl", [record])
        one_error(*run_import(capsys, "jsonl", [src], tmp_path / "out", images)[::2], "ann.jsonl:1", needle)
    assert not (tmp_path / "out").exists()


# ---- 6: --out already holding a dataset ------------------------------------------------------


def test_out_holding_an_import_needs_overwrite(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    first = write_lines(tmp_path / "first.jsonl", [{"image": "a.png", "text": "first", "box": [4, 6, 20, 30]}])
    second = write_lines(tmp_path / "second.jsonl", [{"image": "a.png", "text": "second", "box": [1, 1, 9, 9]}])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [first], out, images)
    before = {f: (out / "custom" / f).read_bytes() for f in ("grefs(unc).json", "instances.json")}

    one_error(*run_import(capsys, "jsonl", [second], out, images)[::2], str(out), "--overwrite")
    assert {f: (out / "custom" / f).read_bytes() for f in before} == before

    # a bad input with --overwrite leaves the old dataset as it was
    bad = write_lines(tmp_path / "bad.jsonl", [{"image": "a.png", "text": "x", "box": [1, 1, 90, 9]}])
    one_error(*run_import(capsys, "jsonl", [bad], out, images, "--overwrite")[::2], "bad.jsonl:1")
    assert {f: (out / "custom" / f).read_bytes() for f in before} == before

    imported(capsys, "jsonl", [second], out, images, "--overwrite")
    assert set(samples(out)) == {"second"}
    assert samples(out)["second"].bboxes == ((1.0, 1.0, 8.0, 8.0),)
    assert (out / "images" / "custom").resolve() == images.resolve()
    checks_ok(capsys, out)


def test_overwrite_relinks_to_the_new_images_folder(tmp_path, capsys):
    old = make_images(tmp_path / "old", "a.png")
    new = make_images(tmp_path / "new", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [{"image": "a.png", "text": "x", "box": [4, 6, 20, 30]}])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [src], out, old)
    imported(capsys, "jsonl", [src], out, new, "--overwrite")
    assert (out / "images" / "custom").resolve() == new.resolve()
    assert (old / "a.png").is_file()  # the old images are untouched


def test_images_already_in_out_images_custom(tmp_path, capsys):
    out = tmp_path / "out"
    images = make_images(out / "images" / "custom", "a.png")
    src = write_lines(tmp_path / "ann.jsonl", [{"image": "a.png", "text": "x", "box": [4, 6, 20, 30]}])
    code, _, err = run_import(capsys, "jsonl", [src], out, images, "--overwrite")
    assert (images / "a.png").is_file()
    assert code == 0, err


# ---- 7: the summary table ----------------------------------------------------------------------


def test_summary_table_counts_images_expressions_and_targets_per_split(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png", "b.png", "c.png", "d.png")
    box = [[1, 1, 9, 9], [11, 11, 19, 19], [21, 21, 29, 29], [31, 31, 39, 39]]
    src = write_lines(tmp_path / "ann.jsonl", [
        {"image": "a.png", "text": "nothing", "boxes": [], "split": "train"},
        {"image": "a.png", "text": "one", "box": box[0], "split": "train"},
        {"image": "a.png", "text": "two", "boxes": box[:2], "split": "train"},
        {"image": "a.png", "text": "three", "boxes": box[:3], "split": "train"},
        {"image": "b.png", "text": "four", "boxes": box, "split": "train"},
        {"image": "c.png", "text": "one", "box": box[0], "split": "val"},
        {"image": "c.png", "text": "also one", "box": box[0], "split": "val"},
        {"image": "d.png", "text": "two", "boxes": box[2:], "split": "test"},
    ])
    out = tmp_path / "out"
    stdout = imported(capsys, "jsonl", [src], out, images)
    rows, skipped = summary(stdout)
    assert rows == {"train": {"images": 2, "expressions": 5, 0: 1, 1: 1, 2: 1, 3: 2},
                    "val": {"images": 1, "expressions": 2, 0: 0, 1: 2, 2: 0, 3: 0},
                    "test": {"images": 1, "expressions": 1, 0: 0, 1: 0, 2: 1, 3: 0}}
    assert not skipped and "skipped: none" in stdout
    assert str(out / "custom") in stdout.splitlines()[-1]
    # the dataset agrees with the table
    for split, row in rows.items():
        ds = GReferDataset(out, "custom", split)
        assert len(ds.samples) == row["expressions"]
        assert len({s.image_id for s in ds.samples}) == row["images"]
        assert sum(1 for s in ds.samples if not s.ann_ids) == row[0]
    checks_ok(capsys, out)


# ---- what a review of the first version found --------------------------------------------


def test_an_image_is_found_by_its_own_path_first_and_a_shared_name_is_refused(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a/x.png", "b/x.png", "c.png")
    task = lambda tid, image: ls_task(tid, image, [ls_rect("r1", 10, 10, 20, 20), ls_text("r1", f"t{tid}")])  # noqa: E731
    src = write_json(tmp_path / "e.json", [task(1, "b/x.png"), task(2, "/data/local-files/?d=c.png")])
    out = tmp_path / "out"
    imported(capsys, "labelstudio", [src], out, images)
    files = {im["file_name"] for im in instances(out)["images"]}
    assert files == {"b/x.png", "c.png"}  # the path as given, not the first x.png by name
    write_json(src, [task(1, upload("x.png"))])
    one_error(*run_import(capsys, "labelstudio", [src], tmp_path / "o2", images)[::2], "could be any of 2 files")


def test_one_image_spelled_two_ways_is_one_image(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_lines(tmp_path / "a.jsonl", [
        {"image": "a.png", "text": "one", "box": [1, 1, 20, 20], "split": "train"},
        {"image": "./sub/../a.png", "text": "two", "box": [1, 1, 20, 20]}])
    out = tmp_path / "out"
    imported(capsys, "jsonl", [src], out, images)
    assert len(instances(out)["images"]) == 1 and set(samples(out)) == {"one", "two"}


def test_an_exif_turned_image_is_refused_not_read_in_another_frame(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    Image.new("RGB", (60, 20)).save(images / "t.jpg", exif=exif)
    src = write_lines(tmp_path / "a.jsonl", [{"image": "t.jpg", "text": "x", "box": [1, 1, 10, 10]}])
    one_error(*run_import(capsys, "jsonl", [src], tmp_path / "out", images)[::2], "EXIF orientation", "t.jpg")


def test_a_rejected_region_leaves_its_whole_expression_out(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_json(tmp_path / "e.json", [ls_task(1, upload("a.png"), [
        ls_rect("r1", 10, 10, 20, 20), ls_text("r1", "the two boxes"),
        ls_rect("r2", 101, 10, 20, 20), ls_text("r2", "the two boxes"),
        ls_rect("r3", 50, 50, 20, 20), ls_text("r3", GOOD_TEXT)])])
    out = tmp_path / "out"
    _, skipped = summary(imported(capsys, "labelstudio", [src], out, images, "--skip-invalid"))
    assert set(samples(out)) == {GOOD_TEXT}  # never "the two boxes" with one of its two targets
    assert skipped["percent out of range"][0] == 1 and skipped["expression with a rejected region"][0] == 1


@pytest.mark.parametrize("record, needle", [
    ({"image": "a.png", "text": "thin", "box": [10, 5, 10.5, 15]}, "narrower than a pixel"),
    ({"image": "a.png", "text": "far", "box": [1, 1, 5, 5], "polygon": [30, 10, 39, 10, 39, 19]},
     "outside the box"),
    ({"image": "a.png", "text": "x", "box": [1, 1, 5, 5], "split": 1}, "split 1"),
    ({"image": "a.png", "text": "x", "box": [1, 1, 5, 5], "mask_rle": {"size": [48], "counts": [3072]}},
     "COCO RLE"),
    ({"image": "a.png", "text": "x", "box": [1, 1, 5, 5], "polygon": [1, 1, "a", 2, 3, 3]}, "polygon"),
    ({"image": "a.png", "text": "x", "box": [1, 1, float("nan"), 5]}, "NaN"),
])
def test_jsonl_values_the_first_version_let_through(tmp_path, capsys, record, needle):
    images = make_images(tmp_path / "img", "a.png")
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n")
    one_error(*run_import(capsys, "jsonl", [path], tmp_path / "out", images)[::2], needle)


@pytest.mark.parametrize("results", [
    "not a list",
    [{"id": "r1", "type": "rectanglelabels", "value": [1, 2]}, ls_text("r1", "x")],
    [ls_rect("r1", 10, 10, 20, 20, rotation="abc"), ls_text("r1", "x")],
    [ls_rect("r1", 10, 10, 20, 20), {**ls_text("r1", "x"), "value": None}],
    [{**ls_rect("r1", 10, 10, 20, 20), "id": ["a"]}, ls_text("r1", "x")],
])
def test_malformed_labelstudio_values_are_one_line_never_a_traceback(tmp_path, capsys, results):
    images = make_images(tmp_path / "img", "a.png")
    task = ls_task(1, upload("a.png"), annotations=[{"id": 1, "result": results}])
    src = write_json(tmp_path / "e.json", [task])
    one_error(*run_import(capsys, "labelstudio", [src], tmp_path / "out", images)[::2], "task 1")


def test_labelstudio_text_lines_controls_and_turned_images(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    src = write_json(tmp_path / "e.json", [ls_task(1, upload("a.png"), [
        ls_rect("r1", 10, 10, 20, 20), ls_text("r1", "the first\nthe second")])])
    out = tmp_path / "out"
    imported(capsys, "labelstudio", [src], out, images)
    assert set(samples(out)) == {"the first", "the second"}
    notes = {**ls_text("r1", "blurry"), "from_name": "notes"}
    write_json(src, [ls_task(1, upload("a.png"), [ls_rect("r1", 10, 10, 20, 20), ls_text("r1", "x"), notes])])
    one_error(*run_import(capsys, "labelstudio", [src], tmp_path / "o2", images)[::2], "expression, notes")
    turned = {**ls_rect("r1", 10, 10, 20, 20), "image_rotation": 90}
    write_json(src, [ls_task(1, upload("a.png"), [turned, ls_text("r1", "x")])])
    one_error(*run_import(capsys, "labelstudio", [src], tmp_path / "o3", images)[::2], "turned by 90")


def test_an_mdetr_annotation_of_no_image_entry_is_refused(tmp_path, capsys):
    images = make_images(tmp_path / "img", "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "height": H, "width": W, "caption": "the one"}],
           "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 10, 10]},
                           {"id": 2, "image_id": 9, "bbox": [1, 1, 10, 10]}]}
    src = write_json(tmp_path / "r.json", doc)
    one_error(*run_import(capsys, "mdetr", [src], tmp_path / "out", images)[::2], "annotation 2", "image_id 9")
    doc["annotations"] = [{"image_id": 1, "bbox": [1, 1, 10, 10]}, {"image_id": 1, "bbox": [1, 1, 10, 10]}]
    write_json(src, doc)
    one_error(*run_import(capsys, "mdetr", [src], tmp_path / "o2", images)[::2], "needs an \"id\"")


def test_mask_outlines_run_along_the_pixel_edges():
    """`mask_polygons` (predictions to Label Studio, the fine-tune demo's outlines) gives back
    the mask when COCO rasterises it: a block exactly, a disc and a staircase nearly."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from vglaw.data.importing import mask_polygons

    def back(m):
        rle = mask_utils.merge(mask_utils.frPyObjects(mask_polygons(m), *m.shape))
        return mask_utils.decode(rle).astype(bool)

    block = np.zeros((40, 50), bool)
    block[5:25, 10:20] = True
    assert (back(block) == block).all() and mask_polygons(block)[0] == [10, 5, 10, 25, 20, 25, 20, 5]
    yy, xx = np.mgrid[:64, :64]
    disc = (xx - 30) ** 2 + (yy - 30) ** 2 < 15**2
    stairs = (yy >= 10) & (yy < 50) & (xx >= 20) & (xx <= 20 + (yy - 10) // 2)
    for m in (disc, stairs):
        got = back(m)
        assert (got & m).sum() / (got | m).sum() > 0.97
    dot = np.zeros((10, 10), bool)
    dot[3, 4] = True
    assert (back(dot) == dot).all()
