"""Hostile and careless input: no code runs from a file, nothing half-written, one clear line
(exit code 2) for every user mistake, and large inputs within bounds."""
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import write_refcoco
from vglaw.cli import main

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def one_error_line(capsys, command, *needles):
    """The command's stderr holds error lines naming `needles` and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"vglaw {command}: error:")]
    assert lines, err
    for needle in needles:
        assert any(needle in ln for ln in lines), (needle, err)
    return lines


# ---- code execution from files -----------------------------------------------------------

def test_no_command_runs_code_from_a_checkpoint(tiny_ckpt, shapes_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_ckpt, weights_only=True)
    state["hyper_parameters"]["extra"] = _Payload(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(state, evil)
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    assert main(["predict", "--image", str(image), "--text", "x", "--model", str(evil),
                 "--out", str(tmp_path / "o.png")]) == 2
    one_error_line(capsys, "predict", "evil.ckpt", "refusing")
    assert main(["export", str(evil), "--out", str(tmp_path / "m")]) == 2
    one_error_line(capsys, "export", "refusing")
    assert main(["validate", "--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
                 "--model.variant=vglaw_tiny", "--model.model_args=null", "--model.weight_seg=0",
                 "--data.img_size=64", f"--ckpt_path={evil}"]) == 2
    one_error_line(capsys, "validate", "refusing")
    weights = tmp_path / "w.pth"
    torch.save({"blocks.0.attn.qkv.weight": _Payload(marker)}, weights)
    from vglaw.errors import UserError
    from vglaw.models.checkpoint import load_visual_weights
    from vglaw.models.vitdet import ViTDet

    with pytest.raises(UserError, match="refusing"):
        load_visual_weights(ViTDet(img_size=64, embed_dim=32, depth=1, num_heads=2), weights, log=None)
    assert not marker.exists()


# ---- nothing half-written ----------------------------------------------------------------

def test_failed_write_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    from vglaw.io import atomic

    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(target, '{"new": ' + "1" * 10000 + "}")
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_concurrent_writers_never_interleave(tmp_path):
    from vglaw.io.atomic import save_image

    target = tmp_path / "overlay.png"
    pictures = [Image.fromarray(np.full((300, 300, 3), v, dtype=np.uint8)) for v in (30, 220)]
    errors = []

    def writer(k):
        try:
            for _ in range(15):
                save_image(pictures[k], target)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    value = np.asarray(Image.open(target))
    assert (value == 30).all() or (value == 220).all()  # one whole picture, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png"]


def test_lightning_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A checkpoint write that fails half-way leaves the previous checkpoint intact."""
    from vglaw.training.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_out_equal_to_the_input_is_refused_and_same_names_do_not_collide(tiny_ckpt, shapes_root, tmp_path,
                                                                         capsys, monkeypatch):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    copy = tmp_path / "photo.png"
    copy.write_bytes(image.read_bytes())
    before = copy.read_bytes()
    assert main(["predict", "--image", str(copy), "--text", "x", "--model", str(tiny_ckpt), "--out", str(copy)]) == 2
    one_error_line(capsys, "predict", "is an input of this run")
    assert copy.read_bytes() == before
    monkeypatch.chdir(tmp_path)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "photo.png").write_bytes(before)
        assert main(["predict", "--image", str(tmp_path / sub / "photo.png"), "--text", "x",
                     "--model", str(tiny_ckpt)]) == 0
    outputs = sorted((tmp_path / "outputs" / "predict").glob("photo-*.png"))
    assert len(outputs) == 2


# ---- wrong answers without a word -------------------------------------------------------

@pytest.mark.parametrize("mode,values,expected", [
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # float in [0, 1]
    ("F", [0.0, 100.0, 255.0], [0, 100, 255]),  # float in [0, 255]
    ("I", [0, 32768, 65535], [0, 128, 255]),  # 32-bit holding 16-bit values
    ("I", [0, 100, 255], [0, 100, 255]),  # 32-bit holding 8-bit values
])
def test_float_and_32bit_tiffs_keep_their_brightness(tmp_path, mode, values, expected):
    from vglaw.data.refer import load_rgb

    arr = np.array([values * 4], dtype=np.float32 if mode == "F" else np.int32)
    path = tmp_path / "x.tif"
    Image.fromarray(arr, mode=mode).save(path)
    got = load_rgb(path)
    assert got.dtype == np.uint8 and got.shape == (1, 12, 3)
    np.testing.assert_array_equal(got[0, :3, 0], expected)


