"""ONNX export of the whole model, checked against PyTorch, and prediction through ONNX Runtime."""
import json

import pytest
import torch

import vglaw
from vglaw.cli import main

pytest.importorskip("onnxruntime")


def _compare(name, tmp_path, tokenizer, size):
    from vglaw.inference.export import check_onnx, export_onnx

    torch.manual_seed(0)
    model = vglaw.create_model(name).eval()
    with torch.no_grad():  # a live language update, so the weight generation is exercised
        model.weight_generator.phi_weight.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "m")
    path, report = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert report == check_onnx(path, model, tokenizer)  # the file is what was checked
    # ONNX Runtime against PyTorch in float32: boxes and attention weights lie in [0, 1], so
    # eps32 * sqrt(n) (n <= 384 summed terms) ~ 2e-6; 1e-4 leaves ~50x (seen: ~1e-7).
    assert report["max_abs/boxes"] <= 1e-4 and report["mask_disagreement"] == 0
    for key in ("lang_attention", "lap_attention"):
        assert report[f"max_abs/{key}"] <= 1e-4
    # the check notices a wrong export: the same file against a slightly different model
    with torch.no_grad():
        model.box_head.mlp[-1].bias.add_(1e-2)
    with pytest.raises(RuntimeError, match="boxes differ"):
        check_onnx(path, model, tokenizer)
    with torch.no_grad():
        model.box_head.mlp[-1].bias.sub_(1e-2)
        model.mask_head.up2.weight.mul_(1.01)  # mask logits 1% off: 10x the band the check allows
    with pytest.raises(RuntimeError, match="mask logits differ"):
        check_onnx(path, model, tokenizer)
    with torch.no_grad():
        model.mask_head.up2.weight.div_(1.01)
    return path


def test_onnx_equals_pytorch_tiny(tmp_path, tokenizer):
    _compare("vglaw_tiny", tmp_path, tokenizer, 64)


def test_onnx_of_a_generalised_cached_model_keeps_its_calibrated_scores(tmp_path, tokenizer):
    from vglaw.inference.export import export_onnx

    torch.manual_seed(0)
    # with the text cache the demo configs use: tracing must not freeze it into the graph
    model = vglaw.create_model("vglaw_tiny_scratch_gref", text_cache_size=100).eval()
    model.centre_head.score_calibration.copy_(torch.tensor([2.5, 0.7]))
    model.save_pretrained(tmp_path / "m")
    _, report = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    # float32 logits of scale <= 5 here: 5 * eps32 * sqrt(n) ~ 1e-5 for n <= 384; seen <= 1e-6
    for key in ("centre_logits", "score_logits", "box_params", "exist_logits"):
        assert report[f"max_abs/{key}"] <= 1e-4, key
    assert report["mask_disagreement"] == 0


