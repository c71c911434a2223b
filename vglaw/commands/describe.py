"""`vglaw describe`: an expression for each region of an image, checked by grounding it back;
or a describing model evaluated on a split.

    vglaw describe --model DIR --image x.jpg --box x1,y1,x2,y2 [--box ...] [--json] [--out overlay.png]
    vglaw describe --model DIR --dataset shapes --split test [--limit N] [--json-out metrics.json]

The model proposes --candidates expressions per box (beam search, or seeded sampling), grounds
each one itself, and keeps the one whose grounded box best matches the query box (--no-rerank:
the likeliest); that IoU is printed as the expression's confidence. With no --model, the most
recent model folder written here.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from vglaw.commands import PRECISION_HELP, PRECISIONS
from vglaw.errors import MissingFileError, UsageError
from vglaw.io.atomic import atomic_write, check_output, save_image, slug


def parse_box(text: str) -> list[float]:
    """"x1,y1,x2,y2" -> four finite floats (one line naming the bad --box otherwise)."""
    parts = text.replace(" ", "").split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"--box {text!r}: expected four numbers x1,y1,x2,y2 in pixels")
    return values


def overlay_path(args) -> Path:
    if args.out:
        return check_output(Path(args.out), [Path(args.image)], kind="image", overwrite=args.overwrite)
    base, k = Path("outputs/describe") / slug(args.image), 1
    out = base.with_name(base.name + ".png")
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}.png")
    return check_output(out, [Path(args.image)], kind="image")


def describe_one(args, grounder, boxes: list[list[float]], out: Path) -> int:
    from vglaw.inference import prepare_image
    from vglaw.inference.describing import REFERS_IOU
    from vglaw.viz.overlay import draw_descriptions

    array, size = prepare_image(args.image)
    results = grounder.describe_decoded(array, size, boxes, args.candidates, not args.no_rerank, args.strategy,
                                        args.seed, args.temperature)
    save_image(draw_descriptions(array, results, size), out)
    report = {"image": str(args.image), "height": size[0], "width": size[1], "box_format": "xyxy",
              "model": str(grounder.model.source or ""), "results": [r.to_json() for r in results],
              "overlay": str(out)}
    if args.json_out:
        with atomic_write(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            refers = "refers to it" if r.listener_iou >= REFERS_IOU else "does not single it out"
            print(f"{[round(v, 1) for v in r.box]}: {r.text!r}  listener IoU {r.listener_iou:.2f} ({refers})")
        print(f"overlay written to {out}")
    return 0


def evaluate(args, grounder) -> int:
    from vglaw.data.grefer import reader_for
    from vglaw.inference.describe_eval import evaluate_describing, to_markdown

    dataset = reader_for(args.dataset, generalised=False)(args.data_root, args.dataset, args.split, args.split_by)
    result = evaluate_describing(grounder, dataset, args.candidates, args.limit, captions=not args.no_captions)
    table = {k: result[k] for k in ("reranked", "likeliest")}
    if args.json_out:
        with atomic_write(args.json_out, "w") as f:
            json.dump({"dataset": args.dataset, "split": args.split, "regions": result["regions"],
                       "candidates": args.candidates, **table}, f, indent=2)
    print(f"{args.dataset} {args.split}: {result['regions']} regions, {args.candidates} candidates each, "
          f"model {grounder.model.source or args.model}")
    print(to_markdown(table))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw describe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder with a describing head, hub id or .ckpt "
                        "(default: the latest written here)")
    parser.add_argument("--image", help="image file (EXIF orientation is honoured)")
    parser.add_argument("--box", action="append", help="x1,y1,x2,y2 in pixels; repeat for more")
    parser.add_argument("--candidates", type=int, default=5, help="expressions proposed per box (default 5)")
    parser.add_argument("--no-rerank", action="store_true", help="keep the likeliest candidate, not the one the "
                        "model grounds back best")
    parser.add_argument("--strategy", default="beam", choices=("beam", "sample"))
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--out", default=None, help="overlay PNG (default: outputs/describe/<image>[-N].png)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("--json-out", default=None, help="also write the JSON (or the metrics) to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out / --json-out when they exist")
    parser.add_argument("--dataset", default=None, help="evaluate on this dataset instead (shapes, refcocog, ...)")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--split-by", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="evaluation: only the first N regions")
    parser.add_argument("--no-captions", action="store_true", help="evaluation: skip the caption metrics "
                        "(they need Java)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help=PRECISION_HELP)
    args = parser.parse_args(argv)
    if bool(args.image) == bool(args.dataset):
        raise UsageError("give --image with --box (describe regions), or --dataset (evaluate on a split)")
    if args.image and not args.box:
        raise UsageError("--image needs at least one --box x1,y1,x2,y2")
    args.box = [parse_box(b) for b in args.box or []]
    if args.candidates < 1:
        raise UsageError(f"--candidates must be >= 1, got {args.candidates}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.temperature <= 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    out = None
    if args.image:
        if not Path(args.image).is_file():
            raise MissingFileError(f"image not found: {args.image}")
        out = overlay_path(args)
    if args.json_out:
        check_output(Path(args.json_out), [Path(args.image)] if args.image else [], flag="--json-out",
                     outputs={"--out": out} if out else None, overwrite=args.overwrite)
    # the library (torch) loads once the arguments and outputs are checked: --help answers without it
    from vglaw.inference import Grounder, resolve_device, resolve_model

    grounder = Grounder(resolve_model(args.model), device=resolve_device(args.device), precision=args.precision)
    if not grounder.model.describes:
        raise UsageError(f"the model {grounder.model.source or args.model} has no describing head: train one "
                         "with a describing variant (configs/describe_shapes.yaml, `make demo-describe`)")
    if args.image:
        return describe_one(args, grounder, args.box, out)
    return evaluate(args, grounder)