@pytest.mark.parametrize("mode,values", [("F", [-1.0, 0.5, 3000.0]), ("F", [0.0, float("nan"), 1.0]),
                                         ("I", [0, 70000, 1])])
def test_ambiguous_tiffs_are_refused(tmp_path, mode, values):
    from vglaw.data.refer import BadSampleError, load_rgb

    path = tmp_path / "x.tif"
    Image.fromarray(np.array([values], dtype=np.float32 if mode == "F" else np.int32), mode=mode).save(path)
    with pytest.raises(BadSampleError, match="x.tif"):
        load_rgb(path)


def test_rle_of_the_wrong_size_is_named_or_counted(tmp_path, capsys):
    root = tmp_path
    write_refcoco(root)
    inst_path = root / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    ann = inst["annotations"][1]  # a compressed RLE
    ann["segmentation"]["size"] = [ann["segmentation"]["size"][0] + 3, ann["segmentation"]["size"][1]]
    inst["annotations"][2]["segmentation"] = [[1, 2, 3, 4]]  # a polygon of two points
    inst_path.write_text(json.dumps(inst))
    assert main(["data", "check", "--root", str(root), "--dataset", "refcoco"]) == 2
    err = capsys.readouterr().err
    assert "annotation 1001 (ref 1)" in err and "RLE mask is" in err
    assert "annotation 1002 (ref 2)" in err and "polygon has 4 numbers" in err
    assert "2 bad samples" in err and "Traceback" not in err
    from vglaw.data.refer import BadSampleError, ReferDataset

    with pytest.raises(BadSampleError, match="annotation 1001"):
        ReferDataset(root, "refcoco", "train")
    with pytest.warns(UserWarning, match="skipped 1 bad samples"):
        ds = ReferDataset(root, "refcoco", "train", skip_invalid=True)
    assert ds.skipped == 1 and all(ds.load(i)["mask"].any() for i in range(len(ds)))


def test_rle_counts_are_decoded_and_checked_against_the_size(tmp_path, capsys):
    from pycocotools import mask as mask_utils

    write_refcoco(tmp_path)
    inst_path = tmp_path / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
    a, b = inst["annotations"][1], inst["annotations"][2]
    h, w = sizes[a["image_id"]]
    # the right size, but the counts of a mask one column narrower: they cover h pixels too few
    a["segmentation"] = {"size": [h, w],
                         "counts": mask_utils.encode(np.ones((h, w - 1), np.uint8, order="F"))["counts"].decode()}
    b["segmentation"] = {"size": list(sizes[b["image_id"]]), "counts": "!!not rle"}
    inst_path.write_text(json.dumps(inst))
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "refcoco"]) == 2
    err = capsys.readouterr().err
    assert "annotation 1001 (ref 1)" in err and f"cover {h * (w - 1)} pixels but its {w}x{h} size has {h * w}" in err
    assert "annotation 1002 (ref 2)" in err and "not a character of COCO's compressed RLE" in err
    assert "Traceback" not in err
    from vglaw.data.refer import ReferDataset

    with pytest.warns(UserWarning, match="skipped 1 bad samples"):  # ref 1 is in train, ref 2 in val
        assert ReferDataset(tmp_path, "refcoco", "train", skip_invalid=True).counts()["refs"] == 1


def test_skip_invalid_skips_in_every_split_so_fit_runs(tmp_path):
    from vglaw.data.datamodule import ReferDataModule

    write_refcoco(tmp_path)
    inst_path = tmp_path / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    inst["annotations"][2]["segmentation"] = [[1, 2, 3, 4]]  # ref 2, the val split's only one
    inst_path.write_text(json.dumps(inst))
    dm = ReferDataModule(dataset="refcoco", data_root=str(tmp_path), img_size=64, batch_size=2, num_workers=0,
                         text_encoder="minilm", skip_invalid=True)
    with pytest.warns(UserWarning, match="skipped 1 bad samples"):
        assert dm.split("val").counts()["refs"] == 0


