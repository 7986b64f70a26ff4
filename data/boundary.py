"""Tokenize rendered text so that every inference prompt is a token prefix of the training ids.

A prompt is the rendered text up to a boundary b, where an answer starts (`Rendered.prompt_ends`).
Tokenizing the whole text and tokenizing `text[:b]` alone agree on every token before b when b
falls between pre-tokens, which is the case for the default templates with SentencePiece and
byte-level BPE tokenizers. It is not always so: a pre-tokenizer may join the prompt's end and the
answer's start into one token (Llama-3's `[^\\s\\p{L}\\p{N}]+[\\r\\n]*` turns ":\\n" + "\\nText" into
":\\n\\n"; GPT-2's `\\s+(?!\\S)` turns "\\n" + "  Text" into "\\n "), or tokenize the end of `text[:b]`
differently when nothing follows. There the training ids are spliced: the prompt's own ids, then
the characters from b to the next clean token boundary of the whole text tokenized on their own,
then the whole text's tokens from there. A prompt is itself encoded with the boundaries before it,
so the rule holds for every answer of a multi-turn record, and `encode_texts` on a prompt (what
demo.py sends) gives exactly the prefix training saw. Splices are counted (data.inspect --stats).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

Offsets = list[tuple[int, int]]


class Encoding(NamedTuple):
    """Token ids, their [start, end) character offsets in the text (None: not computed), and how many boundaries
    were spliced."""

    ids: list[int]
    offsets: Offsets | None
    splices: int = 0


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast tokenizer, without truncation or padding (as transformers sets it for a
    call that asks for neither): the same ids and offsets as `tokenizer(...)`, without its conversion cost."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return backend


def _encode(tokenizer: Any, strings: list[str], add_special_tokens: bool, offsets: bool = True) -> list[Encoding]:
    backend = _backend(tokenizer)
    if offsets:
        return [Encoding(e.ids, e.offsets) for e in backend.encode_batch(strings, add_special_tokens=add_special_tokens)]
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)  # ids only (tokenizers >= 0.21)
    return [Encoding(e.ids, None) for e in fast(strings, add_special_tokens=add_special_tokens)]


class BoundaryError(ValueError):
    """The tokenizer joins a prompt's end with its answer and the answer cannot be tokenized apart from it."""


def _is_prefix(enc: Encoding, prompt: Encoding, b: int) -> bool:
    n = len(prompt.ids)
    if enc.ids[:n] != prompt.ids:
        return False
    if n == len(enc.ids) or enc.offsets is None:  # same ids covering text[:b]: the next token starts at b or later
        return True
    start, end = enc.offsets[n]
    return start >= b or start == end  # the next token starts at the answer (or is a zero-width special token)


def _clean_start(offsets: Offsets, b: int) -> int:
    """The first token at or after b that no earlier token overlaps (a clean cut of the whole text's tokens);
    past the last token of real width when there is none (trailing zero-width special tokens stay)."""
    reach = 0  # furthest end of the tokens so far
    last = 0
    for i, (s, e) in enumerate(offsets):
        if e > s:
            if s >= b and reach <= s:
                return i
            reach = max(reach, e)
            last = i + 1
    return last


def _tokens_apart(tokenizer: Any, text: str, at: int) -> Encoding:
    """`text` (which starts at character `at` of the whole text) tokenized as a continuation: after the EOS
    token, a special token that every tokenizer splits out, so no dummy prefix or merge with what precedes."""
    if not text:
        return Encoding([], [])
    anchor = tokenizer.eos_token
    ids, offsets, _ = _encode(tokenizer, [anchor + text], add_special_tokens=False)[0]
    if not ids or ids[0] != tokenizer.eos_token_id or offsets[0] != (0, len(anchor)):
        raise BoundaryError(f"the tokenizer does not split its EOS token {anchor!r} out of the text")
    shift = at - len(anchor)
    return Encoding(ids[1:], [(s + shift, e + shift) for s, e in offsets[1:]])


def _splice(tokenizer: Any, text: str, enc: Encoding, prompt: Encoding, b: int, add_special_tokens: bool
            ) -> Encoding:
    """`enc` (tokens of `text`) made to start with `prompt` (tokens of text[:b])."""
    if prompt.offsets is None:  # prompts are first encoded without offsets; a splice needs them
        natural = _encode(tokenizer, [text[:b]], add_special_tokens)[0]
        assert natural.ids == prompt.ids, "a prompt spliced itself but lost its offsets"
        prompt = natural
    j = _clean_start(enc.offsets, b)
    e = enc.offsets[j][0] if j < len(enc.ids) else len(text)
    middle = _tokens_apart(tokenizer, text[b:e], b)
    out = Encoding(prompt.ids + middle.ids + enc.ids[j:], prompt.offsets + middle.offsets + enc.offsets[j:],
                   enc.splices + 1)
    if tokenizer.decode(out.ids) != tokenizer.decode(enc.ids):
        raise BoundaryError(f"the tokenizer joins the prompt's end {text[max(0, b - 12):b]!r} with the answer's start "
                            f"{text[b:b + 12]!r}, and the answer cannot be tokenized apart from the prompt")
    return out


def _prefixed(tokenizer: Any, text: str, enc: Encoding, prompts: Sequence[Encoding], bounds: Sequence[int],
              add_special_tokens: bool) -> Encoding:
    """`enc` spliced where needed so that every encoded prompt (of text[:b], b in `bounds`) is a prefix of it."""
    for prompt, b in zip(prompts, bounds, strict=True):
        if not _is_prefix(enc, prompt, b):
            if enc.offsets is None:
                enc = _encode(tokenizer, [text], add_special_tokens)[0]
            enc = _splice(tokenizer, text, enc, prompt, b, add_special_tokens)
    return enc


def encode_texts(tokenizer: Any, items: Sequence[tuple[str, Sequence[int]]], add_special_tokens: bool
                 ) -> list[Encoding | str]:
    """Tokenize each (text, prompt boundaries) so that, for every boundary b, `encode_texts` of (text[:b], the
    boundaries before b) is a prefix of the ids and the token after it starts at b. Two batched calls of the
    Rust tokenizer (texts with offsets, prompts ids only); the problem (a str) for an item where that cannot
    be done."""
    texts = _encode(tokenizer, [text for text, _ in items], add_special_tokens)
    parts = _encode(tokenizer, [text[:b] for text, bounds in items for b in bounds], add_special_tokens, offsets=False)
    out: list[Encoding | str] = []
    at = 0
    for (text, bounds), whole in zip(items, texts, strict=True):
        mine, at = parts[at:at + len(bounds)], at + len(bounds)
        try:
            prompts: list[Encoding] = []
            for k, b in enumerate(bounds):  # prompt k is encoded with the boundaries before it
                prompts.append(_prefixed(tokenizer, text[:b], mine[k], prompts, bounds[:k], add_special_tokens)
                               ._replace(splices=0))
            out.append(_prefixed(tokenizer, text, whole, prompts, bounds, add_special_tokens))
        except BoundaryError as e:
            out.append(str(e))
    return out
