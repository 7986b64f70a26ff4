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

Tokenizer conventions that would break this are undone here, for training and prompts alike: the ids a
post-processor appends to every text (`add_eos_token`) are left out (the templates write the EOS where a
text ends; a prompt ends without one); a token that takes the whitespace beside it (lstrip / rstrip, as
Phi-3's "<|end|>") gets the offsets of its own characters, so an end-of-turn token that swallows the
newline after it is trained with its answer; a splice never writes the dummy prefix that a legacy Llama
tokenizer puts after every special token; offsets are read with the post-processor's `trim_offsets` off (as
`processors.ByteLevel()` and RobertaProcessing default it on), which would give whitespace-only tokens (" " in
indented code) no width, so no label, and break the boundaries (the ids are the same either way).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

Offsets = list[tuple[int, int]]


class Encoding(NamedTuple):
    """Token ids, their [start, end) character offsets in the text (None: not computed), and the boundaries where
    they were spliced."""

    ids: list[int]
    offsets: Offsets | None
    splices: tuple[int, ...] = ()


def _backend(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast tokenizer, without truncation or padding (as transformers sets it for a
    call that asks for neither): the same ids and offsets as `tokenizer(...)`, without its conversion cost."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return backend


def backend_spec(tokenizer: Any) -> str:
    """The Rust tokenizer's serialization (`to_str()`) as `_backend` uses it: without truncation or padding, which a
    tokenizer.json may set (many Hub tokenizers do) and encoding turns off. The same before and after the tokenizer
    has encoded (the data cache's key), the same as a tokenizer.json without them gives; the tokenizer is left as
    it was."""
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    if truncation is None and padding is None:
        return backend.to_str()
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def appended_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's post-processor appends to every text (an EOS, from `add_eos_token`). The templates
    write the EOS where an answer or a text ends; a prompt must not end with one: they are left out."""
    backend = _backend(tokenizer)
    bare = backend.encode("a", add_special_tokens=False).ids
    ids = backend.encode("a", add_special_tokens=True).ids
    at = next(i for i in range(len(ids) - len(bare) + 1) if ids[i:i + len(bare)] == bare)
    return ids[at + len(bare):]


class _Conventions(NamedTuple):
    """What `_encode` undoes of a tokenizer's conventions, read once per `encode_texts` call."""

    cut: int  # ids the post-processor appends to every text (`appended_ids`), left out
    stripping: dict[int, str]  # added tokens that take the whitespace beside them (lstrip / rstrip), by id
    offsets: Any  # the Rust tokenizer that gives the offsets: the tokenizer's own, or `_untrimmed_backend`'s
    added: tuple  # every added token, read once per call (`_conventions`), not once per splice


def _stripping(decoder: dict) -> dict[int, str]:
    """The added tokens (a `get_added_tokens_decoder()`) that take the whitespace beside them (lstrip / rstrip)."""
    return {i: t.content for i, t in decoder.items() if t.lstrip or t.rstrip}


def _conventions(tokenizer: Any) -> _Conventions:
    """The tokenizer's conventions as they are now (well under a millisecond: read per call, never stale). The added
    tokens are read once: those that take the whitespace beside them (`_stripping`), and all of them as they are
    now (what a copy built from `to_str()` holds), part of a cached copy's state so that a token added after the first
    encode is not split into characters by a stale copy."""
    decoder = _backend(tokenizer).get_added_tokens_decoder()
    added = tuple(sorted((i, repr(t)) for i, t in decoder.items()))
    return _Conventions(len(appended_ids(tokenizer)), _stripping(decoder), _untrimmed_backend(tokenizer, added), added)


_UNTRIMMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> (its state, untrimmed backend)


def _untrim(spec: Any) -> bool:
    """Turn every `trim_offsets` of a post-processor's JSON spec off, in place; whether one was on."""
    changed = False
    if isinstance(spec, dict):
        if spec.get("trim_offsets") is True:
            spec["trim_offsets"], changed = False, True
        for value in spec.values():
            changed |= _untrim(value)
    elif isinstance(spec, list):
        for value in spec:
            changed |= _untrim(value)
    return changed


def _untrimmed_backend(tokenizer: Any, added: tuple) -> Any:
    """The Rust tokenizer whose offsets cover every character of its tokens: the tokenizer's own, unless its
    post-processor trims offsets (`trim_offsets`: a ByteLevel token of spaces only gets an empty span), then a copy
    with that off (the same ids); built once per tokenizer state (`added`: its added tokens, `_conventions`)."""
    backend = _backend(tokenizer)
    post = backend.post_processor
    state = None if post is None else post.__getstate__()
    if state is None or b'"trim_offsets":true' not in state:
        return backend
    parts = (backend.pre_tokenizer, backend.normalizer)
    state = (state, added, *(p.__getstate__() if p is not None else None for p in parts))
    hit = _UNTRIMMED.get(backend)
    if hit is None or hit[0] != state:
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        _untrim(spec["post_processor"])
        hit = (state, Tokenizer.from_str(json.dumps(spec)))
        _UNTRIMMED[backend] = hit
    return hit[1]


def _own_offsets(text: str, ids: list[int], offsets: Offsets, stripping: dict[int, str]) -> Offsets:
    """Offsets where a token that took the whitespace beside it covers its own characters only: an end-of-turn token
    that swallows the newline after it ends where its answer ends (and is trained with it)."""
    out = list(offsets)
    for i in np.flatnonzero(np.isin(np.asarray(ids, dtype=np.int64), list(stripping))).tolist():
        content = stripping[ids[i]]
        if (s := text.find(content, *offsets[i])) >= 0:
            out[i] = (s, s + len(content))
    return out


def _encode(tokenizer: Any, strings: list[str], add_special_tokens: bool, conv: _Conventions, offsets: bool = True
            ) -> list[Encoding]:
    """Ids (and offsets) of each string, without the ids the post-processor appends; a token that takes the
    whitespace beside it is given its own characters' offsets (`_own_offsets`)."""
    backend = _backend(tokenizer)
    cut = conv.cut if add_special_tokens else 0
    if offsets:
        out = []
        encoded = conv.offsets.encode_batch(strings, add_special_tokens=add_special_tokens)
        for text, e in zip(strings, encoded, strict=True):
            ids, offs = e.ids, e.offsets
            if cut:
                ids, offs = ids[:-cut], offs[:-cut]
            out.append(Encoding(ids, _own_offsets(text, ids, offs, conv.stripping) if conv.stripping else offs))
        return out
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)  # ids only (tokenizers >= 0.21)
    encoded = fast(strings, add_special_tokens=add_special_tokens)
    return [Encoding(e.ids[:-cut], None) for e in encoded] if cut else [Encoding(e.ids, None) for e in encoded]