def test_invisible_expressions_are_refused_and_long_ones_truncated_with_a_warning(tiny_ckpt, shapes_root):
    from vglaw.data.text import clean_text
    from vglaw.errors import UsageError
    from vglaw.inference import Grounder

    assert clean_text("the\u200b red\u0007 circle\n\tnow") == "the red circle now"
    g = Grounder(tiny_ckpt)
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    for text in ("\u200b\u200d\ufeff", "\x00\x01\x1b", "\n\r\t  "):
        with pytest.raises(UsageError, match="is empty"):
            g.predict(image, [text])
    with pytest.raises(UsageError, match="no word the text encoder knows"):
        g.predict(image, ["\U0001f600\U0001f601"])
    long = " ".join(["red"] * 60)
    with pytest.warns(UserWarning, match=r"has 62 tokens; truncated to 40"):
        r = g.predict(image, [long])[0]
    assert "box" in r


# ---- one clear line, exit code 2 --------------------------------------------------------

def test_train_on_a_fresh_machine_says_what_to_provide(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # a fresh clone has data/ (with its README) and nothing in it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert main(["fit", "--config", str(REPO / "configs" / "refcoco.yaml")]) == 2
    lines = one_error_line(capsys, "fit", "dataset: data/refcoco/refs(unc).p is missing", "data/README.md",
                           "visual weights: data/weights/model_final_61ccd1.pkl is missing",
                           "text encoder: text encoder 'bert-base-uncased'", "minilm")
    assert len(lines) == 5  # refs, instances, images, weights, text encoder: one line each


@pytest.mark.parametrize("override,needle", [
    ("--data.batch_size=0", "data.batch_size must be >= 1"),
    ("--data.img_size=70", "data.img_size 70 is not a positive multiple of the patch size 16"),
    ("--data.data_root=/nonexistent/data", "data.data_root /nonexistent/data does not exist"),
])
def test_fit_settings_are_checked_before_anything_runs(shapes_root, tmp_path, capsys, override, needle):
    args = ["fit", "--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
            "--model.variant=vglaw_tiny_scratch", "--data.img_size=64", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false", "--trainer.max_steps=1", override]
    assert main(args) == 2
    one_error_line(capsys, "fit", needle)


def test_checkpoint_folder_under_a_file_is_found_at_start(shapes_root, tmp_path, capsys):
    """Even root cannot create a folder inside a file."""
    (tmp_path / "results").write_text("a file where a folder should be")
    assert main(["fit", "--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
                 "--model.variant=vglaw_tiny_scratch", "--data.img_size=64",
                 f"--trainer.default_root_dir={tmp_path / 'results' / 'run'}", "--trainer.logger=false"]) == 2
    one_error_line(capsys, "fit", "is a file, not a folder")


def test_unwritable_checkpoint_folder_is_found_at_start(shapes_root, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert main(["fit", "--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
                     "--model.variant=vglaw_tiny_scratch", "--data.img_size=64",
                     f"--trainer.default_root_dir={locked / 'run'}", "--trainer.logger=false"]) == 2
        one_error_line(capsys, "fit", "is not writable")
    finally:
        locked.chmod(0o700)


def test_bad_checkpoints_are_one_line_each(tiny_ckpt, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    state = torch.load(tiny_ckpt, weights_only=True)
    cases = {"text.ckpt": b"this is a text file\n", "empty.ckpt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    unknown = {**state, "hyper_parameters": {**state["hyper_parameters"], "variant": "vglaw_huge"}}
    torch.save(unknown, tmp_path / "unknown.ckpt")
    no_text = {**state, "hyper_parameters": {**state["hyper_parameters"], "text_encoder": "nobody/nothing-bert"}}
    torch.save(no_text, tmp_path / "no_text.ckpt")
    expect = {"text.ckpt": "not a PyTorch checkpoint", "empty.ckpt": "empty file",
              "unknown.ckpt": "unknown model 'vglaw_huge'", "no_text.ckpt": "needs the text encoder"}
    for name, needle in expect.items():
        assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tmp_path / name),
                     "--out", str(tmp_path / "o.png")]) == 2, name
        one_error_line(capsys, "predict", needle)


def test_bad_output_paths_are_refused_before_inference(tiny_ckpt, shapes_root, tmp_path, capsys, monkeypatch):
    import vglaw.inference

    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    monkeypatch.setattr(vglaw.inference, "Grounder", None)  # would fail loudly if the model were loaded
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    cases = [(str(tmp_path), "is a folder"), (str(tmp_path / "result.txt"), "not an image file name"),
             (str(tmp_path / "noext"), "not an image file name")]
    if not os.access(readonly, os.W_OK):
        cases.append((str(readonly / "o.png"), "is not writable"))
    for out, needle in cases:
        assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tiny_ckpt), "--out", out]) == 2
        one_error_line(capsys, "predict", needle)
    readonly.chmod(0o700)


