"""Reduced-precision inference (`vglaw.inference.precision`): each precision runs, stays within
its tolerance of fp32, and says what it quantises."""
import numpy as np
import pytest
import torch

from vglaw.errors import UsageError
from vglaw.inference.precision import PRECISIONS, StaticPlusLowRank, quantize_int8, with_precision
from vglaw.models.loading import create_model

# Largest box-coordinate deviation from fp32 allowed on the tiny test model, as a share of the
# image's longer side, and the least share of mask pixels that must agree with fp32's.
BOX_TOLERANCE = {"bf16": 0.02, "int8": 0.02}
MASK_AGREEMENT = {"bf16": 0.98, "int8": 0.98}


def test_the_commands_offer_the_library_precisions():
    from vglaw import commands

    assert commands.PRECISIONS == PRECISIONS


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_precision_stays_within_its_tolerance_of_fp32(precision, tiny_ckpt, shapes_root):
    from vglaw.inference import Grounder

    images = sorted((shapes_root / "images" / "shapes").glob("test_*.png"))
    texts = ["the red circle", "the big star", "the square left of the blue circle"]
    ref, low = Grounder(tiny_ckpt), Grounder(tiny_ckpt, precision=precision)
    for image in images:
        a, b = ref.predict(image, texts), low.predict(image, texts)
        side = max(a[0].size)
        dev = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra.box, rb.box))
        assert dev <= BOX_TOLERANCE[precision] * side, (image.name, dev)
        agree = np.mean([(ra.mask == rb.mask).mean() for ra, rb in zip(a, b)])
        assert agree >= MASK_AGREEMENT[precision]


def test_int8_quantises_the_static_weights_and_keeps_the_generated_update():
    torch.manual_seed(0)
    model = create_model("vglaw_tiny_scratch", seg_classes=3).eval()
    with torch.no_grad():
        model.weight_generator.phi_weight.normal_(0, 0.5)  # a live language update
    q = quantize_int8(model)
    qkv = q.backbone.blocks[0].attn.qkv
    assert isinstance(qkv, StaticPlusLowRank) and "quantized" in type(qkv.static).__module__
    assert "quantized" in type(q.backbone.blocks[0].mlp.fc1).__module__
    assert type(q.mask_head.seg).__name__ == "Linear" and "quantized" not in type(q.mask_head.seg).__module__
    assert type(model.backbone.blocks[0].attn.qkv).__name__ == "AdaptiveLinear"  # the original is untouched
    x = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[101, 1996, 2417, 4418, 102], [101, 1996, 2502, 2732, 102]])
    with torch.no_grad():
        lang = q.language_weights(ids, torch.ones_like(ids))
        adaptive = q.forward_features(x, lang.qkv)
        static = q.forward_features(x, None)
        full = model.forward_features(x, model.language_weights(ids, torch.ones_like(ids)).qkv)
    assert not torch.allclose(adaptive, static)  # the generated update still steers the backbone
    scale = full.abs().max()
    assert (adaptive - full).abs().max() <= 0.1 * scale  # int8 weights: near the float model


def test_precisions_refused_where_they_do_not_apply(tmp_path):
    model = create_model("vglaw_tiny")
    with pytest.raises(UsageError, match="int8 runs on the CPU"):
        with_precision(model, "int8", torch.device("cuda"))
    with pytest.raises(UsageError, match="precision must be one of"):
        with_precision(model, "fp16", torch.device("cpu"))
