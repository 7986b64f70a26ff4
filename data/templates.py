"""Default prompt templates: render a record into text plus the character spans that are trained.

Every template string is defined once here. A renderer turns a record into segments
(text, is_answer); `render` joins them and picks the trained spans by the `TemplateSettings`.
`prompt_of` / `render_prompt` are built from the same pieces: the text the model sees before it
must produce the next answer. Each prompt is a character prefix of the training text, ending
where an answer starts (`Rendered.prompt_ends`); data.boundary keeps it a token prefix too, so
demo.py prompts the model exactly as training saw it. A dialog answer starts with the space after
its role marker ("### Assistant:" + " answer"): SentencePiece and byte-level BPE glue that space to
the answer's first word, so a prompt ending in the space would end in a lone space token that
training never saw there. For chat-template mode, `CHAT_MESSAGES` turns a record into chat
messages and `data.chat` renders them with the tokenizer's own chat_template.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from data.records import api_params, record_type

INSTRUCT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n"
)
INSTRUCT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruct}\n\n### Response:\n"
)
# ref_qa's instruction and reference: the default template's header, and the system message in chat mode
REF_QA_SYSTEM = (
    "Generate responses to the given instruction series according to the reference text.\n\n"
    "### Reference:\n{reference}"
)
CHAT_INSTRUCT_INPUT = "{instruct}\n\n{input}"  # chat mode: an instruct record's user message when it has input
CHAT_ROLES = {"ask": "user", "ans": "assistant"}


@dataclass(frozen=True)
class DialogTemplate:
    """Rounds rendered as `header`, then `ask` + text + `end` per ask turn and `ans` + `lead` + text + EOS + `end`
    per answer. The answer is `lead` + text + EOS (trained); an inference prompt ends with `ans`, the role
    marker. `header` may name the record's fields, e.g. {reference}."""

    header: str
    ask: str
    ans: str
    lead: str = " "
    end: str = "\n"


DIALOGS = {
    "conversation": DialogTemplate(
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.\n\n", "### Human: ", "### Assistant:"),
    "ref_qa": DialogTemplate(REF_QA_SYSTEM + "\n\n", "### Instruction: ", "### Response:"),
    # gdGPT's, cleaned as the others: its api doc as text (not JSON-quoted), "Assistant", no stray spaces
    "conver_has_api": DialogTemplate(
        "Answer the following questions as best as you can. You have access to the following tool(s):\n"
        "{api_desc}\n\n", "### Human: ", "### Assistant:"),
}
# gdGPT's "ans-api" turn: per action the answer role, then (trained) `lead` + inner_thought + API_CALL + EOS,
# then (not trained: the tool writes it) API_OUTPUT; then the final answer as an "ans" turn.
API_CALL = "\n#### api call\n```python\n{call}\n```"
API_OUTPUT = "\n#### api output\n{output}\n"
TEMPLATES = ("default", "chat")

Segment = tuple[str, bool]  # (text, is_answer)
Span = tuple[int, int]  # [start, end) in characters


@dataclass(frozen=True)
class TemplateSettings:
    """The data knobs that change the rendered text or its labels (all part of the cache key).

    Field names are the training config's keys: `template` "default" (this module) or "chat" (the
    tokenizer's chat_template); `train_on_prompt` trains every token; `last_answer_only` trains only
    a record's last answer; `pretrain_eos` appends EOS to pretrain text; `split_long_pretrain` keeps
    pretrain samples whole when encoding, for packing to split into max_seq_len chunks. `packing`
    (data/packing.py) works on the encoded samples, so it alone is not part of the cache key.
    """

    template: str = "default"
    train_on_prompt: bool = False
    last_answer_only: bool = False
    pretrain_eos: bool = True
    packing: bool = False
    split_long_pretrain: bool = False

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"'template' must be one of {', '.join(map(repr, TEMPLATES))}, got {self.template!r}")
        if self.train_on_prompt and self.last_answer_only:
            raise ValueError("'train_on_prompt' and 'last_answer_only' cannot both be true")
        if self.split_long_pretrain and not self.packing:
            raise ValueError("'split_long_pretrain' needs 'packing': true (the chunks are packed segments)")

    def trained(self, answers: list[Span], length: int) -> list[Span]:
        """The trained spans of a `length`-character text whose answers (with their EOS) are `answers`."""
        if self.train_on_prompt:
            return [(0, length)]
        return answers[-1:] if self.last_answer_only else answers


DEFAULT_SETTINGS = TemplateSettings()


