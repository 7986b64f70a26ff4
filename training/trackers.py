"""Experiment trackers (the config key `report_to`, HF Trainer's name): TensorBoard, Weights & Biases, MLflow.

Every tracker gets, for each metrics.jsonl line, the scalars `scalars(line)` builds from it, so all of them
hold the same numbers as the file (wandb and MLflow also keep the values of the steps a resume repeats). Each
tracker's package is imported only when the config asks for it; a tracker that fails to start or to log is
turned off with one warning line and never stops training. The ids of the wandb and MLflow runs are kept in
save_path/trackers.json so that a resumed run appends to the same run; a run that ends with an error is marked
failed there (wandb exit code 1, MLflow status FAILED).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import math
import os
import secrets
from pathlib import Path

from pipeft import one_line

log = logging.getLogger(__name__)

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}  # name (= module) -> pip package
IDS_FILE = "trackers.json"
MLFLOW_PARAM_MAX = 6000  # MLflow's longest param value (characters)
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
# a request gives up in ~3 s when the server is down (connection refused: retries after 0 and 2 s, +0-1 s jitter
# each), ~35 s when it hangs, and does not wait out a 429 / 503's Retry-After; MLflow's (7, 2, 120, honoured):
# ~4 min, ~20 min, and Retry-After seconds per retry
# what an MLflow tracker sets in the environment (set_tracking_uri and set_experiment write theirs there too): put back
# as it was when it closes, so that a next run in the same process (a notebook's) does not take them for the user's
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE", *MLFLOW_HTTP)


def parse_report_to(value: object) -> tuple[str, ...]:
    """The trackers a `report_to` value names ("none" or [] : none); ValueError with a one-line message for an
    unknown name or a tracker whose package is not installed."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"'report_to' must be a tracker name or a list of them ({', '.join(TRACKERS)}, none), "
                         f"got {json.dumps(value)}")
    for name in names:
        if name not in (*TRACKERS, "none"):
            close = difflib.get_close_matches(name, [*TRACKERS, "none"], n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(TRACKERS)}, none)"
            raise ValueError(f"'report_to' {name!r} is not a tracker{hint}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"'report_to' {json.dumps(value)}: \"none\" cannot be combined with trackers")
    chosen = tuple(dict.fromkeys(n for n in names if n != "none"))
    for name in chosen:
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"'report_to' {name} needs `pip install {TRACKERS[name]}` (or `pip install .[trackers]`)")
    return chosen


def scalars(rec: dict) -> dict[str, float]:
    """The tracker scalars of one metrics.jsonl line: each finite number but `step` (the x axis) and `time` (every
    tracker stamps its own), as train/KEY, eval_KEY as eval/KEY, and peak_memory (bytes per stage) as
    memory/peak_gib_stageK."""
    out = {}
    for key, value in rec.items():
        if key == "peak_memory":
            out.update({f"memory/peak_gib_stage{k}": peak / 2**30 for k, peak in enumerate(value)
                        if isinstance(peak, (int, float)) and math.isfinite(peak)})  # as every number: finite only
        elif (key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)):
            out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, JSON values (lists, null) or plain strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (value if isinstance(value, str) else json.dumps(value))[:MLFLOW_PARAM_MAX]
    return out


class TensorBoard:
    """Event files under save_path/runs; a resumed run drops the events after its checkpoint (purge_step)."""

    def __init__(self, save: Path, start_step: int, ids: dict, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(save / "runs"), purge_step=start_step + 1)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandB:
    """A wandb run: project WANDB_PROJECT (default "pipeft"), name WANDB_NAME (default save_path's name), files
    under WANDB_DIR (default save_path), the config as its config; `train/step` is every chart's x axis, so the
    steps a resumed run repeats after its checkpoint are plotted again instead of being refused by wandb."""

    def __init__(self, save: Path, start_step: int, ids: dict, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pipeft"),
                              name=os.environ.get("WANDB_NAME", save.resolve().name),
                              dir=os.environ.get("WANDB_DIR", str(save)), config=config, resume="allow",
                              id=(ids.get("wandb") if start_step > 0 else None) or secrets.token_hex(4))
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        ids["wandb"] = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "train/step": step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


DEFAULT_STORE = "save_path/mlruns"  # trackers.json's name of MLflow's default store (a moved run's store moved too)


