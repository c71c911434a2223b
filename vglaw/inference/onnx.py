"""An exported model (`vglaw.inference.export`) run by ONNX Runtime behind the same pre- and
post-processing as PyTorch, its metadata checked against its graph before use.

    vglaw export --onnx outputs/demo/logs/demo/model --out model.onnx
    vglaw predict --model model.onnx --image x.jpg --text "the red circle"
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from vglaw.errors import MissingFileError, UsageError, UserError
from vglaw.models.hub import INT_RANGES
from vglaw.models.text_encoder import resolve_text_encoder

INPUTS = ("images", "input_ids", "attention_mask")


def metadata_problems(meta: dict[str, str], session) -> list[str]:
    """What in an ONNX file's vglaw metadata is malformed or disagrees with its graph, one line
    each: the metadata is data a user was handed, checked before it is used."""
    problems = []
    size, (low, high) = meta.get("vglaw_img_size", ""), INT_RANGES["img_size"]
    if not size.isdigit() or not low <= int(size) <= high:
        problems.append(f"metadata vglaw_img_size {size!r} is not an integer in {low}..{high}")
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if sorted(inputs) != sorted(INPUTS):
        problems.append(f"the graph's inputs are {sorted(inputs)}, not {list(INPUTS)}")
    elif not problems:
        side = [d for d in inputs["images"][2:] if isinstance(d, int)]
        if len(inputs["images"]) != 4 or any(d != int(size) for d in side):
            problems.append(f"metadata vglaw_img_size {size} disagrees with the graph's images input "
                            f"{inputs['images']}")
    try:
        names = json.loads(meta.get("vglaw_outputs", ""))
    except json.JSONDecodeError:
        names = None
    graph = [o.name for o in session.get_outputs()]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append("metadata vglaw_outputs is not a JSON list of output names")
    elif sorted(names) != sorted(graph) or not ({"boxes", "mask_logits"} & set(names)):
        problems.append(f"metadata vglaw_outputs {names} disagrees with the graph's outputs {graph}")
    if not isinstance(meta.get("vglaw_text_encoder"), str) or not meta.get("vglaw_text_encoder"):
        problems.append("metadata vglaw_text_encoder is missing")
    return problems


class OnnxModel:
    """An exported model run by ONNX Runtime; called like the PyTorch model (tensors in, a dict
    of tensors out), so `Grounder` and everything after it is shared.

    Args:
        path: the .onnx file (or the serialised graph itself).
        threads: intra-op threads (None: ONNX Runtime's choice).
        spin: let idle intra-op threads busy-wait for the next run (ONNX Runtime's default). Off
            here: spinning threads take the cores from the PyTorch pre- and post-processing
            between runs (side by side in one process, they slowed vglaw_small's PyTorch forward
            from 16 to 41 ms).
    """

    variant = None  # an export keeps its graph, not the name of the variant it was built as
    describes = False  # an export holds the grounding graph only

    def __init__(self, path: str | Path | bytes, threads: int | None = None, spin: bool = False) -> None:
        import onnxruntime as ort  # the runtime loads only for an .onnx model

        graph = path if isinstance(path, bytes) else None
        path = Path("<in memory>") if graph is not None else Path(path)
        if graph is None and not path.is_file():
            raise MissingFileError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(graph if graph is not None else str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
            raise UsageError(f"{path}: not a usable ONNX model ({str(err).splitlines()[0][:160]})") from err
        meta = self.session.get_modelmeta().custom_metadata_map
        if "vglaw_img_size" not in meta:
            raise UsageError(f"{path}: not exported by `vglaw export --onnx` (no vglaw metadata)")
        problems = metadata_problems(meta, self.session)
        if problems:
            raise UsageError("\n".join(f"{path}: {p}" for p in problems))
        self.img_size = int(meta["vglaw_img_size"])
        try:
            self.tokenizer_source = resolve_text_encoder(meta["vglaw_text_encoder"])
        except UserError as err:
            raise UsageError(f"{path}: metadata vglaw_text_encoder: {err}") from err
        self.names = json.loads(meta["vglaw_outputs"])
        self.source = str(path)
        self.device = torch.device("cpu")  # ONNX Runtime's CPU provider: inputs go and outputs come back here

    def __call__(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                 return_attention: bool = False) -> dict[str, Tensor]:
        feeds = {"images": images.cpu().numpy(), "input_ids": input_ids.cpu().numpy(),
                 "attention_mask": attention_mask.cpu().numpy()}
        out = dict(zip(self.names, (torch.from_numpy(v) for v in self.session.run(self.names, feeds))))
        if not return_attention:
            out.pop("lang_attention", None)
            out.pop("lap_attention", None)
        return out