@dataclass(frozen=True)
class Rendered:
    """A rendered record: the full text, the [start, end) character spans that carry loss, whether the text
    already holds the special tokens (chat templates write BOS themselves), and `prompt_ends`: where each
    answer starts, i.e. where the inference prompt for it ends (`text[:b]` is that prompt)."""

    text: str
    spans: list[Span]
    has_special_tokens: bool = False
    prompt_ends: tuple[int, ...] = ()


def has_input(rec: Mapping[str, Any]) -> bool:
    """Whether an instruct record has an "input" to show: an absent or empty one has none, and renders as the template
    without input. A blank one (" ") is shown as it is: rendering it otherwise would change the rows, and so refuse the
    resume, of every run whose data hold one."""
    return bool(rec.get("input"))


def _instruct_prompt(rec: Mapping[str, Any], eos: str | None = None) -> str:
    """The instruct prompt; an absent or empty "input" selects the template without input (`has_input`)."""
    if has_input(rec):
        return INSTRUCT_WITH_INPUT.format(instruct=rec["instruct"], input=rec["input"])
    return INSTRUCT_NO_INPUT.format(instruct=rec["instruct"])


def api_call(action: Mapping[str, Any]) -> str:
    """An action as the Python call gdGPT writes: `name(key='value', n=3)` (keyword arguments as repr)."""
    return f"{action['api_name']}({', '.join(f'{k}={v!r}' for k, v in api_params(action['api_param']).items())})"


def _api_segments(tpl: DialogTemplate, turn: Mapping[str, Any], eos: str) -> list[Segment]:
    segments: list[Segment] = []
    for act in turn["actions"]:
        res = act["api_res"] if isinstance(act["api_res"], str) else json.dumps(act["api_res"], indent=2, ensure_ascii=False)
        segments += [(tpl.ans, False), (tpl.lead + act["inner_thought"] + API_CALL.format(call=api_call(act)) + eos, True),
                     (API_OUTPUT.format(output=res), False)]
    if "ans" in turn:  # absent only in a prompt for the next action or the final answer
        segments += [(tpl.ans, False), (tpl.lead + turn["ans"] + eos, True), (tpl.end, False)]
    return segments


def _dialog_segments(kind: str, rec: Mapping[str, Any], eos: str) -> list[Segment]:
    tpl = DIALOGS[kind]
    segments = [(tpl.header.format(**rec), False)]
    for role, text in rec["rounds"]:
        if role == "ask":
            segments.append((tpl.ask + text + tpl.end, False))
        elif role == "ans-api":
            segments += _api_segments(tpl, text, eos)
        else:
            segments += [(tpl.ans, False), (tpl.lead + text + eos, True), (tpl.end, False)]
    return segments


def _before_answer(rounds: list) -> list:
    """The rounds without the answer to produce: a final "ans" turn, or a final "ans-api" turn's "ans" (its
    actions stay: the prompt then asks for the answer after them)."""
    rounds = list(rounds)
    if rounds and rounds[-1][0] == "ans":
        rounds.pop()
    elif rounds and rounds[-1][0] == "ans-api" and "ans" in rounds[-1][1]:
        rounds[-1] = ["ans-api", {k: v for k, v in rounds[-1][1].items() if k != "ans"}]
    return rounds


def _dialog_prompt(kind: str, rec: Mapping[str, Any], eos: str | None = None) -> str:
    """The rounds before the answer to produce (`_before_answer`), then the answer role."""
    rounds = _before_answer(rec["rounds"])
    if eos is None and any(role == "ans" or role == "ans-api" and turn["actions"] for role, turn in rounds):
        raise ValueError("a prompt with earlier answers needs the tokenizer's EOS string (eos=...) to close them")
    segments = _dialog_segments(kind, {**rec, "rounds": rounds}, eos or "")
    return "".join(text for text, _ in segments) + DIALOGS[kind].ans


# type -> the text the model continues; `eos` closes earlier answers (multi-turn records only).
PROMPTS: dict[str, Callable[[Mapping[str, Any], str | None], str]] = {
    "pretrain": lambda rec, eos=None: rec["text"],  # a pretrain "prompt" is text to continue
    "instruct": _instruct_prompt,
    "conversation": lambda rec, eos=None: _dialog_prompt("conversation", rec, eos),
    "ref_qa": lambda rec, eos=None: _dialog_prompt("ref_qa", rec, eos),
    "conver_has_api": lambda rec, eos=None: _dialog_prompt("conver_has_api", rec, eos),
}

# type -> segments of the training text, from the same pieces as PROMPTS.
RENDERERS: dict[str, Callable[[Mapping[str, Any], str], list[Segment]]] = {
    "pretrain": lambda rec, eos: [(PROMPTS["pretrain"](rec) + eos, True)],
    "instruct": lambda rec, eos: [(PROMPTS["instruct"](rec), False), (rec["output"] + eos, True)],
    "conversation": lambda rec, eos: _dialog_segments("conversation", rec, eos),
    "ref_qa": lambda rec, eos: _dialog_segments("ref_qa", rec, eos),
    "conver_has_api": lambda rec, eos: _dialog_segments("conver_has_api", rec, eos),
}


