"""Default prompt templates: render a record into text plus the character spans that are trained.

Training and inference share one prompt builder: `render` is `render_prompt` followed by the
answer and EOS, so demo.py prompts the model exactly as it was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from data.records import record_type

INSTRUCT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n"
)
INSTRUCT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruct}\n\n### Response:\n"
)

Segment = tuple[str, bool]  # (text, trained)


@dataclass(frozen=True)
class Rendered:
    """A rendered record: the full text and the [start, end) character spans that carry loss."""

    text: str
    spans: list[tuple[int, int]]


def _instruct_prompt(rec: Mapping[str, Any]) -> str:
    """The instruct prompt; an absent or empty "input" selects the template without input."""
    if rec.get("input"):
        return INSTRUCT_WITH_INPUT.format(instruct=rec["instruct"], input=rec["input"])
    return INSTRUCT_NO_INPUT.format(instruct=rec["instruct"])


PROMPTS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "pretrain": lambda rec: rec["text"],  # a pretrain "prompt" is text to continue
    "instruct": _instruct_prompt,
}

# type -> segments of the training text; every renderer builds its prompt with PROMPTS.
RENDERERS: dict[str, Callable[[Mapping[str, Any], str], list[Segment]]] = {
    "pretrain": lambda rec, eos: [(PROMPTS["pretrain"](rec) + eos, True)],
    "instruct": lambda rec, eos: [(PROMPTS["instruct"](rec), False), (rec["output"] + eos, True)],
}


def render_prompt(rec: Mapping[str, Any]) -> str:
    """The prompt text for a record (type from its "type" key or inferred), without any answer."""
    return PROMPTS[record_type(rec)](rec)


def render(rec: Mapping[str, Any], eos: str, pretrain_eos: bool = True) -> Rendered:
    """Render a record for training; `eos` is the tokenizer's EOS string.

    instruct: prompt + output + eos, trained span = output + eos.
    pretrain: text (+ eos when `pretrain_eos`), trained span = all of it.
    """
    kind = record_type(rec)
    if kind == "pretrain" and not pretrain_eos:
        eos = ""
    text, spans = "", []
    for piece, trained in RENDERERS[kind](rec, eos):
        if trained and piece:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return Rendered(text, spans)


def template_settings(pretrain_eos: bool = True) -> dict[str, Any]:
    """Everything about the templates that changes the rendered text (part of the cache key)."""
    return {"instruct_with_input": INSTRUCT_WITH_INPUT, "instruct_no_input": INSTRUCT_NO_INPUT,
            "pretrain_eos": pretrain_eos}
