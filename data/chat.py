"""Chat-template mode: render records with the tokenizer's own chat_template.

The text is exactly `tokenizer.apply_chat_template(messages, tokenize=False)` (messages from
`data.templates.CHAT_MESSAGES`), tokenized as apply_chat_template does: without adding special
tokens, since the template writes them (BOS included) itself.

Trained span of assistant message i: found by rendering incrementally, which works for any
template whose earlier turns do not change when later ones are added. It starts where
`messages[:i]` + the generation prompt ends (the inference prompt for that answer, a
`prompt_ends` boundary) and ends where `messages[:i + 1]` ends (or, for a template that closes a finished
conversation, as Phi-3 writes EOS after the last turn, where it and the whole text part, never inside a
special token), minus trailing whitespace: the assistant's content and the end-of-turn token(s) the template
writes right after it (e.g. ChatML's `<|im_end|>`), but not the newline that separates turns. A template
that stamps today's date is given `date_string` CHAT_DATE, so it renders the same on every day. A template that leaves out a
message's content (e.g. one that ignores system messages, where ref_qa keeps its reference), or rewrites
it (a reasoning template that drops `<think>` reasoning), is refused: the model would be trained without it and
nothing would say so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from data.boundary import bound_reach, text_offsets
from data.records import DataError, Record, record_type
from data.templates import CHAT_MESSAGES, Rendered, Span, TemplateSettings, render
from pipeft import one_line

log = logging.getLogger(__name__)

# what each message of a record type holds, for the error when a template drops it
_CONTENT = {"system": "the instruction and reference", "user": "a question", "assistant": "an answer"}


# A template that stamps today's date (Llama 3.2's `strftime_now("%d %b %Y")` unless `date_string` is given) would
# render another prompt each day: training, a resume and demo.py pass this date, Llama 3's own fallback.
CHAT_DATE = "26 Jul 2024"


def _template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template(s) as one text ("" without one)."""
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else " ".join(t.values()) if isinstance(t, dict) else ""


