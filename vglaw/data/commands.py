"""`vglaw data shapes` and `vglaw data check`."""
from __future__ import annotations

import argparse
import sys

from vglaw.data.refer import DEFAULT_SPLIT_BY, SPLITS, ReferDataset


def check(root: str, dataset: str, split_by: str | None, load_images: bool) -> dict[str, dict[str, int]]:
    """Index every split (and optionally read every image and mask); returns per-split counts."""
    from tqdm import tqdm

    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    counts = {}
    for split in SPLITS[dataset][split_by]:
        ds = ReferDataset(root, dataset, split, split_by)
        counts[split] = ds.counts()
        if load_images:
            for i in tqdm(range(len(ds)), desc=f"{dataset} {split}", unit="sent"):
                ds.load(i)
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vglaw data")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("shapes", help="generate the synthetic shapes dataset (refer format)")
    s.add_argument("--out", default="data", help="root folder; writes OUT/shapes and OUT/images/shapes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train", type=int, default=2000, help="training images")
    s.add_argument("--val", type=int, default=200, help="validation images")
    s.add_argument("--test", type=int, default=200, help="test images")
    c = sub.add_parser("check", help="check a prepared refer-format folder and print per-split counts")
    c.add_argument("--root", default="data")
    c.add_argument("--dataset", required=True, choices=sorted(SPLITS))
    c.add_argument("--split-by", default=None)
    c.add_argument("--images", action="store_true", help="also read every image and mask")
    args = parser.parse_args(argv)
    if args.command == "shapes":
        from vglaw.data.shapes import generate

        counts = generate(args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test})
    else:
        try:
            counts = check(args.root, args.dataset, args.split_by, args.images)
        except (FileNotFoundError, ValueError) as err:  # BadSampleError is a ValueError
            print(f"vglaw data check: error: {err}", file=sys.stderr)
            return 2
    print(f"{'split':<8} {'images':>8} {'refs':>8} {'sentences':>10}")
    for split, c in counts.items():
        print(f"{split:<8} {c['images']:>8} {c['refs']:>8} {c['sentences']:>10}")
    return 0
