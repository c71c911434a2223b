"""Attention kernels and compilation: the fast paths compute what the reference path computes."""
import pytest
import torch

import vglaw
from vglaw.models.vitdet import ViTDet


def backbone(**kw):
    torch.manual_seed(0)
    m = ViTDet(img_size=80, embed_dim=48, depth=4, num_heads=2, window_size=2, window_block_indexes=(0, 2),
               drop_path_rate=0.0, **kw).eval()
    with torch.no_grad():  # rel-pos tables start at zero; make them matter
        for name, p in m.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return m


def test_flex_attention_equals_sdpa_with_the_additive_bias():
    """Window (padded 5x5 -> 6x6) and global blocks. PyTorch runs flex attention's backward on
    GPUs only; the gradients are compared in tests/training/test_gpu.py. Two kernels for one function:
    compared in float64, where they agree to rounding (~1e-15 of outputs of scale ~3)."""
    m = backbone().double()
    x = torch.randn(2, 3, 80, 80, dtype=torch.float64)
    with torch.no_grad():
        ref = m(x)
        m.set_attention_kernel("flex")
        assert all(b.attn.kernel == "flex" for b in m.blocks)
        got = m(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="'sdpa' or 'flex'"):
        m.set_attention_kernel("xformers")


def test_flex_attention_in_the_whole_model_with_language_updates(tokenizer):
    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny").eval()
    with torch.no_grad():
        model.weight_generator.phi_weight.normal_(0, 0.5)
    model.double()  # as above: two kernels for one function, compared in float64
    t = tokenizer(["the red circle", "a square"], padding=True, return_tensors="pt")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x, t["input_ids"], t["attention_mask"])
        model.backbone.set_attention_kernel("flex")
        got = model(x, t["input_ids"], t["attention_mask"])
    for k in ref:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], ref[k], atol=1e-10, rtol=1e-10)


def _expressions(tokenizer):
    for texts in (["the red circle", "a big square"], ["the blue star", "the small dog"], ["left one", "top one"]):
        yield tokenizer(texts, padding="max_length", max_length=8, return_tensors="pt")


def test_new_expressions_do_not_recompile(tokenizer):
    """The per-sample low-rank factors are tensors flowing through the graph, not constants:
    a batch of new expressions (same batch size and token count) reuses the captured graphs."""
    import torch._dynamo

    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny").eval()
    captured = []

    def counting_backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend)
    x = torch.randn(2, 3, 64, 64)
    counts = []
    for t in _expressions(tokenizer):
        with torch.no_grad():
            want = model(x, t["input_ids"], t["attention_mask"])
            got = compiled(x, t["input_ids"], t["attention_mask"])
        counts.append(len(captured))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    assert counts[0] >= 1 and counts[1] == counts[0] and counts[2] == counts[0], counts
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compile_keeps_the_outputs(tokenizer):
    """torch.compile with the default (inductor) backend: same outputs (CPU: ~1 min to compile)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny").eval()
    with torch.no_grad():
        model.weight_generator.phi_weight.normal_(0, 0.5)
    model.double()  # inductor's fused kernels against eager ones: compared in float64
    torch._dynamo.reset()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for t in _expressions(tokenizer):
        with torch.no_grad():
            want = model(x, t["input_ids"], t["attention_mask"])
            got = compiled(x, t["input_ids"], t["attention_mask"])
        for k in want:
            assert got[k].dtype == torch.float64
            torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10)
    torch._dynamo.reset()
