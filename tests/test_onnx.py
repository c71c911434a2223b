"""ONNX export of the whole model, checked against PyTorch, and prediction through ONNX Runtime."""
import json

import pytest
import torch

import vglaw
from vglaw.cli import main

pytest.importorskip("onnxruntime")


def _compare(name, tmp_path, tokenizer, size):
    from vglaw.onnx import OnnxModel, export_onnx

    torch.manual_seed(0)
    model = vglaw.create_model(name).eval()
    with torch.no_grad():  # a live language update, so the weight generation is exercised
        model.weight_generator.phi_weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "m")
    path = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    ort = OnnxModel(path)
    # another batch size and text length than the export traced
    texts = ["the red circle", "the star left of the big blue square at the top", "a square"]
    t = tokenizer(texts, padding=True, return_tensors="pt")
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = model(images, t["input_ids"], t["attention_mask"], return_attention=True)
    got = ort(images, t["input_ids"], t["attention_mask"], return_attention=True)
    assert set(got) == set(want)
    torch.testing.assert_close(got["boxes"], want["boxes"], atol=1e-4, rtol=0)
    for key in ("lang_attention", "lap_attention"):
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4)
    threshold = torch.logit(torch.tensor(0.35))
    decided = (want["mask_logits"] - threshold).abs() > 1e-4  # pixels not on the threshold itself
    assert torch.equal((got["mask_logits"] > threshold)[decided], (want["mask_logits"] > threshold)[decided])
    return path


def test_onnx_equals_pytorch_tiny(tmp_path, tokenizer):
    _compare("vglaw_tiny", tmp_path, tokenizer, 64)


@pytest.mark.slow
def test_onnx_equals_pytorch_small(tmp_path, tokenizer):
    _compare("vglaw_small", tmp_path, tokenizer, 128)


def test_predict_through_onnxruntime_equals_pytorch(tiny_ckpt, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "model")]) == 0
    assert main(["export", "--onnx", str(tmp_path / "model"), "--out", str(tmp_path / "model.onnx")]) == 0
    reports = []
    for source in (tmp_path / "model", tmp_path / "model.onnx"):
        capsys.readouterr()
        assert main(["predict", "--image", str(image), "--text", "the red circle", "--text", "a big star",
                     "--model", str(source), "--out", str(tmp_path / "o.png"), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out)["results"])
    for a, b in zip(*reports):
        assert a["box"] == pytest.approx(b["box"], abs=0.05)  # original pixels, rounded to 0.01
        assert a["mask_area"] == pytest.approx(b["mask_area"], abs=2)
    assert main(["export", "--onnx", str(tmp_path / "model"), "--out", str(tmp_path / "model.bin")]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tmp_path / "junk.onnx"),
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "not a usable ONNX model" in capsys.readouterr().err
