"""Chat-template mode: render records with the tokenizer's own chat_template.

The text is exactly `tokenizer.apply_chat_template(messages, tokenize=False)` (messages from
`data.templates.CHAT_MESSAGES`), tokenized as apply_chat_template does: without adding special
tokens, since the template writes them (BOS included) itself.

Trained span of assistant message i: found by rendering incrementally, which works for any
template whose earlier turns do not change when later ones are added. It starts where
`messages[:i]` + the generation prompt ends and ends where `messages[:i + 1]` ends, minus trailing
whitespace: the assistant's content and the end-of-turn token(s) the template writes right after
it (e.g. ChatML's `<|im_end|>`), but not the newline that separates turns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import TemplateError

from data.records import DataError, record_type
from data.templates import CHAT_MESSAGES, Rendered, Span, TemplateSettings, render


def require_chat_template(tokenizer: Any) -> None:
    """Raise DataError (naming the tokenizer's dir) if the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError([f"{tokenizer.name_or_path}:0: \"template\": \"chat\" needs a tokenizer with a chat template, "
                         "and this one has none (no chat_template.jinja or \"chat_template\" in tokenizer_config.json); "
                         "add one or use \"template\": \"default\""])


def _apply(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_chat(rec: Mapping[str, Any], tokenizer: Any, settings: TemplateSettings) -> Rendered:
    """Render a record through the tokenizer's chat_template (pretrain: the default template).

    Raises ValueError when the template rejects the record or does not render it incrementally.
    """
    kind = record_type(rec)
    if kind not in CHAT_MESSAGES:
        return render(rec, tokenizer.eos_token, settings)
    messages = CHAT_MESSAGES[kind](rec)
    try:
        text = _apply(tokenizer, messages)
        answers: list[Span] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise ValueError("the first turn is an answer: chat templates need a user message before it")
            prompt, turn = _apply(tokenizer, messages[:i], generation_prompt=True), _apply(tokenizer, messages[:i + 1])
            if not (text.startswith(turn) and turn.startswith(prompt)):
                raise ValueError(f"the chat template does not render this record turn by turn (message {i} changes "
                                 "earlier text), so its answers cannot be located; use \"template\": \"default\"")
            answers.append((len(prompt), len(turn.rstrip())))
    except TemplateError as e:
        raise ValueError(f"the tokenizer's chat template rejected this record: {e}") from None
    return Rendered(text, settings.trained(answers, len(text)), has_special_tokens=True)
