"""The data settings a model was trained with, kept beside its weights so inference renders prompts the same way.

train_ds.py writes `data_settings.json` into save_path; `convert_model.py pp_to_hg` / `hg_to_pp` carry it (it is
one of models.hf_io.SIDE_FILES), and so does a PEFT adapter export. demo.py reads it: the template mode, the
chat template training rendered with, and the end-of-turn token generation must stop on.

    {"template": "chat", "train_on_prompt": false, ..., "max_seq_len": 512,
     "chat_template": "{% for m in messages %}...", "end_of_turn": "<|im_end|>", "eos_token": "</s>"}
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from data.chat import end_of_turn
from data.templates import TemplateSettings

DATA_SETTINGS_FILE = "data_settings.json"


@dataclass(frozen=True)
class DataSettings:
    """What training rendered with: the template knobs, max_seq_len, and in chat mode the chat template and
    its end-of-turn token."""

    template: TemplateSettings
    max_seq_len: int | None = None
    chat_template: str | None = None
    end_of_turn: str | None = None
    eos_token: str | None = None
    prompted: bool | None = None  # a training record went through a template (not pretrain text only); None: unknown


def data_settings_of(settings: TemplateSettings, tokenizer: Any, max_seq_len: int | None = None,
                     prompted: bool | None = None) -> DataSettings:
    chat = settings.template == "chat"  # the template apply_chat_template renders with (of named ones: "default")
    return DataSettings(settings, max_seq_len, tokenizer.get_chat_template() if chat else None,
                        end_of_turn(tokenizer) if chat else None, tokenizer.eos_token, prompted)


def write_data_settings(directory: str | Path, found: DataSettings) -> Path:
    """Write `directory`/data_settings.json atomically (a temp file, then rename)."""
    path = Path(directory) / DATA_SETTINGS_FILE
    body = {**asdict(found.template), **{f.name: getattr(found, f.name) for f in fields(found) if f.name != "template"}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{DATA_SETTINGS_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_data_settings(directory: str | Path) -> DataSettings | None:
    """The settings recorded in `directory`, None when it has none. ValueError (one line naming the file)
    when the file is not what write_data_settings writes."""
    path = Path(directory) / DATA_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        template = TemplateSettings(**{f.name: body[f.name] for f in fields(TemplateSettings) if f.name in body})
        rest = {f.name: body.get(f.name) for f in fields(DataSettings) if f.name != "template"}
        named = rest["chat_template"]
        if isinstance(named, dict) and isinstance(named.get("default"), str):  # written before e5bfb61: named
            rest["chat_template"] = named["default"]  # templates whole; training rendered with "default"
        for name, kinds in (("max_seq_len", int), ("chat_template", str), ("end_of_turn", str), ("eos_token", str),
                            ("prompted", bool)):
            if rest[name] is not None and not isinstance(rest[name], kinds):
                raise ValueError(f"{name!r} must be {kinds.__name__} or null, got {json.dumps(rest[name])}")
        return DataSettings(template, **rest)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: unreadable data settings ({e})") from None
