"""Model folders, loading any model source safely, prediction (single, batch, explain), ablation."""
import contextlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vglaw
from vglaw.cli import main
from vglaw.errors import MissingFileError, UnsafeFileError, UsageError
from vglaw.inference import Grounder, load_model, prepare_image


class _Payload:
    """Unpickling this writes a file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def tiny_model(name="vglaw_tiny", seed=0):
    torch.manual_seed(seed)
    m = vglaw.create_model(name).eval()
    with torch.no_grad():  # a non-zero language update, so the round trip covers it
        m.weight_generator.phi_weight.normal_(0, 0.3)
    return m


def outputs(model, texts=("the red circle", "the leftmost blue square")):
    from vglaw.models.text_encoder import load_tokenizer

    t = load_tokenizer(model.text.source)(list(texts), padding=True, return_tensors="pt")
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randn(len(texts), 3, 64, 64), t["input_ids"], t["attention_mask"])


@pytest.mark.parametrize("name,stores_text", [("vglaw_tiny", True), ("vglaw_tiny_scratch", False)])
def test_model_folder_round_trip(tmp_path, name, stores_text):
    m = tiny_model(name)
    m.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert ("text_encoder" in files) == stores_text  # the packaged frozen MiniLM is not stored twice
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["variant"] == name and config["model_class"] == type(m).__name__
    loaded = vglaw.VGLAW.from_pretrained(tmp_path / "m")
    assert type(loaded) is type(m)
    want, got = outputs(m), outputs(loaded)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_from_pretrained_never_unpickles(tmp_path):
    """A folder whose weights are a pickle (under either name) is refused, and nothing runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"w": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(MissingFileError, match="model.safetensors is missing"):
        vglaw.VGLAW.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    with pytest.raises(UnsafeFileError, match="not a safetensors file"):
        vglaw.VGLAW.from_pretrained(folder)
    assert not marker.exists()


def test_model_folder_errors(tmp_path):
    folder = tmp_path / "m"
    tiny_model().save_pretrained(folder)
    with pytest.raises(MissingFileError, match="model folder not found"):
        vglaw.VGLAW.from_pretrained(tmp_path / "nowhere")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "embed_dim": 32, "num_heads": 2}))
    with pytest.raises(UsageError, match=r"(?s)model.safetensors does not fit .*config.json.*shape mismatch"):
        vglaw.VGLAW.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "model_class": "Other"}))
    with pytest.raises(UsageError, match="unknown model_class 'Other'"):
        vglaw.VGLAW.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        vglaw.VGLAW.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(MissingFileError, match="no config.json"):
        vglaw.VGLAW.from_pretrained(folder)


def test_hub_id_while_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingFileError, match="cannot fetch model 'someone/vglaw-nothing'"):
        vglaw.VGLAW.from_pretrained("someone/vglaw-nothing")


