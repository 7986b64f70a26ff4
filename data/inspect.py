"""Show the exact tokens and labels the model will see for one record.

    python -m data.inspect --config CFG.json --index N [--json]

Trained tokens are shown in green on a terminal and between [[ ]] otherwise. With --json, stdout
holds only {"input_ids": [...], "labels": [...]}. Bad data: one line per problem on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from data.encode import IGNORE_INDEX, EncodedDataset, load_dataset
from data.records import DataError
from training.config import ConfigError, load_config

GREEN, RESET = "\033[32m", "\033[0m"


def _runs(ds: EncodedDataset, sample: int) -> list[tuple[list[int], bool]]:
    """Consecutive tokens grouped by whether they are trained."""
    s = ds[sample]
    runs: list[tuple[list[int], bool]] = []
    for tok, lab in zip(s["input_ids"], s["labels"], strict=True):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok)
        else:
            runs.append(([tok], trained))
    return runs


def show(ds: EncodedDataset, sample: int, tokenizer: Any, record: int, color: bool) -> str:
    """Human-readable view: counts, the text with trained spans marked, then one line per token."""
    s = ds[sample]
    n_trained = sum(lab != IGNORE_INDEX for lab in s["labels"])
    st = ds.stats
    text = "".join(
        (f"{GREEN}{t}{RESET}" if color else f"[[{t}]]") if trained else t
        for t, trained in ((tokenizer.decode(ids), trained) for ids, trained in _runs(ds, sample))
    )
    lines = [
        f"record {record} -> sample {sample}: {len(s['input_ids'])} tokens, {n_trained} trained",
        f"dataset: {st.records} records, {st.kept} samples, {st.dropped} dropped, {st.truncated} truncated",
        "--- text (trained: " + ("green" if color else "[[ ]]") + ") ---",
        text,
        "--- tokens: position, id, label, text ---",
    ]
    for pos, (tok, lab) in enumerate(zip(s["input_ids"], s["labels"], strict=True)):
        mark = "-" if lab == IGNORE_INDEX else str(lab)
        lines.append(f"{pos:6d} {tok:8d} {mark:>8} {tokenizer.decode([tok])!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training config (train_ds.py's)")
    ap.add_argument("--index", type=int, required=True, help="record number, 0-based, in file order")
    ap.add_argument("--json", action="store_true", help='print only {"input_ids": [...], "labels": [...]}')
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        cfg = load_config(args.config, require_model=False)
        model_path = Path(cfg.model_path)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError([f"{model_path}:0: cannot load a tokenizer: {' '.join(str(e).split())[:300]}"]) from None
        ds = load_dataset(cfg.data_path, tokenizer, cfg.max_seq_len, cfg.data_cache_dir, cfg.pretrain_eos)
    except (DataError, ConfigError) as e:
        print(e, file=sys.stderr)
        return 2
    if not 0 <= args.index < ds.stats.records:
        print(f"error: --index {args.index} out of range: the data has {ds.stats.records} records", file=sys.stderr)
        return 2
    sample = ds.sample_of_record(args.index)
    if sample is None:
        print(f"error: record {args.index} was dropped: no trained token within max_seq_len={cfg.max_seq_len}",
              file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(ds[sample]))
    else:
        print(show(ds, sample, tokenizer, args.index, color=sys.stdout.isatty()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
