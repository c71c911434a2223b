"""The cost claims: the language-adaptive backbone adds exactly the low-rank product chain and
never builds a per-sample weight matrix."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from vglaw.models.language import WeightGenerator
from vglaw.models.vitdet import ViTDet


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def setup(B=2, C=48, depth=4, rank=8):
    torch.manual_seed(0)
    backbone = ViTDet(img_size=80, embed_dim=C, depth=depth, num_heads=2, window_size=2,
                      window_block_indexes=(0, 2), drop_path_rate=0.0).eval()
    gen = WeightGenerator(in_dim=16, embed_dim=C, depth=depth, rank=rank)
    with torch.no_grad():
        gen.phi_weight.normal_()
    return backbone, gen(torch.randn(B, depth, 16)), torch.randn(B, 3, 80, 80)


def flops(fn):
    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


def test_extra_flops_are_exactly_the_low_rank_chain():
    B, C, depth, r = 2, 48, 4, 8
    backbone, factors, x = setup(B, C, depth, r)
    with torch.no_grad():
        extra = flops(lambda: backbone(x, factors)) - flops(lambda: backbone(x, None))
    grid = 80 // 16  # 5x5 tokens; window blocks pad to 6x6 before qkv
    tokens = {0: 36, 1: 25, 2: 36, 3: 25}
    expected = sum(2 * B * tokens[i] * (C * r + r * 3 * C) for i in range(depth))
    assert grid == 5 and extra == expected


def test_no_per_sample_weight_matrix_is_built():
    B, C = 2, 48
    backbone, factors, x = setup(B, C)
    rec = ShapeRecorder()
    with torch.no_grad(), rec:
        backbone(x, factors)
    assert not {(B, 3 * C, C), (B, C, 3 * C)} & rec.shapes
    assert not any(len(s) == 3 and s[0] == B and sorted(s[1:]) == sorted((3 * C, C)) for s in rec.shapes)