def test_extreme_images(tiny_ckpt, tmp_path, capsys):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (10000, 20), (200, 30, 30)).save(strip)
    assert main(["predict", "--image", str(strip), "--text", "the red thing\non the left", "--model",
                 str(tiny_ckpt), "--out", str(tmp_path / "o.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["width"], report["height"]) == (10000, 20)
    assert report["results"][0]["text"] == "the red thing on the left"  # one line in the overlay
    assert report["results"][0]["mask_rle"]["size"] == [20, 10000]
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 15000)).save(bomb)  # a few kB on disk, 300 MP decoded
    assert main(["predict", "--image", str(bomb), "--text", "x", "--model", str(tiny_ckpt),
                 "--out", str(tmp_path / "bomb-overlay.png")]) == 2
    one_error_line(capsys, "predict", "bomb.png", "300 MP", "limit")


@pytest.mark.parametrize("content,needle", [
    (b"\x80\x02}q\x00.", "expected a list of refs"),  # a pickled dict
])
def test_bad_refs_and_instances_files(tmp_path, capsys, content, needle):
    write_refcoco(tmp_path)
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(content)
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "refcoco"]) == 2
    one_error_line(capsys, "data", needle)


def test_bad_instances_and_split_by(tmp_path, capsys):
    write_refcoco(tmp_path)
    inst = json.loads((tmp_path / "refcoco" / "instances.json").read_text())
    del inst["images"]
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(inst))
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "refcoco"]) == 2
    one_error_line(capsys, "data", "no 'images' list")
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "refcoco", "--split-by", "umd"]) == 2
    one_error_line(capsys, "data", "--split-by 'umd'")
    assert main(["data", "shapes", "--out", str(tmp_path / "s"), "--train", "0"]) == 2
    one_error_line(capsys, "data", "--train must be >= 1")


# ---- big inputs -------------------------------------------------------------------------

def test_a_100_megapixel_photo_within_the_stated_memory_bound(tiny_ckpt, tmp_path):
    """12000 x 9000 JPEG: the model reads it once at a bounded size; the mask comes back at full
    resolution as booleans; `vglaw predict` needs under 600 MiB more than for a 100 x 100 image."""
    import subprocess
    import sys

    photo, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    yy, xx = np.mgrid[0:9000:8, 0:12000:8]
    pattern = np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], -1).astype(np.uint8)  # 1500 x 1125
    Image.fromarray(pattern).resize((12000, 9000), Image.NEAREST).save(photo, quality=80)
    Image.fromarray(pattern[:100, :100]).save(small)
    code = ("import resource, sys; from vglaw.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    peaks = {}
    for image in (small, photo):
        done = subprocess.run([sys.executable, "-c", code, "predict", "--image", str(image), "--text", "the red circle",
                               "--model", str(tiny_ckpt), "--out", str(tmp_path / f"{image.stem}.png"), "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[image.stem] = int(done.stdout.split("PEAK")[-1]) / 1024
        report = json.loads(done.stdout.split("PEAK")[0])
    assert report["results"][0]["mask_rle"]["size"] == [9000, 12000]
    assert max(Image.open(tmp_path / "big.png").size) <= 2048  # the overlay is drawn at a bounded size
    assert peaks["big"] - peaks["small"] < 600, peaks


def test_atomic_outputs_have_ordinary_permissions(tmp_path):
    from vglaw.io.atomic import atomic_dir, write_text

    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "folder").stat().st_mode & 0o777) == oct(0o755)


# ---- devices -----------------------------------------------------------------------------

def test_unavailable_or_malformed_devices_are_one_line_naming_what_exists(tiny_ckpt, shapes_root, tmp_path,
                                                                          capsys):
    import torch

    from vglaw.inference import available_devices

    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, "cuda:0" without any
    there = ", ".join(available_devices())
    for device, needle in (("gpu0", "not a device name"), (missing, "not available here"), ("npu", "not a device")):
        assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tiny_ckpt),
                     "--out", str(tmp_path / "o.png"), "--device", device]) == 2
        one_error_line(capsys, "predict", f"--device {device}", needle, f"this machine has: {there}")
    assert main(["ablate", "--model", str(tiny_ckpt), "--data-root", str(shapes_root), "--dataset", "shapes",
                 "--split", "test", "--device", missing]) == 2
    one_error_line(capsys, "ablate", "not available here")
    assert not (tmp_path / "o.png").exists()


