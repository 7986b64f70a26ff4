"""The data side of the trainer: every record checked before anything is written or built, the data sets loaded on the
ranks that read them (one tokenizing rank per node, the others reading its cache or receiving its arrays), the
middle stages given the rows' lengths, and the steps' batches planned. A mixin of `training.trainer.Trainer`."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from data.dataset import recv_dataset, send_dataset
from data.encode import RUN_CACHE_DIR, cache_file, load_dataset, show_progress, valid_records
from data.packing import describe
from data.records import DataError, file_digests, read_files
from pipeft import module_command
from training.batches import DROP_LAST, BatchPlan, RowsView, row_trained
from training.checkpoint import fault_pause
from training.config import ConfigError
from training.evaluate import EvalPlan, training_and_eval_rows
from training.rundir import data_fingerprint


class _StopNow(BaseException):
    """Raised by a stop signal's handler while this rank tokenizes (`_stops_at_once`)."""


class StoppedInSetUp(Exception):
    """A stop signal reached a rank while it tokenized: every rank ends before training, with nothing to save."""


class TrainingData:
    """Validation, loading and sharing of the training and eval data (needs the Trainer's cfg, ranks and groups)."""

    stops: tuple = ()  # the signals that stop the run (set by setup)
    stop_signal: str | None = None  # the one received

    # validate_data's (files, records) by position in (data_path, eval_data_path): the node's builder encodes them
    _validated: dict[int, list] | None = None  # data set -> [files, records] (load_dataset's `validated`)

    def validate_data(self) -> None:
        """Check every record before anything is written or any model exists (raises DataError), in chat mode also what
        no chat template renders (data.encode.valid_records). Once per node: local rank 0 checks
        (Trainer._validate_data_together raises a problem on every rank). Not when rank 0 already refuses the run
        (cfg.refusal): the process group says so to every rank. Not when a cache of the data exists where
        `_load_datasets` would read it (data.encode.cache_file). The checked records are kept for `_load_datasets`,
        which encodes them without parsing the files again."""
        cfg = self.cfg
        if self.local_rank != 0 or cfg.refusal:
            return
        fault_pause("validate", 0)  # (tests: a check of the records longer than dist_timeout_minutes)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)  # for the cache key; setup keeps it
        validated = {}
        seen = set()
        for i, path in enumerate((cfg.data_path, cfg.eval_data_path)):
            if path is not None:
                cache = cache_file(file_digests(path), self.tokenizer, cfg.max_seq_len, cfg.data_cache_dir,
                                   cfg.template_settings, Path(cfg.save_path) / RUN_CACHE_DIR)
                if not cache.is_file() and cache not in seen:  # cached: they were valid records; seen: the same data
                    seen.add(cache)
                    files = read_files(path)  # (load_dataset keys its cache by these bytes)
                    validated[i] = [files, valid_records(files, cfg.template_settings, self.tokenizer)]
                    del files
        self._validated = validated

    def _setup_data(self) -> None:
        """Load (or receive) the data, check every node built the same, and plan the steps' batches."""
        cfg = self.cfg
        self.eval_fingerprint = None  # of the eval samples, set by _load_datasets on the ranks that read data
        self.dataset, self.eval_set = self._load_datasets()
        self.data_fingerprint = data_fingerprint(self.dataset) if self.reads_data else None
        self._share_rows()
        self._check_same_data()
        self.unit = "packed sequence" if cfg.packing else "sample"
        self.lengths = self.dataset.offsets[1:] - self.dataset.offsets[:-1]
        self.plan = BatchPlan(len(self.dataset), cfg.micro_batch, cfg.grad_accum, self.dp_size, cfg.seed, self.lengths,
                              cfg.group_by_length, cfg.ds_config.get("dataloader_drop_last", DROP_LAST),
                              cfg.pad_to_multiple_of, cfg.max_seq_len)
        if self.plan.steps_per_epoch == 0:  # before any layer is built
            raise ConfigError(f"{cfg.path}: {len(self.dataset)} {self.unit}s are fewer than one global batch "
                              f"({self.plan.global_batch} = micro x accumulation x data-parallel)" + (
                                  "; \"dataloader_drop_last\": false trains them as one smaller batch"
                                  if self.plan.drop_last and len(self.dataset) else ""))
        self.total_steps = cfg.max_steps or cfg.n_epoches * self.plan.steps_per_epoch
        self.tokens = row_trained(self.dataset)
        self.samples_per_row = self.dataset.segments_per_row() if cfg.packing else np.ones(len(self.dataset), np.int64)
        self.eval_plan = EvalPlan(self.eval_set, cfg.micro_batch, cfg.grad_accum, self.dp_size,
                                  cfg.pad_to_multiple_of, cfg.max_seq_len) if self.eval_set else None

    @contextlib.contextmanager
    def _stops_at_once(self) -> Iterator[None]:
        """Within it a stop signal ends the work at once (`_StopNow`): tokenizing a large data set takes minutes,
        where the run's handler would only note the signal for the first step (a launcher's SIGKILL comes first)."""
        def stop(signum, frame) -> None:  # noqa: ARG001
            self.stop_signal = signal.Signals(signum).name
            raise _StopNow

        before = {sig: signal.signal(sig, stop) for sig in self.stops}
        try:
            if self.stop_signal is not None:  # one received before
                raise _StopNow
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def _load_datasets(self):
        """(train, eval or None) on the ranks that read data (first and last pipeline stage); (None, None) on the
        others, which get the rows' lengths from `_share_rows`. On each node the first reading rank tokenizes (all
        cores, cached: beside the data, or in save_path/.data_cache when that cannot be written) while the node's
        other reading ranks wait without a deadline, then read the cache; where it could not be written, the builder
        sends them its arrays (no rank tokenizes a second time). A DataError stops every rank, not only the one that
        saw it. The eval split is taken from the samples before packing; with "packing" every reading rank packs the
        same way (seeded). The builder encodes the records validate_data checked (when it is that rank)."""
        cfg = self.cfg
        def load(path, validated=None):
            return load_dataset(path, self.tokenizer, cfg.max_seq_len, cfg.data_cache_dir, cfg.template_settings,
                                fallback_cache_dir=Path(cfg.save_path) / RUN_CACHE_DIR, validated=validated)
        paths = [p for p in (cfg.data_path, cfg.eval_data_path) if p is not None]
        node = [r for r in range(self.world) if self.readers[r] and self.hosts[r] == self.hosts[self.rank]]
        builder = min(node, default=None)
        validated, self._validated = self._validated or {}, None
        found, error, stopped = None, None, None
        if self.rank == builder:
            checked = [validated.pop(i, None) for i, p in enumerate((cfg.data_path, cfg.eval_data_path))
                       if p is not None]
            try:
                with self._stops_at_once(), show_progress():  # a cold start's "tokenizing N records on P processes",
                    found = [load(p, checked.pop(0)) for p in paths]  # then how far it is
                    fault_pause("data", 0)  # (tests: a tokenization longer than dist_timeout_minutes)
            except DataError as e:  # (a SIGTERM to every process ends the tokenizer workers too: "a process died")
                error, stopped = (None, self.stop_signal) if self.stop_signal is not None else (e, None)
            except _StopNow:
                stopped = self.stop_signal
        validated.clear()  # not the builder: records it checked are not needed
        # per rank: whether it failed, (builders) which data sets it could not cache, and the stop signal it got
        said = [None] * self.world
        unwritten = [bool(d.stats.cache_problem) for d in found or []]
        torch.distributed.all_gather_object(said, (error is not None, unwritten, stopped), group=self.patient)  # others wait
        if any(failed for failed, _, _ in said):
            raise error or DataError(["data: another process could not build the data set (see its error)"])
        if signals := [s for _, _, s in said if s]:
            raise StoppedInSetUp(signals[0])
        if not self.reads_data:
            return None, None
        sent = said[builder][1]
        if self.rank == builder:
            for dst in node[1:] if any(sent) else []:  # one receiver at a time
                for d, send in zip(found, sent, strict=True):
                    if send:
                        send_dataset(d, dst, self.patient)
        elif any(sent):
            found = [recv_dataset(builder, self.patient) if send else load(p) for p, send in zip(paths, sent, strict=True)]
        found = found if found is not None else [load(p) for p in paths]
        ds, eval_set = found[0], (found[1] if len(found) > 1 else None)
        s = ds.stats
        self.prompted = None if s.prompted is None else s.prompted > 0  # data_settings.json: pp_to_hg's template warning
        self.log(f"data: {s.records} records -> {s.kept} samples ({s.dropped} dropped: no trained token within "
                 f"max_seq_len {cfg.max_seq_len}; {s.truncated} truncated"
                 + (f"; {s.spliced} split at a prompt / answer boundary" if s.spliced else "")
                 + f"); cache {s.cache_status}")
        if s.special_text:
            self.log(f"warning: data: {s.special_text} record(s) hold the text of a special (or template) token of the tokenizer "
                     f"(first: {s.special_example}); it is read as that control token, as transformers and serving "
                     "stacks read it: an EOS or end-of-turn inside an answer trains the model to stop there. "
                     f"Check them with: {module_command('data.inspect')} --config CONFIG --stats")
        es = eval_set.stats if eval_set is not None else None  # of the eval file, before any split is added
        if eval_set is not None and len(eval_set) == 0:
            raise ConfigError(f"{cfg.path}: 'eval_data_path' {cfg.eval_data_path}: none of its {es.records} records is left "
                              f"for evaluation ({es.dropped} dropped: no trained token within max_seq_len {cfg.max_seq_len}); "
                              "fix the eval data or raise max_seq_len")
        try:
            ds, eval_set, samples, copies = training_and_eval_rows(ds, eval_set, cfg.eval_split_ratio, cfg.packing,
                                                                   cfg.max_seq_len, cfg.seed, count_copies=self.rank == 0)
        except ValueError as e:
            raise ConfigError(f"{cfg.path}: {e}") from None
        if eval_set is not None:
            # the samples, not the rows: packed otherwise, the same samples give the same token-mean loss
            # (segments see only themselves); split_long_pretrain's cuts move with max_seq_len, and overlap by one
            # token ("o1": eval losses of the earlier, non-overlapping cuts do not rank against these)
            self.eval_fingerprint = data_fingerprint(samples) + (f"/{cfg.max_seq_len}o1" if cfg.split_long_pretrain else "")
            where = [] if es is None else [f"{cfg.eval_data_path}: {es.records} records -> {es.kept} samples, "
                                           f"{es.dropped} dropped (no trained token within max_seq_len "
                                           f"{cfg.max_seq_len}), {es.truncated} truncated"]
            if cfg.eval_split_ratio is not None:
                where.append(f"{cfg.eval_split_ratio:g} of the training samples")
            self.log(f"eval data: {len(samples)} samples ({' + '.join(where)})"
                     + (f", packed into {len(eval_set)} rows" if cfg.packing else ""))
            if copies:
                self.log(f"warning: {copies} of the {len(samples)} eval samples are training samples too (the same "
                         "tokens: a record given twice, e.g. copied to weight a file, or in both data_path and "
                         "eval_data_path): the eval loss measures text the model trains on; remove the copies")
        if cfg.packing:
            self.log(describe(ds.stats))
        return ds, eval_set

    def _share_rows(self) -> None:
        """Middle pipeline stages read no data: rank 0 (a first stage) sends them the rows' lengths, trained tokens
        and segment counts, and its data fingerprints (they need nothing else of the data)."""
        if self.pp_size <= 2:
            return
        payload = [None]
        if self.rank == 0:
            payload = [(RowsView.of(self.dataset), None if self.eval_set is None else RowsView.of(self.eval_set),
                        self.data_fingerprint, self.eval_fingerprint)]
            self.log(f"data: read by the first and last pipeline stages; the {self.pp_size - 2} middle stage(s) get the "
                     "rows' lengths only")
        torch.distributed.broadcast_object_list(payload, src=0)
        if not self.reads_data:
            self.dataset, self.eval_set, self.data_fingerprint, self.eval_fingerprint = payload[0]
