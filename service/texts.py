"""The one check of a text a client sends (a question, a query, a candidate, an item's text, a filter)."""

from __future__ import annotations

from uniadapter_serve.errors import InputError, TextTooLongError
from uniadapter_serve.model.tokenizer import QUESTION_WORDS, clean_text


def check_text(text: str, field: str, max_chars: int, *, words: bool = True) -> str:
    """`text` unchanged, or a 4xx naming `field`: over `max_chars` characters (413), or, with `words`, holding
    no word the model would read (422)."""
    if len(text) > max_chars:
        raise TextTooLongError(f"{field}: {len(text)} characters is over the limit of {max_chars}")
    if words and not clean_text(text, QUESTION_WORDS):
        raise InputError(f"{field}: must contain at least one word")
    return text
