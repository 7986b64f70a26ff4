"""The training config's paths, checked before any work: model_path is a pipeline model, save_path a directory this
run may write (not a model dir, not the model's, not a live or an unasked-for earlier run), data_cache_dir a
directory, eval_data_path not the training data."""

from __future__ import annotations

import filecmp
import fnmatch
import glob
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from data.records import DataError, resolve_files
from models.hf_io import LAYER_FILE, LAYER_GLOB, SIDE_FILES, TOKENIZER_DIRS
from models.outdir import RUN_TAG, run_marks, run_tags
from pipeft import command
from training.config_file import ConfigError
from training.resume import unnamed_tag, weights_from_checkpoint
from training.runlock import JOB_FILE, LockError, check_unlocked

if TYPE_CHECKING:
    from training.config import TrainConfig


def _model_path_hint(model: Path) -> str:
    """What a model_path that holds no pipeline model seems to be, and the way on ("" when it tells nothing)."""
    convert = command("convert_model.py")
    if model.exists() and not model.is_dir():
        return f" (a file; model_path is the pipeline dir {convert} hg_to_pp writes)"
    if not model.exists():
        first = model.parts[0] if model.parts else ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) and first not in (".", "..") and not Path(first).exists():
            return (f" (a Hub id? convert it first: {convert} hg_to_pp --input-path {shlex.quote(str(model))} --save-path DIR, then use "
                    "DIR)")
        return "" if model.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    if (model / "latest").is_file() or run_tags(model) or RUN_TAG.match(model.name):
        return (f" (a training run's checkpoints: resume that run with its own config, or, to train further from "
                f"it as a new run, export it ({convert} pp_to_hg --input-path ... --save-path HF_DIR), then convert "
                f"that ({convert} hg_to_pp --input-path HF_DIR --save-path PP_DIR) and use PP_DIR)")
    if any(model.glob("*.safetensors")) or any(model.glob("pytorch_model*.bin")):
        return f" (an HF dir? convert it first: {convert} hg_to_pp --input-path {shlex.quote(str(model))} --save-path PP_DIR, then use PP_DIR)"
    return ""


SHELL_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")  # $HOME, ${SLURM_TMPDIR}


