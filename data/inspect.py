"""Show the exact tokens and labels the model will see for one record, or statistics of the whole data.

    python -m data.inspect --config CFG.json --index N|FILE:LINE [--json]
    python -m data.inspect --config CFG.json --stats [--json]

Trained tokens are shown in green on a terminal and between [[ ]] otherwise (every trained span of
a conversation: each answer with its EOS), under the record's number and its FILE:LINE (the place warnings and
errors name, which --index takes too); trained as the loss counts them (data.packing.trained_mask): never
a sample's first token, which nothing predicts though it has a label (a tokenizer that adds no BOS). With
--json, stdout holds only {"input_ids": [...], "labels": [...]} of the record's own (unpacked) sample, or the
statistics as one object. --stats: token-length percentiles, the fraction of samples truncated, the fraction
of tokens trained, and the packing efficiency (trained tokens / total tokens of the padded sequences, packed
when the config packs, and unpacked for comparison; beside it the share of tokens that is not padding). With
"packing": true, --index shows the whole packed sequence holding the record, one block per segment; for a
record split_long_pretrain cut into chunks, the sequence of its first chunk, and which sequences hold the
others. Bad data: one line per problem on stderr, exit 2. The statistics also count
the samples whose tokens were split at a prompt / answer boundary (data.boundary). `python data/inspect.py`
works too: run as a file, it re-runs itself as the module, so this file never shadows the standard library's
`inspect` (which its imports load).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:  # `python data/inspect.py`: data/ is sys.path[0]
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]
    import runpy

    runpy.run_module("data.inspect", run_name="__main__", alter_sys=True)
    sys.exit(0)

import argparse
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data.dataset import EncodedDataset
from data.encode import RUN_CACHE_DIR, load_dataset
from data.packing import PackedDataset, chunk_counts, pack, trained_mask, trained_tokens
from data.records import DataError, parse_records, resolve_files
from data.tokenizer_checks import vocab_size_problem, vocabulary_problem
from pipeft import module_command

PROG = module_command("data.inspect")  # as the user runs it, in usage and errors
GREEN, RESET = "\033[32m", "\033[0m"
PERCENTILES = (50, 90, 95, 99, 100)
SHOWN_ROWS = 20  # the packed sequences named for the other chunks of a record split_long_pretrain cut


def _vocab_size(model_path: Path) -> int | None:
    """The model's vocab_size as training reads it (its config.json through transformers: a family's default where
    the file has none); None where model_path holds no model config (inspect needs only a tokenizer there)."""
    from models.convert import family_of
    from models.hf_io import CheckpointError
    from models.pipeline import ModelConfigError

    try:
        return family_of(model_path)[1].vocab_size
    except (CheckpointError, ModelConfigError, OSError, ValueError):
        return None


PLACE = re.compile(r"(?P<file>.+):(?P<at>\d+(?: \(record \d+\))?)")  # FILE:LINE, or a one-line array's FILE:1 (record K)


def _starts(path: Path) -> Iterator[Any]:
    """The line each record of data file `path` starts at, in order (the data are valid: checked), as warnings and
    errors name it. JSON Lines are read line by line (a record is a line with text: the parser's rule), never whole;
    other formats are parsed."""
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8-sig", newline="\n") as f:  # lines split at \n only, as the parser splits them
            yield from (n for n, line in enumerate(f, 1) if line.strip())
    else:
        yield from (r.line for r in parse_records(path, path.read_bytes())[0])


def record_places(data_path: Any, wanted: set[int]) -> dict[int, str]:
    """FILE:LINE of the records numbered `wanted` (0-based, in file order: training's numbers), as warnings and errors
    name them. The data files are read one at a time, up to the last record wanted."""
    places, first, todo = {}, 0, set(wanted)
    for path in resolve_files(data_path):
        if not todo:
            break
        for n, line in enumerate(_starts(path), first):
            if n in todo:
                places[n] = f"{path}:{line}"
                todo.discard(n)
            first = n + 1
    return places


def record_number(data_path: Any, place: str) -> int:
    """The number of the record at `place` (FILE:LINE where it starts, or FILE:1 (record K) in a one-line .json array);
    ValueError (a one-line reason) where no record of the data starts there, or several do."""
    name, at = PLACE.fullmatch(place).group("file", "at")
    number, _, rest = at.partition(" ")
    line = int(number)
    at = f"{line} {rest}".rstrip()  # FILE:02 is line 2
    files = resolve_files(data_path)
    found = [f for f in files if f.resolve() == Path(name).resolve()]
    if not found:
        raise ValueError(f"--index {place}: {name} is not one of the data files of data_path ({len(files)} file"
                         f"{'s' * (len(files) != 1)}: {', '.join(map(str, files[:3]))}{', ...' * (len(files) > 3)})")
    starts = [str(start) for start in _starts(found[0])]
    if at not in starts:
        shared = [s for s in starts if int(s.split()[0]) == line]
        before = [s for s in starts if int(s.split()[0]) < line]
        raise ValueError(f"--index {place}: " + (
            f"line {line} of {name} holds one record: {name}:{shared[0]}" if len(shared) == 1 else
            f"{len(shared)} records start at line {line} of {name}: name one, {name}:{shared[0]} to "
            f"{name}:{shared[-1]}" if shared else
            f"no record of {name} starts at line {line}" + (f"; the one before it starts at line {before[-1]}"
                                                              if before else "")))
    earlier = files[:files.index(found[0])]  # their records come first
    return sum(sum(1 for _ in _starts(f)) for f in earlier) + starts.index(at)


def _runs(input_ids: list[int], trained_at: list[bool]) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they are trained."""
    runs: list[tuple[list[int], bool]] = []
    for tok, trained in zip(input_ids, trained_at, strict=True):
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return runs


def _marked(input_ids: list[int], trained_at: list[bool], tokenizer: Any, color: bool) -> tuple[str, int]:
    """The text with trained spans (`trained_at`: per token) marked, and the number of spans. Each run is decoded in
    context (the text of the ids up to its end less the text before it): decoded alone, a SentencePiece run loses the
    space of its first piece (`▁S` reads `S`), which hides the seam space that training does have."""
    runs = _runs(input_ids, trained_at)
    parts, done, end = [], "", 0
    for ids, trained in runs:
        end += len(ids)
        upto = tokenizer.decode(input_ids[:end])
        t = upto[len(done):] if upto.startswith(done) else tokenizer.decode(ids)  # a run splitting a character
        parts.append((f"{GREEN}{t}{RESET}" if color else f"[[{t}]]") if trained else t)
        done = upto
    return "".join(parts), sum(trained for _, trained in runs)


def _token_line(tokenizer: Any, tok: int) -> str:
    """A token's text and, where it differs, its piece (`▁S`, `Ġa`: the space a lone decode drops or hides)."""
    text, piece = tokenizer.decode([tok]), tokenizer.convert_ids_to_tokens(tok)
    return f"{text!r}" if piece == text else f"{text!r} {piece!r}"


def show(ds: EncodedDataset, sample: int, tokenizer: Any, record: int, place: str, color: bool) -> str:
    """Human-readable view: counts, the text with trained spans marked, then one line per token."""
    s = ds[sample]
    trained_at = trained_mask(np.asarray(s["labels"]), [0]).tolist()  # as the loss counts: never the first token
    st = ds.stats
    text, n_spans = _marked(s["input_ids"], trained_at, tokenizer, color)
    lines = [
        f"record {record} at {place} -> sample {sample}: {len(s['input_ids'])} tokens, {sum(trained_at)} trained in {n_spans} "
        "span(s)",
        f"dataset: {st.records} records, {st.kept} samples, {st.dropped} dropped, {st.truncated} truncated",
        "--- text (trained: " + ("green" if color else "[[ ]]") + ") ---",
        text,
        "--- tokens: position, id, label, text (piece) ---",
    ]
    for pos, (tok, lab, trained) in enumerate(zip(s["input_ids"], s["labels"], trained_at, strict=True)):
        mark = str(lab) if trained else "-"
        lines.append(f"{pos:6d} {tok:8d} {mark:>8} {_token_line(tokenizer, tok)}")
    return "\n".join(lines)


def show_packed(ds: EncodedDataset, packed: PackedDataset, sample: int, tokenizer: Any, places: dict[int, str],
                color: bool) -> str:
    """The packed sequence holding `sample` (its first chunk, and where the others are, when split_long_pretrain cut
    it): counts, then per segment its record (with its FILE:LINE from `places`, record_places' of every record of the
    sequence: `packed_records`), text (trained spans marked) and one line per token (segment, position,
    id, label, text)."""
    rows = packed.rows_of_sample(sample).tolist()
    row = rows[0]
    p = packed[row]
    segs = range(packed.row_segments[row], packed.row_segments[row + 1])
    starts = packed.seg_offsets[packed.row_segments[row]:packed.row_segments[row + 1]] - packed.offsets[row]
    trained_at = trained_mask(np.asarray(p["labels"]), starts).tolist()  # as the loss counts
    st = packed.stats
    record = int(ds.record_index[sample])
    lines = [f"record {record} at {places[record]} -> sample {sample} -> packed sequence {row}: {len(p['input_ids'])} of "
             f"{st.max_seq_len} tokens, {len(segs)} segment(s)",
             *([f"sample {sample} is cut into {len(rows)} chunks (split_long_pretrain): chunk 1 is shown; "
                + (f"chunk 2 is in packed sequence {rows[1]}" if len(rows) == 2 else
                   f"chunks 2..{len(rows)} are in packed sequences {', '.join(map(str, rows[1:1 + SHOWN_ROWS]))}"
                   + (f", ... ({len(rows) - 1 - SHOWN_ROWS} more)" if len(rows) > 1 + SHOWN_ROWS else ""))]
               if len(rows) > 1 else []),
             f"packing: {st.samples} samples -> {st.sequences} sequences, efficiency {st.efficiency:.1%}"]
    for k, seg in enumerate(segs, 1):
        at = [j for j, s in enumerate(p["segment_ids"]) if s == k]
        ids, marks = [p["input_ids"][j] for j in at], [trained_at[j] for j in at]
        src = int(packed.segment_sample[seg])
        n_chunks = int(np.count_nonzero(packed.segment_sample == src))
        chunk = f", chunk {int(packed.segment_chunk[seg]) + 1} of {n_chunks}" if n_chunks > 1 else ""
        text, n_spans = _marked(ids, marks, tokenizer, color)
        rec = int(ds.record_index[src])
        lines += [f"=== segment {k}: record {rec} at {places[rec]}, sample {src}{chunk}, tokens {at[0]}..{at[-1]}, "
                  f"{sum(marks)} trained in {n_spans} span(s) ===", text]
    lines.append("--- tokens: segment, position, id, label, text (piece) ---")
    for seg, pos, tok, lab, trained in zip(p["segment_ids"], p["position_ids"], p["input_ids"], p["labels"], trained_at,
                                           strict=True):
        mark = str(lab) if trained else "-"
        lines.append(f"{seg:3d} {pos:6d} {tok:8d} {mark:>8} {_token_line(tokenizer, tok)}")
    return "\n".join(lines)


def packed_records(ds: EncodedDataset, packed: PackedDataset, sample: int) -> set[int]:
    """The record numbers of the segments of the packed sequence show_packed shows for `sample`."""
    row = int(packed.rows_of_sample(sample)[0])
    segs = packed.segment_sample[packed.row_segments[row]:packed.row_segments[row + 1]]
    return {int(ds.record_index[s]) for s in segs}


def dataset_stats(ds: EncodedDataset, max_seq_len: int, packed: PackedDataset | None = None,
                  split_long_pretrain: bool = False) -> dict:
    """Counts, sample-length percentiles (tokens, after truncation), truncated and trained fractions, and the
    efficiency (trained tokens / total tokens, padding included) and fill (non-padding share) unpacked and,
    with `packed`, packed. With `split_long_pretrain` long pretrain samples are kept whole (packing cuts them
    into chunks that overlap by one token): unpacked, each chunk counts as a row of its own."""
    st = ds.stats
    lengths = np.diff(ds.offsets)
    total = int(lengths.sum())
    trained = int(trained_tokens(ds).sum())  # after the next-token shift: what the loss counts (no cut loses one)
    rows = int(chunk_counts(lengths, max_seq_len).sum()) if len(ds) else 0
    total_in_rows = total + rows - len(ds)  # each cut repeats one token
    pct = np.percentile(lengths, PERCENTILES, method="higher") if len(ds) else [0] * len(PERCENTILES)
    return {
        "records": st.records, "samples": st.kept, "dropped": st.dropped, "truncated": st.truncated,
        "truncated_fraction": st.truncated / st.kept if st.kept else 0.0, "max_seq_len": max_seq_len,
        "spliced": st.spliced, "split_long_pretrain": split_long_pretrain,
        "special_text": st.special_text, "special_example": st.special_example,
        "length_percentiles": {f"p{q}": int(v) for q, v in zip(PERCENTILES, pct, strict=True)},
        "tokens": total, "trained_tokens": trained, "trained_fraction": trained / total if total else 0.0,
        "unpacked_efficiency": trained / (rows * max_seq_len) if rows else 0.0,
        "unpacked_fill": total_in_rows / (rows * max_seq_len) if rows else 0.0,
        "sequences": packed.stats.sequences if packed is not None else None,  # (none packed: still packing on)
        "packing_efficiency": packed.stats.efficiency if packed is not None else None,
        "packed_fill": packed.stats.fill if packed is not None else None,
    }


def show_stats(st: dict) -> str:
    """The statistics (`dataset_stats`) as a few human-readable lines."""
    pct = st["length_percentiles"]
    return "\n".join([
        f"records: {st['records']} -> {st['samples']} samples, {st['dropped']} dropped (no trained token within "
        f"max_seq_len {st['max_seq_len']})",
        f"truncated: {st['truncated']} of {st['samples']} samples ({st['truncated_fraction']:.1%})",
        f"prompt / answer boundary split: {st['spliced']} of {st['samples']} samples (the tokenizer joins a prompt's "
        "last token with its answer's first there; training and demo.py split it, a plain tokenizer(prompt) would not)",
        *([f"special-token text: {st['special_text']} record(s) hold a special token's text in their own fields, read "
           f"as that control token (first: {st['special_example']})"] if st["special_text"] else []),
        f"tokens per sample (after truncation to {st['max_seq_len']}"
        + ("; pretrain text kept whole, cut into chunks of that size by packing" if st["split_long_pretrain"] else "")
        + "): "
        + ", ".join(f"{'max' if k == 'p100' else k} {v}" for k, v in pct.items()),
        *([f"held out for evaluation (eval_split_ratio): {st['held_out']} of {st['samples']} samples, not in the "
           "counts below"] if st.get("held_out") else []),
        f"trained tokens: {st['trained_tokens']} of {st['tokens']} ({st['trained_fraction']:.1%})"
        + (" in the training samples" if st.get("held_out") else ""),
        (f"packing efficiency (trained / total tokens): {st['packing_efficiency']:.1%} ({st['samples'] - st.get('held_out', 0)} samples in "
         f"{st['sequences']} sequences, {st['packed_fill']:.1%} not padding; unpacked with rows padded to max_seq_len "
         f"{st['unpacked_efficiency']:.1%}, more in training, which pads each micro-batch to its longest row)"
         if st["packing_efficiency"] is not None else
         f"packing efficiency (trained / total tokens): n/a (packing off; unpacked with rows padded to max_seq_len "
         f"{st['unpacked_efficiency']:.1%}, {st['unpacked_fill']:.1%} not padding; more in training, which pads each "
         "micro-batch to its longest row)"),
    ])


def main(argv: list[str] | None = None) -> int:
    try:
        return _inspect(argv)
    except BrokenPipeError:  # `| head`, a pager quit early: the reader has what it wanted (it was a traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit writes nowhere
        return 0


def _index(text: str) -> int | str:
    """--index: a record number, or FILE:LINE as it is (checked against the data by record_number)."""
    if text.lstrip("-").isdigit():
        return int(text)
    if PLACE.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give a record number (0-based) or FILE:LINE")


def _inspect(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training config (train_ds.py's)")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--index", type=_index, help="the record: its number, 0-based, in file order, or FILE:LINE (where it starts, "
                      "as warnings and errors name it)")
    what.add_argument("--stats", action="store_true", help="statistics of the whole data set")
    ap.add_argument("--json", action="store_true", help='print only {"input_ids": [...], "labels": [...]} '
                    "(with --stats: the statistics as one object)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    from launch import deepspeed_logs_on_stderr, exit_if_ds_accelerator_unusable

    exit_if_ds_accelerator_unusable(PROG)  # before DeepSpeed's import builds it
    with deepspeed_logs_on_stderr():  # --json: stdout holds the object only
        from models.hf_io import CheckpointError, load_tokenizer
        from training.config import ConfigError, load_config  # the one parser of training configs
        from training.evaluate import split_eval  # what training holds out (eval_split_ratio) is never packed with it

    try:
        cfg = load_config(args.config, require_model=False)
        for note in cfg.notes:
            print(f"warning: {note}", file=sys.stderr)
        model_path = Path(cfg.model_path)
        try:
            tokenizer = load_tokenizer(model_path)
        except CheckpointError as e:
            raise DataError([str(e)]) from None
        if problem := vocabulary_problem(tokenizer):
            raise DataError([f"{model_path}:0: {problem}"])
        if (vocab := _vocab_size(model_path)) is not None and (problem := vocab_size_problem(vocab, tokenizer)):
            raise DataError([f"{model_path}: {problem}"])  # as training refuses it
        ds = load_dataset(cfg.data_path, tokenizer, cfg.max_seq_len, cfg.data_cache_dir, cfg.template_settings,
                          fallback_cache_dir=Path(cfg.save_path) / RUN_CACHE_DIR)  # where training caches it
        trained, held = split_eval(ds, cfg.eval_split_ratio, cfg.seed) if cfg.eval_split_ratio else (ds, None)
        packed = pack(trained, cfg.max_seq_len, cfg.seed) if cfg.packing else None  # the training rows, as trained
    except (DataError, ConfigError, ValueError) as e:
        for line in str(e).splitlines():  # each problem found (a DataError's FILE:LINE lines), as train_ds.py says them
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a cold start tokenizes for minutes (its workers leave it to this process)
        print(f"{PROG}: interrupted: the data cache is as it was (a cache file is written whole)", file=sys.stderr)
        return 130
    if args.stats:
        stats = dataset_stats(ds, cfg.max_seq_len, packed, cfg.split_long_pretrain)
        stats["held_out"] = 0 if held is None else len(held)
        if held is not None:  # the token counts of the training samples (what an epoch trains), as packing's are
            rows = dataset_stats(trained, cfg.max_seq_len, None, cfg.split_long_pretrain)
            stats.update({k: rows[k] for k in ("tokens", "trained_tokens", "trained_fraction", "unpacked_efficiency",
                                               "unpacked_fill")})
        print(json.dumps(stats) if args.json else show_stats(stats))
        return 0
    try:
        index = args.index if isinstance(args.index, int) else record_number(cfg.data_path, args.index)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if not 0 <= index < ds.stats.records:
        print(f"{PROG}: error: --index {index} out of range: the data has {ds.stats.records} records", file=sys.stderr)
        return 2
    sample = ds.sample_of_record(index)
    out_of_training = held is not None and held.sample_of_record(index) is not None
    in_packed = packed is not None and sample is not None and not out_of_training
    shown = packed_records(trained, packed, trained.sample_of_record(index)) if in_packed else set()
    quiet = args.json and sample is not None and not out_of_training  # prints no record's place: parses no file
    places = {} if quiet else record_places(cfg.data_path, {index} | shown)
    record = f"record {index} at {places.get(index)}"
    if sample is None:
        print(f"{PROG}: error: {record} was dropped: no trained token within max_seq_len={cfg.max_seq_len}",
              file=sys.stderr)
        return 2
    if out_of_training:
        print(f"note: {record} is held out for evaluation (eval_split_ratio {cfg.eval_split_ratio:g}): it "
              "is never trained; shown as its own sample", file=sys.stderr)
    if args.json:
        print(json.dumps(ds[sample]))
    elif in_packed:
        print(show_packed(trained, packed, trained.sample_of_record(index), tokenizer, places,
                          color=sys.stdout.isatty()))
    else:
        print(show(ds, sample, tokenizer, index, places[index], color=sys.stdout.isatty()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
