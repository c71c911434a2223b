"""What the language-adaptive weights do: a split evaluated with the language removed from the
backbone, from the heads, or from both (see `vglaw ablate`)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from vglaw.data.datamodule import Collate
from vglaw.models.postprocess import to_original
from vglaw.training.metrics import GroundingMetrics, measure_predictions

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
    source = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=Collate(model.tokenizer_source))
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
