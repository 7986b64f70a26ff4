"""Build a tiny tokenizer locally (no hub access) for tests and the quickstart, of one of three kinds.

    python -m data.tiny_tokenizer --save-path DIR [--kind bpe|sentencepiece|llama3] [--data data/samples]
                                  [--vocab-size 512] [--chat-template chatml|llama3]

- `bpe`: byte-level BPE with GPT-2's pre-tokenizer (GPT-2, Bloom), BOS prepended (Llama-like ids 0..3).
- `sentencepiece`: a Llama-2-style SentencePiece model trained with the `sentencepiece` package (BPE, byte
  fallback, dummy prefix, split digits), loaded and saved through transformers' LlamaTokenizer.
- `llama3`: byte-level BPE with Llama-3's split pattern (digits in groups of up to 3, newlines apart) and
  its special tokens; BOS `<|begin_of_text|>`, EOS `<|end_of_text|>`.

`--chat-template` adds a chat template and its special tokens: ChatML (`<|im_start|>` ... `<|im_end|>`) or
Llama-3's (`<|start_header_id|>` ... `<|eot_id|>`). Both render every message, system messages included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeft import module_command, one_line

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama-like: BOS prepended, EOS not
KINDS = ("bpe", "sentencepiece", "llama3")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATES = {  # name -> (template, its special tokens)
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
               ["<|im_start|>", "<|im_end|>"]),
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}

FALLBACK_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Pipeline parallelism splits a model's layers across devices.",
    "Below is an instruction that describes a task. Write a response.",
    "### Instruction:\n### Input:\n### Response:\n### Human: ### Assistant:",
    "一个小的分词器也能处理中文文本。",
]


def _byte_level(texts: list[str], vocab_size: int, pattern: str | None, specials: list[str], bos: str, eos: str,
                unk: str | None, pad: str | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    if pattern is None:  # GPT-2's own regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)


def _sentencepiece(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama-2's trainer settings, at a tiny vocabulary; the .model is kept as tokenizer.model."""
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=f"{tmp}/sp", vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, add_dummy_prefix=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=0.9995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=1 << 20, minloglevel=2)
        src = Path(tmp) / "hf"
        src.mkdir()
        shutil.copy(f"{tmp}/sp.model", src / "tokenizer.model")
        (src / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}))
        tok = AutoTokenizer.from_pretrained(str(src))
        tok.sp_model_file = (src / "tokenizer.model").read_bytes()
    return tok


def train_tiny_tokenizer(texts: Iterable[str], save_path: str | Path, vocab_size: int = 512, kind: str = "bpe",
                         chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer of `kind` (see KINDS) on `texts` and save it as an HF tokenizer dir."""
    texts = list(texts) + FALLBACK_TEXT
    if kind == "bpe":
        tok = _byte_level(texts, vocab_size, None, SPECIALS, "<s>", "</s>", "<unk>", "<pad>")
    elif kind == "llama3":
        tok = _byte_level(texts, vocab_size, LLAMA3_PATTERN, LLAMA3_SPECIALS, "<|begin_of_text|>", "<|end_of_text|>",
                          None, None)
    elif kind == "sentencepiece":
        tok = _sentencepiece(texts, vocab_size)
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if chat_template is not None:
        template, specials = CHAT_TEMPLATES[chat_template]
        tok.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in tok.get_vocab()]})
        tok.chat_template = template
    model_file = getattr(tok, "sp_model_file", None)
    Path(save_path).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(save_path))
    if model_file is not None:
        (Path(save_path) / "tokenizer.model").write_bytes(model_file)  # for tools that read the SentencePiece model
    return AutoTokenizer.from_pretrained(str(save_path))


def _texts_from_records(path: Path) -> list[str]:
    """Every string value of the records in `path`: a record file or a directory of them, read as data_path reads
    them (.jsonl, .json, .csv, .parquet, .arrow; a directory's files with those suffixes), not validated as records."""
    from data.parsers import PARSERS
    from data.records import DataError, resolve_files

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

    try:
        files = resolve_files(path, "--data")
    except DataError as e:
        raise ValueError(e.problems[0]) from None
    for f in files:
        if f.suffix not in PARSERS:
            raise ValueError(f"{f}: unsupported file type {f.suffix!r} (use {', '.join(PARSERS)})")
        items, errors = PARSERS[f.suffix](f.read_bytes())
        if errors:
            line, problem = errors[0]
            raise ValueError(f"{f}:{line}: {problem}")
        for _, value in items:
            walk(value)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=module_command("data.tiny_tokenizer"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save-path", required=True)
    ap.add_argument("--data", default=None, help="record file, directory or glob (as data_path) whose text trains the "
                    "tokenizer")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--kind", choices=KINDS, default="bpe")
    ap.add_argument("--chat-template", choices=sorted(CHAT_TEMPLATES), default=None)
    ap.add_argument("--overwrite", action="store_true", help="replace a tokenizer dir at --save-path (whole: a dir "
                    "holding anything but tokenizer files is refused)")
    args = ap.parse_args(argv)
    from models.hf_io import TOKENIZER_DIRS, TOKENIZER_FILES, CheckpointError
    from models.outdir import atomic_output_dir, check_target

    try:
        check_target(Path(args.save_path), args.overwrite)
    except CheckpointError as e:
        ap.error(f"--save-path {e}")
    save = Path(args.save_path)
    if args.overwrite and save.is_dir() and (other := sorted(
            p.name for p in save.iterdir() if p.name not in (*TOKENIZER_FILES, *TOKENIZER_DIRS))):
        ap.error(f"--save-path {save} holds {', '.join(other[:3])}{', ...' * (len(other) > 3)}, not only a tokenizer's "
                 "files: --overwrite replaces the dir whole and would delete them; give a tokenizer's own directory")
    least = {"bpe": 256 + len(SPECIALS), "llama3": 256 + len(LLAMA3_SPECIALS)}.get(args.kind, 1)
    if args.vocab_size < least:  # (a byte-level vocabulary below it was its 256 bytes and specials, not the size asked)
        ap.error(f"--vocab-size {args.vocab_size}: a {args.kind} tokenizer has at least {least} tokens"
                 + (f" (256 bytes + {least - 256} special tokens)" if least > 1 else ""))
    try:
        texts = _texts_from_records(Path(args.data)) if args.data else []
    except (OSError, ValueError) as e:  # each names its file
        ap.error(f"--data: {one_line(e)}")
    if args.data and not texts:  # (it trained on the built-in fallback text alone without a word)
        ap.error(f"--data {args.data}: no text in its records")
    try:  # written beside --save-path, then renamed into place (with --overwrite the old dir goes whole: no stale file)
        with atomic_output_dir(save, args.overwrite) as tmp:
            tok = train_tiny_tokenizer(texts, tmp, args.vocab_size, args.kind, args.chat_template)
    except (CheckpointError, OSError) as e:
        ap.error(f"--save-path {one_line(e)}")
    except RuntimeError as e:  # sentencepiece's trainer: a vocabulary below the characters of the text, or above what
        # the text yields ("INTERNAL: src/trainer_interface.cc(638) ... [check] Vocabulary size is smaller ...")
        ap.error(f"--vocab-size {args.vocab_size}: sentencepiece: {one_line(str(e).rsplit('] ', 1)[-1])}")
    print(f"{args.kind} tokenizer with {len(tok)} tokens written to {args.save_path}")


if __name__ == "__main__":
    main()