class MLflow:
    """An MLflow run in MLFLOW_TRACKING_URI (default: a file store in save_path/mlruns), experiment
    MLFLOW_EXPERIMENT_NAME (default "pipeft"), run name save_path's name; the config as params (a resumed run
    adds the params it did not have: MLflow keeps a param's first value). Its requests, from start to close, give up
    in seconds (MLFLOW_HTTP, unless the user set them): a server that is down turns the tracker off, not training."""

    def __init__(self, save: Path, start_step: int, ids: dict, config: dict):
        import mlflow

        self.env, self.uri = {k: os.environ.get(k) for k in MLFLOW_ENV}, mlflow.get_tracking_uri()  # the caller's
        given = os.environ.get("MLFLOW_TRACKING_URI")
        uri = given or (save / "mlruns").resolve().as_uri()
        where = given or DEFAULT_STORE  # as trackers.json keeps it: the default store moves with save_path
        if uri.startswith("file:") or "://" not in uri:  # the file store is in maintenance mode: MLflow asks to opt in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        stored = ids.get("mlflow") or {}
        os.environ.update({k: v for k, v in MLFLOW_HTTP.items() if k not in os.environ})  # quick requests
        run = None
        try:
            if start_step > 0 and stored.get("tracking_uri") in (where, uri):  # (uri: as earlier versions kept it)
                run = mlflow.start_run(run_id=stored["run_id"])
            else:
                # the experiment by id, not mlflow.set_experiment: that one is process-wide (a caller's own
                # start_run afterwards looked for it in the caller's store)
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "pipeft")
                found = mlflow.get_experiment_by_name(name)
                exp = found.experiment_id if found is not None else mlflow.create_experiment(name)
                run = mlflow.start_run(experiment_id=exp, run_name=save.resolve().name)
            ids["mlflow"] = {"run_id": run.info.run_id, "tracking_uri": where}
            have = mlflow.get_run(run.info.run_id).data.params
            mlflow.log_params({k: v for k, v in flat_params(config).items() if k not in have})
        except BaseException:  # the run started here (not one of the caller's) is ended, failed, while the short
            # settings hold; then the environment as it was
            if run is not None:
                with contextlib.suppress(Exception):
                    mlflow.end_run(status="FAILED")
            self._restore()
            raise
        self.mlflow = mlflow

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self, failed: bool = False) -> None:
        """End the run (MLflow takes it off its active runs before telling the server, so a server that is down
        leaves none open), then the environment as it was before the tracker started (MLFLOW_ENV)."""
        try:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
        finally:
            self._restore()

    def _restore(self) -> None:
        """The caller's tracking URI (set_tracking_uri is process-wide) and environment (MLFLOW_ENV) back."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        restore_env(self.env)


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as `saved` holds them (None: unset). The MLflow tracker's MLFLOW_HTTP settings
    (those the user did not set) hold from its start to its close, not around each call: a server that is down
    fails in seconds, not MLflow's ~4 minutes of 7 retries (at start the other ranks wait for rank 0, mid-run a log
    call stalled training), and os.environ is not safe to change while other threads (the prefetch) read it."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


SINKS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(names: tuple[str, ...], save: Path, start_step: int, config: dict) -> dict[str, object]:
    """Start the named trackers (rank 0 only): name -> tracker. A resumed run (start_step > 0) continues the runs
    named in save_path/trackers.json; a tracker that fails to start is left out with one warning line."""
    ids_path = save / IDS_FILE
    try:
        ids = json.loads(ids_path.read_text()) if start_step > 0 and ids_path.is_file() else {}
    except (OSError, ValueError):  # unreadable: new runs
        ids = {}
    sinks = {}
    for name in names:
        try:
            sinks[name] = SINKS[name](save, start_step, ids, config)
        except Exception as e:  # noqa: BLE001 -- login, network, a broken install: report, keep training
            log.warning("report_to %s off: it failed to start (%s)", name, one_line(e, named=True))
    if ids:
        from training.checkpoint import atomic_write_text  # (torch: imported where a tracker runs)

        try:
            atomic_write_text(ids_path, json.dumps(ids, indent=1) + "\n")
        except OSError as e:  # a full disk: the trackers still log; only a resume's continuation is lost
            log.warning("report_to: %s not written (%s): a resume of this run may not continue these tracker runs",
                        ids_path, one_line(e, named=True))
    return sinks


