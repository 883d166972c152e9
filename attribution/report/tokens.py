"""Token scores laid back onto a document's own text, so the report shows the words the model read.

The token table holds the tokenizer's token strings (``Ġword``, ``▁word``, ``<unk>``, ...). A
fast tokenizer's character offsets map each token back to the span of text it came from; the
text between two spans (spaces, newlines) is shown uncoloured before the next token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.data.corpus import DataError, Skip, iter_documents

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenText:
    """What to display for each token (its text, with the gap before it); where the token
    string differs from that text, the token string itself (for the hover); and which tokens
    are special (BOS, EOS: no text of their own)."""

    display: list[str]
    raw: dict[int, str]
    special: list[int]
    aligned: bool


def load_tokenizer(model_path: str | None, trust_remote_code: bool = False) -> Any | None:
    """The run's candidate-side tokenizer, or None when its directory is gone."""
    if model_path is None or not Path(model_path).is_dir():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        log.warning("tokenizer of %s cannot be loaded (%s): tokens are shown as the tokenizer wrote them", model_path, error)
        return None


def document_texts(wanted: dict[str, set[str]], id_field: str, text_field: str) -> tuple[dict[str, str], list[str]]:
    """Texts of the wanted documents (shard -> ids), read from the shards that hold them, and
    the shards that could not be read (their documents are shown without text)."""
    texts: dict[str, str] = {}
    missing = []
    for shard, ids in sorted(wanted.items()):
        if not Path(shard).is_file():
            missing.append(shard)
            continue
        try:
            # Bad rows were met (and failed or recorded) by the score run; none is a listed document.
            for doc in iter_documents([Path(shard)], id_field, text_field, on_skip=_skipped, on_bad_row="skip"):
                if doc.id in ids:
                    texts[doc.id] = doc.text
        except DataError as error:
            log.warning("shard %s cannot be read for the report: %s", shard, error)
            missing.append(shard)
    return texts, missing


def token_texts(tokenizer: Any | None, texts: Sequence[str | None], tokens: Sequence[list[str]]) -> list[TokenText]:
    """Each document's tokens as display text, aligned on its text where the tokenizer reproduces
    the stored tokens exactly, else the stored token strings themselves."""
    result = [_unaligned(t) for t in tokens]
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return result
    positions = [i for i, text in enumerate(texts) if text is not None and tokens[i]]
    for start in range(0, len(positions), 256):
        chunk = positions[start:start + 256]
        encoded = tokenizer(
            [texts[i] for i in chunk], add_special_tokens=True, truncation=True,
            max_length=max(len(tokens[i]) for i in chunk), return_offsets_mapping=True,
        )
        for i, ids, offsets in zip(chunk, encoded["input_ids"], encoded["offset_mapping"]):
            stored = tokens[i]
            if tokenizer.convert_ids_to_tokens(ids[:len(stored)]) == stored and len(ids) >= len(stored):
                result[i] = _aligned(texts[i], stored, offsets[:len(stored)])
    return result


def predicted_token_scores(scores: Sequence[float]) -> list[float | None]:
    """The token table's scores, each moved onto the token whose prediction it scores.

    The table's score at position t is the term of the step that reads token t, and that step's
    logits predict token t + 1 (``sequence_log_prob``): the gradient reaches it from the loss of
    token t + 1 (and, through attention, of later tokens). So it belongs to token t + 1. Nothing
    predicts the first token (None); the last position predicts nothing in the document, so its
    score is zero and nothing is lost by dropping it.
    """
    return [None, *scores[:-1]] if scores else []


def _aligned(text: str, tokens: Sequence[str], offsets: Iterable[tuple[int, int]]) -> TokenText:
    display, raw, special = [], {}, []
    shown_to = 0
    for i, (token, (start, end)) in enumerate(zip(tokens, offsets)):
        if end <= start:
            display.append(token)
            special.append(i)
            continue
        piece = text[shown_to:end] if end > shown_to else ""
        shown_to = max(shown_to, end)
        display.append(piece)
        if piece.strip() != token:
            raw[i] = token
    return TokenText(display, raw, special, True)


def _unaligned(tokens: Sequence[str]) -> TokenText:
    return TokenText([f" {t}" if i else t for i, t in enumerate(tokens)], {}, [], False)


def _skipped(skip: Skip) -> None:
    """The score run recorded skips already; the report only reads texts."""
