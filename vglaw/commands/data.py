"""`vglaw data shapes`, `vglaw data check` and `vglaw data import`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vglaw.errors import UsageError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw data")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shapes", help="generate the synthetic shapes dataset (refer format)")
    s.add_argument("--out", default="data", help="root folder; writes OUT/shapes and OUT/images/shapes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=2000, help="training images")
    s.add_argument("--val", type=int, default=200, help="validation images")
    s.add_argument("--test", type=int, default=200, help="test images")
    s.add_argument("--generalised", action="store_true",
                   help="also expressions naming several shapes or none, in gRefCOCO's format (OUT/gshapes)")
    s.add_argument("--overwrite", action="store_true", help="replace a dataset of the same name already in OUT")
    c = sub.add_parser("check", help="check a prepared refer-format folder and print per-split counts")
    c.add_argument("--root", default="data")
    c.add_argument("--dataset", required=True,
                   help="refcoco, refcoco+, refcocog, refclef, grefcoco, shapes, gshapes, custom")
    c.add_argument("--split-by", default=None)
    c.add_argument("--images", action="store_true", help="also read every image and mask")
    i = sub.add_parser("import", help="convert your own annotations (MDETR, ODVG, Label Studio, jsonl) into a "
                                      "dataset every command reads (--data.dataset custom)")
    i.add_argument("--format", required=True, help="mdetr, odvg, labelstudio or jsonl (data/README.md)")
    i.add_argument("--input", required=True, action="append",
                   help="the annotation file; repeat for several, SPLIT=FILE to put a file's records in SPLIT")
    i.add_argument("--images", default=None, help="the images folder (default: the first input's folder)")
    i.add_argument("--out", required=True, help="root folder; writes OUT/custom and links OUT/images/custom")
    i.add_argument("--seed", type=int, default=0, help="the seed of the split by image, when the input gives none")
    i.add_argument("--skip-invalid", action="store_true", help="skip bad records (counted by reason) instead of "
                                                               "stopping at the first")
    i.add_argument("--overwrite", action="store_true", help="replace a dataset already imported into OUT")
    args = parser.parse_args(argv)
    if args.command == "import":
        from vglaw.data.formats import import_dataset
        from vglaw.data.importing import summary_table

        result = import_dataset(args.format, args.input, args.out, args.images, args.seed, args.skip_invalid,
                                args.overwrite)
        print(summary_table(result))
        print(f"wrote {Path(args.out) / 'custom'}; train with: vglaw fit --config configs/custom.yaml "
              f"--data.data_root {args.out}")
        return 0
    # the library (numpy, torch) loads once the arguments are read: --help answers without it
    from vglaw.data.check import check
    from vglaw.data.refer import SPLITS
    from vglaw.data.shapes import generate

    problems: list[str] = []
    if args.command == "shapes":
        for name in ("train", "val", "test"):
            if getattr(args, name) < 1:
                raise UsageError(f"--{name} must be >= 1 image, got {getattr(args, name)}")
        name = "gshapes" if args.generalised else "shapes"
        for folder in (Path(args.out) / name, Path(args.out) / "images" / name):
            if folder.is_dir() and any(folder.iterdir()) and not args.overwrite:
                raise UsageError(f"--out {args.out}: {folder} already holds a {name} dataset; add --overwrite to "
                                 "replace it, or give another --out")
        counts = generate(args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test},
                          generalised=args.generalised)
    else:
        if args.dataset not in SPLITS:
            raise UsageError(f"--dataset {args.dataset!r}: one of {', '.join(sorted(SPLITS))}")
        counts, problems = check(args.root, args.dataset, args.split_by, args.images)
    extra = [k for k in ("no_target", "multi_target", "skipped") if any(k in c for c in counts.values())]
    if not problems and "skipped" in extra:
        extra.remove("skipped")
    print(f"{'split':<8} {'images':>8} {'refs':>8} {'sentences':>10}" + "".join(f" {k:>12}" for k in extra))
    for split, c in counts.items():
        print(f"{split:<8} {c['images']:>8} {c['refs']:>8} {c['sentences']:>10}"
              + "".join(f" {c.get(k, 0):>12}" for k in extra))
    if problems:
        for p in problems[:50]:
            print(f"vglaw data check: bad sample: {p}", file=sys.stderr)
        more = f" ({len(problems) - 50} more not shown)" if len(problems) > 50 else ""
        print(f"vglaw data check: {len(problems)} bad samples{more}; fix them, or train with "
              "--data.skip_invalid true to skip them", file=sys.stderr)
        return 2
    return 0
