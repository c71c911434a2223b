"""What `vglaw fit / validate / test` needs, checked before anything is built, one line each.

A fresh machine running `make train DATASET=refcoco` should hear first what the user must
provide (the dataset, the visual weights, the text encoder) and where to get it, not a
traceback from deep inside a library.
"""
from __future__ import annotations

import os
from pathlib import Path

from transformers.utils import cached_file

from vglaw.data.grefer import reader_for
from vglaw.data.refer import DEFAULT_SPLIT_BY, GENERALISED, IMAGE_DIRS, SPLITS
from vglaw.errors import UserError
from vglaw.io.safe_pickle import load_torch_file
from vglaw.models.hub import is_local_path
from vglaw.models.loading import VARIANTS, is_generalised
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER, resolve_text_encoder


class PreflightError(UserError):
    """Several things are missing or wrong; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def text_encoder_problem(name: str) -> str | None:
    """None if the text encoder can be loaded here, else what to do."""
    try:
        path = resolve_text_encoder(name)
    except UserError as err:
        return str(err)
    if name == DEFAULT_TEXT_ENCODER or Path(path).expanduser().is_dir():
        if not (Path(path).expanduser() / "config.json").is_file():
            return f"text encoder folder {path} has no config.json"
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        cached_file(name, "config.json", local_files_only=True)
        return None
    except Exception:  # noqa: BLE001 - not in the local cache, whatever the reason
        pass
    if offline:
        return (f"text encoder {name!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it "
                f"once (HF_HUB_OFFLINE=0 vglaw ...), give a local folder (--data.text_encoder DIR), or use the "
                f"packaged offline BERT (--data.text_encoder minilm)")
    return None


def check_run(subcommand: str, config) -> None:
    """Everything a Lightning run would fail on later, reported together.

    Raises:
        PreflightError: one line per problem.
    """
    problems: list[str] = []
    data, model, trainer = config.data, config.model, config.trainer
    if data.batch_size is None or data.batch_size < 1:
        problems.append(f"data.batch_size must be >= 1, got {data.batch_size}")
    if data.num_workers is not None and data.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0, got {data.num_workers}")
    if model.variant not in VARIANTS:
        problems.append(f"model.variant {model.variant!r} is unknown; available: {', '.join(sorted(VARIANTS))}")
    # imported data ("custom") is read for either kind of model (`reader_for`)
    elif data.dataset != "custom" and is_generalised(model.variant) != (data.dataset in GENERALISED):
        problems.append(f"model.variant {model.variant} and data.dataset {data.dataset} do not go together: "
                        f"generalised variants (*_gref) train on {' / '.join(GENERALISED)}, the others on "
                        "single-target data")
    else:
        patch = VARIANTS[model.variant][1].get("patch_size", 16)
        if data.img_size is None or data.img_size < patch or data.img_size % patch:
            problems.append(f"data.img_size {data.img_size} is not a positive multiple of the patch size {patch} "
                            f"of {model.variant}")
    root = Path(data.data_root).expanduser()
    if data.dataset in SPLITS:
        split_by = data.split_by or DEFAULT_SPLIT_BY[data.dataset]
        reader = reader_for(data.dataset, is_generalised(model.variant))
        hint = (f"run `vglaw data shapes --out {root}{' --generalised' if data.dataset == 'gshapes' else ''}`"
                if data.dataset in ("shapes", "gshapes") else
                "see data/README.md for where to download it and the layout")
        if not root.is_dir():
            problems.append(f"dataset: data.data_root {root} does not exist ({hint})")
        else:
            for p in (root / data.dataset / reader.refs_file(split_by), root / data.dataset / "instances.json",
                      root / IMAGE_DIRS[data.dataset]):
                if not p.exists():
                    problems.append(f"dataset: {p} is missing ({hint})")
    if model.visual_weights and not Path(model.visual_weights).expanduser().is_file():
        problems.append(f"visual weights: {model.visual_weights} is missing (detectron2's ViTDet-B "
                        "model_final_61ccd1.pkl from the detectron2 model zoo, see data/README.md; or "
                        "--model.visual_weights null to start from scratch)")
    init = model.init_from
    if init and is_local_path(init) and not (Path(init).expanduser() / "config.json").is_file():
        problems.append(f"model.init_from {init}: no model folder there (a folder with config.json, as `vglaw fit` "
                        "and `vglaw export` write; or a hub id)")
    problem = text_encoder_problem(data.text_encoder)
    if problem:
        problems.append(f"text encoder: {problem}")
    ckpt = config.get("ckpt_path")
    if ckpt:
        if not Path(ckpt).expanduser().is_file():
            problems.append(f"--ckpt_path {ckpt} not found")
        else:
            try:
                load_torch_file(ckpt, "checkpoint")
            except UserError as err:
                problems.append(f"--ckpt_path: {err}")
    if subcommand == "fit":
        out = Path(trainer.default_root_dir or ".").expanduser()
        problem = _folder_problem(out)
        if problem:
            problems.append(f"trainer.default_root_dir {out}: {problem} (checkpoints go there)")
        for logger in _loggers(trainer.logger):
            save_dir = Path(str(logger)).expanduser()
            problem = _folder_problem(save_dir)
            if problem:
                problems.append(f"logger save_dir {save_dir}: {problem}")
    if problems:
        raise PreflightError(problems)


def _folder_problem(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (made if missing), or None."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def _loggers(logger) -> list[str]:
    """The save_dir of each configured logger."""
    if logger in (None, False, True):
        return []
    items = logger if isinstance(logger, list) else [logger]
    dirs = []
    for item in items:
        init = getattr(item, "init_args", None) or (item.get("init_args") if isinstance(item, dict) else None)
        save_dir = getattr(init, "save_dir", None) if init is not None and not isinstance(init, dict) else \
            (init or {}).get("save_dir")
        if save_dir:
            dirs.append(save_dir)
    return dirs