# ---- models handed to vglaw --------------------------------------------------------------

def test_nan_weights_are_refused_and_nan_outputs_never_written(tiny_ckpt, shapes_root, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from vglaw.errors import ModelOutputError
    from vglaw.inference import Grounder
    from vglaw.models.loading import model_from_checkpoint

    model = model_from_checkpoint(tiny_ckpt)
    model.save_pretrained(tmp_path / "m")
    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state["box_head.mlp.0.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    json_out = tmp_path / "r.json"
    assert main(["predict", "--image", str(image), "--text", "the red circle", "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "o.png"), "--json-out", str(json_out)]) == 2
    one_error_line(capsys, "predict", "box_head.mlp.0.weight holds NaN or infinite values")
    assert not json_out.exists() and not (tmp_path / "o.png").exists()
    # a model object (no file to check) that computes NaN: an error, never a result
    with torch.no_grad():
        model.box_head.mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(ModelOutputError, match="NaN or infinite boxes"):
        Grounder(model).predict(str(image), ["the red circle"])


def test_outputs_never_overwrite_an_input_or_each_other(tiny_ckpt, shapes_root, tmp_path, capsys, monkeypatch):
    import shutil

    import vglaw.inference

    image = tmp_path / "photo.png"
    shutil.copy(next((shapes_root / "images" / "shapes").glob("test_*.png")), image)
    before = image.read_bytes()
    monkeypatch.setattr(vglaw.inference, "Grounder", None)  # would fail loudly if the model were loaded
    for extra, needle in ((["--json-out", str(image)], "--json-out"), (["--json-out", str(tmp_path / "o.png")],
                                                                       "is also --out")):
        assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tiny_ckpt),
                     "--out", str(tmp_path / "o.png"), *extra]) == 2
        one_error_line(capsys, "predict", needle)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"image": str(image), "text": "x"}) + "\n")
    assert main(["predict", "--pairs", str(pairs), "--output", str(pairs), "--model", str(tiny_ckpt)]) == 2
    one_error_line(capsys, "predict", "--output", "is an input of this run")
    assert image.read_bytes() == before and pairs.read_text().count("\n") == 1


