"""Expressions as the model reads them: cleaned, checked, tokenised, truncated with a warning."""
from __future__ import annotations

import re
import unicodedata
import warnings

from vglaw.errors import UsageError

_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """NFC-normalised text without control or invisible format characters (zero-width spaces,
    BOMs, direction marks), whitespace (newlines included) collapsed to single spaces."""
    text = unicodedata.normalize("NFC", str(text))
    text = "".join(" " if ch.isspace() else ch for ch in text
                   if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    return _SPACE.sub(" ", text).strip()


def check_expression(text: str, what: str = "expression") -> str:
    """`clean_text(text)`, refusing one that is empty once cleaned.

    Raises:
        UsageError: nothing but whitespace, control or invisible characters.
    """
    cleaned = clean_text(text)
    if not cleaned:
        raise UsageError(f"{what} {text!r} is empty (nothing but whitespace, control or invisible characters)")
    return cleaned


def real_token_counts(tokenizer, texts: list[str]) -> tuple[list[int], list[int]]:
    """Per expression: tokens other than unknown ones, and all tokens (special ones excluded),
    before truncation."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    unk = tokenizer.unk_token_id
    return [sum(t != unk for t in row) for row in ids], [len(row) for row in ids]


def warn_truncated(texts: list[str], lengths: list[int], max_tokens: int, stacklevel: int = 2) -> None:
    """Warn for each expression whose `lengths` (tokens, special ones excluded) exceed `max_tokens`."""
    for text, n in zip(texts, lengths):
        if n + 2 > max_tokens:
            warnings.warn(f"expression {text[:60]!r}{'...' if len(text) > 60 else ''} has {n + 2} tokens; truncated "
                          f"to {max_tokens} (the model reads at most {max_tokens})", stacklevel=stacklevel)