class BoundaryError(ValueError):
    """The tokenizer joins a prompt's end with its answer and the answer cannot be tokenized apart from it."""


def _is_prefix(enc: Encoding, prompt: Encoding, b: int) -> bool:
    return enc.ids[:len(prompt.ids)] == prompt.ids and _next_starts_after(enc, len(prompt.ids), b)


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


_CONTINUATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # backend -> (its state, continuation)


def _no_dummy_prefix(spec: Any, pre: bool = False) -> bool:
    """Make a tokenizer's JSON spec write no dummy prefix ("▁", "Ġ") after a special token, in place: Metaspace's
    prepend_scheme "always" (a Llama tokenizer with "legacy": true) becomes "first", a Prepend normalizer goes, and
    a ByteLevel pre-tokenizer's add_prefix_space (`pre`: inside the pre-tokenizer; the decoder's and
    post-processor's ByteLevel keep theirs) is turned off. Whether anything changed."""
    changed = False
    if isinstance(spec, dict):
        if spec.get("type") == "Metaspace" and spec.get("prepend_scheme") == "always":
            spec["prepend_scheme"], changed = "first", True
        if pre and spec.get("type") == "ByteLevel" and spec.get("add_prefix_space"):
            spec["add_prefix_space"], changed = False, True
        for key, value in spec.items():
            if key == "normalizers" and isinstance(value, list):
                kept = [n for n in value if not (isinstance(n, dict) and n.get("type") == "Prepend")]
                changed |= len(kept) < len(value)
                value[:] = kept
            if key == "normalizer" and isinstance(value, dict) and value.get("type") == "Prepend":
                spec[key], changed = None, True
                continue
            changed |= _no_dummy_prefix(value, pre or key == "pre_tokenizer")
    elif isinstance(spec, list):
        for value in spec:
            changed |= _no_dummy_prefix(value, pre)
    return changed


