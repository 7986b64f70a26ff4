"""`report_to`: TensorBoard, wandb (offline mode) and MLflow (a file store) hold exactly the scalars of
metrics.jsonl, read back with each tool's own reader; a resumed run appends to the same wandb / MLflow run;
a bad value or a missing package is one line at load_config. Nothing here touches the network."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ops_config, run_deepspeed
from training.config import ConfigError, load_config
from training.monitor import Monitor, truncate_metrics
from training.trackers import IDS_FILE, MLFLOW_ENV, MLFLOW_HTTP, scalars

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}


@pytest.fixture
def offline(monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for key, value in {**OFFLINE, "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def mlflow_http_unset():
    """No MLFLOW_HTTP_REQUEST_* setting of the user's during the test, and none left after it whatever the tracker
    did (monkeypatch would not undo what the code under test set)."""
    saved = {key: os.environ.pop(key) for key in MLFLOW_HTTP if key in os.environ}
    yield
    for key in MLFLOW_HTTP:
        os.environ.pop(key, None)
    os.environ.update(saved)


def wandb_history(save: Path, exits: list | None = None) -> tuple[set[str], list[dict]]:
    """(run ids, history rows) of every offline wandb run under save/wandb, oldest first (their exit codes appended
    to `exits`). wandb ships no reader for
    its offline files: they are LevelDB-log framed (32 KiB blocks, 7-byte record headers, after a 7-byte ':W&B'
    file header) wandb_internal_pb2.Record messages, read here with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids, rows, exits = set(), [], [] if exits is None else exits
    for path in sorted(save.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, part = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # block trailer
                pos += 32768 - pos % 32768
                continue
            _, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
            part, pos = part + data[pos + 7:pos + 7 + size], pos + 7 + size
            if kind in (1, 4):  # FULL or LAST: a whole record
                rec = pb.Record.FromString(part)
                part = b""
                if rec.WhichOneof("record_type") == "run":
                    ids.add(rec.run.run_id)
                elif rec.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
                elif rec.WhichOneof("record_type") == "exit":
                    exits.append(rec.exit.exit_code)
    return ids, rows


def series_of(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] of what every tracker must hold: scalars() of each metrics.jsonl line."""
    out: dict[str, list] = {}
    for line in lines:
        for key, value in scalars(line).items():
            out.setdefault(key, []).append((line["step"], value))
    return out


def wandb_series(save: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list] = {}
    for row in wandb_history(save)[1]:
        for key, value in row.items():
            if not key.startswith("_") and key != "train/step":
                out.setdefault(key, []).append((row["train/step"], value))
    return out


def mlflow_run(save: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((save / "mlruns").resolve().as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, runs
    run = runs[0]
    series = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                      key=lambda m: (m.step, m.timestamp))]
              for key in run.data.metrics}
    return run, series


def assert_same(got: dict, want: dict, rel: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for key, values in want.items():
        assert [s for s, _ in got[key]] == [s for s, _ in values], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in values], rel=rel, abs=0), key


def test_scalars_of_a_line():
    line = {"step": 4, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "tokens": 96, "epoch": 0, "skipped": True,
            "peak_memory": [2**30, 2**29], "eval_loss": 700.5, "eval_ppl": math.inf, "time": 3.25}
    assert scalars(line) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 96.0, "train/epoch": 0.0,
                             "memory/peak_gib_stage0": 1.0, "memory/peak_gib_stage1": 0.5, "eval/loss": 700.5}


@pytest.mark.parametrize("value, message", [
    ("wandbb", "'report_to' 'wandbb' is not a tracker; did you mean 'wandb'?"),
    (["none", "mlflow"], "'report_to' [\"none\", \"mlflow\"]: \"none\" cannot be combined with trackers"),
    (5, "'report_to' must be str or list, got 5"),
    ([1], "'report_to' must be a tracker name or a list of them (tensorboard, wandb, mlflow, none), got [1]"),
    ("@missing", "'report_to' wandb needs `pip install wandb` (or `pip install .[trackers]`)"),
])
def test_bad_report_to_is_one_line_at_load(tmp_path, monkeypatch, value, message):
    if value == "@missing":
        monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: the import system finds no spec
        value = ["tensorboard", "wandb"]
    (tmp_path / "model").mkdir()
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_path": str(tmp_path / "model"), "save_path": str(tmp_path / "out"),
                               "data_path": str(tmp_path / "d.jsonl"), "train_micro_batch_size_per_gpu": 1,
                               "report_to": value}))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, require_model=False)
    assert str(e.value) == f"{cfg}: {message}"


def test_a_resumed_run_appends_to_the_same_wandb_and_mlflow_runs(tmp_path, offline):
    """Two Monitors on one save_path, the second starting at step 2 as a resumed run does: one run each, also when
    save_path was moved in between (MLflow's default store, save_path/mlruns, moved with it)."""
    save = tmp_path / "run"
    save.mkdir()
    config = {"model_path": "m", "lora": {"r": 4, "target_modules": ["q_proj"]}, "max_steps": 4}
    for start, steps in ((0, (1, 2)), (2, (3, 4))):
        monitor = Monitor(save, 0, 4, start, 1, ["wandb", "mlflow"], config)
        assert set(monitor.trackers) == {"wandb", "mlflow"}
        for step in steps:
            monitor.step({"step": step, "loss": 1.0 / step, "lr": 0.1 * step, "grad_norm": 0.5, "tokens": 10})
        monitor.close()
        config = {**config, "max_steps": 6}  # a change on resume: MLflow keeps the first value
        if start == 0:  # (the run keeps its name, its first save_path's)
            save = save.rename(tmp_path / "moved")
    lines = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    ids, _ = wandb_history(save)
    assert len(ids) == 1 and ids == {json.loads((save / IDS_FILE).read_text())["wandb"]}
    assert len(list(save.glob("wandb/offline-run-*"))) == 2
    assert_same(wandb_series(save), series_of(lines))
    run, series = mlflow_run(save)
    assert_same(series, series_of(lines))
    assert run.data.params == {"model_path": "m", "lora.r": "4", "lora.target_modules": '["q_proj"]', "max_steps": "4"}
    assert run.info.run_name == "run" and run.info.status == "FINISHED"


def test_tokens_per_s_times_the_step_not_an_evaluation_or_save_after_the_last(tmp_path, capsys):
    """A step's `step_s` (its data wait and train_batch) times its tokens/s and the progress line's; the time an
    evaluation or checkpoint took between two steps does not count."""
    import time

    monitor = Monitor(tmp_path, 0, 4, 0, 2, "none")
    for step in (1, 2):
        time.sleep(0.2)  # an evaluation and a save
        monitor.step({"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 100, "step_s": 0.01})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["tokens_per_s"] for line in lines] == [10_000, 10_000]
    assert "| 10,000 tok/s |" in capsys.readouterr().out


def test_a_resumed_run_logs_on_the_steps_of_the_interval(tmp_path, capsys):
    """Progress lines (and the trainer's peak_memory, on the same steps: `log_now`) fall on the multiples of
    log_interval, as in a run never stopped: a run resumed from step 5 logged steps 5, 7 and 8."""
    monitor = Monitor(tmp_path, 0, 8, 5, 2, "none")
    for step in (6, 7, 8):
        monitor.step({"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 100, "step_s": 0.01})
    said = [line.split(" |")[0] for line in capsys.readouterr().out.splitlines()]
    assert said == ["step 6/8", "step 8/8"]


def test_a_run_that_fails_is_marked_failed(tmp_path, offline):
    """Monitor.close(failed=True), as train_ds.py's run() closes on an exception: wandb exit code 1, MLflow FAILED."""
    monitor = Monitor(tmp_path, 0, 4, 0, 1, ["wandb", "mlflow"], {"max_steps": 4})
    monitor.step({"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 10})
    monitor.close(failed=True)
    exits = []
    wandb_history(tmp_path, exits)
    assert exits == [1]
    assert mlflow_run(tmp_path)[0].info.status == "FAILED"


def test_trackers_ids_that_cannot_be_written_are_a_warning_not_a_traceback(tmp_path, offline, caplog):
    """save_path/trackers.json unwritable (a full disk; here a directory in its place): rank 0 raised at its start,
    the other ranks waited. The trackers run on, and a resume says it starts new tracker runs."""
    (tmp_path / IDS_FILE).mkdir()
    monitor = Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
    assert set(monitor.trackers) == {"mlflow"}
    monitor.step({"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 10})
    monitor.close()
    assert f"report_to: {tmp_path / IDS_FILE} not written (IsADirectoryError" in caplog.text
    assert mlflow_run(tmp_path)[0].info.status == "FINISHED"
    assert not list(tmp_path.glob(f".{IDS_FILE}*"))  # no temporary file left


def test_an_unreachable_mlflow_server_is_given_up_after_two_retries(tmp_path, offline, mlflow_http_unset, monkeypatch,
                                                                     caplog):
    """README: a tracker that cannot start is one warning line and training goes on. MLflow's own default retries a
    refused connection 7 times with backoff (~4 minutes on rank 0 while the other ranks wait; a short
    dist_timeout_minutes ended the run): the run's default is 2 retries (MLflow's come back when a start fails); a
    value the user set stands."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the discard port: connection refused
    with caplog.at_level("WARNING"):
        monitor = Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
    assert monitor.trackers == {}
    retries = [r for r in caplog.records if r.getMessage().startswith("Retrying")]
    assert len(retries) <= 2, [r.getMessage()[:80] for r in retries]  # MLflow's default: 7
    assert [r.getMessage()[:40] for r in caplog.records if r.name == "training.trackers"] == [
        "report_to mlflow off: it failed to start"]
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # a failed start leaves MLflow's settings
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.clear()
    with caplog.at_level("WARNING"):
        Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
    assert not [r for r in caplog.records if r.getMessage().startswith("Retrying")]


def strict_json(line: str) -> dict:
    """json.loads as jq / JSON.parse read a line: NaN, Infinity and -Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_numbers_are_null_in_metrics_jsonl(tmp_path):
    """A NaN / inf loss, grad norm, perplexity or peak is written as null (bare NaN / Infinity is not JSON: jq and
    JSON.parse refused the line); the trackers get the finite numbers only, as before."""
    monitor = Monitor(tmp_path, 0, 4, 0, 1, "none")
    monitor.step({"step": 1, "loss": math.nan, "lr": 0.1, "grad_norm": math.inf, "tokens": 10, "skipped": True,
                  "peak_memory": [2.0**30, -math.inf]})
    monitor.write({"step": 1, "eval_loss": 800.0, "eval_ppl": math.inf})
    lines = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["loss"], line["grad_norm"], line["peak_memory"]) for line in lines[:1]] == [(None, None, [2.0**30, None])]
    assert lines[1]["eval_ppl"] is None and lines[1]["eval_loss"] == 800.0
    assert scalars(lines[0]) == {"train/lr": 0.1, "train/tokens": 10.0, "train/tokens_per_s": lines[0]["tokens_per_s"],
                                 "memory/peak_gib_stage0": 1.0}


def test_time_goes_on_across_a_resume(tmp_path):
    """A resumed run's `time` continues from the checkpoint's last line (it restarted at 0: plots against it broke)."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "time": 100.0 * s}) + "\n" for s in (1, 2, 3, 4))
                                            + '{"step": 5, "time": 9')  # half-written when the run was killed
    truncate_metrics(tmp_path / "metrics.jsonl", 3)
    resumed = Monitor(tmp_path, 0, 6, 3, 1, "none")
    resumed.step({"step": 4, "loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens": 1})
    times = [json.loads(line)["time"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert times[:3] == [100.0, 200.0, 300.0] and 300.0 <= times[3] < 310.0, times
    assert resumed.time_before == 300.0 and time.time() - resumed.t0 < 10  # elapsed and eta: this process's


def test_a_resume_rewrites_metrics_by_a_rename_and_only_when_it_drops_lines(tmp_path):
    """Rewritten in place, a metrics.jsonl of a long run was emptied by a kill during the rewrite at a (re)start."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    before = path.stat()
    truncate_metrics(path, 4)  # a resume at the last step: nothing to drop, nothing written
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    truncate_metrics(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert path.stat().st_ino != before.st_ino and not list(tmp_path.glob(".metrics*"))  # a new file, renamed


class FakeMlflowServer:
    """The few MLflow REST calls of a run (experiment by name, create / get / update a run, log-batch) on a localhost
    port, in a thread: `mlflow server` needs the full mlflow package, and takes seconds to start. `stop()` closes the
    port, as a server that goes down does (connection refused). The paths in `refuse` are answered 400, those in
    `throttle` (a set, changed as it runs) 429 with a Retry-After of an hour (a rate-limited server)."""

    def __init__(self, refuse: tuple[str, ...] = ()):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        run = {"info": {"run_id": "0" * 32, "run_uuid": "0" * 32, "experiment_id": "1", "run_name": "run",
                        "status": "RUNNING", "start_time": 1, "lifecycle_stage": "active", "artifact_uri": ""},
               "data": {}}
        replies = {"experiments/get-by-name": {"experiment": {"experiment_id": "1", "name": "pipeft",
                                                              "lifecycle_stage": "active"}},
                   "runs/create": {"run": run}, "runs/get": {"run": run}, "runs/update": {"run_info": run["info"]}}
        self.calls, self.throttle = [], set()

        class Handler(BaseHTTPRequestHandler):
            def reply(handler):
                handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                path = handler.path.split("?")[0].split("/mlflow/", 1)[-1]
                self.calls.append(path)
                body = json.dumps(replies.get(path, {})).encode()
                throttled = path in self.throttle
                handler.send_response(400 if path in refuse else 429 if throttled else 200)
                if throttled:
                    handler.send_header("Retry-After", "3600")
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            do_GET = do_POST = do_PATCH = reply

            def log_message(handler, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def step_within_a_minute(monitor, step: int, why: str) -> None:
    """monitor.step for `step` in this (the main) thread, under a 60 s alarm that raises `why` as a BaseException
    (Monitor.write would take an Exception for the tracker's failure)."""
    import signal

    class Stalled(BaseException):
        pass

    def stalled(*_):
        raise Stalled(why)

    before = signal.signal(signal.SIGALRM, stalled)  # the main thread: MLflow's active run is thread-local
    try:
        signal.alarm(60)
        monitor.step({"step": step, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 10})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def test_an_mlflow_server_that_goes_down_mid_run_costs_seconds(tmp_path, offline, mlflow_http_unset, monkeypatch,
                                                               caplog):
    """The tracking server goes down after the run started: the next log call gave up after MLflow's 7 retries with
    backoff (~4 minutes with training stalled); it now fails as fast as at start (2 retries), one warning line, and
    training goes on. The bound is generous (a refused connection fails in ~3 s) so that a slow machine cannot flake:
    what it catches is minutes. The run's HTTP settings stand from start to close (then MLflow's come back); the
    tracker turned off is closed at once, as fast, with its run."""
    import time

    server = FakeMlflowServer()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monitor = Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
    assert set(monitor.trackers) == {"mlflow"} and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    monitor.close()
    assert "runs/update" in server.calls and not set(MLFLOW_HTTP) & set(os.environ)
    monitor = Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
    monitor.step({"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 10})
    assert server.calls[-1] == "runs/log-batch" and set(monitor.trackers) == {"mlflow"}
    server.stop()
    start = time.monotonic()
    with caplog.at_level("WARNING"):
        step_within_a_minute(monitor, 2, "a log call to a server that is down still blocks after 60 s (MLflow's "
                                         "default: ~4 minutes)")
    assert time.monotonic() - start < 60 and monitor.trackers == {}
    assert [r.getMessage()[:45] for r in caplog.records if r.name == "training.monitor"] == [
        "report_to mlflow off: it failed to log step 2"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # metrics.jsonl has every step
    import mlflow

    # the tracker turned off was closed (fast too): no run left open (MLflow's atexit end_run would wait ~4 minutes
    # with its own settings; a next run in this process could not start its own), the environment as before
    assert mlflow.active_run() is None and time.monotonic() - start < 60
    assert not set(MLFLOW_HTTP) & set(os.environ) and os.environ["MLFLOW_TRACKING_URI"] == server.uri


def test_a_rate_limited_mlflow_server_costs_seconds_not_its_retry_after(tmp_path, offline, mlflow_http_unset,
                                                                          monkeypatch, caplog):
    """A server that answers 429 with Retry-After: 3600: MLflow's HTTP retries honour the header by default, so the
    log call would block training an hour per retry; the run's settings turn that off (unless the user set
    MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER), so it gives up after its 2 quick retries and the tracker is off."""
    import time

    server = FakeMlflowServer()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monitor = Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
    assert set(monitor.trackers) == {"mlflow"}
    server.throttle.add("runs/log-batch")  # from the first step on
    logged = server.calls.count("runs/log-batch")  # the params, at start
    start = time.monotonic()
    try:
        with caplog.at_level("WARNING"):
            step_within_a_minute(monitor, 1, "a log call to a rate-limited server still blocks after 60 s (its "
                                             "Retry-After: an hour)")
    finally:
        server.stop()
    assert time.monotonic() - start < 60 and monitor.trackers == {}
    assert server.calls.count("runs/log-batch") - logged == 3  # the call and its 2 retries
    assert [r.getMessage()[:45] for r in caplog.records if r.name == "training.monitor"] == [
        "report_to mlflow off: it failed to log step 1"]


def test_an_mlflow_run_started_by_a_tracker_that_then_fails_to_start_is_ended(tmp_path, offline, mlflow_http_unset,
                                                                             monkeypatch):
    """The server creates the run, then refuses its params (400): the tracker is off, and its run was left active in
    the process (a next in-process run could not start its tracker; MLflow's atexit end_run retried for minutes)."""
    import mlflow

    server = FakeMlflowServer(refuse=("runs/log-batch",))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:
        assert Monitor(tmp_path, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4}).trackers == {}
        assert mlflow.active_run() is None and server.calls[-1] == "runs/update"  # ended, FAILED
    finally:
        server.stop()


def test_a_tracker_that_cannot_start_leaves_the_callers_own_mlflow_run_alone(tmp_path, offline, mlflow_http_unset):
    """A notebook with its own active MLflow run: the tracker's start_run refuses (a run is already active), the
    tracker is off with one warning, and the caller's run stays active and running in the caller's tracking URI (it
    was ended as FAILED, and the process-wide tracking URI was left the tracker's)."""
    import mlflow

    uri = (tmp_path / "mine").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    mine = mlflow.start_run()
    try:
        assert Monitor(tmp_path / "out", 0, 4, 0, 1, ["mlflow"], {"max_steps": 4}).trackers == {}
        assert mlflow.active_run().info.run_id == mine.info.run_id and mlflow.get_tracking_uri() == uri
        assert mlflow.get_run(mine.info.run_id).info.status == "RUNNING"
    finally:
        mlflow.end_run()


def test_a_closed_mlflow_tracker_leaves_the_environment_as_it_found_it(tmp_path, offline, mlflow_http_unset):
    """Two runs in one process (a notebook's): MLflow's set_tracking_uri and set_experiment write to os.environ, and
    the second run took the first one's file store for the user's MLFLOW_TRACKING_URI (its runs went into the first
    save_path's mlruns, which overwrite_save_path of that run deletes)."""
    before = {k: os.environ.get(k) for k in MLFLOW_ENV}
    for name in ("a", "b"):
        monitor = Monitor(tmp_path / name, 0, 4, 0, 1, ["mlflow"], {"max_steps": 4})
        monitor.step({"step": 1, "loss": 1.0, "lr": 0.1, "grad_norm": 0.5, "tokens": 10})
        monitor.close()
        assert {k: os.environ.get(k) for k in MLFLOW_ENV} == before
    assert [mlflow_run(tmp_path / name)[0].info.status for name in ("a", "b")] == ["FINISHED"] * 2  # one run each


def test_overwrite_clears_the_previous_runs_outputs(tmp_path):
    """overwrite_save_path: the old run's checkpoints, metrics, events and tracker files go; side files stay."""
    from training.rundir import RUN_OUTPUTS, clear_run

    save = tmp_path / "save"
    for name in ("global_step3", "runs", "mlruns"):
        (save / name / "sub").mkdir(parents=True)
    for name in ("latest", "best", "metrics.jsonl", IDS_FILE, "config.json"):
        (save / name).write_text("x")
    (tmp_path / "big_disk" / "run-1").mkdir(parents=True)
    (save / "wandb").symlink_to(tmp_path / "big_disk")  # the link goes, what it points to stays (rmtree refused it)
    assert clear_run(save, ["global_step3"]) == ["global_step3", "latest", "best", "metrics.jsonl", "runs", IDS_FILE,
                                                 "wandb", "mlruns"]
    assert [p.name for p in save.iterdir()] == ["config.json"] and {IDS_FILE, "wandb", "mlruns"} <= set(RUN_OUTPUTS)
    assert (tmp_path / "big_disk" / "run-1").is_dir()


@pytest.mark.distributed
def test_report_to_every_tracker_holds_the_metrics_lines(tmp_path, ops_model, offline):
    """One 2-stage run with all three trackers and an evaluation at the end (a line of its own)."""
    cfg = ops_config(tmp_path, ops_model, max_steps=3, eval_data_path=str(ops_model / "eval.jsonl"),
                     report_to=["tensorboard", "wandb", "mlflow"])
    run_deepspeed("train_ds.py", ["--config", str(cfg)], env=OFFLINE)
    save = tmp_path / "out"
    lines = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 3] and "eval_loss" in lines[-1]
    assert all(line["tokens_per_s"] == pytest.approx(line["tokens"] / line["step_s"], rel=1e-3) for line in lines[:3])
    want = series_of(lines)
    assert {"train/loss", "train/tokens_per_s", "memory/peak_gib_stage1", "eval/loss", "eval/ppl"} <= set(want)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save / "runs"))
    events.Reload()
    tb = {key: [(e.step, e.value) for e in events.Scalars(key)] for key in events.Tags()["scalars"]}
    assert_same(tb, want, rel=1e-6)  # float32 in the event files
    assert_same(wandb_series(save), want)
    run, series = mlflow_run(save)
    assert_same(series, want)
    assert run.data.params["model_topo.process_topology.dims"] == "[2, 1]"
