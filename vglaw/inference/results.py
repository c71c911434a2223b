"""What grounding one expression returns (`Grounding`), and its exchange form (`to_json`).

Every caller of the model (`Grounder`, `vglaw predict`, the web page, the overlay and the
explanation figure) reads these fields; none probes a dict for keys that may be missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class Attention:
    """Where the model looked, for `return_attention=True`.

    tokens: the expression's WordPiece tokens, `[CLS]` first.
    lang: (depth, G, tokens) the per-block language aggregation weights α.
    letterbox: {"scale": [sx, sy], "pad": [left, top]} of the model's input, to map maps back.
    lap: (h, w) the box head's pooling map over the letterboxed input (box models).
    centre: (2h, 2w) the referring-object centre probabilities (generalised models).
    """

    tokens: list[str]
    lang: np.ndarray
    letterbox: dict
    lap: np.ndarray | None = None
    centre: np.ndarray | None = None


@dataclass
class Grounding:
    """One expression grounded in one image; coordinates in the original image's pixels.

    text: the expression as the model read it (cleaned).
    size: the original image's (h, w).
    box: [x1, y1, x2, y2] (box models; generalised models give `boxes` instead).
    mask: (h, w) bool, and score, the mean probability over it (mask models).
    exists, no_target: the existence probability and the decision (generalised models).
    boxes, box_scores: every box of the set and its score (generalised models).
    attention: with `return_attention`.
    image: the decoded working-size picture it was grounded in, when asked for
        (`Grounder.predict_pairs(keep_image=True)`), e.g. to draw an overlay.
    """

    text: str
    size: tuple[int, int]
    box: list[float] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    score: float | None = None
    exists: float | None = None
    no_target: bool = False
    boxes: list[list[float]] | None = None
    box_scores: list[float] | None = None
    attention: Attention | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def generalised(self) -> bool:
        """From a model that grounds 0..N objects."""
        return self.exists is not None

    def to_json(self) -> dict:
        """Box (xyxy, original pixels), score, mask as COCO RLE with its area; for generalised
        models also "no_target", "exists" and every box with its score."""
        item: dict = {"text": self.text}
        if self.box is not None:
            item["box"] = self.box
        if self.score is not None:
            item["score"] = self.score
        if self.generalised:
            item.update(no_target=self.no_target, exists=self.exists, boxes=self.boxes, box_scores=self.box_scores)
        if self.mask is not None:
            rle = mask_utils.encode(np.asfortranarray(self.mask.view(np.uint8)))  # one copy, even for 100 MP
            item["mask_area"] = int(self.mask.sum())
            item["mask_rle"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        return item

    # Read as a mapping too (r["box"], "mask" in r), as results were before they were typed.
    _KEYS = {"text": "text", "size": "size", "box": "box", "mask": "mask", "score": "score", "exists": "exists",
             "boxes": "boxes", "box_scores": "box_scores"}
    _ATTENTION_KEYS = {"tokens": "tokens", "lang_attention": "lang", "lap_attention": "lap",
                       "centre_map": "centre", "letterbox": "letterbox"}

    def _lookup(self, key: str):
        if key in self._KEYS:
            value = getattr(self, self._KEYS[key])
        elif key == "no_target":
            value = self.no_target if self.generalised else None
        elif key in self._ATTENTION_KEYS and self.attention is not None:
            value = getattr(self.attention, self._ATTENTION_KEYS[key])
        else:
            value = None
        return value

    def __getitem__(self, key: str):
        value = self._lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return self._lookup(key) is not None

    def get(self, key: str, default=None):
        value = self._lookup(key)
        return default if value is None else value

    def keys(self) -> list[str]:
        names = [*self._KEYS, "no_target", *self._ATTENTION_KEYS]
        return [k for k in names if self._lookup(k) is not None]

    def __iter__(self):
        return iter(self.keys())


@dataclass(frozen=True)
class PairError:
    """A pair of `Grounder.predict_pairs` that could not be grounded (an unreadable image, an
    unusable expression); the others go on."""

    error: str

    # Read as a mapping too ("error" in r, r["error"]), as failed pairs were before they were typed.
    def __contains__(self, key: str) -> bool:
        return key == "error"

    def __getitem__(self, key: str) -> str:
        if key != "error":
            raise KeyError(key)
        return self.error

    def get(self, key: str, default=None):
        return self.error if key == "error" else default


@dataclass(frozen=True)
class SpokenCandidate:
    """One expression the describing head proposed for a region, with what its listener made of it.

    text: the expression (WordPiece tokens joined back into words).
    log_prob: its log probability under the describing head.
    listener_iou: IoU of the box the model grounds `text` to with the query box (0 when the
        text could not be grounded, e.g. empty).
    grounded_box: that box, [x1, y1, x2, y2] in original pixels (None when not grounded).
    """

    text: str
    log_prob: float
    listener_iou: float
    grounded_box: list[float] | None


@dataclass
class Description:
    """An expression for one region of one image; coordinates in the original image's pixels.

    box: the query region [x1, y1, x2, y2].
    text: the chosen expression; listener_iou its confidence: the IoU of the box the same
        model grounds it to with `box` (it refers to the region when >= 0.5).
    log_prob, grounded_box: of the chosen expression.
    candidates: every candidate considered, most likely first.
    reranked: chosen by the listener (else the most likely candidate).
    """

    box: list[float]
    text: str
    listener_iou: float
    log_prob: float
    grounded_box: list[float] | None
    candidates: list[SpokenCandidate]
    reranked: bool

    def to_json(self) -> dict:
        return {"box": self.box, "text": self.text, "listener_iou": self.listener_iou, "log_prob": self.log_prob,
                "grounded_box": self.grounded_box, "reranked": self.reranked,
                "candidates": [{"text": c.text, "log_prob": c.log_prob, "listener_iou": c.listener_iou,
                                "grounded_box": c.grounded_box} for c in self.candidates]}