def test_export_and_predict_from_folder_equal_the_checkpoint(tiny_ckpt, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model" / "config.json").is_file()
    runs = {}
    for source in (str(tiny_ckpt), str(tmp_path / "model")):
        capsys.readouterr()
        assert main(["predict", "--image", str(image), "--text", "the red circle", "--model", source,
                     "--out", str(tmp_path / "o.png"), "--json", "--overwrite"]) == 0
        runs[source] = json.loads(capsys.readouterr().out)["results"][0]
    a, b = runs.values()
    assert a["box"] == b["box"] and a["mask_rle"] == b["mask_rle"] and a["score"] == b["score"]


def test_predict_without_a_model_uses_the_latest_written(tiny_ckpt, shapes_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VGLAW_HOME", str(tmp_path / "home"))
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    assert main(["predict", "--image", str(image), "--text", "the red circle", "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "no model given" in err and "make demo" in err and "Traceback" not in err
    main(["export", str(tiny_ckpt), "--out", str(tmp_path / "older")])
    main(["export", str(tiny_ckpt), "--out", str(tmp_path / "newer")])
    capsys.readouterr()
    assert main(["predict", "--image", str(image), "--text", "the red circle", "--out", str(tmp_path / "o.png")]) == 0
    assert f"using {tmp_path / 'newer'}" in capsys.readouterr().err


def test_batch_prediction_equals_one_at_a_time(tiny_ckpt, shapes_root, tmp_path):
    g = Grounder(tiny_ckpt)
    # Batch independence holds exactly, but float32 batches of 4 and of 1 run different BLAS
    # kernels (~1e-5 px apart), enough to flip a box rounded to 0.01 px or a mask pixel at the
    # threshold: the model runs in float64 (the letterboxed images cast as they enter it).
    g.model.double()
    g.model.register_forward_pre_hook(lambda module, args: (args[0].double(), *args[1:]))
    images = sorted((shapes_root / "images" / "shapes").glob("test_*.png"))[:3]
    texts = ["the red circle", "the star left of the big blue square at the top", "a square"]
    pairs = [(im, t) for im in images for t in texts]
    batched = list(g.predict_pairs(pairs, batch_size=4))
    assert len(batched) == len(pairs)
    for (im, t), r in zip(pairs, batched):
        single = g.predict(im, t)[0]
        np.testing.assert_allclose(r["box"], single["box"], atol=1e-9, rtol=0)  # the same after rounding
        np.testing.assert_array_equal(r["mask"], single["mask"])
        assert r["score"] == single["score"]


def test_pairs_file_reports_bad_lines_and_keeps_the_rest(tiny_ckpt, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [json.dumps({"image": str(image), "text": "the red circle"}),
             "{not json",
             json.dumps({"image": str(image)}),
             json.dumps({"image": "broken.png", "text": "the circle"}),
             json.dumps({"image": str(image), "text": "\u200b\u200b"}),
             json.dumps({"image": str(image), "text": "the blue square"})]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    assert main(["predict", "--pairs", str(pairs), "--model", str(tiny_ckpt), "--overlays",
                 str(tmp_path / "ov")]) == 0
    captured = capsys.readouterr()
    records = [json.loads(x) for x in (tmp_path / "pairs.predictions.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [("error" in r) for r in records] == [False, True, True, True, True, False]
    for n, needle in ((2, "not JSON"), (3, "'image' and 'text'"), (4, "cannot read image"), (5, "is empty")):
        assert needle in records[n - 1]["error"] and f"line {n}" in captured.err
    good = records[0]
    assert good["mask_rle"]["size"] == [good["height"], good["width"]] and Path(good["overlay"]).is_file()
    assert "2 pairs grounded, 4 skipped" in captured.out
    assert not list(tmp_path.glob("*.partial"))


def test_folder_and_expression_list(tiny_ckpt, shapes_root, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((shapes_root / "images" / "shapes").glob("test_*.png"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (tmp_path / "texts.txt").write_text("the red circle\n\nthe blue square\n")
    out = tmp_path / "res.jsonl"
    assert main(["predict", "--images", str(folder), "--texts", str(tmp_path / "texts.txt"), "--model",
                 str(tiny_ckpt), "--output", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 4 and all("box" in r for r in records)


def test_explain_figure_has_the_three_panels_per_expression(tiny_ckpt, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    out = tmp_path / "overlay.png"
    assert main(["predict", "--image", str(image), "--text", "the red circle", "--text", "the big blue star",
                 "--model", str(tiny_ckpt), "--out", str(out), "--explain", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [Path(p).name for p in report["explain"]] == ["overlay.explain-0.png", "overlay.explain-1.png"]
    assert all(Image.open(p).size == (1500, 480) for p in report["explain"])

    from vglaw.viz.explain import build_explain_figure

    g = Grounder(tiny_ckpt)
    array = np.asarray(Image.open(image).convert("RGB"))
    r = g.predict(image, ["the big blue star"], return_attention=True)[0]
    fig = build_explain_figure(array, r, g.img_size)
    heat, pooling, result = fig.axes[:3]
    assert [t.get_text() for t in heat.get_xticklabels()] == r["tokens"] == \
        ["[CLS]", "the", "big", "blue", "star", "[SEP]"]  # padding excluded
    np.testing.assert_allclose(heat.images[0].get_array(), r["lang_attention"].mean(axis=1), rtol=1e-6)
    assert heat.images[0].get_array().shape == (4, 6)  # blocks x tokens
    assert "(b)" in pooling.get_title() and len(pooling.images) == 2  # image + pooling map
    assert "(c)" in result.get_title() and len(result.patches) == 1  # the box


def test_grounder_python_api_in_original_pixels(tiny_ckpt, shapes_root):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    w, h = Image.open(image).size
    g = vglaw.Grounder(tiny_ckpt)
    results = g.predict(Image.open(image), ["the red circle", "the square"])
    assert len(results) == 2
    for r in results:
        x1, y1, x2, y2 = r["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        assert r["mask"].shape == (h, w) and r["mask"].dtype == bool and 0 <= r["score"] <= 1
    with pytest.raises(UsageError, match="is empty"):
        g.predict(image, [" \n\t"])
    with pytest.raises(UsageError, match="at least one expression"):
        g.predict(image, [])


def test_ablation_rows(tiny_ckpt, shapes_root):
    from vglaw.data.refer import ReferDataset
    from vglaw.data.transforms import GroundingTransform
    from vglaw.inference.ablation import CONDITIONS, ablate, other_expression
    from vglaw.training.module import VGLAWModule

    assert other_expression([1, 1, 2, 3]).tolist() == [2, 2, 3, 0] and other_expression([5, 5]).tolist() == [0, 1]
    model = load_model(tiny_ckpt)
    with torch.no_grad():  # make the language update matter
        model.weight_generator.phi_weight.normal_(0, 1.0)
    ds = ReferDataset(shapes_root, "shapes", "val", transform=GroundingTransform(64, keep_original=True))
    table = ablate(model, ds, batch_size=8, progress=False)
    assert list(table) == list(CONDITIONS)
    # "as trained" is the ordinary evaluation of the model
    module = VGLAWModule(variant="vglaw_tiny", img_size=64)
    module.model = model
    from vglaw.data.datamodule import ReferDataModule

    dm = ReferDataModule(dataset="shapes", data_root=str(shapes_root), img_size=64, batch_size=8, num_workers=0)
    from vglaw.training.metrics import GroundingMetrics

    metric = GroundingMetrics()
    for batch in dm.val_dataloader()[0]:
        metric.update(batch["index"], **module.measure(module(batch), batch))
    want = metric.compute()
    assert table["as trained"]["miou"] == pytest.approx(float(want["miou"]), abs=1e-6)
    assert table["as trained"]["prec@0.5"] == pytest.approx(float(want["prec@0.5"]), abs=1e-6)
    # each condition hands the backbone and the heads what its name says
    seen = []
    real_ground = model.ground
    model.ground = lambda images, qkv, sentence: seen.append((qkv, sentence)) or real_ground(images, qkv, sentence)
    ablate(model, ds, batch_size=8, limit=8, progress=False)
    (q0, s0), (q1, s1), (q2, s2), (q3, s3), (q4, s4) = seen[:5]
    targets = [ds.samples[i].ann_id for i in range(8)]
    perm = other_expression(targets)
    assert q1 is None and torch.equal(s1, s0)
    assert torch.equal(q2[0][0], q0[0][0][perm]) and torch.equal(s2, s0)
    assert q3 is q0 and torch.equal(s3, s0[perm])
    assert torch.equal(q4[0][0], q0[0][0][perm]) and torch.equal(s4, s0[perm])
    assert not torch.equal(q0[0][0], q2[0][0])


def test_ablate_command(tiny_ckpt, shapes_root, tmp_path, capsys):
    assert main(["ablate", "--model", str(tiny_ckpt), "--data-root", str(shapes_root), "--split", "val",
                 "--out", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "| as trained |" in out and "heads read another expression" in out
    assert set(json.loads((tmp_path / "t.json").read_text())) == {
        "as trained", "Φ = 0 (static backbone, heads read the expression)", "backbone weights from another expression",
        "heads read another expression", "both from another expression"}


def test_serve_requests_take_turns_keep_their_results_and_explain_bad_input(tiny_ckpt, shapes_root, tmp_path):
    """The web page's request handler (`vglaw.commands.serve.ground`), without the browser: concurrent
    requests each get their own answers, equal to sequential ones; a non-image, an empty
    expression and a huge image are messages, not crashes."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from vglaw.commands.serve import ground
    from vglaw.errors import UserError
    from vglaw.inference import Grounder

    grounder, lock = Grounder(tiny_ckpt), threading.Lock()
    images = sorted((shapes_root / "images" / "shapes").glob("test_*.png"))[:4]
    requests = [(str(img), f"the red circle\nthe {word} square") for img, word in
                zip(images, ["big", "small", "blue", "leftmost"])]
    sequential = [ground(grounder, lock, img, texts, False)[1] for img, texts in requests]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda r: ground(grounder, lock, r[0], r[1], False)[1], requests * 2))
    assert concurrent == sequential * 2
    assert [r["text"] for r in sequential[3]["results"]] == ["the red circle", "the leftmost square"]

    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(UserError, match="notes.png"):
        ground(grounder, lock, str(not_image), "the red circle", False)
    with pytest.raises(UserError, match="at least one expression"):
        ground(grounder, lock, str(images[0]), " \n\t\n", False)
    with pytest.raises(UserError, match="upload an image"):
        ground(grounder, lock, None, "the red circle", False)
    from vglaw.commands.serve import MAX_EXPLAINED, MAX_EXPRESSIONS

    many = "\n".join(["the red circle"] * (MAX_EXPRESSIONS + 1))
    with pytest.raises(UserError, match=f"{MAX_EXPRESSIONS + 1} expressions in one request"):
        ground(grounder, lock, str(images[0]), many, False)
    with pytest.raises(UserError, match=f"up to {MAX_EXPLAINED} expressions"):
        ground(grounder, lock, str(images[0]), "\n".join(["the red circle"] * (MAX_EXPLAINED + 1)), True)
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 3000), (90, 90, 90)).save(big)
    overlay, report, figures, note = ground(grounder, lock, str(big), "the red circle", True)
    assert "5000x3000" in note and report["width"] == 5000 and report["height"] == 3000
    assert len(figures) == 1 and max(overlay.size) <= 2048  # drawn at the working size


def test_an_image_in_memory_is_converted_as_the_same_file_would_be(tmp_path):
    """RGBA on white, grey to RGB, 16-bit by its range, large ones shrunk: whether the picture
    arrives as a file, a PIL image or an array."""
    from PIL import Image

    from vglaw.inference import WORKING_SIDE, prepare_image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)
    grey16 = Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16))
    wide = rng.integers(0, 256, (10, WORKING_SIDE + 500, 3), dtype=np.uint8)
    pictures = (("rgba.png", Image.fromarray(rgba)), ("grey16.png", grey16), ("wide.png", Image.fromarray(wide)))
    for name, picture in pictures:
        picture.save(tmp_path / name)
        from_file = prepare_image(tmp_path / name)
        assert from_file[0].shape[2] == 3 and from_file[0].dtype == np.uint8
        for other in (picture, np.asarray(picture)) if picture.mode != "I;16" else (picture,):
            got = prepare_image(other)
            assert got[1] == from_file[1] and np.array_equal(got[0], from_file[0]), name
    assert prepare_image(wide)[0].shape[1] == WORKING_SIDE


def test_results_are_typed_and_each_expression_is_tokenised_once_as_before(tiny_ckpt, shapes_root, tokenizer):
    from vglaw.inference.results import Grounding

    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    g = Grounder(str(tiny_ckpt))
    long = " ".join(["the big red circle left of the small blue square"] * 8)  # > 40 tokens: truncated
    with pytest.warns(UserWarning, match="truncated"):
        results = g.predict(str(image), ["the red circle", long], return_attention=True)
    assert all(isinstance(r, Grounding) for r in results)
    r = results[0]
    assert r.box is not None and r.mask.dtype == bool and r.mask.shape == r.size and 0 <= r.score <= 1
    assert not r.generalised and r.exists is None and r.boxes is None
    # the ids the model read are the batch tokenizer's, special tokens and truncation included
    array, size = prepare_image(str(image))
    for text in ("the red circle", long):
        with pytest.warns(UserWarning) if text == long else contextlib.nullcontext():
            ids = g.prepare(array, size, text).ids
        reference = tokenizer(text, truncation=True, max_length=g.max_tokens)["input_ids"]
        assert ids == reference
    assert results[1].attention.tokens == tokenizer.convert_ids_to_tokens(reference)
    # the exchange form, and the mapping view kept for code written against dict results
    item = r.to_json()
    assert set(item) == {"text", "box", "score", "mask_area", "mask_rle"}
    assert r["box"] == r.box and "mask" in r and "exists" not in r and r["lang_attention"] is r.attention.lang
    with pytest.raises(KeyError):
        r["boxes"]
    assert r.get("boxes") is None and r.get("box") == r.box and "lang_attention" in list(r)
    from vglaw.inference.results import PairError

    failed = PairError("image not found: x.png")
    assert "error" in failed and failed["error"] == failed.get("error") == "image not found: x.png"


def test_help_answers_without_loading_torch():
    import subprocess
    import sys

    for argv in ([], ["predict"], ["export"], ["ablate"], ["data"], ["serve"], ["bench"]):
        code = ("import sys; from vglaw.cli import main\n"
                f"try:\n    main({argv + ['--help']!r})\nexcept SystemExit:\n    pass\n"
                "assert 'torch' not in sys.modules, 'torch was imported'")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        assert "usage" in done.stdout.lower(), (argv, done.stdout)


def test_the_page_offers_shapes_examples_to_a_model_of_the_kind_trained_on_them(shapes_root):
    from vglaw.commands.serve import demo_examples

    scratch, paper = vglaw.create_model("vglaw_tiny_scratch"), vglaw.create_model("vglaw_tiny")
    examples = demo_examples(scratch, shapes_root)
    assert examples and all(Path(image).is_file() and text for image, text in examples)
    assert demo_examples(paper, shapes_root) == []
