"""Tokenization cache: a cold build (all cores) against a warm one (cache hit) on 100k short records.

    python bench/data_cache.py [--records 100000] [--workdir DIR] [--template default|chat]

Writes the records (a mix of every type, cycled from data/samples with a counter so each is
unique) into a temp dir, builds a tokenizer locally, then times `load_dataset` twice: cold (parse,
validate, tokenize on every core, write the cache) and warm (read the cache). Prints the worker
processes and the CPU time / utilisation of the cold build, both wall times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.encode import MIN_RECORDS_FOR_POOL, load_dataset, usable_cores  # noqa: E402
from data.records import load_records  # noqa: E402
from data.templates import TemplateSettings  # noqa: E402
from data.tiny_tokenizer import _texts_from_records, train_tiny_tokenizer  # noqa: E402

CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (the pool's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def write_records(path: Path, n: int) -> None:
    """n short records cycled from data/samples, each made unique by a counter in its first text."""
    samples = [r.data for r in load_records(ROOT / "data" / "samples")]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = json.loads(json.dumps(samples[i % len(samples)]))
            if "rounds" in rec:
                rec["rounds"][0][1] = f"({i}) {rec['rounds'][0][1]}"
            else:
                key = "text" if "text" in rec else "instruct"
                rec[key] = f"({i}) {rec[key]}"
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workdir", help="default: a temporary directory")
    ap.add_argument("--template", choices=["default", "chat"], default="default")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tok = train_tiny_tokenizer(_texts_from_records(ROOT / "data" / "samples"), work / "tokenizer", vocab_size=1024)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
        data = work / "records.jsonl"
        write_records(data, args.records)
        settings = TemplateSettings(template=args.template)
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # a --workdir used before: the cold build must build
        workers = usable_cores() if args.records >= MIN_RECORDS_FOR_POOL else 1
        print(f"{args.records} records ({data.stat().st_size / 1e6:.1f} MB), template {args.template!r}, "
              f"max_seq_len 256, {usable_cores()} usable cores")

        cpu0, t0 = cpu_seconds(), time.perf_counter()
        cold = load_dataset(data, tok, 256, cache, settings)
        cold_s, cold_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        assert not cold.stats.cache_hit
        print(f"cold: {cold_s:7.2f} s wall, {workers} worker processes, {cold_cpu:.2f} s CPU "
              f"(utilisation {cold_cpu / (cold_s * usable_cores()):.0%} of {usable_cores()} cores), "
              f"{cold.stats.kept} samples, {int(cold.offsets[-1])} tokens")

        t0 = time.perf_counter()
        warm = load_dataset(data, tok, 256, cache, settings)
        warm_s = time.perf_counter() - t0
        assert warm.stats.cache_hit and len(warm) == len(cold) and (warm.input_ids == cold.input_ids).all()
        print(f"warm: {warm_s:7.2f} s wall (cache hit: read the data bytes for the key, load the arrays)")
        ratio = cold_s / warm_s
        print(f"cold / warm: {ratio:.1f}x ({'meets' if ratio >= 4 else 'BELOW'} the 4x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
