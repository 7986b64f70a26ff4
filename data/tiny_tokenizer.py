"""Build a tiny byte-level BPE tokenizer locally (no hub access) for tests and the quickstart.

    python -m data.tiny_tokenizer --save-path DIR [--data data/samples] [--vocab-size 512]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama-like: BOS prepended, EOS not

FALLBACK_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Pipeline parallelism splits a model's layers across devices.",
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction:\n### Input:\n### Response:\n### Human: ### Assistant:",
    "一个小的分词器也能处理中文文本。",
]


def train_tiny_tokenizer(texts: Iterable[str], save_path: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it as an HF tokenizer dir (tokenizer.json + config)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + FALLBACK_TEXT, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(save_path))
    return fast


def _texts_from_records(path: Path) -> list[str]:
    """Every string value found in the .json/.jsonl record files under `path`."""
    out: list[str] = []

    def walk(x: object) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    files = sorted(path.rglob("*.json*")) if path.is_dir() else [path]
    for f in files:
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    walk(json.loads(line))
        else:
            walk(json.loads(text))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save-path", required=True)
    ap.add_argument("--data", default=None, help="record file or directory whose text trains the BPE")
    ap.add_argument("--vocab-size", type=int, default=512)
    args = ap.parse_args(argv)
    texts = _texts_from_records(Path(args.data)) if args.data else []
    tok = train_tiny_tokenizer(texts, args.save_path, args.vocab_size)
    print(f"tokenizer with {len(tok)} tokens written to {args.save_path}")


if __name__ == "__main__":
    main()
