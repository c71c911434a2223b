"""`vglaw export`: a training checkpoint -> a model folder (or, with --onnx, an ONNX file)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vglaw.atomic import check_output
from vglaw.errors import UsageError


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Write the model of a training checkpoint as a model folder, atomically (a folder that
    exists afterwards is complete), and remember it as the latest model."""
    from vglaw.atomic import atomic_dir
    from vglaw.inference import model_from_checkpoint
    from vglaw.recent import remember_model

    model = model_from_checkpoint(ckpt)
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    remember_model(out)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw export", description=__doc__)
    parser.add_argument("source", help="training checkpoint (.ckpt) or, with --onnx, a model folder / checkpoint")
    parser.add_argument("--out", required=True, help="model folder to write (or .onnx file with --onnx)")
    parser.add_argument("--onnx", action="store_true", help="export the whole model to ONNX instead")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    args = parser.parse_args(argv)
    # before any work: never over the source (or a folder holding it), never over what exists unasked
    check_output(args.out, [Path(args.source)], kind="file" if args.onnx else "dir", overwrite=args.overwrite)
    if args.onnx:
        from vglaw.onnx import export_onnx

        if args.source.endswith(".onnx"):
            raise UsageError(f"{args.source} is already an ONNX file; export from the model folder or checkpoint "
                             "it came from")
        path, report = export_onnx(args.source, args.out)
        diffs = ", ".join(f"{k.split('/')[1]} {v:.1e}" for k, v in report.items() if k.startswith("max_abs/"))
        print(f"checked against PyTorch (3 expressions, another batch and length than traced): largest "
              f"|difference| {diffs}" + ("; masks at the threshold identical" if "mask_disagreement" in report
                                         else ""))
    else:
        if not args.source.endswith(".ckpt"):
            raise UsageError(f"{args.source}: expected a training checkpoint (.ckpt) written by `vglaw fit`")
        path = export_checkpoint(args.source, args.out)
    print(f"wrote {path}")
    return 0