def test_export_never_replaces_what_exists_unasked_nor_its_source(tiny_ckpt, tmp_path, capsys):
    import shutil

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    ckpt = ckpts / "best-0.ckpt"
    shutil.copy(tiny_ckpt, ckpt)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    cases = ((keep, [], "exists; add --overwrite"), (ckpts, ["--overwrite"], "is an input of this run"),
             (afile, [], "is a file; a folder is written there"), (keep, ["--onnx"], "is a folder"),
             (afile.with_suffix(".onnx"), ["--onnx"], None))
    for out, extra, needle in cases:
        if needle is None:  # an existing .onnx file
            out.write_text("mine")
            needle = "exists; add --overwrite"
        assert main(["export", str(ckpt), "--out", str(out), *extra]) == 2
        one_error_line(capsys, "export", needle)
    assert (keep / "notes.txt").read_text() == "mine" and afile.read_text() == "mine" and ckpt.is_file()
    assert afile.with_suffix(".onnx").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing hidden away
    # asked to, the folder is replaced whole
    assert main(["export", str(ckpt), "--out", str(keep), "--overwrite"]) == 0
    assert (keep / "config.json").is_file() and not (keep / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("change,needle", [
    ({"depth": 10**6}, "depth = 1000000 is outside 1..48"),
    ({"img_size": 0}, "img_size = 0 is outside"),
    ({"img_size": -64}, "img_size = -64 is outside"),
    ({"img_size": "64"}, "img_size must be an integer"),
    ({"img_size": 72}, "img_size 72 is not a multiple of patch_size 16"),
    ({"drop_path_rate": float("nan")}, "drop_path_rate must be a number"),
    ({"window_block_indexes": [0, 99]}, "window_block_indexes must list blocks"),
    ({"text_weights": "../../elsewhere"}, "text_weights must be one of"),
    ({"text_weights": "package", "text_encoder": "/somewhere/else"}, "means the packaged 'minilm' text encoder"),
])
def test_model_folder_configs_are_checked_before_anything_is_built(tiny_ckpt, shapes_root, tmp_path, capsys, change,
                                                                   needle):
    from vglaw.models.loading import model_from_checkpoint

    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    model_from_checkpoint(tiny_ckpt).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tmp_path / "m"),
                 "--out", str(tmp_path / "o.png")]) == 2
    one_error_line(capsys, "predict", "config.json", needle)


@pytest.mark.parametrize("change,needle", [
    (lambda refs: refs[0].update(ann_id=[1000]), "ann_id is [1000], not an integer id"),
    (lambda refs: refs[0].update(ref_id="0"), "ref_id is '0', not an integer id"),
    (lambda refs: refs[0].update(sentences=None), "sentences is NoneType, not a list"),
    (lambda refs: refs[0]["sentences"][0].update(sent=5), "is empty"),
    (lambda refs: refs.insert(0, "a ref"), "expected a list of refs"),
])
def test_structural_type_errors_in_refs_are_one_line_naming_the_ref(tmp_path, capsys, change, needle):
    import pickle

    write_refcoco(tmp_path)
    path = tmp_path / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    change(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "refcoco"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


@pytest.mark.parametrize("change,needle", [
    (lambda refs: refs[0].update(ann_id=[[1000]]), "ann_id holds [1000], not an integer id"),
    (lambda refs: refs[0].update(ann_id="1000"), "ann_id holds '1000', not an integer id"),
    (lambda refs: refs[0].update(image_id="1"), "image_id holds '1', not an integer id"),
    (lambda refs: refs[0].update(sentences=None), "sentences is NoneType, not a list"),
    (lambda refs: refs[0]["sentences"].__setitem__(0, None), "is empty"),
    (lambda refs: refs.insert(0, 7), "expected a list of refs"),
])
def test_structural_type_errors_in_generalised_refs_are_one_line_naming_the_ref(tmp_path, capsys, change, needle):
    from tests.fixtures import write_grefcoco

    write_grefcoco(tmp_path)
    path = tmp_path / "grefcoco" / "grefs(unc).json"
    refs = json.loads(path.read_text())
    refs.sort(key=lambda r: r["split"] != "train")  # the first ref is one `data check` reads
    change(refs)
    path.write_text(json.dumps(refs))
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "grefcoco"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err


def test_an_annotation_with_a_list_for_its_image_id_is_named(tmp_path, capsys):
    write_refcoco(tmp_path)
    inst_path = tmp_path / "refcoco" / "instances.json"
    inst = json.loads(inst_path.read_text())
    inst["annotations"][0]["image_id"] = [inst["annotations"][0]["image_id"]]
    inst_path.write_text(json.dumps(inst))
    assert main(["data", "check", "--root", str(tmp_path), "--dataset", "refcoco"]) == 2
    err = capsys.readouterr().err
    assert "annotation 1000 names image [" in err and "Traceback" not in err, err


def test_ablate_checks_its_arguments_before_any_work(tiny_ckpt, shapes_root, tmp_path, capsys):
    base = ["ablate", "--model", str(tiny_ckpt), "--data-root", str(shapes_root), "--dataset", "shapes"]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for extra, needle in ((["--batch-size", "0"], "--batch-size must be >= 1"),
                          (["--out", str(tmp_path)], "is a folder"),
                          (["--out", str(afile / "t.json")], "is a file, not a folder")):
        assert main([*base, *extra]) == 2
        one_error_line(capsys, "ablate", needle)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really")
    assert main(["ablate", "--model", str(onnx), "--data-root", str(shapes_root)]) == 2
    one_error_line(capsys, "ablate", "give the model folder or checkpoint")
    assert main(["export", str(onnx), "--onnx", "--out", str(tmp_path / "again.onnx")]) == 2
    one_error_line(capsys, "export", "is already an ONNX file")


def test_a_full_disk_at_the_end_is_one_line_and_says_where_the_results_are(tiny_ckpt, shapes_root, tmp_path, capsys,
                                                                            monkeypatch):
    import errno

    import vglaw.commands.predict

    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"image": str(image), "text": "the red circle"}) + "\n")
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith(".predictions.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(vglaw.commands.predict.os, "replace", full)
    assert main(["predict", "--pairs", str(pairs), "--model", str(tiny_ckpt)]) == 2
    lines = one_error_line(capsys, "predict", "No space left on device", "the results so far are in")
    kept = Path(lines[0].rsplit(" ", 1)[-1])
    assert kept.is_file() and json.loads(kept.read_text())["text"] == "the red circle"
    # the same failure in a command without its own handling: one line, not a traceback
    monkeypatch.setattr(vglaw.commands.predict, "save_image", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o.png"))))
    assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tiny_ckpt),
                 "--out", str(tmp_path / "o.png")]) == 2
    one_error_line(capsys, "predict", "o.png: No space left on device", "no file was left half-written")