def _continuation_backend(tokenizer: Any, conv: _Conventions) -> tuple[Any, dict[int, str]]:
    """The Rust tokenizer for text that continues other text, and its stripping tokens: as the tokenizer's own, but
    with no dummy prefix after a special token and an EOS that takes no whitespace (`_tokens_apart` uses it as an
    anchor); built once per tokenizer state."""
    backend = _backend(tokenizer)
    eos = tokenizer.eos_token
    parts = (backend.pre_tokenizer, backend.normalizer, backend.post_processor)
    state = (eos, eos in conv.stripping.values(), conv.added,
             *(p.__getstate__() if p is not None else None for p in parts))
    hit = _CONTINUATIONS.get(backend)
    if hit is None or hit[0] != state:
        from tokenizers import Tokenizer

        spec = json.loads(backend.to_str())
        changed = _no_dummy_prefix(spec)
        changed |= _untrim(spec.get("post_processor"))
        for t in spec.get("added_tokens") or []:  # the anchor takes no whitespace of the text after it
            if t.get("content") == eos and (t.get("lstrip") or t.get("rstrip")):
                t["lstrip"] = t["rstrip"] = False
                changed = True
        if changed:
            cont = Tokenizer.from_str(json.dumps(spec))
            hit = (state, (cont, _stripping(cont.get_added_tokens_decoder())))
        else:
            hit = (state, (backend, conv.stripping))
        _CONTINUATIONS[backend] = hit
    return hit[1]


def _tokens_apart(tokenizer: Any, text: str, at: int, conv: _Conventions) -> Encoding:
    """`text` (which starts at character `at` of the whole text) tokenized as a continuation: after the EOS
    token, a special token that every tokenizer splits out, so no merge with what precedes (and, by
    `_continuation_backend`, no dummy prefix)."""
    if not text:
        return Encoding([], [])
    anchor = tokenizer.eos_token
    backend, stripping = _continuation_backend(tokenizer, conv)
    e = backend.encode(anchor + text, add_special_tokens=False)
    ids, offsets = e.ids, e.offsets
    if stripping:
        offsets = _own_offsets(anchor + text, ids, offsets, stripping)
    if not ids or ids[0] != tokenizer.eos_token_id or offsets[0] != (0, len(anchor)):
        raise BoundaryError(f"the tokenizer does not split its EOS token {anchor!r} out of the text")
    shift = at - len(anchor)
    return Encoding(ids[1:], [(s + shift, e + shift) for s, e in offsets[1:]])


def _splice(tokenizer: Any, text: str, enc: Encoding, prompt: Encoding, b: int, add_special_tokens: bool,
            conv: _Conventions) -> Encoding:
    """`enc` (tokens of `text`) made to start with `prompt` (tokens of text[:b])."""
    if prompt.offsets is None:  # prompts are first encoded without offsets; a splice needs them
        natural = _encode(tokenizer, [text[:b]], add_special_tokens, conv)[0]
        assert natural.ids == prompt.ids, "a prompt spliced itself but lost its offsets"
        prompt = natural
    j = _clean_start(enc.offsets, b)
    e = enc.offsets[j][0] if j < len(enc.ids) else len(text)
    middle = _tokens_apart(tokenizer, text[b:e], b, conv)
    out = Encoding(prompt.ids + middle.ids + enc.ids[j:], prompt.offsets + middle.offsets + enc.offsets[j:],
                   (*enc.splices, b))
    if tokenizer.decode(out.ids) != tokenizer.decode(enc.ids):
        raise BoundaryError(f"the tokenizer joins the prompt's end {text[max(0, b - 12):b]!r} with the answer's start "
                            f"{text[b:b + 12]!r}, and the answer cannot be tokenized apart from the prompt")
    return out


def _next_starts_after(enc: Encoding, n: int, b: int) -> bool:
    """`_is_prefix`'s second half: given that the first n ids are a prompt's (of text[:b]), the token after them
    starts at b or later (or is a zero-width special token)."""
    if n == len(enc.ids) or enc.offsets is None:  # same ids covering text[:b]
        return True
    start, end = enc.offsets[n]
    return start >= b or start == end


def _prefixed(tokenizer: Any, text: str, enc: Encoding, prompts: Sequence[Encoding], bounds: Sequence[int],
              add_special_tokens: bool, conv: _Conventions, chained: bool = False) -> Encoding:
    """`enc` spliced where needed so that every encoded prompt (of text[:b], b in `bounds`) is a prefix of it.

    `chained`: each prompt's ids start with the ids of every prompt before it (as `encode_texts` builds them), so
    the ids of all of them are a prefix of `enc` iff the last one's are: one comparison instead of one per prompt
    (which made a record of n answers cost n^3). Any prompt that fails is handled by the loop below, as before."""
    if chained and prompts and enc.ids[:len(prompts[-1].ids)] == prompts[-1].ids and all(
            _next_starts_after(enc, len(p.ids), b) for p, b in zip(prompts, bounds, strict=True)):
        return enc
    for prompt, b in zip(prompts, bounds, strict=True):
        if not _is_prefix(enc, prompt, b):
            if enc.offsets is None:
                enc = _encode(tokenizer, [text], add_special_tokens, conv)[0]
            enc = _splice(tokenizer, text, enc, prompt, b, add_special_tokens, conv)
    return enc


