"""What the language-adaptive weights do: a split evaluated with the language removed from the
backbone, from the heads, or from both (see `vglaw ablate`); and what reduced precision does:
the split at each precision beside fp32 (`compare_precisions`)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from vglaw.data.datamodule import Collate
from vglaw.inference.precision import autocast, with_precision
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
def ablate(model, dataset, batch_size: int = 32, limit: int | None = None, progress: bool = True,
           precision: str = "fp32") -> dict:
    """Metrics of every condition in `CONDITIONS` over `dataset` (a `ReferDataset` with an
    evaluation transform), at `precision`; returns {condition: {metric: value}}."""
    source = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=Collate(model.tokenizer_source))
    metrics = {key: GroundingMetrics() for key in CONDITIONS.values()}
    device = next(model.parameters()).device
    model = with_precision(model, precision, device)
    for batch in tqdm(loader, desc="ablate", unit="batch", disable=not progress):
        images = batch["images"].to(device)
        with autocast(precision, device):
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
            with autocast(precision, device):
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


@torch.no_grad()
def compare_precisions(model, dataset, precisions: list[str], batch_size: int = 32, limit: int | None = None,
                       progress: bool = True) -> dict:
    """The split's metrics at each precision (`vglaw.inference.precision`), as trained, and the
    largest deviation of a box coordinate from fp32's, in original pixels; returns
    {precision: {metric: value, "max_box_dev_px": ...}}."""
    source = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=Collate(model.tokenizer_source))
    device = next(model.parameters()).device
    order = ["fp32", *(p for p in precisions if p != "fp32")]
    table, reference = {}, None
    for precision in order:
        run = with_precision(model, precision, device)
        metric, boxes = GroundingMetrics(), []
        for batch in tqdm(loader, desc=f"{precision}", unit="batch", disable=not progress):
            with autocast(precision, device):
                outputs = run(batch["images"].to(device), batch["input_ids"].to(device),
                              batch["attention_mask"].to(device))
            pred = to_original(outputs, batch["scale"], batch["pad"], batch["orig_size"], model.img_size)
            metric.update(batch["index"], **{k: v.cpu() for k, v in measure_predictions(pred, batch).items()})
            if "boxes" in pred:
                boxes.append(pred["boxes"].float().cpu())
        values = {k: float(v) for k, v in metric.compute().items()}
        if boxes:
            stacked = torch.cat(boxes)
            reference = stacked if reference is None else reference
            values["max_box_dev_px"] = float((stacked - reference).abs().max())
        if precision in precisions:
            table[precision] = values
    return table


def precision_markdown(table: dict) -> str:
    cols = [c for c in ("prec@0.5", "miou", "oiou", "max_box_dev_px") if c in next(iter(table.values()))]
    lines = ["| precision | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, values in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.4f}" if c != "max_box_dev_px" else f"{values[c]:.2f}"
                                                for c in cols) + " |")
    return "\n".join(lines)