def require_chat_template(tokenizer: Any) -> None:
    """Raise DataError (naming the tokenizer's dir) if the tokenizer has no chat template, or one that stamps the
    current date or time in a way `date_string` does not pin. Warns once when answers end with no token generation
    can stop on (`end_of_turn`)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError([f"{tokenizer.name_or_path}:0: \"template\": \"chat\" needs a tokenizer with a chat template, "
                         "and this one has none (no chat_template.jinja or \"chat_template\" in tokenizer_config.json); "
                         "add one or use \"template\": \"default\""])
    text = _template_text(tokenizer)
    if "strftime_now" in text and "date_string" not in text:
        raise DataError([f"{tokenizer.name_or_path}:0: the chat template writes the current date or time "
                         "(strftime_now) into its text, so a prompt would differ from training on another day; make it "
                         "take the date from a date_string variable (as Llama 3's does) or use \"template\": \"default\""])
    try:  # a user and an assistant message, and the prompt for the answer: what every chat template renders
        text, prompt = _apply(tokenizer, _PROBE), _apply(tokenizer, _PROBE[:1], generation_prompt=True)
    except TemplateError as e:
        raise DataError([f"{tokenizer.name_or_path}:0: the chat template fails on a user message and an answer "
                         f"({e}); use another or \"template\": \"default\""]) from None
    try:  # a lone user message without the prompt: training never renders it (a template may refuse it)
        plain = _apply(tokenizer, _PROBE[:1])
    except TemplateError:
        plain = None
    header = text[len(plain):text.find("Hello", len(plain))] if plain is not None and text.startswith(plain) else ""
    if prompt == plain and header.strip():
        raise DataError([f"{tokenizer.name_or_path}:0: the chat template writes no generation prompt (it has no "
                         f"add_generation_prompt branch), so the {header.strip()!r} it writes before each answer would "
                         "be trained as part of the answer, and a serving stack's prompt would end before it; add the "
                         "branch or use \"template\": \"default\""])
    _warn_if_no_end_token(tokenizer)
    _warn_if_no_bos(tokenizer)


_warned: set[tuple[str, str, str]] = set()  # (tokenizer dir, chat template, what): said once per process


def _warn_if_no_bos(tokenizer: Any) -> None:
    """One warning line when the tokenizer puts a BOS before plain text (the base model was pretrained with one at
    position 0) and the chat template writes none: chat samples are tokenized as apply_chat_template(tokenize=True)
    does, so they start without it, and a serving stack that adds BOS to a rendered chat prompt sends one token
    more than training saw."""
    key = (str(tokenizer.name_or_path), _template_text(tokenizer), "bos")
    bos = getattr(tokenizer, "bos_token", None)
    if key in _warned or not bos or tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return
    _warned.add(key)
    try:
        text = _apply(tokenizer, _PROBE)
    except TemplateError:
        return
    if not text.startswith(bos):
        log.warning("%s: the chat template writes no BOS (%s), which this tokenizer puts before plain text: chat samples "
                    "are trained without it, as apply_chat_template(tokenize=True) renders them; a base model "
                    "pretrained with a BOS at position 0 may want {{ bos_token }} at the template's start",
                    tokenizer.name_or_path, bos)


def _warn_if_no_end_token(tokenizer: Any) -> None:
    """One warning line when the template ends an answer with no token generation can stop on (`end_of_turn`)."""
    key = (str(tokenizer.name_or_path), _template_text(tokenizer), "end")
    if key in _warned or (tail := turn_tail(tokenizer)) is None or _first_added(tokenizer, tail) is not None:
        return
    _warned.add(key)
    if tail.strip():
        log.warning("%s: the chat template ends each answer with %r, which the tokenizer splits into several tokens: "
                    "generation cannot stop on it (demo.py stops on the text; an export's generation_config and "
                    "serving stacks do not); add it as a special token", tokenizer.name_or_path, tail.strip())
    else:
        log.warning("%s: the chat template writes nothing after an answer: no answer is trained to end with a token "
                    "generation can stop on; use a template that ends each turn with one (e.g. eos_token)",
                    tokenizer.name_or_path)


def _apply(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """apply_chat_template's text; TemplateError for whatever the template raises (a jinja `raise_exception`, or a
    TypeError of a template written for another caller: Phi-4-mini's iterates `tools`, which transformers passes as
    None), so that each caller says it in one line."""
    dated = {"date_string": CHAT_DATE} if "strftime_now" in _template_text(tokenizer) else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **dated)
    except TemplateError:
        raise
    except Exception as e:  # noqa: BLE001 - a template's own failure: one line
        raise TemplateError(one_line(e, 200, named=True)) from None


def _check_kept(text: str, messages: list[dict[str, str]]) -> None:
    """Every message's content appears in the rendered text, in order (a template may strip or rewrite it)."""
    at = 0
    for i, m in enumerate(messages):
        content = m["content"].strip()
        found = text.find(content, at) if content else at
        last = (content.rsplit("</think>", 1)[-1] if "</think>" in content else content.splitlines()[-1]).strip() \
            if content else ""
        if found < 0 and m["role"] == "assistant" and last != content and last in text[at:]:  # the rest rewritten
            why = ": it drops the <think> reasoning" if "</think>" in content else ""
            raise ValueError(f"the chat template rewrote message {i} ({m['role']}: {_CONTENT.get(m['role'], 'text')}, "
                             f"{content[:40]!r}){why}; it would not be trained as written: use a template that renders "
                             f"{m['role']} messages as they are, or \"template\": \"default\"")
        if found < 0 and i and text.find(content) >= 0:  # there, but before the previous message's text
            raise ValueError(f"the chat template renders message {i} ({m['role']}) before message {i - 1} "
                             f"({messages[i - 1]['role']}): it moves or reorders messages (e.g. the system message "
                             "into the last user turn), so a record's prompt is not the start of its training text: "
                             "use a template that keeps the messages in order, or \"template\": \"default\"")
        if found < 0:
            raise ValueError(f"the chat template dropped message {i} ({m['role']}: {_CONTENT.get(m['role'], 'text')}, "
                             f"{content[:40]!r}); it would never be trained on: use a template that renders "
                             f"{m['role']} messages, or \"template\": \"default\"")
        at = found + len(content)