# A boundary past the end of a text's first max_tokens + REACH_SLACK + REACH_PER_BOUND x (boundaries before it) whole
# tokens cannot change its first max_tokens ids: a splice moves the ids after it by a few, and a tokenizer's choice
# at a boundary reaches back a pre-token or two, not 64 tokens.
REACH_SLACK, REACH_PER_BOUND = 64, 4


def bound_reach(offsets: Offsets, max_tokens: int | None, before: int) -> float:
    """The last character at which a prompt boundary can still change the first `max_tokens` ids of a text whose
    whole tokens have `offsets`, given `before` boundaries before it (inf: any; None: no truncation). Boundaries past
    it are left out: their splices and prompts cost time (a record of n answers: n prompts of up to n turns each) and
    change nothing that is kept."""
    n = None if max_tokens is None else max_tokens + REACH_SLACK + REACH_PER_BOUND * before
    return float("inf") if n is None or n > len(offsets) else offsets[n - 1][1]


def within_reach(offsets: Offsets, bounds: Sequence[int], max_tokens: int | None) -> list[int]:
    """The leading `bounds` that `bound_reach` keeps."""
    kept: list[int] = []
    for b in bounds:
        if b > bound_reach(offsets, max_tokens, len(kept)):
            break
        kept.append(b)
    return kept


def text_offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> Offsets:
    """The offsets of `text`'s whole tokens, as `encode_texts` tokenizes it before any splice."""
    return _encode(tokenizer, [text], add_special_tokens, _conventions(tokenizer))[0].offsets


# Characters of texts and their prompts tokenized in one pair of calls: a record of n answers has n prompts of up to
# its whole length, so a batch of 1000 50-turn conversations held ~2 GB of prompt tokens at once (per worker).
GROUP_CHARS = 1 << 21


def encode_texts(tokenizer: Any, items: Sequence[tuple[str, Sequence[int]]], add_special_tokens: bool,
                 max_tokens: int | None = None) -> Iterator[Encoding | str]:
    """Tokenize each (text, prompt boundaries) so that, for every boundary b, `encode_texts` of (text[:b], the
    boundaries before b) is a prefix of the ids and the token after it starts at b. Two batched calls of the
    Rust tokenizer per group of items of about GROUP_CHARS characters, prompts included (texts with offsets,
    prompts ids only); the problem (a str) for an item where that cannot be done. `max_tokens`: only the first
    that many ids will be kept (training truncates): the boundaries past `bound_reach` are not spliced (the ids
    after the first max_tokens may then differ). Yielded group by group: the caller keeps what it needs of each
    (the encodings hold Python lists, over 100 bytes per token: a worker's batch of long documents held them all at once,
    gigabytes)."""
    group: list[tuple[str, Sequence[int]]] = []
    chars = 0
    for item in items:
        cost = len(item[0]) + sum(item[1])  # the text and its prompts (before `within_reach` drops any)
        if group and chars + cost > GROUP_CHARS:
            yield from _encode_group(tokenizer, group, add_special_tokens, max_tokens)
            group, chars = [], 0
        group.append(item)
        chars += cost
    if group:
        yield from _encode_group(tokenizer, group, add_special_tokens, max_tokens)


def _encode_group(tokenizer: Any, items: Sequence[tuple[str, Sequence[int]]], add_special_tokens: bool,
                  max_tokens: int | None) -> list[Encoding | str]:
    """`encode_texts` of one group of items."""
    conv = _conventions(tokenizer)
    texts = _encode(tokenizer, [text for text, _ in items], add_special_tokens, conv)
    if max_tokens is not None:
        items = [(text, within_reach(whole.offsets, bounds, max_tokens)) for (text, bounds), whole in
                 zip(items, texts, strict=True)]
    parts = _encode(tokenizer, [text[:b] for text, bounds in items for b in bounds], add_special_tokens, conv,
                    offsets=False)
    out: list[Encoding | str] = []
    at = 0
    for (text, bounds), whole in zip(items, texts, strict=True):
        mine, at = parts[at:at + len(bounds)], at + len(bounds)
        try:
            prompts: list[Encoding] = []
            chained = True  # every prompt's ids start with those of the one before it (checked, not assumed)
            for k, b in enumerate(bounds):  # prompt k is encoded with the boundaries before it
                prompt = _prefixed(tokenizer, text[:b], mine[k], prompts, bounds[:k], add_special_tokens, conv,
                                   chained)._replace(splices=())
                chained = chained and (not prompts or prompt.ids[:len(prompts[-1].ids)] == prompts[-1].ids)
                prompts.append(prompt)
            out.append(_prefixed(tokenizer, text, whole, prompts, bounds, add_special_tokens, conv, chained))
        except BoundaryError as e:
            out.append(str(e))
    return out
