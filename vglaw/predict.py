"""`vglaw predict`: ground one or more expressions in one image with a trained checkpoint."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from vglaw.data.refer import BadSampleError, load_rgb
from vglaw.data.transforms import GroundingTransform, to_original
from vglaw.models.checkpoint import state_dict_problems
from vglaw.models.text_encoder import MAX_TOKENS, load_tokenizer
from vglaw.training.module import VGLAWModule

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable or of another configuration."""


def load_module(ckpt: str | Path, device: str = "cpu") -> VGLAWModule:
    """Rebuild the model from a Lightning checkpoint's hyperparameters and load its weights strictly."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    try:
        # Lightning checkpoints hold hyperparameters next to tensors; only open files you trust.
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to read means the file is unusable
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {err}") from err
    hp = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not hp or "variant" not in hp or "state_dict" not in state:
        raise CheckpointError(f"{ckpt} is not a vglaw training checkpoint (no hyper_parameters.variant / state_dict)")
    hp = {k: v for k, v in hp.items() if not k.startswith("_")}  # LightningCLI adds "_instantiator"
    # The checkpoint carries every weight: skip loading pretrained files that would be overwritten.
    hp["visual_weights"] = None
    hp["model_args"] = {**(hp.get("model_args") or {}), "text_pretrained": False}
    try:
        module = VGLAWModule(**hp)
    except TypeError as err:
        raise CheckpointError(f"{ckpt} was saved by another configuration of vglaw: {err}") from err
    problems = state_dict_problems(state["state_dict"], module.state_dict(), limit=20)
    if problems:
        raise CheckpointError(f"{ckpt} does not match its own configuration ({hp['variant']}):\n  " +
                              "\n  ".join(problems))
    module.load_state_dict(state["state_dict"])
    return module.eval().to(device)


@torch.no_grad()
def predict(module: VGLAWModule, image: np.ndarray, texts: list[str]) -> list[dict]:
    """Boxes (x1, y1, x2, y2) in original pixels and boolean masks for each expression."""
    texts = [t.strip() for t in texts]
    if not texts or any(not t for t in texts):
        raise ValueError("every --text must be a non-empty expression")
    device = module.device
    transform = GroundingTransform(module.img_size)
    samples = [transform({"image": image, "text": t}) for t in texts]
    tokenizer = load_tokenizer(module.hparams.text_encoder)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(device)
    images = torch.stack([s["image"] for s in samples]).to(device)
    outputs = module.model(images, tokens["input_ids"], tokens["attention_mask"])
    scale, pad, orig = (torch.stack([s[k] for s in samples]).to(device) for k in ("scale", "pad", "orig_size"))
    pred = to_original(outputs, scale, pad, orig, module.img_size)
    results = [{"text": t} for t in texts]
    for i, r in enumerate(results):
        if "boxes" in pred:
            r["box"] = [round(v, 2) for v in pred["boxes"][i].tolist()]
        if "masks" in pred:
            r["mask"] = pred["masks"][i].cpu().numpy()
            # Confidence of the mask: its mean probability over the predicted pixels.
            r["score"] = round(float(pred["mask_scores"][i]), 4)
    return results


OVERLAY_MIN_SIDE = 512  # smaller pictures are enlarged so the expressions fit as text


def draw_overlay(image: np.ndarray, results: list[dict]) -> Image.Image:
    """The image with each expression's mask, box and text in its own colour.

    An image whose longer side is under `OVERLAY_MIN_SIDE` is enlarged by an integer factor
    (nearest neighbour, so pixels stay sharp) before drawing; boxes are scaled with it.
    """
    canvas = image.astype(np.float32)
    for k, r in enumerate(results):
        if "mask" in r:
            colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
            canvas[r["mask"]] = 0.5 * canvas[r["mask"]] + 0.5 * colour
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    zoom = max(1, math.ceil(OVERLAY_MIN_SIDE / max(image.shape[:2])))
    if zoom > 1:
        out = out.resize((out.width * zoom, out.height * zoom), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    for k, r in enumerate(results):
        colour = PALETTE[k % len(PALETTE)]
        box = [v * zoom for v in r["box"]] if "box" in r else None
        if box is not None:
            draw.rectangle(box, outline=colour, width=width)
        x, y = (box[0], max(0, box[1] - 12)) if box is not None else (2, 2 + 12 * k)
        label = r["text"] + (f" ({r['score']:.2f})" if "score" in r else "")
        x = max(0, min(x, out.width - draw.textlength(label)))  # keep the label inside the picture
        left, top, right, bottom = draw.textbbox((x, y), label)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), label, fill=colour)
    return out


def to_json(results: list[dict], image_path: str, size: tuple[int, int]) -> dict:
    items = []
    for r in results:
        item = {k: v for k, v in r.items() if k != "mask"}
        if "mask" in r:
            rle = mask_utils.encode(np.asfortranarray(r["mask"].astype(np.uint8)))
            item["mask_area"] = int(r["mask"].sum())
            item["mask_rle"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        items.append(item)
    return {"image": image_path, "height": size[0], "width": size[1], "box_format": "xyxy", "results": items}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw predict", description=__doc__)
    parser.add_argument("--image", required=True, help="image file (EXIF orientation is honoured)")
    parser.add_argument("--text", action="append", required=True, help="referring expression; repeat for more")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `vglaw fit`")
    parser.add_argument("--out", default=None, help="overlay PNG (default: outputs/predict/<image stem>.png)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        if any(not t.strip() for t in args.text):
            raise ValueError("every --text must be a non-empty expression")
        image = load_rgb(args.image, exif_transpose=True)
        module = load_module(args.ckpt, args.device)
        results = predict(module, image, args.text)
    except (FileNotFoundError, BadSampleError, CheckpointError, ValueError) as err:
        print(f"vglaw predict: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("outputs/predict") / f"{Path(args.image).stem}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, results).save(out)
    if args.json:
        print(json.dumps({**to_json(results, args.image, image.shape[:2]), "overlay": str(out)}, indent=2))
    else:
        for r in results:
            print(f"{r['text']!r}: box={r.get('box')} score={r.get('score')}")
        print(f"overlay written to {out}")
    return 0
