"""Reader of gRefCOCO's format (henghuiding/gRefCOCO `grefer.py`): an expression refers to zero,
one or many objects.

    <root>/<dataset>/grefs(<splitBy>).json   JSON list of refs; `ann_id` and `category_id` are
                                             lists, `[-1]` for an expression that names nothing
    <root>/<dataset>/instances.json          COCO-style images and annotations
    <root>/<IMAGE_DIRS[dataset]>/<file_name>

One sample per sentence, with the union mask of its objects (empty for no target) and every
box of the set. Datasets: "grefcoco", the generated "gshapes" (`vglaw data shapes --generalised`)
and "custom" (`vglaw data import`), which a single-target model reads through
`SingleTargetGReferDataset`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vglaw.data.refer import GREFS_FORMAT, BadSampleError, ReferDataset, Sample, ann_to_mask, segmentation_problem
from vglaw.errors import UsageError


@dataclass(frozen=True)
class GSample:
    """One sentence of one generalised ref."""

    index: int
    ref_id: int
    sent_id: int
    ann_ids: tuple[int, ...]  # empty: the expression names nothing in the image
    image_id: int
    text: str
    image_path: Path
    bboxes: tuple[tuple[float, float, float, float], ...]  # COCO x, y, w, h of every referred object

    @property
    def ann_id(self) -> tuple[int, ...]:
        """The target's identity (the set), as `ReferDataset` samples have one."""
        return self.ann_ids