# ---- existing outputs: refused unless --overwrite ------------------------------------------

def test_an_existing_output_is_refused_unless_overwrite_and_default_names_never_replace(
        tiny_ckpt, shapes_root, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    image = tmp_path / "photo.png"
    shutil.copy(next((shapes_root / "images" / "shapes").glob("test_*.png")), image)
    base = ["predict", "--image", str(image), "--text", "the red circle", "--model", str(tiny_ckpt)]
    mine = {name: tmp_path / name for name in ("o.png", "e.explain-0.png", "r.json")}
    for name, path in mine.items():
        path.write_text(f"mine: {name}")
        flags = {"o.png": ["--out", str(path)], "e.explain-0.png": ["--out", str(tmp_path / "e.png"), "--explain"],
                 "r.json": ["--out", str(tmp_path / "new.png"), "--json-out", str(path)]}[name]
        assert main([*base, *flags]) == 2
        one_error_line(capsys, "predict", f"{path} exists; add --overwrite")
    assert all(p.read_text() == f"mine: {n}" for n, p in mine.items())
    assert not (tmp_path / "new.png").exists() and not (tmp_path / "e.png").exists()  # refused before any work
    # asked to, each is replaced
    for out in ("o.png", "e.png"):
        assert main([*base, "--out", str(tmp_path / out), "--explain", "--json-out", str(mine["r.json"]),
                     "--overwrite"]) == 0
    assert Image.open(mine["o.png"]).size and Image.open(mine["e.explain-0.png"]).size
    assert json.loads(mine["r.json"].read_text())["overlay"] == str(tmp_path / "e.png")
    # an output the user did not name takes a new name rather than replacing the earlier one
    capsys.readouterr()
    assert main([*base, "--json"]) == 0 and main([*base, "--json"]) == 0
    first, second = (json.loads(r)["overlay"] for r in capsys.readouterr().out.split("\n}\n") if r.strip()
                     for r in [r + "\n}"])
    assert first != second and Path(first).is_file() and Path(second).is_file()
    dotted = tmp_path / "scan.v2.final.png"  # dots in the stem are not a suffix: the hash stays
    shutil.copy(image, dotted)
    assert main([*base[:2], str(dotted), *base[3:], "--json"]) == 0
    assert Path(json.loads(capsys.readouterr().out)["overlay"]).name.startswith("scan.v2.final-")
    # batch mode: --output, and each picture of --overlays
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"image": str(image), "text": "the red circle"}) + "\n")
    results = tmp_path / "results.jsonl"
    results.write_text("mine")
    assert main(["predict", "--pairs", str(pairs), "--output", str(results), "--model", str(tiny_ckpt)]) == 2
    one_error_line(capsys, "predict", "--output", "exists; add --overwrite")
    assert main(["predict", "--pairs", str(pairs), "--overlays", str(tmp_path / "pics"),
                 "--model", str(tiny_ckpt)]) == 0
    picture = next((tmp_path / "pics").iterdir())
    picture.write_text("mine")
    assert main(["predict", "--pairs", str(pairs), "--overlays", str(tmp_path / "pics"),
                 "--model", str(tiny_ckpt)]) == 2
    one_error_line(capsys, "predict", "--overlays", "add --overwrite")
    assert results.read_text() == "mine" and picture.read_text() == "mine"
    # the default batch output, like the default overlay, takes a new name
    assert (tmp_path / "p.predictions.jsonl").is_file() and (tmp_path / "p.predictions-2.jsonl").exists() is False


