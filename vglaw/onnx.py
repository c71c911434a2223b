"""The whole model as one ONNX graph (text encoder, aggregation, weight generation,
language-adaptive backbone, heads), and running it with ONNX Runtime behind the same
pre- and post-processing as PyTorch.

    vglaw export --onnx outputs/demo/logs/demo/model --out model.onnx
    vglaw predict --model model.onnx --image x.jpg --text "the red circle"

Inputs: images (B, 3, S, S) float32, input_ids and attention_mask (B, L) int64, B and L
dynamic. Outputs: every tensor the PyTorch model returns with `return_attention=True`.
The file's metadata records the input side, the text encoder (for the tokenizer) and the
output names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from vglaw.errors import MissingFileError, UsageError

OPSET = 17


class _Exported(nn.Module):
    """The model with positional inputs and a fixed tuple of outputs, as the exporter needs."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        out = self.model(images, input_ids, attention_mask, return_attention=True)
        return tuple(out[k] for k in self.names)


def export_onnx(source: str | Path, out: str | Path) -> Path:
    """Export a model folder, hub id or training checkpoint to `out` (an .onnx file), atomically."""
    from vglaw.atomic import atomic_write
    from vglaw.inference import load_model
    from vglaw.models.text_encoder import load_tokenizer

    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: an ONNX file name ends in .onnx")
    model = load_model(source).eval()
    tokenizer = load_tokenizer(model.text.source)
    t = tokenizer(["the red circle", "a much longer expression to ground"], padding=True, return_tensors="pt")
    images = torch.randn(2, 3, model.img_size, model.img_size)
    with torch.no_grad():
        names = list(model(images, t["input_ids"], t["attention_mask"], return_attention=True))
    wrapper = _Exported(model, names)
    dynamic = {"images": {0: "batch"}, "input_ids": {0: "batch", 1: "tokens"},
               "attention_mask": {0: "batch", 1: "tokens"}}
    for name in names:
        dynamic[name] = {0: "batch", **({3: "tokens"} if name == "lang_attention" else {})}
    import io

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(wrapper, (images, t["input_ids"], t["attention_mask"]), buffer, dynamo=False,
                          input_names=["images", "input_ids", "attention_mask"], output_names=names,
                          dynamic_axes=dynamic, opset_version=OPSET)
    import onnx

    graph = onnx.load_from_string(buffer.getvalue())
    text = getattr(model, "init_args", {}).get("text_encoder") or model.text.source
    meta = {"vglaw_img_size": str(model.img_size), "vglaw_text_encoder": str(text),
            "vglaw_outputs": json.dumps(names), "vglaw_source": str(source)}
    for k, v in meta.items():
        graph.metadata_props.add(key=k, value=v)
    with atomic_write(out) as f:
        f.write(graph.SerializeToString())
    return out


class _Text:
    """What `Grounder` reads of a model's text encoder: where its tokenizer comes from."""

    def __init__(self, source: str) -> None:
        from vglaw.models.text_encoder import resolve_text_encoder

        self.source = resolve_text_encoder(source)


class OnnxModel:
    """An exported model run by ONNX Runtime; called like the PyTorch model (tensors in, a dict
    of tensors out), so `Grounder` and everything after it is shared.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's choice).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise UsageError(f"{path}: not a usable ONNX model ({str(err).splitlines()[0][:160]})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if "vglaw_img_size" not in meta:
            raise UsageError(f"{path}: not exported by `vglaw export --onnx` (no vglaw metadata)")
        self.img_size = int(meta["vglaw_img_size"])
        self.text = _Text(meta["vglaw_text_encoder"])
        self.names = json.loads(meta["vglaw_outputs"])
        self.source = str(path)

    def eval(self) -> OnnxModel:
        return self

    def to(self, device) -> OnnxModel:
        return self

    def __call__(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 return_attention: bool = False) -> dict[str, Tensor]:
        feeds = {"images": images.cpu().numpy(), "input_ids": input_ids.cpu().numpy(),
                 "attention_mask": attention_mask.cpu().numpy()}
        out = dict(zip(self.names, (torch.from_numpy(v) for v in self.session.run(self.names, feeds))))
        if not return_attention:
            out.pop("lang_attention", None)
            out.pop("lap_attention", None)
        return out