def check_paths(cfg: TrainConfig, path: Path, require_model: bool) -> None:
    for key in ("model_path", "save_path", "data_cache_dir"):  # "" is the working directory, as Path reads it
        if isinstance(getattr(cfg, key), str) and not getattr(cfg, key).strip():
            raise ConfigError(f"{path}: '{key}' is empty (it would be the working directory); give a directory")
    for key in ("model_path", "save_path", "data_cache_dir", "data_path", "eval_data_path"):
        values = getattr(cfg, key) if isinstance(getattr(cfg, key), list) else [getattr(cfg, key)]
        for value in (v for v in values if isinstance(v, str) and v.startswith("~")):  # a dir named ~ would be made
            full = os.path.expanduser(value)
            raise ConfigError(f"{path}: '{key}' {value}: a config's paths are not expanded as the shell expands '~' "
                              f"(it names a directory {value.split(os.sep)[0]} here); give the full path"
                              + (f" ({full}?)" if full != value else ""))
        for value in (v for v in values if isinstance(v, str) and (var := SHELL_VARIABLE.search(v))
                      and not _exists_as_written(v)):  # as with ~
            full = os.path.expandvars(value)
            raise ConfigError(f"{path}: '{key}' {value}: a config's paths are not expanded as the shell expands "
                              f"{var.group()} (it is read as written, '{var.group()}'); give the full path"
                              + (f" ({full}?)" if full != value else ""))
    if cfg.data_cache_dir is not None and (file := _file_at_or_above(Path(cfg.data_cache_dir))):
        raise ConfigError(f"{path}: data_cache_dir {cfg.data_cache_dir}: {file} is a file, not a directory")
    model = Path(cfg.model_path)
    if not model.is_dir():
        raise ConfigError(f"{path}: model_path {model} is not a directory{_model_path_hint(model)}")
    if not require_model:
        return
    if not (model / "config.json").is_file():
        raise ConfigError(f"{path}: model_path {model} has no config.json{_model_path_hint(model)}")
    if not cfg.from_scratch and not weights_from_checkpoint(cfg) and not (model / LAYER_FILE.format(0)).is_file():
        raise ConfigError(f"{path}: model_path {model} has no pipeline layer files{_model_path_hint(model)}")
    save = Path(cfg.save_path)
    if save.exists() and not save.is_dir():
        raise ConfigError(f"{path}: save_path {save} is a file, not a directory")
    if save.resolve() == model.resolve() or model.resolve() in save.resolve().parents:
        raise ConfigError(f"{path}: save_path {save} is {'model_path' if save.resolve() == model.resolve() else 'inside model_path'} "
                          f"{model}: checkpoints would mix with the base model's files (and pp_to_hg of that dir would "
                          "export the untrained base); use another directory")
    if (real := Path(path).resolve()).parent == save.resolve() and real.name in SIDE_FILES:  # (a link to it too)
        raise ConfigError(f"{path}: the config is save_path's {real.name}, which training replaces with "
                          "model_path's; keep the training config elsewhere")
    if found := _model_files(save):
        raise ConfigError(f"{path}: save_path {save} holds a model, not a training run ({', '.join(found[:3])}): training "
                          "would replace its config and tokenizer files and remove those model_path lacks; give a "
                          "new directory")
    if found := _files_a_start_would_replace(save, Path(cfg.model_path)):
        raise ConfigError(f"{path}: save_path {save} holds {', '.join(found[:3])}{', ...' * (len(found) > 3)} and no "
                          "training run: a start puts model_path's config and tokenizer files there, replacing these "
                          "(they are not model_path's) and removing those model_path lacks; give a new or empty "
                          "directory (or delete them, if a start stopped before its first step left them)")
    if file := _file_at_or_above(save):
        raise ConfigError(f"{path}: save_path {save} is under {file}, which is a file, not a directory")
    parent = save if save.exists() else next((p for p in save.parents if p.exists()), Path("/"))
    if problem := _write_problem(parent):
        raise ConfigError(f"{path}: save_path {save} is not writable: {parent} refuses new files ({problem})")
    if cfg.resume is True and not (save / "latest").is_file() and unnamed_tag(save) is None:
        raise ConfigError(f"{path}: 'resume' is true but save_path {save} has no checkpoint ('latest' file)")
    for key in ("data_path", "eval_data_path"):
        if getattr(cfg, key) is not None:
            try:
                files = resolve_files(getattr(cfg, key), key)
            except DataError as e:
                raise ConfigError(f"{path}: '{key}': {e.problems[0]}") from None
            values = getattr(cfg, key) if isinstance(getattr(cfg, key), list) else [getattr(cfg, key)]
            inside = next((f"reads {f}, inside" for f in files if _written_by_runs(f, save)), None) or next(
                (f"{v} matches files a run writes in" for v in values
                 if isinstance(v, str) and glob.has_magic(v) and _matches_run_files(v, save)), None)
            if inside:
                raise ConfigError(f"{path}: '{key}' {inside} save_path {save}: a run writes its metrics, config and "
                                  "tokenizer files there, which a later start would read as records; keep the data out "
                                  "of save_path")


def _exists_as_written(value: str) -> bool:
    """Whether a path with a '$' in it names something that exists as written (a file `price$usd.jsonl`, a dir
    `a$b/` under which a save_path is still to be made, a glob that matches): a name, not a variable."""
    parts = Path(value).parts
    upto = max(i for i, part in enumerate(parts) if SHELL_VARIABLE.search(part))
    head = str(Path(*parts[:upto + 1]))
    return any(os.path.lexists(p) or glob.glob(p, recursive=True) for p in (value, head))


def _written_by_runs(file: Path, save: Path) -> bool:
    """Whether `file` is where a run in save_path writes: directly in it (metrics.jsonl, config.json, ...) or in
    one of its checkpoint dirs (a subdirectory of the user's own, e.g. save_path/data/, is not)."""
    try:
        parts = file.resolve().relative_to(save.resolve()).parts
    except ValueError:
        return False
    return len(parts) == 1 or bool(RUN_TAG.match(parts[0]))


def _matches_run_files(pattern: str, save: Path) -> bool:
    """Whether glob `pattern` (`**` recursive, as resolve_files reads it) matches files a run writes in save_path
    (metrics.jsonl, config.json, a checkpoint's trainer_state.json), which are not there yet at its first start."""

    def match(pat: tuple[str, ...], parts: tuple[str, ...]) -> bool:
        if not pat:
            return not parts
        hidden = [p.startswith(".") for p in parts]  # a wildcard matches no hidden name, as in glob
        if pat[0] == "**":
            return any(match(pat[1:], parts[i:]) for i in range(len(parts) + 1) if not any(hidden[:i]))
        return (bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and (not hidden[0] or pat[0].startswith("."))
                and match(pat[1:], parts[1:]))

    pat = Path(os.path.abspath(pattern)).parts
    return any(match(pat, Path(os.path.abspath(save / name)).parts)
               for name in ("metrics.jsonl", "config.json", "global_step1/trainer_state.json"))


