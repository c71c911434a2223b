"""Reduced precision for inference on the CPU (or a GPU, for bf16): one name per choice.

- "fp32": the model as trained.
- "bf16": every matrix product in bfloat16 under `torch.autocast` (weights stay float32);
  2x the fp32 rate on CPUs with `avx512_bf16` / AMX, emulated (slower) on those without.
- "int8": dynamic quantisation (`torch.ao.quantization.quantize_dynamic`, fbgemm / oneDNN):
  the weights of every `nn.Linear` (the text encoder's, the backbone's qkv, proj and MLP, the
  heads' linear layers, except those read as tensors: `READ_AS_TENSORS`) in int8 per output
  channel, activations quantised per batch at run time. The qkv projections keep their
  generated low-rank update (x·down)·up in float32: only their static W0 is int8.
  Convolutions (the from-scratch stem, the mask head's transposed convolutions), attention
  products, norms and the weight generator stay float32. CPU only.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.models.scratch import ScratchMaskHead
from vglaw.models.vitdet import AdaptiveLinear, LowRank, add_low_rank

PRECISIONS = ("fp32", "bf16", "int8")
# Linear layers whose weights a module reads as tensors (folded into a per-sample readout), not
# by calling them: they stay float32.
READ_AS_TENSORS = {ScratchMaskHead: ("skip", "seg")}


class StaticPlusLowRank(nn.Module):
    """An `AdaptiveLinear` whose static projection is any module (here: a quantised linear),
    with the low-rank update added in the input's precision."""

    def __init__(self, static: nn.Module) -> None:
        super().__init__()
        self.static = static

    def forward(self, x: Tensor, low_rank: LowRank | None = None) -> Tensor:
        return add_low_rank(self.static(x), x, low_rank)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with int8 dynamic quantisation (module docstring); `model` is unchanged."""
    model = copy.deepcopy(model).cpu().eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is AdaptiveLinear:
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, StaticPlusLowRank(plain))
    keep = {f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules()
            for cls, names in READ_AS_TENSORS.items() if isinstance(m, cls) for name in names}
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    spec = {name: qconfig for name, m in model.named_modules() if type(m) is nn.Linear and name not in keep}
    with warnings.catch_warnings():  # eager-mode quantisation is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def with_precision(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """The model to run at `precision` on `device`: itself for fp32 and bf16 (see `autocast`),
    a quantised copy for int8.

    Raises:
        UsageError: an unknown precision, or int8 off the CPU.
    """
    check_precision(precision)
    if precision == "int8":
        if device.type != "cpu":
            raise UsageError(f"--precision int8 runs on the CPU (dynamic quantisation); use bf16 on {device}")
        return quantize_int8(model)
    return model


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device):
    """The context a forward pass at `precision` runs in (bf16: autocast; else nothing)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