def _unsplit(tokenizer: Any) -> set[str]:
    """The texts the tokenizer reads as one token, never split: its added tokens, special (`</s>`) or not (a
    `tokenizer.add_tokens(["<|im_end|>"])`)."""
    return set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()}


def _clean_end(tokenizer: Any, turn: str, end: int) -> int:
    """`end`, or the start of the added token of `turn` it falls inside ("<|end" of "<|endoftext|>")."""
    if end == len(turn):  # the whole turn (every template that renders turn by turn)
        return end
    for token in _unsplit(tokenizer):
        at = turn.find(token, max(0, end - len(token) + 1))  # the first occurrence that could hold `end`
        if 0 <= at < end:
            end = at
    return end


def _turn_end(tokenizer: Any, messages: list[dict[str, str]], turn: str) -> int:
    """Where the last message's turn ends in `turn` (the whole conversation): where it parts from the conversation
    continued by a user message, when what it keeps before that ends with an added token (Phi-3: `<|end|>`, before
    the EOS it writes after a finished conversation only), so that the last answer ends as the others do; else the
    whole turn (a template whose only end of an answer is that closing EOS: the model must learn to stop)."""
    try:
        more = _apply(tokenizer, [*messages, {"role": "user", "content": "?"}])
    except TemplateError:
        return len(turn)
    common = _clean_end(tokenizer, turn, len(os.path.commonprefix([turn, more])))  # ("<" of "</s>" and "<|user|>")
    kept, dropped, tokens = turn[:common].rstrip(), turn[common:], _unsplit(tokenizer)
    for t in sorted(tokens, key=len, reverse=True):
        dropped = dropped.replace(t, "")
    closing = not dropped.strip()  # only the closing's tokens and whitespace are cut, never the answer's own text
    return common if common < len(turn) and closing and any(kept.endswith(t) for t in tokens if t.strip()) else len(turn)


def structure_problem(messages: Sequence[Mapping[str, str]]) -> str | None:
    """Why no chat template can render these messages, found without rendering them; None when nothing is."""
    if messages and messages[0]["role"] == "assistant":
        return "the first turn is an answer: chat templates need a user message before it"
    return None


def chat_problems(records: Sequence[Record], tokenizer: Any = None) -> list[str]:
    """`FILE:LINE: problem` lines of the records that no chat template can render (`structure_problem`) and, given
    the `tokenizer`, of those whose roles its template rejects (a system role, roles that must alternate): each
    sequence of roles is rendered once, with placeholder contents, so they are found while the records are
    validated, before anything is tokenized. What a template refuses in the contents shows when the records are
    rendered (encoding)."""
    out, shapes = [], {}
    for r in records:
        if r.type not in CHAT_MESSAGES:
            continue
        messages = CHAT_MESSAGES[r.type](r.data)
        if problem := structure_problem(messages):
            out.append(f"{r.source}:{r.line}: {problem}")
        elif getattr(tokenizer, "chat_template", None):  # (none: require_chat_template says so)
            roles = tuple(m["role"] for m in messages)
            if roles not in shapes:
                try:
                    _apply(tokenizer, [{"role": role, "content": "x"} for role in roles])
                    shapes[roles] = None
                except TemplateError as e:
                    shapes[roles] = _rejected(e, list(roles))
            if shapes[roles]:
                out.append(f"{r.source}:{r.line}: {shapes[roles]}")
    return out


def _rejected(e: Exception, roles: list[str]) -> str:
    """The line for a chat template that raised `e` on messages of `roles`, with what in them templates refuse."""
    why = [*(["it holds a system message (a ref_qa record's reference)"] if "system" in roles else []),
           *[f"messages {k} and {k + 1} are both {r} turns" for k, r in enumerate(roles[:-1]) if r == roles[k + 1]]]
    return (f"the tokenizer's chat template rejected this record: {e}" + (f" ({'; '.join(why[:2])})" if why else "")
            + "; use \"template\": \"default\" for such records")


