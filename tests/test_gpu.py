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


def test_cuda_matches_cpu_in_fp32():
    torch.manual_seed(0)
    model = vglaw.create_model("vglaw_tiny").eval()
    ids = torch.randint(1000, 2000, (2, 9))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cpu = model(x, ids, torch.ones_like(ids))
        gpu = model.cuda()(x.cuda(), ids.cuda(), torch.ones_like(ids).cuda())
    torch.testing.assert_close(gpu["boxes"].cpu(), cpu["boxes"], atol=1e-4, rtol=1e-3)
