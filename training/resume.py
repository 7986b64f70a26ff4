"""Resuming a run: which checkpoint, and what changed in the config since it was saved.

Every checkpoint holds the run's config as loaded (`run_config.json`) and a manifest of its files with their
sizes (`manifest.json`). At resume:
- the tag `latest` names is checked (its trainer_state.json readable, every file of the manifest present
  with its size); a damaged one is passed over for the newest intact earlier tag, with a line saying so;
- with no `latest` (a run killed between its first tag's rename and `latest`'s write, or `latest` deleted) the
  newest complete tag is resumed, with a line saying so, and rank 0 then names it in `latest` (`name_resumed`:
  `best` and rotation as after its save);
- the config in force is compared with the saved one key by key, each change applied or refused
  (training/config_diff.py);
- a full run's checkpoint records the model config it was built with (`MODEL_CONFIG_FILE`): a model_path whose
  config.json differs is refused, naming the keys (a LoRA checkpoint's base_fingerprint covers its base).
Everything here runs before any process group exists, except where the trainer calls it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from models.lora import CONFIG_WRITER_KEYS, LoraSettings, base_fingerprint, read_lora_info
from models.outdir import latest_tag, run_tags
from models.quant import saved_quantization
from training.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    TAG,
    Checkpoints,
    RunState,
    atomic_write_text,
    saved_eval_fingerprint,
    tag_of,
)
from training.config_diff import (
    UNORDERED,
    UNSET,
    config_changes,
    refusals,
    same_global_batch,
    same_set,
    show,
    side_by_side,
)

if TYPE_CHECKING:
    from training.config import TrainConfig

RUN_CONFIG_FILE = "run_config.json"
MODEL_CONFIG_FILE = "model_config.json"  # a full run's: `model_config` of model_path, compared at resume
# config.json keys that do not change what training computes: who wrote it, and what serving reads
MODEL_CONFIG_IGNORED = (*CONFIG_WRITER_KEYS, "torch_dtype", "dtype", "use_cache", "architectures", "bos_token_id",
                        "eos_token_id", "pad_token_id")
def model_config(model_path: str | Path) -> dict | None:
    """model_path's config.json without MODEL_CONFIG_IGNORED: what builds the model's computation; None if
    unreadable."""
    try:
        body = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in body.items() if k not in MODEL_CONFIG_IGNORED} if isinstance(body, dict) else None


def _as_built(config: dict) -> dict:
    """`config` as the installed transformers builds it (defaults filled in, one spelling of the rope settings), less
    MODEL_CONFIG_IGNORED; as written where transformers cannot read it."""
    from transformers import AutoConfig

    try:
        built = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - transformers raises many kinds for a config it cannot read
        return config
    return {k: v for k, v in built.to_dict().items() if k not in MODEL_CONFIG_IGNORED}


def model_config_problem(ckpt: Path, model_path: str) -> str | None:
    """Why a full checkpoint cannot resume with model_path's config.json (it differs from the MODEL_CONFIG_FILE the
    checkpoint recorded: the weights would run in another model), naming the keys; None when equal or unrecorded."""
    try:
        saved = json.loads((ckpt / MODEL_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None  # written before the record existed
    now = model_config(model_path)
    if not isinstance(saved, dict) or now is None or saved == now:
        return None
    saved, now = _as_built(saved), _as_built(now)
    if saved == now:  # written differently (a default left out, another transformers' rope spelling): the same model
        return None
    # a section set to or from null is one key, the section whole (side_by_side, as config_changes says it)
    diff = [(k, old, new) for k, old, new in side_by_side(saved, now) if old != new] or [
        (k, saved.get(k, UNSET), now.get(k, UNSET)) for k in sorted(set(saved) | set(now))
        if saved.get(k, UNSET) != now.get(k, UNSET)]  # (an empty section against none: side_by_side's alike)
    keys = [k for k, _, _ in diff]
    said = ", ".join(f"{k} {show(old)} -> {show(new)}" for k, old, new in diff[:3])
    more = f" (and {len(keys) - 3} more: {', '.join(keys[3:])})" if len(keys) > 3 else ""
    return (f"model_path {model_path}: its config.json differs from the model config the checkpoint {ckpt} was "
            f"trained with ({MODEL_CONFIG_FILE}): {said}{more}; the checkpoint's weights would run in another model: "
            "restore that config.json (a moved model_path with the same config.json resumes)")


def read_run_config(tag_dir: Path) -> dict | None:
    f = tag_dir / RUN_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):  # (JSONDecodeError, UnicodeDecodeError)
        return None


def tag_problem(tag_dir: Path) -> str | None:
    """Why a checkpoint tag cannot be resumed (missing or damaged files), or None."""
    try:
        state = json.loads((tag_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is damaged ({type(e).__name__})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is damaged (not a JSON object)"
    manifest = tag_dir / MANIFEST_FILE
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())
        except (OSError, ValueError):  # (JSONDecodeError, UnicodeDecodeError)
            return f"{MANIFEST_FILE} is damaged"
        if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
            return f"{MANIFEST_FILE} is damaged (not an object of file sizes)"
        for name, size in sizes.items():
            f = tag_dir / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def earlier_tags(save: Path, tag: str) -> list[str]:
    """Tag directories older than `tag` (every one for a `tag` that is none, e.g. ""), newest first."""
    m = TAG.match(tag)
    limit = int(m.group(1)) if m else None
    return [name for name in reversed(run_tags(save)) if limit is None or int(TAG.match(name).group(1)) < limit]


def unnamed_tag(save: Path) -> str | None:
    """When there is no `latest` (the run was killed after its first checkpoint's rename, before `latest` named it;
    or it was deleted): the complete tag of the highest step (a manifest, written before the rename, and every file
    as it lists), or None. With a `latest`, its choice stands (a later tag it does not name is resumed from the
    earlier one, bit-exactly; mtimes cannot tell that from a `latest` pointed back by hand)."""
    if (save / "latest").is_file() or not save.is_dir():
        return None
    return next((t for t in earlier_tags(save, "")
                 if (save / t / MANIFEST_FILE).is_file() and tag_problem(save / t) is None), None)


def not_a_checkpoint(save: Path, tag: str) -> str | None:
    """Why the tag `latest` names is no checkpoint directory of `save` (`latest` of "" or ".." names save_path itself or
    its parent, never a checkpoint to resume or to delete), or None."""
    if not TAG.match(tag):
        return "is not a checkpoint (global_stepN)"
    if not (save / tag).is_dir():
        return "is not a directory" if (save / tag).exists() else "does not exist"
    return None


def resume_tag(save: Path) -> tuple[str | None, list[str]]:
    """The tag to resume from and lines to print: `unnamed_tag` when there is one, else the one `latest` names, or,
    when that one is damaged, the newest intact earlier tag. (None, [...]) when `latest` names nothing usable and no
    earlier tag is intact; (None, []) when there is no `latest` and no complete tag."""
    latest = save / "latest"
    if unnamed := unnamed_tag(save):
        return unnamed, [f"resuming from {save / unnamed}, the newest complete checkpoint: {latest} is missing "
                         "(deleted, or the run was stopped before it named its first checkpoint)"]
    if not latest.is_file():
        return None, []
    tag = latest_tag(save)
    if missing := not_a_checkpoint(save, tag):
        notes = [f"{latest} names {tag!r}, which {missing}"]
    elif problem := tag_problem(save / tag):
        notes = [f"checkpoint {save / tag} cannot be resumed: {problem}"]
    else:
        return tag, []
    left = "" if missing else f" ({save / tag} is left in place; delete it once you no longer need it)"
    for older in earlier_tags(save, tag):
        if tag_problem(save / older) is None:
            notes.append(f"resuming from the previous intact checkpoint {save / older} instead{left}")
            return older, notes
    return None, notes


def length_before(saved: RunState, changes: list | None, cfg: TrainConfig, steps_per_epoch: int) -> int | None:
    """The length in steps of the run checkpoint state `saved` was written by, to compare with this run's. Counted
    in epochs where n_epoches sets both (its n_epoches over this run's epoch: a batch or data change alone does not
    lengthen it); else as it recorded it; else the step of a run that ended at its length; else its max_steps, or
    its n_epoches over this run's epoch, from this config and `changes` since it (None: unknown, the checkpoint has
    no run config)."""
    was = {c.key: c.old for c in changes or [] if c.key in ("max_steps", "n_epoches")}
    steps, epochs = was.get("max_steps", cfg.max_steps), was.get("n_epoches", cfg.n_epoches)
    steps, epochs = None if steps is UNSET else steps, 1 if epochs is UNSET else epochs
    if changes is not None and not steps and not cfg.max_steps:
        return epochs * steps_per_epoch
    if saved.length is not None:
        return saved.length
    if saved.finished and saved.patience_ended is False and not saved.cut_short:
        return saved.step
    return None if changes is None else steps or epochs * steps_per_epoch


def knob(cfg: TrainConfig) -> str:
    """What sets the run's length: max_steps where it is set (n_epoches then does not count)."""
    return "max_steps" if cfg.max_steps else "max_steps or n_epoches"