def _not_turn_by_turn(before: str, prompt: str, turn: str, text: str, i: int) -> str:
    """Why assistant message i cannot be located: `before` renders the messages before it, `prompt` adds the
    generation prompt, `turn` adds message i, `text` is the whole record."""
    if turn.startswith(prompt):  # the prompt and the answer agree until later messages are added
        what = f"message {i}" if text.startswith(before) else f"the messages before message {i}"
        return (f"the chat template renders {what} differently once later messages follow, so its answers cannot be "
                "located; use \"template\": \"default\"")
    if prompt.startswith(before) and turn.startswith(before):
        tail, answer = prompt[len(before):], turn[len(before):]
        shown = f"{answer[:len(tail) + 20]!r}{'...' if len(answer) > len(tail) + 20 else ''}"
        return (f"the chat template's generation prompt ends with {tail!r}, which is not a prefix of how it renders "
                f"the answer (message {i}: {shown}): a prompt would not be the start of the trained text; use "
                "\"template\": \"default\"")
    return (f"the chat template does not render this record turn by turn (message {i} changes earlier text), so its "
            "answers cannot be located; use \"template\": \"default\"")


def _render_messages(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool,
                     max_tokens: int | None = None) -> tuple[str, list[Span], tuple[int, ...], bool]:
    """(text, the assistant messages' spans, their prompt ends, whether every answer was located); ValueError for a
    template that rejects the messages, drops one, or does not render them turn by turn. `max_tokens`: only the
    text's first that many ids are kept: the answers whose prompts start past data.boundary's `bound_reach` are not
    located (each costs a render of every message before it)."""
    if problem := structure_problem(messages):
        raise ValueError(problem)
    try:
        text = _apply(tokenizer, messages, generation_prompt)
        _check_kept(text, messages)
        offsets = text_offsets(tokenizer, text, add_special_tokens=False) if max_tokens is not None else []
        answers: list[Span] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _apply(tokenizer, messages[:i], generation_prompt=True)
            if len(prompt) > bound_reach(offsets, max_tokens, len(answers)):
                return text, answers, tuple(a for a, _ in answers), False
            turn = _apply(tokenizer, messages[:i + 1])
            # the answer ends where its turn and the whole text part: a template may close a finished conversation
            # (Phi-3 writes EOS after the last turn, not after this one); never inside a special token's text
            # startswith compares in C; commonprefix loops over every character in Python (n^2 per record)
            common = len(turn) if text.startswith(turn) else len(os.path.commonprefix([turn, text]))
            if i == len(messages) - 1 and common == len(turn):  # the last answer: its own end, not the closing
                common = _turn_end(tokenizer, messages, turn)
            end = _clean_end(tokenizer, turn, common)
            if not (turn.startswith(prompt) and text.startswith(prompt)
                    and message["content"].strip() in text[len(prompt):end]):
                raise ValueError(_not_turn_by_turn(_apply(tokenizer, messages[:i]), prompt, turn, text, i))
            answers.append((len(prompt), len(text[:end].rstrip())))
    except TemplateError as e:
        raise ValueError(_rejected(e, [m["role"] for m in messages])) from None
    return text, answers, tuple(a for a, _ in answers), True


def render_chat(rec: Mapping[str, Any], tokenizer: Any, settings: TemplateSettings,
                max_tokens: int | None = None) -> Rendered:
    """Render a record through the tokenizer's chat_template (pretrain: the default template); with `max_tokens`
    (training's max_seq_len), the answers past what its first max_tokens ids can reach are not located.

    Raises ValueError when the template rejects the record, drops part of it, or does not render it incrementally.
    """
    kind = record_type(rec)
    if kind not in CHAT_MESSAGES:
        return render(rec, tokenizer.eos_token, settings)
    text, answers, ends, every = _render_messages(tokenizer, CHAT_MESSAGES[kind](rec), False, max_tokens)
    # the last answer (last_answer_only) lies past the kept ids when not every one was located
    last_cut = not every and settings.last_answer_only and not settings.train_on_prompt
    trained = [] if last_cut else settings.trained(answers, len(text))
    return Rendered(text, trained, has_special_tokens=True, prompt_ends=ends)


