"""`vglaw ablate`: what the language-adaptive weights do, measured on a split.

The split is evaluated five ways: as trained; with Φ = 0 (the static backbone; the heads still
read the expression); with the backbone's weights generated from another expression of the
batch (one with another target); with the heads reading that other expression; and with both
from it. The gap between the rows separates what the expression-specific backbone does from
what the heads' reading of the expression does.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vglaw.commands import PRECISION_HELP, PRECISIONS
from vglaw.errors import UsageError
from vglaw.io.atomic import check_output, write_text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model folder, hub id or .ckpt (default: the latest written here)")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--split-by", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None, help="only the first N sentences")
    parser.add_argument("--out", default=None, help="also write the table as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="run the ablation at this precision: " + PRECISION_HELP)
    parser.add_argument("--precisions", default=None,
                        help="instead of the ablation: the split as trained at each of these precisions "
                        "(comma-separated, e.g. fp32,bf16,int8) with the largest box deviation from fp32 in pixels")
    args = parser.parse_args(argv)
    compare = [p.strip() for p in args.precisions.split(",") if p.strip()] if args.precisions else []
    unknown = [p for p in compare if p not in PRECISIONS]
    if unknown or (args.precisions is not None and not compare):
        raise UsageError(f"--precisions {args.precisions!r}: give some of {', '.join(PRECISIONS)}, comma-separated")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.out:
        check_output(args.out, flag="--out", overwrite=args.overwrite)  # before minutes of work
    # the library (torch) loads once the arguments are read: --help answers without it
    from vglaw.data.grefer import reader_for
    from vglaw.data.transforms import GroundingTransform
    from vglaw.inference import load_model, resolve_device, resolve_model
    from vglaw.inference.ablation import ablate, compare_precisions, precision_markdown, to_markdown

    source = resolve_model(args.model)
    if str(source).endswith(".onnx"):
        raise UsageError(f"{source}: the ablation swaps the language-adaptive weights inside the PyTorch model; "
                         "give the model folder or checkpoint the ONNX file was exported from")
    model = load_model(source, resolve_device(args.device))
    # the ablation measures single-target grounding: imported data gives its one-object expressions
    dataset = reader_for(args.dataset, generalised=False)(args.data_root, args.dataset, args.split, args.split_by,
                                                          transform=GroundingTransform(model.img_size,
                                                                                       keep_original=True))
    if compare:
        table = compare_precisions(model, dataset, compare, args.batch_size, args.limit)
        md = precision_markdown(table)
    else:
        table = ablate(model, dataset, args.batch_size, args.limit, precision=args.precision)
        md = to_markdown(table)
    print(f"{args.dataset} {args.split}, {len(dataset) if not args.limit else min(args.limit, len(dataset))} "
          f"sentences, model {model.source or args.model}\n\n{md}")
    if args.out:
        write_text(Path(args.out), json.dumps(table, indent=2))
    return 0