def _chat_rounds(rec: Mapping[str, Any]) -> list[dict[str, str]]:
    return [{"role": CHAT_ROLES[role], "content": text} for role, text in rec["rounds"]]


def _chat_instruct(rec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The user message, then the output as the assistant's (absent in an inference prompt's record)."""
    user = CHAT_INSTRUCT_INPUT.format(**rec) if has_input(rec) else rec["instruct"]
    answer = [{"role": "assistant", "content": rec["output"]}] if "output" in rec else []
    return [{"role": "user", "content": user}, *answer]


# type -> chat messages for the tokenizer's chat_template (chat mode); a type absent here (pretrain, plain text
# with no turns; conver_has_api, whose tool turns chat templates do not render alike) renders with its default
# template in chat mode too.
CHAT_MESSAGES: dict[str, Callable[[Mapping[str, Any]], list[dict[str, str]]]] = {
    "instruct": _chat_instruct,
    "conversation": _chat_rounds,
    "ref_qa": lambda rec: [{"role": "system", "content": REF_QA_SYSTEM.format(reference=rec["reference"])},
                           *_chat_rounds(rec)],
}


def render_prompt(rec: Mapping[str, Any], eos: str | None = None) -> str:
    """The text the model sees before it must produce the record's (next) answer, without that answer.

    pretrain: the text; instruct: the prompt; conversation / ref_qa: the rounds up to the last "ask"
    turn, then the answer role ("### Assistant:" / "### Response:", no space: it starts the answer).
    Records with earlier answers need `eos` (the tokenizer's EOS string), which closes each answer as
    in training.
    """
    return PROMPTS[record_type(rec)](rec, eos)


def answer_lead(rec: Mapping[str, Any], settings: TemplateSettings, tokenizer: Any) -> str:
    """What the answer to `rec`'s prompt starts with that is the template's, not the answer's: a dialog's `lead`
    (the space after its role marker) with the default templates, what the chat template writes before an answer
    in chat mode (`data.chat.chat_lead`), else "". demo.py prints the answer without it, as the record holds it
    (fed back as a turn, it is rendered with the lead again)."""
    kind = record_type(rec)
    if settings.template == "chat" and kind in CHAT_MESSAGES:
        from data.chat import chat_lead  # (data.chat imports this module)

        return chat_lead(rec, tokenizer)
    return DIALOGS[kind].lead if kind in DIALOGS else ""


def prompt_of(rec: Mapping[str, Any], eos: str | None = None) -> Rendered:
    """`render_prompt` as a Rendered whose `prompt_ends` are the starts of the earlier answers in it (the
    boundaries data.boundary keeps, as training does); no spans."""
    text = render_prompt(rec, eos)
    if record_type(rec) in DIALOGS:
        earlier = render({**rec, "rounds": _before_answer(rec["rounds"])}, eos or "")
        return Rendered(text, [], prompt_ends=earlier.prompt_ends)
    return Rendered(text, [])


def render(rec: Mapping[str, Any], eos: str, settings: TemplateSettings = DEFAULT_SETTINGS) -> Rendered:
    """Render a record with the default templates; `eos` is the tokenizer's EOS string.

    Answers are trained with their EOS: instruct's output, every "ans" turn of conversation / ref_qa,
    all of pretrain's text (+ EOS when `settings.pretrain_eos`); `settings` may widen or narrow that.
    """
    kind = record_type(rec)
    if kind == "pretrain" and not settings.pretrain_eos:
        eos = ""
    pieces, answers, at = [], [], 0
    for piece, is_answer in RENDERERS[kind](rec, eos):
        if is_answer and piece:
            answers.append((at, at + len(piece)))
        pieces.append(piece)
        at += len(piece)
    ends = tuple(a for a, _ in answers if a > 0)  # pretrain's answer is its whole text: no prompt before it
    return Rendered("".join(pieces), settings.trained(answers, at), prompt_ends=ends)


def template_settings(settings: TemplateSettings) -> dict[str, Any]:
    """Everything about the templates that changes the rendered text or labels (part of the cache key)."""
    return {"instruct": [INSTRUCT_WITH_INPUT, INSTRUCT_NO_INPUT], "ref_qa_system": REF_QA_SYSTEM,
            "api": [API_CALL, API_OUTPUT],
            "dialogs": {k: asdict(v) for k, v in DIALOGS.items()}, "chat": [CHAT_INSTRUCT_INPUT, CHAT_ROLES],
            **{f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "packing"}}
