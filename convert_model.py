"""Convert between Hugging Face checkpoints and pipeline layer files, or create a fresh model.

  python convert_model.py hg_to_pp --input-path HF_DIR|ORG/NAME --save-path PP_DIR [--dtype bf16|fp16|fp32]
  python convert_model.py pp_to_hg --input-path CKPT_DIR --save-path HF_DIR [--max-shard-size 5GB]
  python convert_model.py pp_to_hg --input-path LORA_CKPT --save-path DIR --lora peft|merge [--base BASE_PP_DIR]
  python convert_model.py init --family llama (--config-json FILE | --preset tiny) --tokenizer DIR --save-path PP_DIR
"""

from __future__ import annotations

import argparse
import sys

from pipeft import prog, quiet_start, started

PROG = prog("convert_model.py")  # pipeft-convert when run as that
quiet_start(PROG, __name__)  # a Ctrl-C during the imports below: one line

from launch import exit_if_ds_accelerator_unusable  # noqa: E402

exit_if_ds_accelerator_unusable(PROG)  # before DeepSpeed's import builds it

from models.convert import DTYPES, hg_to_pp, init_model, pp_to_hg  # noqa: E402
from models.family import FAMILIES  # noqa: E402
from models.hf_io import CheckpointError  # noqa: E402
from models.outdir import Interrupted  # noqa: E402
from models.pipeline import ModelConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hg_to_pp", help="HF dir -> pipeline layer files")
    p.add_argument("--input-path", required=True, help="HF model dir (safetensors, or pytorch_model*.bin), or a Hub id "
                   "org/name in the local Hugging Face cache")
    p.add_argument("--save-path", required=True, help="pipeline dir to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")

    p = sub.add_parser("pp_to_hg", help="pipeline or training checkpoint dir -> HF dir")
    p.add_argument("--input-path", required=True, help="pipeline dir, checkpoint tag dir, or save_path with 'latest'")
    p.add_argument("--save-path", required=True, help="HF dir to create")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard: a size such as 5GB or 500MiB (KB..TB, KiB..TiB), or bytes (default 5GB)")
    p.add_argument("--lora", choices=["peft", "merge"], help="a LoRA checkpoint: write a PEFT adapter dir, or the base "
                   "model with the adapters merged in")
    p.add_argument("--base", help="a LoRA checkpoint whose base pipeline dir moved since training: where it is now "
                   "(checked against the base fingerprint the checkpoint records)")

    p = sub.add_parser("init", help="a freshly initialised model in pipeline format")
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config-json", help="an HF config.json for the family")
    src.add_argument("--preset", help="a named config, e.g. tiny")
    p.add_argument("--tokenizer", required=True, help="dir with the tokenizer files")
    p.add_argument("--save-path", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")

    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save-path")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    given = sys.argv[1:] if argv is None else argv
    if given and given[0].startswith("-") and given[0] != "-h" and not "--help".startswith(given[0]):  # argparse said
        # "the following arguments are required: command" ("--he": --help abbreviated, as argparse allows)
        ap.error(f"{given[0]}: the command comes first: {PROG} {{hg_to_pp,pp_to_hg,init}} [options]")
    args = ap.parse_args(given)
    try:
        if args.command == "hg_to_pp":
            hg_to_pp(args.input_path, args.save_path, args.dtype, args.overwrite)
        elif args.command == "pp_to_hg":
            pp_to_hg(args.input_path, args.save_path, args.max_shard_size, args.overwrite, args.lora, args.base)
        else:
            init_model(args.family, args.save_path, args.tokenizer, args.config_json, args.preset, args.seed,
                       args.dtype, args.overwrite)
    except (CheckpointError, ModelConfigError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # outside atomic_output_dir: before its output is built, or once it is in place
        said = str(e) if isinstance(e, Interrupted) else (f"{args.save_path} holds what it held before or the whole new "
                                                          "output (an output is renamed into place complete)")
        print(f"{PROG} {args.command}: interrupted: {said}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    started()
    sys.exit(main())
