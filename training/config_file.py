"""Reading a training config file: JSON, or YAML for .yml / .yaml; one object, each key written once, every number
finite; and the names other fine-tuning tools give this config's keys (for the unknown-key hint). The keys' checks
are training.config's."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipeft import DuplicateKey, unique_keys
from training.compat import YAML_SUFFIXES, parse_yaml


def script_parser(prog: str, description: str | None = None, launcher: bool = False) -> argparse.ArgumentParser:
    """train_ds.py's arguments. The launch shims (`launcher`: --config not required, errors raised, not exits) read
    the --config it will take with this parser too: the last one given, an abbreviation such as --conf included."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 exit_on_error=not launcher, add_help=not launcher)
    ap.add_argument("--config", required=not launcher, help="JSON or YAML config (DeepSpeed keys + project keys)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return ap


class ConfigError(ValueError):
    """A bad training config; the message is one line naming the file, the key and the problem."""


# other fine-tuning tools' names (HF Trainer's TrainingArguments, LLaMA-Factory's) for what a config says here
OTHER_TOOLS_KEYS = {
    "learning_rate": "optimizer.params.lr", "lr": "optimizer.params.lr", "weight_decay": "optimizer.params.weight_decay",
    "num_train_epochs": "n_epoches", "epochs": "n_epoches", "max_length": "max_seq_len", "cutoff_len": "max_seq_len",
    "per_device_train_batch_size": "train_micro_batch_size_per_gpu", "output_dir": "save_path",
    "model_name_or_path": "model_path", "warmup_steps": "lr_schedule.warmup_steps",
    "warmup_ratio": "lr_schedule.warmup_ratio", "lr_scheduler_type": "lr_schedule.type",
    "gradient_checkpointing": "use_grad_ckpt", "save_steps": "save_interval", "eval_steps": "eval_interval",
    "logging_steps": "log_interval", "save_total_limit": "keep_last", "max_grad_norm": "gradient_clipping",
    "dataset": "data_path", "train_file": "data_path", "validation_file": "eval_data_path",
}


def read_config_file(path: Path) -> dict:
    """The config file's object: JSON, or YAML for .yml / .yaml (ConfigError: one line naming the file, the line
    for YAML, and the problem)."""
    yml = path.suffix.lower() in YAML_SUFFIXES
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    try:
        raw = parse_yaml(path, text) if yml else json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:  # json keeps the last value of a repeated key without a word
        raise ConfigError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        hint = "" if text.lstrip()[:1] in ("{", "[") else " (a YAML config? name it .yml or .yaml)"
        raise ConfigError(f"{path}: invalid JSON ({e}){hint}") from None
    except ValueError as e:  # parse_yaml's message names the file and line
        raise ConfigError(str(e)) from None
    try:
        json.dumps(raw)  # YAML may hold dates or sets: the config is saved as JSON in every checkpoint
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: a value JSON cannot hold ({e}); quote it") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a {'YAML mapping' if yml else 'JSON object'}")
    if found := _non_finite(raw):  # JSON's NaN / Infinity, YAML's .nan / .inf: NaN passes every range check
        raise ConfigError(f"{path}: '{found[0]}' is {found[1]}: a config's numbers must be finite")
    if found := _non_string_key(raw):  # YAML's 1:, on: / yes: (booleans), ~: (null)
        where, key = found
        raise ConfigError(f"{path}: the key {json.dumps(key)}{f' in {where!r}' if where else ''} is not a string "
                          "(YAML reads 1, on, yes, no and ~ as a number, a boolean or null: quote it)")
    return raw


def _non_string_key(value: object, at: str = "") -> tuple[str, object] | None:
    """(where, the key) of the first key of a parsed config that is not a string, else None."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(value, dict) and not isinstance(k, str):
            return at, k
        if found := _non_string_key(v, f"{at}.{k}" if at and isinstance(k, str) else f"{at}[{k}]" if at else str(k)):
            return found
    return None


def _non_finite(value: object, at: str = "") -> tuple[str, float] | None:
    """(the key path, the value) of the first NaN or infinite number in a parsed config, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return at, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if found := _non_finite(v, f"{at}.{k}" if at and isinstance(k, str) else f"{at}[{k}]" if at else str(k)):
            return found
    return None
