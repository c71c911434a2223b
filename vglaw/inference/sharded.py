"""Many image-expression pairs over many processes (GPUs, nodes): Lightning's `trainer.predict`,
the same engine `vglaw fit` uses for DDP.

Each process grounds its share of the pairs (Lightning's distributed sampler), with the images
decoded and prepared in its DataLoader's workers, and appends each batch's records to its own
part file in `<output>.parts/` (a record counts once its line is complete: a crash leaves at most
one partial line, which is ignored). A rerun with the same pairs and output skips every pair a
part file already holds, so a killed run resumes. When all processes are done, the first one
merges the parts into the output in the input's order (written whole, atomically) and removes
the parts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from vglaw.errors import UsageError, UserError
from vglaw.inference.grounder import Grounder, Prepared, Preprocessor, prepare_image
from vglaw.io.atomic import atomic_write

PARTS = ".parts"  # <output>.parts/: the processes' part files while a run is unfinished


def parts_folder(output: Path) -> Path:
    return output.with_name(output.name + PARTS)


def read_parts(folder: Path) -> dict[int, dict]:
    """The complete records of every part file in `folder`, by pair line (a trailing line
    without its newline, cut by a crash, is left out; a pair written twice counts once)."""
    records: dict[int, dict] = {}
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("part-*.jsonl")):
        text = path.read_text(encoding="utf-8")
        for line in text.split("\n")[:-1]:  # the last piece is empty or the unfinished line
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short and then continued by a later attempt: not a record
            records.setdefault(int(record["line"]), record)
    return records


def next_attempt(folder: Path) -> int:
    """The number of this run's part files: one above every earlier attempt's. Every process
    reads the folder before the first batch is written, so all agree."""
    attempts = [int(p.stem.split("-")[1]) for p in folder.glob("part-*-*.jsonl")] if folder.is_dir() else []
    return max(attempts, default=0) + 1


class PairsDataset(Dataset):
    """(line, image, text) pairs; each item is decoded and prepared where it is loaded (in a
    DataLoader worker), and a pair whose image or expression is unusable becomes an error record."""

    def __init__(self, pairs: list[tuple[int, str | Path, str]], preprocessor: Preprocessor) -> None:
        self.pairs, self.pre = pairs, preprocessor

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[dict, Prepared | None]:
        line, image, text = self.pairs[index]
        record = {"line": line, "image": str(image), "text": text}
        try:
            return record, self.pre.prepare(*prepare_image(image), text)
        except UserError as err:
            return {**record, "error": str(err)}, None


def keep_as_list(items: list) -> list:
    """A batch stays the list of (record, prepared) pairs: `Grounder.run` stacks them itself."""
    return items


class PairsModule(pl.LightningModule):
    """`trainer.predict` around a `Grounder`: each batch grounded, one record per pair."""

    def __init__(self, grounder: Grounder) -> None:
        super().__init__()
        self.grounder = grounder
        self.model = grounder.model  # a child module, so Lightning puts it on the process's device

    def on_predict_start(self) -> None:
        self.grounder.device = self.device

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # `Grounder.run` moves the tensors it stacks

    def predict_step(self, batch: list, batch_idx: int) -> list[dict]:
        good = [(record, p) for record, p in batch if p is not None]
        out = [record for record, p in batch if p is None]
        if good:
            for (record, _), r in zip(good, self.grounder.run([p for _, p in good])):
                out.append({**record, "height": r.size[0], "width": r.size[1], "box_format": "xyxy", **r.to_json()})
        return out


class PartWriter(BasePredictionWriter):
    """Appends each batch's records to this process's part file, flushed to disk per batch."""

    def __init__(self, folder: Path, attempt: int) -> None:
        super().__init__(write_interval="batch")
        self.folder, self.attempt = folder, attempt

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        path = self.folder / f"part-{self.attempt:04d}-{trainer.global_rank:05d}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in prediction))
            f.flush()
            os.fsync(f.fileno())


def predict_sharded(grounder: Grounder, pairs: list[tuple[int, str | Path, str]], bad: list[tuple[int, str]],
                    output: Path, devices: int | str = 1, num_nodes: int = 1, batch_size: int = 16,
                    workers: int = 0, accelerator: str = "auto") -> dict[str, int] | None:
    """Ground `pairs` over `devices` x `num_nodes` processes into `output` (JSON lines in the
    input's order, `bad` lines as error records), resuming from the part files of an earlier
    run with the same output. Returns {"grounded", "skipped", "resumed"} on the first process,
    None on the others."""
    folder = parts_folder(output)
    done = read_parts(folder)
    unknown = sorted(set(done) - {n for n, _, _ in pairs})
    if unknown:
        raise UsageError(f"{folder} holds results of pairs this input does not have (line {unknown[0]}): it belongs "
                         "to another run; give another --output or remove it")
    todo = [p for p in pairs if p[0] not in done]
    attempt = next_attempt(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = int(devices) * num_nodes if str(devices).isdigit() else None
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                         strategy="ddp" if world != 1 else "auto", logger=False, enable_checkpointing=False,
                         callbacks=[PartWriter(folder, attempt)], enable_model_summary=False,
                         use_distributed_sampler=True)
    if todo:
        loader = DataLoader(PairsDataset(todo, Preprocessor(grounder.model.tokenizer_source, grounder.img_size,
                                                            grounder.max_tokens)),
                            batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=keep_as_list,
                            persistent_workers=False)
        trainer.predict(PairsModule(grounder), loader, return_predictions=False)
    # Every process waits for the others' last parts (without a launch, only this one runs).
    trainer.strategy.barrier("vglaw-predict-merge")
    if not trainer.is_global_zero:
        return None
    records = read_parts(folder)
    missing = [n for n, _, _ in pairs if n not in records]
    if missing:
        raise UsageError(f"{len(missing)} pairs have no result in {folder} (first: line {missing[0]}); run the same "
                         "command again to finish them")
    for n, problem in bad:
        records[n] = {"line": n, "error": problem}
    with atomic_write(output, "w") as f:
        for n in sorted(records):
            f.write(json.dumps(records[n]) + "\n")
    for path in folder.glob("part-*.jsonl"):
        path.unlink()
    folder.rmdir()
    errors = sum("error" in r for r in records.values())
    return {"grounded": len(records) - errors, "skipped": errors, "resumed": len(done)}

