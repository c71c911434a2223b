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

import torch

from vglaw.errors import UsageError

CONDITIONS = {
    "as trained": "trained",
    "Φ = 0 (static backbone, heads read the expression)": "static",
    "backbone weights from another expression": "swap_backbone",
    "heads read another expression": "swap_heads",
    "both from another expression": "swap_both",
}


def other_expression(targets: list[int]) -> torch.Tensor:
    """For each sample, the next one in the batch (cyclically) with another target; itself if
    the whole batch shares one target."""
    n = len(targets)
    perm = []
    for i in range(n):
        j = next(((i + k) % n for k in range(1, n) if targets[(i + k) % n] != targets[i]), i)
        perm.append(j)
    return torch.tensor(perm)


@torch.no_grad()
def ablate(model, dataset, batch_size: int = 32, limit: int | None = None, progress: bool = True) -> dict:
    """Metrics of every condition in `CONDITIONS` over `dataset` (a `ReferDataset` with an
    evaluation transform); returns {condition: {metric: value}}."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from vglaw.data.datamodule import Collate
    from vglaw.data.transforms import to_original
    from vglaw.training.metrics import GroundingMetrics, measure_predictions

    source = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=Collate(model.text.source))
    metrics = {key: GroundingMetrics() for key in CONDITIONS.values()}
    device = next(model.parameters()).device
    for batch in tqdm(loader, desc="ablate", unit="batch", disable=not progress):
        images = batch["images"].to(device)
        lang = model.language_weights(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        targets = [dataset.samples[int(i)].ann_id for i in batch["index"]]
        perm = other_expression(targets).to(device)
        swapped = [(down[perm], up) for down, up in lang.qkv]
        runs = {
            "trained": (lang.qkv, lang.sentence),
            "static": (None, lang.sentence),
            "swap_backbone": (swapped, lang.sentence),
            "swap_heads": (lang.qkv, lang.sentence[perm]),
            "swap_both": (swapped, lang.sentence[perm]),
        }
        for key, (qkv, sentence) in runs.items():
            outputs = model.ground(images, qkv, sentence)
            pred = to_original(outputs, batch["scale"], batch["pad"], batch["orig_size"], model.img_size)
            metrics[key].update(batch["index"], **{k: v.cpu() for k, v in measure_predictions(pred, batch).items()})
    return {name: {k: float(v) for k, v in metrics[key].compute().items()} for name, key in CONDITIONS.items()}


def to_markdown(table: dict) -> str:
    cols = [c for c in ("prec@0.5", "miou", "oiou") if c in next(iter(table.values()))]
    lines = ["| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, values in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    from vglaw.atomic import check_output
    from vglaw.data.refer import ReferDataset
    from vglaw.data.transforms import GroundingTransform
    from vglaw.inference import load_model, resolve_device
    from vglaw.predict import resolve_model

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    if args.out:
        check_output(args.out, flag="--out", overwrite=args.overwrite)  # before minutes of work
    source = resolve_model(args.model)
    if str(source).endswith(".onnx"):
        raise UsageError(f"{source}: the ablation swaps the language-adaptive weights inside the PyTorch model; "
                         "give the model folder or checkpoint the ONNX file was exported from")
    model = load_model(source, resolve_device(args.device))
    dataset = ReferDataset(args.data_root, args.dataset, args.split, args.split_by,
                           transform=GroundingTransform(model.img_size, keep_original=True))
    table = ablate(model, dataset, args.batch_size, args.limit)
    md = to_markdown(table)
    print(f"{args.dataset} {args.split}, {len(dataset) if not args.limit else min(args.limit, len(dataset))} "
          f"sentences, model {getattr(model, 'source', args.model)}\n\n{md}")
    if args.out:
        from vglaw.atomic import write_text

        write_text(Path(args.out), json.dumps(table, indent=2))
    return 0
