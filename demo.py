"""Generate from an HF dir or a pipeline / training checkpoint dir, prompted exactly as training rendered records.

  python demo.py --model-path DIR --prompt TEXT
  python demo.py --model-path DIR --instruct TEXT [--input TEXT] [--max-new-tokens 128 --temperature 0.7 --top-p 0.9]
  python demo.py --model-path DIR --record '{"rounds": [["ask", "Hi!"], ["ans", "Hello."], ["ask", "2+3?"]]}'
  python demo.py --model-path BASE --adapter PEFT_DIR --prompt TEXT  # a LoRA adapter, merged in at load
  deepspeed --num_gpus N demo.py --model-path DIR ...   # tensor parallel over N GPUs (DeepSpeed inference)

A LoRA training checkpoint (adapters only) works as --model-path too: its base is merged with the adapters (a QLoRA
checkpoint's into its dequantised 4-bit base). An adapter exported from a QLoRA checkpoint runs on a 4-bit base.

The prompt is rendered with the data settings the model was trained with (data_settings.json, written by
train_ds.py and carried by exports; --template overrides): the default templates, or in chat mode the
recorded chat template with `add_generation_prompt=True`. Its ids are the token prefix training saw
(data.encode.encode_prompt). --record takes any record (JSON text or a .json file); the model answers its
last question. Generation stops on every id of the generation config's eos_token_id, the tokenizer's EOS
and, in chat mode, the template's end-of-turn token (or its text, where the tokenizer splits it into pieces).

Greedy when --temperature is 0. Only the generated text goes to stdout; status goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from pipeft import DuplicateKey, one_line, prog, quiet_start, started, unique_keys

PROG = prog("demo.py")
quiet_start(PROG, __name__)  # a Ctrl-C during the imports below: one line

import torch  # noqa: E402

from launch import deepspeed_logs_on_stderr, exit_if_ds_accelerator_unusable  # noqa: E402

exit_if_ds_accelerator_unusable(PROG)  # before DeepSpeed's import builds it
with deepspeed_logs_on_stderr():  # stdout holds the generated text only
    import deepspeed  # noqa: F401
    from transformers import TextStreamer

    from data.chat import end_of_turn, end_of_turn_text
    from data.collate import pad_id_of
    from data.encode import encode_prompt
    from data.records import DataError, present_fields, prompt_problems, string_problem
    from data.settings import DataSettings, read_data_settings
    from data.templates import TEMPLATES, TemplateSettings, answer_lead
    from data.tokenizer_checks import special_text_in, vocab_size_problem, vocabulary_problem
    from launch import AcceleratorError
    from models.convert import DTYPES, config_dir_of, load_hf_model
    from models.family import ModelFamily
    from models.hf_io import CheckpointError, load_tokenizer
    from models.pipeline import ModelConfigError
    from training.distributed import accelerator_problem

class DemoError(ValueError):
    """A user-facing problem, reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="HF dir (or a Hub id org/name in the local cache), pipeline "
                    "dir, checkpoint tag dir, or save_path with 'latest'")
    ap.add_argument("--adapter", help="a PEFT LoRA adapter dir (pp_to_hg --lora peft, or any peft adapter) for --model-path")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="raw text to continue (a pretrain record)")
    src.add_argument("--instruct", help="an instruction, rendered with the training template")
    src.add_argument("--record", help="a record as JSON text or a .json file (conversation rounds ending with "
                     "an \"ask\", a ref_qa record, ...): the model gives the next answer")
    ap.add_argument("--input", help="context for --instruct")
    ap.add_argument("--template", choices=TEMPLATES, help="override the recorded template mode (default: the "
                    "model's data_settings.json, else \"default\")")
    ap.add_argument("--show-ids", action="store_true", help="print the prompt's and the generated token ids to "
                    "stderr as JSON lines")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, help="sampling: 0 = off (default: the model's generation_config, as "
                    "transformers' generate; 50 where it sets none)")
    ap.add_argument("--top-p", type=float, help="sampling: 1 = off (default: the model's generation_config; 1.0 where "
                    "it sets none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on an accelerator that has it (else fp16), fp32 on CPU")
    ap.add_argument("--no-stream", action="store_true", help="print the continuation at the end instead of streaming")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # from `deepspeed`
    return ap


