"""A trained model written for others to run: a training checkpoint as a model folder, or any
model source as one ONNX graph (text encoder, aggregation, weight generation, language-adaptive
backbone, heads), checked against PyTorch before anything is written.

Inputs of the graph: images (B, 3, S, S) float32, input_ids and attention_mask (B, L) int64, B
and L dynamic. Outputs: every tensor the PyTorch model returns with `return_attention=True`.
The file's metadata records the input side, the text encoder (for the tokenizer) and the
output names (read back by `vglaw.inference.onnx.OnnxModel`). Every export is checked at once
(`check_onnx`): ONNX Runtime against PyTorch on another batch size and text length than the
ones traced.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from vglaw.errors import UsageError
from vglaw.inference.loading import load_model
from vglaw.inference.onnx import OnnxModel
from vglaw.io.atomic import atomic_write
from vglaw.models.postprocess import MASK_THRESHOLD
from vglaw.models.scratch import FrozenTextEncoder
from vglaw.models.text_encoder import load_tokenizer

OPSET = 17


BOX_TOLERANCE = 1e-4  # largest |ONNX Runtime - PyTorch| of a normalised box coordinate an export may show


# Largest |ONNX Runtime - PyTorch| of a mask logit, as a share of the logits' scale (max |logit|,
# at least 1): float32 rounding through the network is ~1e-5 of it (the paper model: 4e-5 at a
# scale of ~10), and kernels differ between CPUs, so a fixed absolute band would not hold.
MASK_LOGIT_TOLERANCE = 1e-3

# An int8 export (`quantize="int8"`) is checked against the float32 model with its own bounds:
# its weights are rounded to 1/255 of each output channel's range, so it is held to boxes within
# 5% of the input side and masks deciding at most 3% of the pixels differently.
INT8_BOX_TOLERANCE = 0.05
INT8_MASK_DISAGREEMENT = 0.03
QUANTIZE = (None, "int8")


class _Exported(nn.Module):
    """The model with positional inputs and a fixed tuple of outputs, as the exporter needs."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, input_ids, attention_mask, return_attention=True)
        return tuple(out[k] for k in self.names)