def course(st: RunState, total_steps: int, before: int | None, patience: int | None,
           knob: str = "max_steps or n_epoches") -> str | None:
    """How resumed state `st` goes on in a run of `total_steps` steps, and the line that says so (None: it trains
    on). A finished run continues when its length was raised (above `before`, the checkpoint run's length; None:
    not known), or when a lower one had ended it (also back at its length); one that early stopping ended, when
    `patience` allows more; a run at or past a length it now has ends there. st's finished / cut_short /
    patience_ended are set to match: finished after it, there is nothing to do (the line says how to train
    further, by `knob`: "max_steps" where it is set, as it overrides n_epoches)."""
    # (an older state has no patience_ended: it was guessed from cut_short)
    ended = st.patience_ended if st.patience_ended is not None else not st.cut_short
    early = st.finished and ended and st.step < total_steps  # early stopping ended it
    since = st.evals_since_best()
    raised, changed = before is not None and total_steps > before, before is not None and total_steps != before
    if st.finished and (raised or st.cut_short) and st.step < total_steps:
        st.finished, st.cut_short, st.patience_ended = False, False, False
        return f"continuing the finished run from step {st.step} to step {total_steps} (its length was raised)"
    if early and (not patience or since < patience):
        st.finished, st.patience_ended = False, False
        return (f"continuing the run early stopping ended at step {st.step}: early_stopping_patience is "
                f"{patience or 'off'} now ({since} evaluations since the best)")
    if not st.finished and (st.step > total_steps or st.step == total_steps and changed):
        # (at its last step and unchanged: a run stopped after its last save, before it was marked finished)
        st.cut_short = True
        return (f"the run is {total_steps} steps long now, and the checkpoint is at step {st.step}: it ends here "
                f"(a longer {knob} later continues it)")
    if not st.finished:
        return None
    more = (f"early stopping ended it after {since} evaluations without improvement: raise early_stopping_patience "
            "or turn it off" if early else f"raise {knob}")
    return (f"nothing to do: this run finished at step {st.step} ({more} to train further; a new run needs another "
            "save_path, or \"resume\": false with \"overwrite_save_path\": true)")


