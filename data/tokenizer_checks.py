"""What a tokenizer must do for training to mean what the user expects, checked before any record is encoded:
it has a vocabulary and an EOS token, it reads special tokens' text as those tokens; and which records hold the
text of a special token in their own fields (read as that control token, as serving stacks do)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from data.chat import template_tokens
from data.records import DataError, Record


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(field path, text) of every string in a record's value: "output", "rounds[3][1]", ..."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}" if where else k)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")


def special_text(records: Sequence[Record], tokenizer: Any) -> tuple[int, str]:
    """How many records hold the text of one of the tokenizer's special tokens in their own fields, and the first
    ('FILE:LINE: field ... holds ...'). The tokenizer reads such text as that control token, as transformers and
    serving stacks do: an EOS inside an answer is trained as a stop there. Counted too: the added tokens that are not
    special but that the chat template writes (a ChatML `<|im_end|>` added with `add_tokens`), never split either;
    not a word added to the vocabulary."""
    pattern = _special_pattern(tokenizer)
    if pattern is None:
        return 0, ""
    count, first = 0, ""
    for rec in records:
        if (found := _first_special(rec.data, pattern)) is not None:
            count += 1
            first = first or f"{rec.source}:{rec.line}: {found}"
    return count, first


def special_text_in(data: Mapping[str, Any], tokenizer: Any) -> str | None:
    """"field ... holds ..." for one record's fields (`special_text`'s finding), None when none holds such text."""
    pattern = _special_pattern(tokenizer)
    return None if pattern is None else _first_special(data, pattern)


def _special_pattern(tokenizer: Any) -> re.Pattern | None:
    """What `special_text` looks for: the tokenizer's special tokens and the added tokens its chat template writes."""
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials |= set(tokenizer.all_special_tokens) | template_tokens(tokenizer)
    specials = sorted((t for t in specials if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _first_special(data: Mapping[str, Any], pattern: re.Pattern) -> str | None:
    found = next(((where, m.group()) for where, text in _strings(data, "") if (m := pattern.search(text))), None)
    return None if found is None else f"field {found[0]!r} holds {found[1]!r}"


def require_special_tokens_parsed(tokenizer: Any) -> None:
    """Raise DataError (naming the tokenizer's dir) if the tokenizer splits special tokens' text into characters
    (`split_special_tokens`): the templates write EOS and end-of-turn tokens as text, so no answer would end with one."""
    if getattr(tokenizer.backend_tokenizer, "encode_special_tokens", False):
        raise DataError([f"{tokenizer.name_or_path}:0: the tokenizer has \"split_special_tokens\": true, which reads "
                         f"{tokenizer.eos_token!r} as plain characters: no answer would end with the EOS token (the "
                         "templates write it as text); set it false in tokenizer_config.json"])


def require_eos(tokenizer: Any) -> None:
    """Raise DataError (naming the tokenizer's dir) if the tokenizer has no EOS token: answers and pretrain text
    end with it, and generation stops on it."""
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise DataError([f"{tokenizer.name_or_path}:0: the tokenizer has no EOS token (eos_token): every answer is "
                         "trained to end with it and generation stops on it; set \"eos_token\" in its "
                         "tokenizer_config.json"])


def vocab_size_problem(vocab_size: int, tokenizer: Any) -> str | None:
    """Why a model of `vocab_size` embedding rows cannot take the tokenizer's ids (training, demo and inspect refuse
    it), or None."""
    if len(tokenizer) <= vocab_size:
        return None
    return (f"the model's vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens (ids >= "
            f"{vocab_size} have no embedding row); resize the model's embeddings or use its own tokenizer")


def vocabulary_problem(tokenizer: Any) -> str | None:
    """Why the tokenizer cannot be used: every token it has is an added (special) one, so text encodes to nothing (a
    dir with tokenizer_config.json but neither tokenizer.json nor tokenizer.model loads as such a tokenizer); None when
    it has a vocabulary (of any script or size), or when that cannot be told."""
    try:
        if len(tokenizer.get_vocab()) > len(tokenizer.added_tokens_decoder):
            return None
    except Exception:  # noqa: BLE001 -- a tokenizer class without these: not refused on a guess
        return None
    return "the tokenizer encodes text to no tokens: it has no vocabulary (its tokenizer.json or tokenizer.model is missing?)"