def export_onnx(source: str | Path, out: str | Path, check: bool = True,
                quantize: str | None = None) -> tuple[Path, dict[str, float]]:
    """Export a model folder, hub id or training checkpoint to `out` (an .onnx file), atomically.
    With `check`, the graph is run against the PyTorch model (`check_onnx`) before anything is
    written, so a failing export leaves no file. Returns the path and the check's report ({}
    without it).

    Args:
        quantize: "int8": ONNX Runtime's dynamic quantisation of the graph (`quantize_int8_graph`),
            checked with the int8 bounds (`INT8_BOX_TOLERANCE`, `INT8_MASK_DISAGREEMENT`).
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: an ONNX file name ends in .onnx")
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize}: only int8 is offered")
    model = load_model(source).eval()
    tokenizer = load_tokenizer(model.tokenizer_source)
    t = tokenizer(["the red circle", "a much longer expression to ground"], padding=True, return_tensors="pt")
    images = torch.randn(2, 3, model.img_size, model.img_size)
    with torch.no_grad():
        names = list(model(images, t["input_ids"], t["attention_mask"], return_attention=True))
    wrapper = _Exported(model, names)
    # A text cache is Python bookkeeping that tracing would freeze into the graph (the first
    # batch's shapes); the traced graph runs the encoder itself.
    cached = {m: m.cache_size for m in model.modules() if isinstance(m, FrozenTextEncoder)}
    for m in cached:
        m.cache_size = 0
    dynamic = {"images": {0: "batch"}, "input_ids": {0: "batch", 1: "tokens"},
               "attention_mask": {0: "batch", 1: "tokens"}}
    for name in names:
        dynamic[name] = {0: "batch", **({3: "tokens"} if name == "lang_attention" else {})}
    buffer = io.BytesIO()
    try:
        with torch.no_grad():
            torch.onnx.export(wrapper, (images, t["input_ids"], t["attention_mask"]), buffer, dynamo=False,
                              input_names=["images", "input_ids", "attention_mask"], output_names=names,
                              dynamic_axes=dynamic, opset_version=OPSET)
    finally:
        for m, size in cached.items():
            m.cache_size = size
    import onnx  # the exporter's graph library: only when exporting

    graph = onnx.load_from_string(buffer.getvalue())
    text = model.config.text_encoder
    meta = {"vglaw_img_size": str(model.img_size), "vglaw_text_encoder": str(text),
            "vglaw_outputs": json.dumps(names), "vglaw_source": str(source)}
    for k, v in meta.items():
        graph.metadata_props.add(key=k, value=v)
    data = graph.SerializeToString()
    if quantize == "int8":
        data = quantize_int8_graph(data)
        bounds = dict(box_tolerance=INT8_BOX_TOLERANCE, mask_disagreement=INT8_MASK_DISAGREEMENT)
    else:
        bounds = {}
    report = check_onnx(data, model, tokenizer, name=str(out), **bounds) if check else {}
    with atomic_write(out) as f:
        f.write(data)
    return out, report


def quantize_int8_graph(data: bytes) -> bytes:
    """ONNX Runtime's dynamic quantisation of a serialised graph: the constant weights of its
    MatMul / Gemm nodes in int8 per output channel, activations quantised at run time. The
    generated low-rank qkv updates are computed, not constants, so they stay float32."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic  # only when quantising

    with tempfile.TemporaryDirectory(prefix="vglaw-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
        import onnx

        graph = onnx.load(str(dst))
        graph.metadata_props.add(key="vglaw_quantized", value="int8")
        return graph.SerializeToString()


def check_onnx(onnx_model: str | Path | bytes, model: nn.Module, tokenizer, name: str | None = None,
               box_tolerance: float = BOX_TOLERANCE, mask_disagreement: float | None = None) -> dict[str, float]:
    """Run the export (a file or the serialised graph; `name` names it in errors) and `model` on
    the same three expressions of different lengths and random images, and return the largest
    |difference| of every output ("max_abs/<name>") and the share of mask pixels decided
    differently at the mask threshold ("mask_disagreement"), leaving out the pixels within the
    float32 band (`MASK_LOGIT_TOLERANCE` x the logits' scale) of the threshold. Raises
    RuntimeError when a box coordinate differs by more than `box_tolerance`, or a mask logit by
    more than the band (with `mask_disagreement`, a quantised graph's bound: when more than
    that share of the pixels is decided differently)."""
    texts = ["the red circle", "the star left of the big blue square at the top", "a square"]
    t = tokenizer(texts, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, model.img_size, model.img_size, generator=generator)
    with torch.no_grad():
        want = model.eval()(images, t["input_ids"], t["attention_mask"], return_attention=True)
    path = name or (onnx_model if not isinstance(onnx_model, bytes) else "the ONNX graph")
    got = OnnxModel(onnx_model)(images, t["input_ids"], t["attention_mask"], return_attention=True)
    if set(got) != set(want):
        raise RuntimeError(f"{path}: outputs {sorted(got)} but PyTorch gives {sorted(want)}")
    report = {f"max_abs/{k}": float((got[k].float() - want[k].float()).abs().max()) for k in sorted(want)}
    if "mask_logits" in want:
        threshold = torch.logit(torch.tensor(MASK_THRESHOLD))
        band = MASK_LOGIT_TOLERANCE * max(1.0, float(want["mask_logits"].abs().max()))
        decided = (want["mask_logits"] - threshold).abs() > band
        differ = (got["mask_logits"] > threshold) != (want["mask_logits"] > threshold)
        report["mask_disagreement"] = float((differ & decided).float().mean())
        if mask_disagreement is not None:
            if report["mask_disagreement"] > mask_disagreement:
                raise RuntimeError(f"{path}: {report['mask_disagreement']:.2e} of the mask pixels are decided "
                                   f"differently from PyTorch's float32 (> {mask_disagreement})")
        elif report["max_abs/mask_logits"] > band:
            raise RuntimeError(f"{path}: ONNX Runtime's mask logits differ from PyTorch's by "
                               f"{report['max_abs/mask_logits']:.2e} (> {band:.1e}, {MASK_LOGIT_TOLERANCE} of their "
                               f"scale); {report['mask_disagreement']:.2e} of the pixels are decided differently")
    for key in ("boxes", "box_params"):
        if report.get(f"max_abs/{key}", 0.0) > box_tolerance:
            raise RuntimeError(f"{path}: ONNX Runtime's {key} differ from PyTorch's by "
                               f"{report[f'max_abs/{key}']:.2e} (> {box_tolerance})")
    return report