def name_resumed(ckpts: Checkpoints, state: RunState) -> str | None:
    """Rank 0, after resuming `state` with no `latest` (an `unnamed_tag`): name the resumed tag in `latest`, then
    write `best` and rotate as its save would have (keep_last, keep_best by the evals it holds). Returns the line to
    print, or None when there is a `latest`."""
    latest, tag = ckpts.root / "latest", tag_of(state.step)
    if latest.is_file() or not (ckpts.root / tag).is_dir():
        return None
    atomic_write_text(latest, tag)
    ckpts._after_save(state)
    return f"{latest} now names {tag}, the checkpoint resumed"


def resumes(cfg: TrainConfig) -> bool:
    """Whether the run resumes from save_path ("resume" not false, and a `latest` or a complete checkpoint there; one
    that cannot be resumed is `resume_problem`'s) rather than starting fresh: what it starts from then comes from the
    checkpoint (e.g. the adapters, not lora.adapter_path)."""
    save = Path(cfg.save_path)
    return cfg.resume is not False and ((save / "latest").is_file() or resume_tag(save)[0] is not None)


def weights_from_checkpoint(cfg: TrainConfig) -> bool:
    """A full fine-tune's resume (`resumes`): every weight is the checkpoint's (loaded strictly), so model_path's
    layer files are neither needed nor read (a LoRA or QLoRA run's frozen base still comes from model_path)."""
    return cfg.lora is None and resumes(cfg)