def chat_prompt(rec: Mapping[str, Any], tokenizer: Any) -> Rendered:
    """The inference prompt for the record's (next) answer in chat mode: its messages without a final assistant
    message, with the generation prompt (`apply_chat_template(..., add_generation_prompt=True)`); `prompt_ends`
    are the earlier answers' starts, as in training."""
    messages = CHAT_MESSAGES[record_type(rec)](rec)
    if problem := structure_problem(messages):  # before the answer to prompt for is dropped: it may be the only turn
        raise ValueError(problem)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text, _, ends, _ = _render_messages(tokenizer, messages, generation_prompt=True)
    return Rendered(text, [], has_special_tokens=True, prompt_ends=ends)


_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]  # rendered to find markers


def chat_lead(rec: Mapping[str, Any], tokenizer: Any) -> str:
    """What the chat template writes between the generation prompt for the record's (next) answer and that answer's
    text (Llama-2's space after [/INST], a Vicuna-style "ASSISTANT: "'s space): trained as the answer's start, not
    the record's ("" when it writes nothing there, or when this record does not render)."""
    messages = CHAT_MESSAGES[record_type(rec)](rec)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    answer = _PROBE[1]["content"]
    try:
        prompt = _apply(tokenizer, messages, generation_prompt=True)
        turn = _apply(tokenizer, [*messages, {"role": "assistant", "content": answer}])
    except TemplateError:  # chat_prompt says why
        return ""
    at = turn.find(answer, len(prompt)) if turn.startswith(prompt) else -1
    return turn[len(prompt):at] if at >= 0 else ""


def template_tokens(tokenizer: Any) -> set[str]:
    """The added tokens (special or not; not whitespace) the chat template writes around a probe conversation:
    its control tokens, such as a ChatML `<|im_end|>` added with `add_tokens`; not an added word it never writes."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    try:
        text = _apply(tokenizer, _PROBE) + _apply(tokenizer, _PROBE[:1], generation_prompt=True)
    except (TemplateError, ValueError, TypeError):
        return set()
    text = text.replace("Hello", "\x00").replace("Hi", "\x00")  # the template's own text only
    return {t for t in _unsplit(tokenizer) if t.strip() and t in text}


def turn_tail(tokenizer: Any) -> str | None:
    """The text the chat template writes right after an assistant's content, which answers are trained to end with
    (ChatML's `<|im_end|>`), found by rendering a probe; None when the template cannot render the probe."""
    try:
        text, answers, _, _ = _render_messages(tokenizer, _PROBE, generation_prompt=False)
    except ValueError:
        return None
    start, end = answers[0]
    return text[text.index("Hello", start) + len("Hello"):end]


def end_of_turn(tokenizer: Any) -> str | None:
    """The first added token (special or not: never split) in the text the chat template writes right after an
    assistant's content (ChatML's `<|im_end|>`, Llama-3's `<|eot_id|>`, Llama-2's `</s>`); None when there is none."""
    return _first_added(tokenizer, turn_tail(tokenizer))


def _first_added(tokenizer: Any, tail: str | None) -> str | None:
    """The first added token (not whitespace) that `tail` tokenizes into, None when there is none."""
    if not tail:
        return None
    added = {t for t in _unsplit(tokenizer) if t.strip()}  # not an added run of spaces
    found = [t for t in tokenizer.convert_ids_to_tokens(tokenizer(tail, add_special_tokens=False)["input_ids"])
             if t in added]
    return found[0] if found else None  # the first: Phi-3 writes <|end|>, then EOS after a finished conversation


def end_of_turn_text(tokenizer: Any) -> str | None:
    """The text that ends each answer when no token does (`end_of_turn` is None: the tokenizer splits it), for
    generation to stop on the text; None otherwise."""
    tail = turn_tail(tokenizer)
    return tail.strip() if tail and tail.strip() and _first_added(tokenizer, tail) is None else None
