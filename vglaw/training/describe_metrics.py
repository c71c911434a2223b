"""Metrics of generated referring expressions: the caption metrics of the COCO caption
evaluation code (`pycocoevalcap`: BLEU-4, METEOR, ROUGE-L, CIDEr-D, after its PTB tokenizer;
METEOR and the tokenizer run a Java program), listener accuracy (the share of expressions the
model grounds back to their region at IoU >= 0.5) and, where a resolver of the language is
known (shapes), unique-reference accuracy and grammaticality.

`ExpressionMetrics` keeps every region's expression, references and scores as tensor states, so
under DDP each process's are gathered and the metrics are computed once over all regions;
regions are keyed by an index, so those a distributed sampler repeats to even out the
processes count once.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from vglaw.errors import UsageError

TEXT_BYTES = 512  # UTF-8 bytes kept per expression in the metric's state
MAX_REFERENCES = 16  # references kept per region
UNKNOWN = -1  # a check not made (no resolver for the dataset)
REFERS_IOU = 0.5  # an expression refers to its region when the listener's box reaches this IoU


def _encode(texts: list[str]) -> Tensor:
    """Strings -> (N, TEXT_BYTES) uint8, zero-padded."""
    out = torch.zeros(len(texts), TEXT_BYTES, dtype=torch.uint8)
    for i, t in enumerate(texts):
        raw = t.encode("utf-8")
        if len(raw) > TEXT_BYTES:
            raise UsageError(f"expression of {len(raw)} bytes is longer than the {TEXT_BYTES} the metrics keep: "
                             f"{t[:60]!r}...")
        out[i, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


def _decode(row: Tensor) -> str:
    raw = bytes(row.tolist()).rstrip(b"\0")
    return raw.decode("utf-8")


def caption_scores(references: dict[int, list[str]], candidates: dict[int, str]) -> dict[str, float]:
    """BLEU-4, METEOR, ROUGE-L and CIDEr-D of `candidates` against `references` (keyed alike),
    as the COCO caption evaluation computes them: both tokenised by its PTB tokenizer, CIDEr-D's
    document frequencies taken from these references."""
    # Imported here: pycocoevalcap starts Java programs, needed only when captions are scored.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(candidates) or not candidates:
        raise UsageError("captions to score need one candidate and some references per key, and at least one key")
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": r} for r in refs] for k, refs in references.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()  # a Java process, ended when the object is collected
    meteor_score, _ = meteor.compute_score(gts, res)
    del meteor
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "meteor": float(meteor_score), "rouge_l": float(rouge), "cider_d": float(cider)}


class ExpressionMetrics(Metric):
    """Caption metrics, listener accuracy and (when given) unique-reference accuracy and
    grammaticality of one expression per region.

    `update(index, candidates, references, listener_iou, unique=None, grammatical=None)`;
    `compute()` -> "n", "bleu4", "meteor", "rouge_l", "cider_d" (with `captions`),
    "listener_acc", "listener_miou" and, where checked, "unique_acc" and "grammatical".

    Args:
        captions: compute the pycocoevalcap metrics (they need Java).
    """

    full_state_update = False

    def __init__(self, captions: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.captions = captions
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("candidate", default=[], dist_reduce_fx="cat")
        self.add_state("references", default=[], dist_reduce_fx="cat")
        self.add_state("listener_iou", default=[], dist_reduce_fx="cat")
        self.add_state("unique", default=[], dist_reduce_fx="cat")
        self.add_state("grammatical", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, candidates: list[str], references: list[list[str]], listener_iou: Tensor,
               unique: Tensor | None = None, grammatical: Tensor | None = None) -> None:
        n = len(candidates)
        if not (len(index) == len(references) == len(listener_iou) == n):
            raise ValueError("index, candidates, references and listener_iou must have one entry per region")
        refs = torch.zeros(n, MAX_REFERENCES, TEXT_BYTES, dtype=torch.uint8)
        for i, r in enumerate(references):
            if not r or len(r) > MAX_REFERENCES:
                raise UsageError(f"region {int(index[i])}: {len(r)} references (1..{MAX_REFERENCES} kept)")
            refs[i, : len(r)] = _encode(list(r))
        unknown = torch.full((n,), UNKNOWN, dtype=torch.int8)
        self.index.append(index.long().to(self.device))
        self.candidate.append(_encode(list(candidates)).to(self.device))
        self.references.append(refs.to(self.device))
        self.listener_iou.append(listener_iou.double().to(self.device))
        self.unique.append((unique.to(torch.int8) if unique is not None else unknown).to(self.device))
        self.grammatical.append((grammatical.to(torch.int8) if grammatical is not None else unknown).to(self.device))

    def _states(self) -> dict[str, Tensor]:
        cat = lambda v: torch.cat(v) if isinstance(v, list) else v  # noqa: E731  (a list before sync)
        return {k: cat(getattr(self, k)) for k in ("index", "candidate", "references", "listener_iou", "unique",
                                                   "grammatical")}

    def compute(self) -> dict[str, Tensor]:
        s = self._states()
        if len(s["index"]) == 0:
            raise UsageError("no region was described: nothing to score")
        first: dict[int, int] = {}
        for row, i in enumerate(s["index"].tolist()):
            first.setdefault(i, row)  # a region a distributed sampler repeated counts once
        rows = torch.tensor(sorted(first.values()), device=s["index"].device)
        out = {"n": torch.tensor(float(len(rows)))}
        iou = s["listener_iou"][rows]
        out["listener_acc"] = (iou >= REFERS_IOU).double().mean()
        out["listener_miou"] = iou.mean()
        for key, name in (("unique", "unique_acc"), ("grammatical", "grammatical")):
            checked = s[key][rows]
            if (checked != UNKNOWN).any():
                out[name] = (checked[checked != UNKNOWN] == 1).double().mean()
        if self.captions:
            cands = {int(s["index"][r]): _decode(s["candidate"][r]) for r in rows.tolist()}
            refs = {int(s["index"][r]): [t for t in (_decode(x) for x in s["references"][r]) if t]
                    for r in rows.tolist()}
            out.update({k: torch.tensor(v, dtype=torch.float64) for k, v in caption_scores(refs, cands).items()})
        return out