def _file_at_or_above(directory: Path) -> Path | None:
    """The nearest existing path at or above `directory` when it is not a directory (a file, a link to one)."""
    found = next((p for p in (directory, *directory.parents) if p.exists()), None)
    return found if found is not None and not found.is_dir() else None


def eval_is_training_data(cfg: TrainConfig) -> str | None:
    """A note naming the files eval_data_path shares with data_path (after globs, directories and links), else None."""
    if cfg.eval_data_path is None:
        return None
    try:
        train = {f.resolve() for f in resolve_files(cfg.data_path)}
        both = [f for f in (f.resolve() for f in resolve_files(cfg.eval_data_path)) if f in train]
    except DataError:  # a path that matches nothing: check_paths or the data loading says so
        return None
    if not both:
        return None
    return (f"'eval_data_path' names {len(both)} of the training files (data_path): {', '.join(map(str, both[:3]))}"
            f"{' ...' if len(both) > 3 else ''}; the eval loss of records the model trains on does not tell how it does "
            "on new ones: evaluate on held-out records (or set 'eval_split_ratio' instead)")


def _write_problem(directory: Path) -> str | None:
    """Why a file cannot be created in `directory` (tried: permission bits do not tell for root, read-only or
    network filesystems), None when it can."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".pipeft-write-test-")
    except OSError as e:
        return e.strerror or type(e).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def save_path_in_use(cfg: TrainConfig, path: Path) -> str | None:
    """Rank 0's checks of what is in save_path now: a live run's lock (the others cannot judge another host's), a run
    that "resume": false would replace without "overwrite_save_path" (rank 0 decides whether this start resumes)."""
    save = Path(cfg.save_path)
    try:
        check_unlocked(save)
    except LockError as e:
        return f"{path}: {e}"
    return used_save_path(cfg, path)


def used_save_path(cfg: TrainConfig, path: Path) -> str | None:
    """The refusal of a save_path that holds a run when "resume" is false without "overwrite_save_path"; checked at
    the config and again under the run's lock (a run started meanwhile, e.g. the same job submitted twice, is not
    replaced)."""
    save = Path(cfg.save_path)
    if cfg.resume is False and not cfg.overwrite_save_path and holds_run(save):
        return (f"{path}: save_path {save} already holds a training run and 'resume' is false; set \"resume\": \"auto\" "
                "to continue it or \"overwrite_save_path\": true to replace it")
    return None


MODEL_FILES = ("*.safetensors", "pytorch_model*.bin", LAYER_GLOB, "*.gguf")  # never at a run's top


def _model_files(save: Path) -> list[str]:
    """The weights of a save_path that is a model dir (an HF or pipeline dir, an export, an adapter): files directly
    in it that a run never writes there; [] for a run's save_path (a file the user added to one is theirs), a new or
    an unrelated directory. (Not a config.json alone: a run stopped at its start's first writes leaves one.)"""
    if not save.is_dir() or run_marks(save) or (save / JOB_FILE).exists():
        return []
    return sorted(p.name for pattern in MODEL_FILES for p in save.glob(pattern))


def _files_a_start_would_replace(save: Path, model: Path) -> list[str]:
    """The side files (SIDE_FILES, TOKENIZER_DIRS) in a save_path that holds no run which are not copies of
    model_path's: a start replaces save_path's side files with model_path's and removes those model_path lacks, so
    these, the user's (a project dir's config.json or LICENSE), would be lost. A start stopped after its first writes
    left copies: those are not named. [] for a run's save_path (its metrics.jsonl is written right after the side
    files) or a new one."""
    if not save.is_dir() or run_marks(save) or (save / JOB_FILE).exists():
        return []
    return [n for n in (*SIDE_FILES, *TOKENIZER_DIRS) if os.path.lexists(save / n) and not _same(save / n, model / n)]


def _same(a: Path, b: Path) -> bool:
    """Whether `a` holds what `b` does: files of the same bytes, or directories of such files (links followed)."""
    if a.is_dir() and b.is_dir():
        names = sorted(p.relative_to(a) for p in a.rglob("*"))
        return names == sorted(p.relative_to(b) for p in b.rglob("*")) and all(
            _same(a / n, b / n) for n in names if not (a / n).is_dir())
    return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)


def holds_run(save: Path) -> bool:
    """Whether save_path has checkpoints or metrics of an earlier run (its lock alone is not one)."""
    return bool(run_marks(save, lock=False))