def test_an_export_that_fails_its_check_writes_nothing(tmp_path, monkeypatch):
    import vglaw.inference.export

    vglaw.create_model("vglaw_tiny").save_pretrained(tmp_path / "m")

    def failing_check(*args, **kwargs):
        raise RuntimeError("boxes differ")

    monkeypatch.setattr(vglaw.inference.export, "check_onnx", failing_check)
    with pytest.raises(RuntimeError, match="boxes differ"):
        vglaw.inference.export.export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert list(tmp_path.glob("*.onnx*")) == [] and list(tmp_path.glob(".m.onnx*")) == []


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
                     "--model", str(source), "--out", str(tmp_path / "o.png"), "--json", "--overwrite"]) == 0
        reports.append(json.loads(capsys.readouterr().out)["results"])
    from vglaw.inference import Grounder

    # an ONNX model runs on ONNX Runtime's CPU provider whatever device was asked for
    onnx_grounder = Grounder(tmp_path / "model.onnx", device="cuda")
    assert onnx_grounder.device.type == "cpu"
    # the same batch of two as `predict` ran, so the same ONNX Runtime kernels: the same boxes (a
    # batch of one may run other kernels, ~1e-5 px apart, and flip the rounding to 0.01 px)
    direct = onnx_grounder.predict(str(image), ["the red circle", "a big star"])
    assert [r["box"] for r in direct] == [r["box"] for r in reports[1]]
    for a, b in zip(*reports):
        # ONNX Runtime against PyTorch, float32: ~1e-7 of the normalised box (x ~1e2 px), plus
        # one rounding step of 0.01 px; a mask pixel flips only within ~1e-5 of the threshold.
        assert a["box"] == pytest.approx(b["box"], abs=0.05)  # original pixels, rounded to 0.01
        assert a["mask_area"] == pytest.approx(b["mask_area"], abs=2)
    assert main(["export", "--onnx", str(tmp_path / "model"), "--out", str(tmp_path / "model.bin")]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    assert main(["predict", "--image", str(image), "--text", "x", "--model", str(tmp_path / "junk.onnx"),
                 "--out", str(tmp_path / "new.png")]) == 2
    assert "not a usable ONNX model" in capsys.readouterr().err
    # metadata that disagrees with the graph, or is malformed: one line naming the file and field
    import onnx

    for key, value, needle in (("vglaw_img_size", "448", "disagrees with the graph's images input"),
                               ("vglaw_img_size", "0", "vglaw_img_size '0' is not an integer"),
                               ("vglaw_img_size", "-64", "is not an integer"),
                               ("vglaw_outputs", '["boxes"]', "disagrees with the graph's outputs"),
                               ("vglaw_outputs", "{", "not a JSON list"),
                               ("vglaw_text_encoder", "", "vglaw_text_encoder is missing")):
        graph = onnx.load(str(tmp_path / "model.onnx"))
        next(p for p in graph.metadata_props if p.key == key).value = value
        bad = tmp_path / "bad.onnx"
        onnx.save(graph, str(bad))
        capsys.readouterr()
        assert main(["predict", "--image", str(image), "--text", "x", "--model", str(bad),
                     "--out", str(tmp_path / "new.png")]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"{bad}: metadata" in err and needle in err, (key, value, err)
    assert not (tmp_path / "new.png").exists()


def test_int8_onnx_export_passes_its_own_check_and_predicts(tiny_ckpt, shapes_root, tmp_path, tokenizer, capsys):
    """`vglaw export --onnx --quantize int8`: a smaller graph with int8 weights, checked against
    the float32 model with the int8 bounds, that `vglaw predict` runs."""
    import onnx

    from vglaw.inference.export import INT8_BOX_TOLERANCE, INT8_MASK_DISAGREEMENT, check_onnx
    from vglaw.models.vglaw import VGLAW

    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "model")]) == 0
    assert main(["export", "--onnx", str(tmp_path / "model"), "--out", str(tmp_path / "fp32.onnx")]) == 0
    assert main(["export", "--onnx", str(tmp_path / "model"), "--out", str(tmp_path / "int8.onnx"),
                 "--quantize", "int8"]) == 0
    assert "checked against PyTorch float32" in capsys.readouterr().out
    graph = onnx.load(str(tmp_path / "int8.onnx"))
    assert {p.key: p.value for p in graph.metadata_props}["vglaw_quantized"] == "int8"
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in graph.graph.node)
    report = check_onnx(tmp_path / "int8.onnx", VGLAW.from_pretrained(tmp_path / "model"), tokenizer,
                        box_tolerance=INT8_BOX_TOLERANCE, mask_disagreement=INT8_MASK_DISAGREEMENT)
    assert report["max_abs/boxes"] <= INT8_BOX_TOLERANCE and report["mask_disagreement"] <= INT8_MASK_DISAGREEMENT
    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    assert main(["predict", "--image", str(image), "--text", "the red circle", "--model",
                 str(tmp_path / "int8.onnx"), "--out", str(tmp_path / "o.png"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 1
    assert main(["export", str(tiny_ckpt), "--out", str(tmp_path / "m2"), "--quantize", "int8"]) == 2