class GReferDataset(ReferDataset):
    """Sentences of one split of a gRefCOCO-format dataset (see the module docstring).

    Arguments as `ReferDataset`. `load` returns "bboxes" (N, 4) and "has_target" instead of
    "bbox", and the union "mask".
    """

    @staticmethod
    def refs_file(split_by: str) -> str:
        return f"grefs({split_by}).json"

    @staticmethod
    def read_refs(path: Path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: not valid JSON ({err})") from err

    def _ref_samples(self, ref: dict, refs_path: Path, inst_path: Path, problems: list[str],
                     first_index: int) -> list[GSample]:
        """One generalised ref's samples, or `BadSampleError` naming what is wrong with it (the
        structural loop, and `skip_invalid`, are `ReferDataset._index`'s)."""
        missing = [k for k in ("ref_id", "ann_id", "image_id", "sentences") if k not in ref]
        if missing:
            raise BadSampleError(f"a ref in {refs_path} (ref_id {ref.get('ref_id')}) lacks {', '.join(missing)}")
        if not isinstance(ref["sentences"], list):
            raise BadSampleError(f"ref {ref['ref_id']!r} in {refs_path}: sentences is "
                                 f"{type(ref['sentences']).__name__}, not a list")
        sent_ids = [s.get("sent_id") for s in ref["sentences"] if isinstance(s, dict)]
        where = f"ref {ref['ref_id']!r} (sentences {sent_ids}) in {refs_path}"
        ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
        for key, values in (("ref_id", [ref["ref_id"]]), ("image_id", [ref["image_id"]]), ("ann_id", ids)):
            bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                raise BadSampleError(f"{where}: {key} holds {bad[0]!r}, not an integer id")
        if not ids:
            raise BadSampleError(f"{where} has an empty ann_id list (use [-1] for no target)")
        if -1 in ids and len(ids) > 1:
            raise BadSampleError(f"{where} mixes -1 (no target) with real annotation ids {ids}")
        ids = [] if ids == [-1] else ids
        image = self.images.get(ref["image_id"])
        if image is None:
            raise BadSampleError(f"{where} names image {ref['image_id']}, which is not in {inst_path}")
        if not isinstance(image.get("file_name"), str):
            raise BadSampleError(f"image {image['id']} in {inst_path} has no file_name")
        anns = []
        for ann_id in ids:
            ann = self.anns.get(ann_id)
            if ann is None:
                raise BadSampleError(f"{where} names annotation {ann_id}, which is not in {inst_path}")
            if ann["image_id"] != image["id"]:
                raise BadSampleError(f"{where}: annotation {ann_id} belongs to image {ann['image_id']}, "
                                     f"not {image['id']}")
            try:
                x, y, w, h = (float(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):
                raise BadSampleError(f"{where}: annotation {ann_id} in {inst_path} has no [x, y, w, h] bbox") from None
            if not (w >= 1 and h >= 1):
                raise BadSampleError(f"{where}: annotation {ann_id} has a degenerate box {[x, y, w, h]} "
                                     "(w or h < 1 px)")
            problem = segmentation_problem(ann, image)
            if problem:
                raise BadSampleError(f"{where}: annotation {ann_id}: {problem}")
            anns.append(ann)
        boxes = tuple(tuple(float(v) for v in a["bbox"]) for a in anns)
        return [GSample(first_index + i, ref["ref_id"], sent_id, tuple(ids), image["id"], text,
                        self.image_dir / image["file_name"], boxes)
                for i, (sent_id, text) in enumerate(self._sentences(ref, refs_path, problems))]

    def load(self, index: int) -> dict:
        """The raw sample: image, text, "bboxes" (N, 4) COCO boxes, the union "mask" (H, W)
        uint8 (zeros for no target), "has_target", ids [, category map]."""
        s = self.samples[index]
        image = self._cached(("image", s.image_id), lambda: self._load_image(s))

        def union() -> np.ndarray:
            mask = np.zeros(image.shape[:2], dtype=np.uint8)
            for ann_id in s.ann_ids:
                mask |= ann_to_mask(self.anns[ann_id], *image.shape[:2])
            return mask

        mask = self._cached(("mask", s.image_id, s.ann_ids), union)  # () names no object of *this* image
        out = {"image": image, "text": s.text, "bboxes": np.array(s.bboxes, dtype=np.float32).reshape(-1, 4),
               "mask": mask, "has_target": bool(s.ann_ids), "index": s.index, "ref_id": s.ref_id,
               "sent_id": s.sent_id, "image_id": s.image_id}
        if self.with_categories:
            out["categories"] = self._cached(("categories", s.image_id),
                                             lambda: self.category_map(s.image_id, *image.shape[:2]))
        return out

    def counts(self) -> dict[str, int]:
        out = super().counts()
        out["no_target"] = sum(1 for s in self.samples if not s.ann_ids)
        out["multi_target"] = sum(1 for s in self.samples if len(s.ann_ids) > 1)
        return out


class SingleTargetGReferDataset(GReferDataset):
    """A gRefCOCO-format dataset read for a model that grounds exactly one object: every
    expression must name one (else a bad sample, skipped with `skip_invalid`); samples and
    `load` as `ReferDataset`'s ("bbox", the object's mask)."""

    def _ref_samples(self, ref: dict, refs_path: Path, inst_path: Path, problems: list[str],
                     first_index: int) -> list[Sample]:
        samples = super()._ref_samples(ref, refs_path, inst_path, problems, first_index)
        n = len(samples[0].ann_ids) if samples else 1
        if n != 1:
            raise BadSampleError(f"ref {ref['ref_id']} in {refs_path} ({samples[0].text!r}) names "
                                 f"{'no object' if n == 0 else f'{n} objects'}; a single-target model grounds exactly "
                                 "one: train a generalised variant (*_gref) on this data, or set data.skip_invalid "
                                 "true to leave such expressions out")
        return [Sample(s.index, s.ref_id, s.sent_id, s.ann_ids[0], s.image_id, s.text, s.image_path, s.bboxes[0])
                for s in samples]

    load = ReferDataset.load
    counts = ReferDataset.counts


def reader_for(dataset: str, generalised: bool | None = None) -> type[ReferDataset]:
    """The reader of `dataset` for a generalised model or not (None: as the dataset is; an
    imported "custom" dataset is read as stored, with 0..N targets)."""
    if dataset not in GREFS_FORMAT:
        return ReferDataset
    if generalised is None:
        generalised = True
    return GReferDataset if generalised else SingleTargetGReferDataset