def resume_problem(cfg: TrainConfig, lora: LoraSettings | None) -> str | None:
    """The checkpoint to resume (resume_tag: the one `latest` names or the newest intact earlier one; with no
    `latest`, the newest complete one) can be resumed exactly, is of the configured kind (full / LoRA), and the
    config's changes since it are all allowed: None, else why not (training.config.load_config refuses it).
    `lora`: the config's parsed adapters."""
    save = Path(cfg.save_path)
    if not resumes(cfg):
        return None
    tag, notes = resume_tag(save)  # with no `latest`, the newest complete checkpoint if there is one
    fresh = "or start a new run with \"resume\": false and \"overwrite_save_path\": true"
    if tag is None:
        named = latest_tag(save)
        if missing := not_a_checkpoint(save, named):
            return f"{save / 'latest'} names {named!r}, which {missing}; point it at a checkpoint directory {fresh}"
        if not (save / named / STATE_FILE).is_file():
            return (f"{save / named} has no {STATE_FILE} (written by an older version?): it cannot be "
                    f"resumed exactly; export it with pp_to_hg and train from that, {fresh}")
        return f"{notes[0]}, and no earlier checkpoint is intact; {fresh}"
    ckpt = save / tag
    saved = read_lora_info(ckpt)
    if (saved is None) != (cfg.lora is None):
        kind = "a LoRA checkpoint (adapters only)" if saved else "a full checkpoint"
        return (f"{ckpt} is {kind} but the config {'has no' if saved else 'has a'} 'lora' section; "
                f"use the same kind of run to resume it, {fresh}")
    if saved is not None:
        quant = saved_quantization(cfg.quantization)
        for key, value in (("r", lora.r), ("alpha", lora.alpha), ("target_modules", list(lora.target_modules)),
                           ("modules_to_save", list(lora.modules_to_save)), ("quantization", quant)):
            was = saved.get(key, [] if key != "quantization" else None)
            if was != value and not (f"lora.{key}" in UNORDERED and same_set(was, value)):
                name, same = (("'quantization'", "base quantization") if key == "quantization" else
                              (f"lora.{key}", "adapters"))
                return (f"{name} is {json.dumps(value)} but the checkpoint {ckpt} was trained with "
                        f"{json.dumps(saved.get(key))}; resume with the same {same}, {fresh}")
        if saved.get("base_fingerprint") and base_fingerprint(cfg.model_path) != saved["base_fingerprint"]:
            return (f"the model in model_path {cfg.model_path} is not the base the checkpoint {ckpt} "
                    "was trained on (its config.json or weights changed since: lora_config.json's "
                    f"base_fingerprint differs); a LoRA run resumes on its own base: restore it, {fresh}")
    if saved is None and (problem := model_config_problem(ckpt, cfg.model_path)):
        return f"{problem}, {fresh}"
    old = read_run_config(ckpt)
    if old is None:
        return None
    if saved is not None and saved.get("base_fingerprint") and "model_path" in old:  # the base proven the same above:
        old = {**old, "model_path": cfg.raw.get("model_path")}  # moved, renamed or spelt another way, it resumes
    try:  # a checkpoint with the fingerprint of its training rows: a data key's change is checked against it later
        state = json.loads((ckpt / STATE_FILE).read_text())
        fingerprinted, evaluated = state.get("data_fingerprint") is not None, bool(state.get("evals"))
        # the eval rows' fingerprint: their change (not the path's) is refused once the data are read
        evaluated = evaluated and saved_eval_fingerprint(state) is None
        saved_batch = state.get("global_batch")
    except (OSError, ValueError, AttributeError):
        fingerprinted, evaluated, saved_batch = False, True, None
    batch = cfg.ds_config.get("train_batch_size")  # micro x accumulation x replicas (derived when the world is known)
    changes = same_global_batch(config_changes(old, cfg.raw, lora_run=cfg.lora is not None),
                                batch is not None and saved_batch == batch)
    refused = refusals(changes, cfg.allow_data_change_on_resume,
                       compares_evals=evaluated and bool(cfg.keep_best or cfg.early_stopping_patience),
                       fingerprinted=fingerprinted)
    if refused:
        c = refused[0]
        more = f" (and {len(refused) - 1} more: {', '.join(r.key for r in refused[1:])})" if len(refused) > 1 else ""
        how = ("set \"allow_data_change_on_resume\": true to continue anyway (the data order is then not sample-exact), "
               "restore the old value" if c.kind in ("data", "samples") else "restore the old value")
        return (f"'{c.key}' changed since the checkpoint {ckpt / RUN_CONFIG_FILE} "
                f"({c.values()}): {c.note}{more}; "
                f"{how}, {fresh}")
    ds = cfg.ds_config  # with the world known, derive_batch has filled in every batch key
    micro, accum = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps")
    if None not in (batch, saved_batch, micro, accum) and batch != saved_batch and not cfg.allow_data_change_on_resume:
        # the batch keys as they were, another number of data-parallel replicas (model_topo, or the process count)
        return (f"cannot resume {ckpt} exactly: the global batch changed ({saved_batch} -> {batch}: {micro} per "
                f"micro-batch x {accum} accumulation steps x {batch // (micro * accum)} data-parallel replicas), so "
                "samples would be repeated or skipped; keep the global batch (e.g. scale gradient_accumulation_steps "
                "inversely to the data-parallel replicas), set \"allow_data_change_on_resume\": true to continue "
                f"anyway (the data order is then not sample-exact), {fresh}")
    return None