def test_ablate_data_and_bench_refuse_an_existing_output(tiny_ckpt, shapes_root, tmp_path, capsys):
    table = tmp_path / "table.json"
    table.write_text("mine")
    assert main(["ablate", "--model", str(tiny_ckpt), "--data-root", str(shapes_root), "--out", str(table)]) == 2
    one_error_line(capsys, "ablate", f"{table} exists; add --overwrite")
    assert main(["data", "shapes", "--out", str(shapes_root), "--train", "2", "--val", "1", "--test", "1"]) == 2
    one_error_line(capsys, "data", "already holds a shapes dataset", "--overwrite")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.md").write_text("mine")
    assert main(["bench", "--quick", "--out", str(tmp_path / "bench")]) == 2
    one_error_line(capsys, "bench", "results.md exists; add --overwrite")
    assert table.read_text() == "mine" and (tmp_path / "bench" / "results.md").read_text() == "mine"


def test_fit_never_mixes_with_an_earlier_run_unasked(shapes_root, tmp_path, capsys):
    args = ["fit", "--config", str(REPO / "configs" / "shapes.yaml"), f"--data.data_root={shapes_root}",
            "--model.variant=vglaw_tiny_scratch", "--data.img_size=64", "--data.batch_size=4",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.version=mine", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
            "--model.model_args.text_cache_size=0"]
    run = tmp_path / "logs" / "mine"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("an earlier run's weights")
    (run / "metrics.csv").write_text("epoch,step\n0,99\n")
    assert main(args) == 2
    one_error_line(capsys, "fit", "holds an earlier run", f"--ckpt_path {run / 'checkpoints' / 'last.ckpt'}",
                   "--overwrite")
    assert (run / "checkpoints" / "last.ckpt").read_text() == "an earlier run's weights"
    assert (run / "metrics.csv").read_text() == "epoch,step\n0,99\n"
    assert main([*args, "--overwrite"]) == 0
    assert "removed the earlier run's" in capsys.readouterr().err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    assert "0,99" not in (run / "metrics.csv").read_text()


def test_make_demo_never_replaces_an_earlier_demo_unasked(shapes_root, tmp_path):
    from vglaw.commands.demo import main as demo_main

    earlier = tmp_path / "demo" / "logs" / "demo" / "checkpoints"
    earlier.mkdir(parents=True)
    (earlier / "last.ckpt").write_text("28 minutes of training")
    with pytest.raises(SystemExit, match="holds an earlier demo run.*ARGS=--overwrite"):
        demo_main(["--data", str(shapes_root), "--out", str(tmp_path / "demo")])
    # `vglaw fit` overrides pass through (make demo ARGS=--trainer.max_epochs=2), checked after the run's outputs
    with pytest.raises(SystemExit, match="holds an earlier demo run"):
        demo_main(["--data", str(shapes_root), "--out", str(tmp_path / "demo"), "--trainer.max_epochs=2"])
    assert (earlier / "last.ckpt").read_text() == "28 minutes of training"
