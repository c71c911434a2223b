"""Training a describing head: the expression's next-token loss, and the location's grounding.

`VGLAWModule` adds these terms for a model with a describing head (`vglaw.models.describe`)
when `weight_describe` > 0. The batch is a grounding batch (`ReferDataModule`): each sample's
expression is a target for its box.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert

from vglaw.training.losses import box_losses

IGNORE = -100  # target id of padding
DESCRIBE_PARTS = ("locator.", "describer.")  # the describing head's parameters, by name


def describe_losses(model, batch: dict, weight_describe: float, weight_locate: float) -> dict[str, Tensor]:
    """Weighted total ("loss") and the terms: "describe", the mean next-token cross-entropy of
    the expressions given their boxes (teacher forcing, truncated to the decoder's length);
    "word_acc", the share of next tokens predicted right (not a loss); with `weight_locate` > 0
    and a box head, "locate_l1" / "locate_giou", the box head's reading of the location-adapted
    features against the query box (it teaches the location tokens to point the backbone at it).
    """
    ids, real = batch["input_ids"], batch["attention_mask"]
    n = model.config.max_words
    inputs, targets = ids[:, :n], ids[:, 1 : n + 1].masked_fill(real[:, 1 : n + 1] == 0, IGNORE)  # (B, T)
    inputs = inputs[:, : targets.shape[1]]
    boxes = box_convert(batch["boxes"].float(), "cxcywh", "xyxy").clamp(0, 1)  # (B, 4) normalised xyxy
    out = model.forward_describe(batch["images"], boxes.to(batch["images"].dtype), inputs)
    logits = out["word_logits"].float()  # (B, T, V)
    terms = {"describe": F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE)}
    total = weight_describe * terms["describe"]
    if weight_locate > 0 and "located_boxes" in out:
        located = box_losses(out["located_boxes"].float(), batch["boxes"].float())
        terms.update({f"locate_{k}": v for k, v in located.items()})
        total = total + weight_locate * sum(located.values())
    scored = targets != IGNORE
    terms["word_acc"] = (logits.argmax(-1) == targets)[scored].float().mean().detach()
    terms["loss"] = total
    return terms
