"""Checks that need a CUDA device (skipped without one)."""
import pytest
import torch

import vglaw
from vglaw.training.losses import grounding_loss

pytestmark = pytest.mark.gpu


def test_bf16_training_step_of_the_paper_model(tmp_path):
    from transformers import BertConfig

    BertConfig().save_pretrained(tmp_path)
    model = vglaw.create_model("vglaw_vitb", text_encoder=str(tmp_path), text_pretrained=False).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), 1e-5)
    ids = torch.randint(1000, 2000, (4, 20), device="cuda")
    images = torch.randn(4, 3, 448, 448, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images, ids, torch.ones_like(ids))
        terms = grounding_loss(out, torch.rand(4, 4, device="cuda") * 0.5 + 0.25,
                               (torch.rand(4, 448, 448, device="cuda") > 0.5).float(),
                               {"l1": 1, "giou": 1, "focal": 4, "dice": 4})
    terms["loss"].backward()
    opt.step()
    assert torch.isfinite(terms["loss"]) and out["mask_logits"].shape == (4, 1, 448, 448)


def test_cuda_matches_cpu_in_fp64():
    """One function on two devices. In float32 cuDNN may run the convolutions in TF32 (units of
    2**-11) and either side picks its kernels by shape, so compared in float64 (no TF32)."""
    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny").eval().double()
    ids = torch.randint(1000, 2000, (2, 9))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        cpu = model(x, ids, torch.ones_like(ids))
        gpu = model.cuda()(x.cuda(), ids.cuda(), torch.ones_like(ids).cuda())
    for k in cpu:
        assert gpu[k].dtype == torch.float64
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-9, rtol=1e-9)


def test_flex_attention_matches_sdpa_in_bf16_on_cuda():
    from vglaw.models.vitdet import ViTDet

    torch.manual_seed(0)
    m = ViTDet(img_size=448, drop_path_rate=0.0).cuda().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.1)
    x = torch.randn(4, 3, 448, 448, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = m(x).float()
        grads_ref = torch.autograd.grad(ref.square().mean(), list(m.parameters()))
        m.set_attention_kernel("flex")
        got = m(x).float()
        grads = torch.autograd.grad(got.square().mean(), list(m.parameters()))
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=5e-2)


def test_compiled_model_matches_eager_on_cuda():
    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny").cuda().eval()
    compiled = torch.compile(model)
    ids = torch.randint(1000, 2000, (2, 9), device="cuda")
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        want, got = model(x, ids, torch.ones_like(ids)), compiled(x, ids, torch.ones_like(ids))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-3, rtol=1e-3)
