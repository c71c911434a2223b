"""`vglaw export`: a training checkpoint -> a model folder (or, with --onnx, an ONNX file)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vglaw.errors import UsageError
from vglaw.io.atomic import check_output


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw export", description=__doc__)
    parser.add_argument("source", help="training checkpoint (.ckpt) or, with --onnx, a model folder / checkpoint")
    parser.add_argument("--out", required=True, help="model folder to write (or .onnx file with --onnx)")
    parser.add_argument("--onnx", action="store_true", help="export the whole model to ONNX instead")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="with --onnx: ONNX Runtime's dynamic int8 quantisation of the graph's weights, checked "
                        "against the float32 model with int8 bounds")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    args = parser.parse_args(argv)
    if args.quantize and not args.onnx:
        raise UsageError("--quantize applies to an ONNX export (--onnx); for PyTorch use --precision int8 "
                         "where the model runs")
    # before any work: never over the source (or a folder holding it), never over what exists unasked
    check_output(args.out, [Path(args.source)], kind="file" if args.onnx else "dir", overwrite=args.overwrite)
    # the library (torch) loads once the arguments are read: --help answers without it
    from vglaw.inference.export import export_onnx
    from vglaw.models.loading import export_checkpoint

    if args.onnx:
        if args.source.endswith(".onnx"):
            raise UsageError(f"{args.source} is already an ONNX file; export from the model folder or checkpoint "
                             "it came from")
        path, report = export_onnx(args.source, args.out, quantize=args.quantize)
        diffs = ", ".join(f"{k.split('/')[1]} {v:.1e}" for k, v in report.items() if k.startswith("max_abs/"))
        masks = report.get("mask_disagreement")
        print(f"checked against PyTorch{' float32' if args.quantize else ''} (3 expressions, another batch and "
              f"length than traced): largest |difference| {diffs}"
              + ("" if masks is None else "; masks at the threshold identical" if masks == 0
                 else f"; {masks:.2%} of mask pixels decided differently"))
    else:
        if not args.source.endswith(".ckpt"):
            raise UsageError(f"{args.source}: expected a training checkpoint (.ckpt) written by `vglaw fit`")
        path = export_checkpoint(args.source, args.out)
    print(f"wrote {path}")
    return 0
