"""`vglaw data check`'s library: every sample of a prepared dataset read and counted per split."""
from __future__ import annotations

import warnings

from tqdm import tqdm

from vglaw.data.grefer import reader_for
from vglaw.data.refer import DEFAULT_SPLIT_BY, SPLITS, BadSampleError
from vglaw.errors import UsageError


def check(root: str, dataset: str, split_by: str | None, load_images: bool) -> tuple[dict, list[str]]:
    """Index every split (and optionally read every image and mask).

    Returns:
        per-split counts, and every problem found (one line each; bad samples are skipped and
        counted, not fatal, so one run lists them all).
    """
    split_by = split_by or DEFAULT_SPLIT_BY[dataset]
    if split_by not in SPLITS[dataset]:
        raise UsageError(f"--split-by {split_by!r}: {dataset} has {', '.join(SPLITS[dataset])}")
    counts, problems = {}, []
    for split in SPLITS[dataset][split_by]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = reader_for(dataset)
            ds = reader(root, dataset, split, split_by, skip_invalid=True)
        problems += [f"{split}: {p}" for p in ds.problems]
        counts[split] = {**ds.counts(), "skipped": len(ds.problems)}
        if load_images:
            for i in tqdm(range(len(ds)), desc=f"{dataset} {split}", unit="sent"):
                try:
                    ds.load(i)
                except BadSampleError as err:
                    problems.append(f"{split}: {err}")
                    counts[split]["skipped"] += 1
    return counts, problems