MIN_TEMPERATURE = 1e-6  # the smallest sampling temperature (0: greedy)


def check_args(args: argparse.Namespace) -> None:
    if args.input is not None and args.instruct is None:
        raise DemoError("--input needs --instruct")
    if args.max_new_tokens < 1:
        raise DemoError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise DemoError(f"--temperature {args.temperature}: must be a number >= 0")
    if 0 < args.temperature < MIN_TEMPERATURE:
        raise DemoError(f"--temperature {args.temperature}: must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (logits "
                        "divided by less can overflow; sampling at such a temperature is greedy decoding anyway)")
    if not -2**63 <= args.seed < 2**64:
        raise DemoError(f"--seed {args.seed}: must be in [-2**63, 2**64) (torch's seed range)")
    if args.top_k is not None and args.top_k < 0:
        raise DemoError(f"--top-k {args.top_k}: must be >= 0")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise DemoError(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise DemoError(f"--{'top-k' if args.top_k is not None else 'top-p'} samples, but --temperature 0 (the "
                        "default) is greedy decoding (which takes neither); give --temperature T > 0 to sample")
    if args.adapter:  # before the base model loads
        check_adapter_dir(args.adapter)


def check_adapter_dir(adapter: str | Path) -> None:
    """DemoError unless `adapter` is a directory with an adapter_config.json holding a JSON object."""
    from models.hf_io import read_json

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise DemoError(f"--adapter {adapter}: " + ("no such directory" if not path.exists() else "not a directory"
                                                     if not path.is_dir() else
                                                     "no adapter_config.json (not a PEFT adapter dir)"))
    if not isinstance(read_json(path / "adapter_config.json"), dict):  # (a traceback once the base had loaded)
        raise DemoError(f"--adapter {adapter}: {path / 'adapter_config.json'} is not a JSON object")


def build_record(args: argparse.Namespace) -> dict:
    """The record to prompt with: --prompt is a pretrain text, --instruct an instruct record without output,
    --record any record (the last two checked as training checks records)."""
    if args.instruct is not None:
        rec = {"instruct": args.instruct, **({"input": args.input} if args.input is not None else {})}
        if problems := prompt_problems(present_fields(rec)):
            raise DemoError(f"--instruct: {problems[0]}")
        return rec
    if args.record is None:
        if problem := string_problem("--prompt", args.prompt, allow_empty=True):  # a byte the locale cannot decode
            raise DemoError(problem)
        return {"text": args.prompt}
    text = args.record
    if not text.lstrip().startswith(("{", "[")):
        try:
            text = Path(text).read_text(encoding="utf-8-sig")  # a BOM as the training readers take it
        except OSError as e:
            try:  # JSON, but no object: null, "a string", 5
                value = json.loads(text)
            except ValueError:
                raise DemoError(f"--record {args.record}: not JSON and not a readable file ({e.strerror})") from None
            raise DemoError(f"--record {args.record}: JSON {type(value).__name__ if value is not None else 'null'}, "
                            f"not a record (a JSON object), and not a readable file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise DemoError(f"--record {args.record}: not valid UTF-8 (byte offset {e.start})") from None
    try:
        rec = present_fields(json.loads(text, object_pairs_hook=unique_keys))
    except json.JSONDecodeError as e:
        more = (": give one record (a .jsonl file holds several: pick one line of it)"
                if e.msg == "Extra data" and text[e.pos:].lstrip().startswith("{") else "")
        raise DemoError(f"--record: invalid JSON ({e}){more}") from None
    except DuplicateKey as e:
        raise DemoError(f"--record: {e}") from None
    if not isinstance(rec, dict):
        raise DemoError("--record: a record is a JSON object")
    if problems := prompt_problems(rec):
        raise DemoError(f"--record: {problems[0]}")
    return rec


def prompt_settings(settings_dirs: list[Path], template: str | None, tokenizer, rank: int = 0
                    ) -> tuple[TemplateSettings, int | None]:
    """The template settings to prompt with and the max_seq_len training kept (None: not recorded): the first
    data_settings.json found in `settings_dirs` (the adapter's, then the model's), `template` overriding its mode.
    In chat mode the tokenizer gets the chat template training used. Rank 0 (`rank`) warns of another EOS."""
    found: DataSettings | None = None
    for d in settings_dirs:
        try:
            found = read_data_settings(d)
        except ValueError as e:
            raise DemoError(str(e)) from None
        if found is not None:
            break
    settings = found.template if found is not None else TemplateSettings()
    if found is not None and found.eos_token and found.eos_token != tokenizer.eos_token and rank == 0:  # once
        log(f"warning: training's tokenizer had the EOS {found.eos_token!r} (data_settings.json), this one "
            f"{tokenizer.eos_token!r}: earlier answers are closed, and generation stops, with this one's")
    if template is not None:
        settings = TemplateSettings(template=template)
    if settings.template == "chat":
        recorded = found.chat_template if found is not None else None
        if recorded:
            tokenizer.chat_template = recorded
        if not getattr(tokenizer, "chat_template", None):
            raise DemoError("--template chat: the tokenizer has no chat template (and none was recorded in training)")
    return settings, found.max_seq_len if found is not None else None


def stop_ids(generation_config, tokenizer, settings: TemplateSettings) -> list[int]:
    """Every id generation stops on: the generation config's eos_token_id (an id or a list), the tokenizer's
    EOS and, in chat mode, the chat template's end-of-turn token."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    extra = [tokenizer.eos_token_id]
    if settings.template == "chat" and (eot := end_of_turn(tokenizer)) is not None:
        extra.append(tokenizer.convert_tokens_to_ids(eot))
    return list(dict.fromkeys(i for i in [*ids, *extra] if i is not None))


def stop_strings(tokenizer, settings: TemplateSettings) -> list[str]:
    """In chat mode, the text that ends each answer where no token does (`data.chat.end_of_turn_text`: the tokenizer
    splits it), for generation to stop on; else []."""
    text = end_of_turn_text(tokenizer) if settings.template == "chat" else None
    return [text] if text else []


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(`text` before the first of `stops` it holds, whether it held one)."""
    at = min((i for stop in stops if (i := text.find(stop)) >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


def after_context(tokenizer, context: list[int], ids: list[int]) -> tuple[list[int], int]:
    """(`context` or [], the length of its decoded text): `ids` are decoded after the prompt's last token
    (`context`), as they continue it: SentencePiece's decoder drops the space that starts a text (an answer's
    "▁Yes" alone decodes to "Yes"), not one after a token. [] where the decoded context is not a prefix."""
    head = tokenizer.decode(context, skip_special_tokens=True)
    if tokenizer.decode(context + ids, skip_special_tokens=True).startswith(head):
        return list(context), len(head)
    return [], 0


def decode_answer(tokenizer, context: list[int], ids: list[int], lead: str = "") -> str:
    """`ids` decoded as the continuation of `context` (`after_context`), special tokens skipped, without the
    template's `lead` (`data.templates.answer_lead`) they start with."""
    cache, at = after_context(tokenizer, context, ids)
    return tokenizer.decode(cache + ids, skip_special_tokens=True)[at:].removeprefix(lead)


class AnswerStreamer(TextStreamer):
    """TextStreamer printing the answer only, as `decode_answer` decodes it (after the prompt's last token, without
    the template's `lead`): not the stop token it ends on (an added token that is not special decodes to its
    text), nor a stop text (text that could begin one is held until the next tokens tell)."""

    def __init__(self, tokenizer, eos_ids: list[int], stops: list[str], lead: str = ""):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.eos_ids, self.stops, self.held, self.stopped = set(eos_ids), stops, "", False
        self.lead, self.lead_left, self.context = lead, lead, None

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:
            self.context = value.reshape(-1)[-1:].tolist()
        else:
            value = torch.tensor([i for i in value.reshape(-1).tolist() if i not in self.eos_ids], dtype=torch.long)
            if self.context is not None:  # the first new tokens: decoded after the prompt's last one
                self.token_cache, self.print_len = after_context(self.tokenizer, self.context, value.tolist())
                self.context = None
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.lead_left:  # the answer's first characters: held until they tell whether they are the lead
            text, self.held = self.held + text, ""
            if len(text) < len(self.lead_left) and self.lead_left.startswith(text) and not stream_end:
                self.held = text
                return
            text, self.lead_left = text.removeprefix(self.lead_left), ""
        if self.stopped:
            text = ""
        else:
            text, self.stopped = cut_at_stop(self.held + text, self.stops)
            hold = 0 if self.stopped or stream_end else max(
                (n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
            text, self.held = text[:len(text) - hold], text[len(text) - hold:]
        super().on_finalized_text(text, stream_end)
        if stream_end:
            self.held, self.stopped, self.lead_left = "", False, self.lead


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.bfloat16 if acc.is_bf16_supported() else torch.float16 if acc.is_fp16_supported() else torch.float32


def load_tokenizer_of(model_path: str | Path):
    """(tokenizer, the dir of config and tokenizer) of any directory `load_hf_model` accepts, its weights not read:
    what is wrong with the tokenizer, the settings or the prompt is said before the weights load."""
    config_dir = config_dir_of(model_path)
    tokenizer = load_tokenizer(config_dir)
    if problem := vocabulary_problem(tokenizer):
        raise DemoError(f"{config_dir}: {problem}")
    check_generation_config(Path(config_dir) / "generation_config.json")
    return tokenizer, config_dir


def check_generation_config(path: Path) -> None:
    """A DemoError naming `path` (when there is one) unless transformers takes it and its stop ids are token ids: a
    list, a string id or a string top_k there were tracebacks once the weights had loaded."""
    from transformers import GenerationConfig

    from models.hf_io import read_json

    if not path.is_file():
        return
    body = read_json(path)
    if not isinstance(body, dict):
        raise DemoError(f"{path}: not a JSON object")
    eos = body.get("eos_token_id")
    if not (eos is None or _is_id(eos) or isinstance(eos, list) and all(map(_is_id, eos))):
        raise DemoError(f"{path}: eos_token_id must be a token id or a list of them, got {json.dumps(eos)}")
    for key, kind in (("top_k", int), ("top_p", (int, float)), ("temperature", (int, float))):
        if body.get(key) is not None and (isinstance(body[key], bool) or not isinstance(body[key], kind)):
            raise DemoError(f"{path}: {key} must be a number, got {json.dumps(body[key])}")
    try:
        GenerationConfig.from_dict(body)
    except (ValueError, TypeError) as e:
        raise DemoError(f"{path}: {one_line(e, 200)}") from None


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_model(model_path: str | Path, dtype: torch.dtype | None = None):
    """The eval-mode HF model on CPU of any directory `load_hf_model` accepts. The generation config comes from the
    tokenizer/config dir in both cases, so an HF dir and the checkpoint it was exported from generate identically."""
    from transformers import GenerationConfig

    model, _, config_dir = load_hf_model(model_path, dtype=dtype)
    if (Path(config_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(config_dir))
    return model


def load(model_path: str | Path, dtype: torch.dtype | None = None):
    """(eval-mode HF model on CPU, tokenizer, the dir of config and tokenizer) of any directory `load_hf_model`
    accepts."""
    tokenizer, config_dir = load_tokenizer_of(model_path)
    return load_model(model_path, dtype), tokenizer, config_dir


@torch.inference_mode()
def generate(model, tokenizer, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stream: bool = True,
             eos_ids: list[int] | None = None, stops: list[str] | None = None,
             new_ids: list[int] | None = None, lead: str = "") -> str:
    """Generate a continuation of `prompt`: token ids (`data.encode.encode_prompt`), or a text tokenized by the
    tokenizer (BOS etc. added).

    Greedy when temperature == 0, else sampling with temperature / top_k (0 = off) / top_p (None: the model's
    generation_config's, as transformers' generate takes them). Stops on any of
    `eos_ids` (default: the generation config's eos_token_id and the tokenizer's EOS) and once the continuation
    holds one of `stops` (texts, as GenerationConfig's stop_strings). With `stream`, tokens
    are printed to stdout as they come (AnswerStreamer, ending with a newline). Returns the answer: the continuation
    without the prompt (decoded as it continues the prompt's last token), special tokens skipped, and without the
    stop token or text it ended on (as serving stacks return it; printed alike), nor `lead`
    (`data.templates.answer_lead`: what the template writes before the answer, not in the record); `new_ids`,
    when given, receives the continuation's ids, the stop's included."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise DemoError("the prompt is empty (no tokens, and the tokenizer adds no BOS): nothing to continue")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    pad = pad_id_of(tokenizer)
    kw = dict(do_sample=temperature > 0)
    if temperature > 0:
        kw.update(temperature=temperature, **{k: v for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None})
    if eos_ids is None:
        eos_ids = stop_ids(getattr(model, "generation_config", None), tokenizer, TemplateSettings())
    if stops:
        kw.update(stop_strings=stops, tokenizer=tokenizer)
    streamer = AnswerStreamer(tokenizer, eos_ids, stops or [], lead) if stream else None
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         eos_token_id=eos_ids, pad_token_id=pad, streamer=streamer, **kw)  # (1, T + new)
    generated = out[0, len(ids):].tolist()
    if new_ids is not None:
        new_ids[:] = generated
    answer = generated[:-1] if generated and generated[-1] in eos_ids else generated
    return cut_at_stop(decode_answer(tokenizer, ids[-1:], answer, lead), stops or [])[0]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def with_adapter(model, adapter: str | Path, model_path: str | Path | None = None):
    """`model` with a PEFT LoRA adapter merged into its weights (as PEFT's merge_and_unload). An adapter trained on
    a 4-bit base (pp_to_hg --lora peft of a QLoRA checkpoint: quantization_config.json) runs on the base quantised
    the same way, the adapters beside the 4-bit layers as in training (not merged)."""

    from models.quant import quantize_hf_model, read_quant_file

    check_adapter_dir(adapter)
    if other := other_base(model, adapter, model_path):
        log(f"warning: --adapter {adapter} was trained on {other}, whose weights differ from --model-path's: the "
            "output is not the fine-tuned model's (give its base as --model-path)")
    try:
        quant = read_quant_file(Path(adapter))
    except ValueError as e:  # damaged or edited: it says how the base was quantised in training
        raise DemoError(f"--adapter {adapter}: {e}") from None
    if quant is None:
        return load_adapter_strictly(model, adapter).merge_and_unload().eval()
    try:
        n = quantize_hf_model(model, quant)
    except ValueError as e:  # bitsandbytes missing or too old
        raise DemoError(f"--adapter {adapter}: {e}") from None
    log(f"base quantised as in training: {quant.describe()} ({n} bitsandbytes Linear4bit layers)")
    return load_adapter_strictly(model, adapter).eval()


def other_base(model, adapter: str | Path, model_path: str | Path | None = None, elements: int = 64) -> str | None:
    """The adapter's recorded base (base_model_name_or_path) when it is a local HF dir whose safetensors weights
    differ from `model`'s (the first `elements` values of each tensor they share, cast to the model's dtype as
    from_pretrained casts them): an adapter applied to another model of the same shapes (a chat variant of its base)
    runs without an error. None when they are the same, or when that cannot be told (a Hub id, no safetensors); a
    pipeline dir `model_path` converted from the recorded base (hg_to_pp's hf_source.json; maybe cast to another
    dtype, as training read it) is the same."""
    from safetensors import safe_open

    from models.hf_io import CheckpointError, hf_source_of

    recorded = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    files = sorted(Path(recorded).glob("*.safetensors")) if isinstance(recorded, str) and Path(recorded).is_dir() else []
    try:
        source = hf_source_of(model_path) if model_path is not None and Path(model_path).is_dir() else None
    except CheckpointError:  # a damaged hf_source.json: not a proof
        source = None
    if not files or any(Path(recorded).resolve() == Path(d).resolve()
                        for d in (getattr(model, "name_or_path", "") or "/", source or "/")):
        return None
    own = model.state_dict()
    for f in files:
        with safe_open(str(f), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                mine, part = own.get(key), weights.get_slice(key)
                if mine is None or not mine.is_floating_point() or list(mine.shape) != list(part.get_shape()) \
                        or mine.dim() == 0:
                    continue
                rows = slice(0, elements) if mine.dim() == 1 else slice(0, 1)  # read a row, not the whole tensor
                theirs = part[rows].reshape(-1)[:elements].to(mine.dtype)
                if not torch.equal(theirs, mine[rows].reshape(-1)[:elements].cpu()):
                    return recorded
    return None


def load_adapter_strictly(model, adapter: str | Path):
    """PeftModel.from_pretrained, but an adapter made for another base is one line: PEFT drops the tensors that find
    no module (an adapter of a deeper model: its last layers) without a word, and a family or width that differs
    is a traceback."""
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    from models.lora import adapter_keys

    if (Path(adapter) / "adapter_model.safetensors").is_file():  # (peft also saves adapter_model.bin)
        adapter_keys(adapter)  # a damaged file: one line (CheckpointError), not safetensors' traceback
    base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    fits = f"--adapter {adapter} does not fit this base model (the adapter's base: {base or 'not recorded'})"
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, RuntimeError) as e:  # no target module (another family); shapes (another width)
        raise DemoError(f"{fits}: {one_line(e)}") from None
    saved, used = set(load_peft_weights(str(adapter))), set(get_peft_model_state_dict(peft_model))
    if saved - used or used - saved:
        what = (f"its tensor {min(saved - used)} has no place in the base" if saved - used else
                f"it has no tensor {min(used - saved)}")
        raise DemoError(f"{fits}: {what} ({len(saved - used)} unused, {len(used - saved)} missing)")
    return peft_model


def run(args: argparse.Namespace) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    from deepspeed.accelerator import get_accelerator

    from launch.accelerator import install_from_env

    install_from_env()
    acc = get_accelerator()
    if world_size > 1 and acc.device_name() == "cpu":
        raise DemoError(f"WORLD_SIZE={world_size}: the tensor-parallel demo needs accelerators (GPUs, Gaudi, ...; "
                        "DeepSpeed found only the CPU); run `python demo.py ...` for one process on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if problem := accelerator_problem(acc, local_rank):
        raise DemoError(problem)
    device = torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.device_name(local_rank))
    dtype = pick_dtype(args.dtype, device)
    rec = build_record(args)
    t0 = time.time()
    if rank == 0:
        log(f"loading {args.model_path} ({str(dtype).removeprefix('torch.')}, {device.type}, {world_size} process(es))")
    if args.adapter:
        from models.convert import resolve_checkpoint, resolve_hf_dir
        from models.lora import read_lora_info

        try:
            layers_dir = resolve_checkpoint(resolve_hf_dir(args.model_path))[0]
        except (CheckpointError, OSError):
            layers_dir = None  # an HF dir, or a path load() reports
        if layers_dir is not None and read_lora_info(layers_dir) is not None:
            raise DemoError(f"--model-path {args.model_path} is a LoRA checkpoint, whose adapters are merged when it is "
                            f"loaded: --adapter {args.adapter} would add them a second time; give the base model with "
                            "--adapter, or drop --adapter")
    tokenizer, config_dir = load_tokenizer_of(args.model_path)
    settings, trained = prompt_settings(([Path(args.adapter)] if args.adapter else []) + [config_dir], args.template,
                                        tokenizer, rank)
    try:
        prompt = encode_prompt(tokenizer, rec, settings)
    except ValueError as e:
        raise DemoError(f"cannot prompt with this record: {one_line(e)}") from None
    model = load_model(args.model_path, dtype)
    if problem := vocab_size_problem(model.get_input_embeddings().num_embeddings, tokenizer):
        raise DemoError(f"{config_dir}: {problem}")
    if (found := special_text_in(rec, tokenizer)) and rank == 0:  # as training warns of such records
        log(f"warning: the prompt's {found}, the text of a special (or template) token, read as that control token "
            "(as training and serving stacks read it)")
    if trained is not None and len(prompt) >= trained and rank == 0:
        log(f"warning: the prompt has {len(prompt)} tokens, and training kept {trained} per sample (max_seq_len in "
            "data_settings.json): the model never learned an answer after so long a prompt")
    eos_ids = stop_ids(getattr(model, "generation_config", None), tokenizer, settings)
    stops = stop_strings(tokenizer, settings)
    max_new_tokens = args.max_new_tokens
    limit, how = ModelFamily.max_positions(model.config)
    if limit is not None and len(prompt) + max_new_tokens > limit:
        if len(prompt) >= limit:
            raise DemoError(f"the prompt has {len(prompt)} tokens, and the model's positions cover {limit} ({how}); "
                            "shorten it")
        max_new_tokens = limit - len(prompt)
        log(f"--max-new-tokens {args.max_new_tokens}: {max_new_tokens} fit after the {len(prompt)}-token prompt "
            f"({limit} positions, {how})")
    if args.adapter:
        model = with_adapter(model, args.adapter, args.model_path)
    if world_size > 1:
        import deepspeed

        acc.set_device(local_rank)
        deepspeed.init_distributed()
        # AutoTP: shards the linear layers over the ranks; every rank runs generate with the same seed
        model = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size}, dtype=dtype)
    else:
        model = model.to(device)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        log(f"loaded {n / 1e6:.2f}M parameters{' per rank' if world_size > 1 else ''} in {time.time() - t0:.1f}s")
        log(f"prompt: {len(prompt)} tokens, template {settings.template!r}; stops on ids {eos_ids}"
            + "".join(f" and the text {t!r}" for t in stops))
        if args.show_ids:
            log(json.dumps({"prompt_ids": prompt}))
    new_ids: list[int] = []
    try:
        text = generate(model, tokenizer, prompt, max_new_tokens, args.temperature, args.top_k, args.top_p,
                        args.seed, stream=rank == 0 and not args.no_stream, eos_ids=eos_ids, stops=stops,
                        new_ids=new_ids, lead=answer_lead(rec, settings, tokenizer))
        if rank == 0 and args.no_stream:
            print(text, flush=True)
        if rank == 0 and not text.strip():  # a blank line alone looks like a failure
            log(f"note: the answer is {'empty' if not text else 'blank'} (the model generated {len(new_ids)} token(s): "
                f"ids {new_ids[:8]}{' ...' if len(new_ids) > 8 else ''})")
        if rank == 0 and args.show_ids:
            log(json.dumps({"generated_ids": new_ids}))
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        run(args)
    except (DemoError, CheckpointError, ModelConfigError, DataError, OSError, AcceleratorError) as e:
        print(f"{PROG}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    started()
    sys.exit(main())
