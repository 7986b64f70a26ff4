"""HF dir <-> pipeline dir (layer_XX-model_states.pt + config + tokenizer), and fresh models.

Every direction goes through the family's one key table, one pipeline layer at a time, into a
temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import zipfile
from collections.abc import Callable
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from pipeft import parse_size

from .family import ModelFamily, config_errors, get_family, meta_layers
from .hf_io import (
    GONE,
    HF_SOURCE_FILE,
    LAYER_FILE,
    LAYER_GLOB,
    REPLACED,
    TOKENIZER_DIRS,
    TOKENIZER_FILES,
    CheckpointError,
    HFCheckpoint,
    ShardWriter,
    _first_line,
    check_not_lfs_pointer,
    copy_side_files,
    hf_source_of,
    load_tokenizer,
    load_torch_file,
    no_dir_error,
    pipeline_dir_problem,
    read_json,
    resolve_hf_dir,
    unreadable,
)
from .keymap import KeyMapError
from .outdir import atomic_output_dir, latest_tag, prepare_target, run_tags

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def family_of(directory: Path) -> tuple[ModelFamily, object]:
    """Read `config.json` of an HF or pipeline dir -> (family, prepared config)."""
    if not directory.is_dir():
        raise no_dir_error(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a model directory needs its config.json)")
    body = read_json(cfg_path)
    if not isinstance(body, dict):  # (was "model_type None is not supported")
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    family = get_family(body.get("model_type"), where=str(cfg_path))
    return family, family.load_config(directory)


def expected_layer_shapes(family: ModelFamily, config) -> dict[int, dict[str, tuple[int, ...]]]:
    """{layer index: {local state-dict key: shape}} for every spec that owns a layer file."""
    return {i: {k: tuple(t.shape) for k, t in m.state_dict().items()} for i, m in meta_layers(family, config).items()}


def expected_layer_keys(family: ModelFamily, config) -> dict[int, list[str]]:
    """{layer index: local state-dict keys} for every spec that owns a layer file."""
    return {i: list(shapes) for i, shapes in expected_layer_shapes(family, config).items()}


def _layer_name(family: ModelFamily, config, idx: int) -> str:
    slot, block = family.key_map.slot_of(idx, family.num_blocks(config))
    return f"block {block}" if slot == "block" else slot


def _mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def config_update(dtype: torch.dtype | None = None, architecture: str | None = None) -> Callable[[str], str]:
    """A config.json transform recording `dtype` (the floating dtype of the weights written): `dtype`, which
    transformers 5 writes and reads first, and `torch_dtype` too where the file has it (what older readers use); and
    `architectures` = [`architecture`] where the file names none (llama.cpp's converter reads architectures[0]); an
    export (`architecture` given) drops `auto_map`: the custom code it names is not what was trained (transformers'
    own class) and is not carried, so `trust_remote_code=True` (vLLM's, lm-eval's) could not load the export.
    A file that already says so is kept byte for byte."""
    name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))

    def transform(text: str) -> str:
        cfg = json.loads(text)
        keys = [] if dtype is None else ["dtype", *(["torch_dtype"] if "torch_dtype" in cfg else [])]
        update: dict = dict.fromkeys(keys, name)
        if architecture is not None and not cfg.get("architectures"):
            update["architectures"] = [architecture]
        custom = custom_classes(cfg) if architecture is not None else set()
        if custom & set(cfg.get("architectures") or []):  # a class of the code dropped: the one trained instead
            update["architectures"] = [architecture]
        drop = ["auto_map"] if architecture is not None and "auto_map" in cfg else []
        if all(cfg.get(k) == v for k, v in update.items()) and not drop:
            return text
        cfg.update(update)
        for key in drop:
            del cfg[key]
        return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    return transform


def custom_classes(cfg: dict) -> set[str]:
    """The class names a config's (or tokenizer config's) `auto_map` points to ("modeling_x.XForCausalLM" -> "XForCausalLM";
    a tokenizer's entries are [slow, fast] pairs)."""
    auto = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    refs = [r for v in auto.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    return {r.rpartition(".")[2] for r in refs}


def without_auto_map(text: str) -> str:
    """A tokenizer_config.json transform for exports: no `auto_map` (its custom code is not carried: the tokenizer
    loads as the class training used); a file without one is kept byte for byte."""
    cfg = json.loads(text)
    if not isinstance(cfg, dict) or "auto_map" not in cfg:
        return text
    del cfg["auto_map"]
    return json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"


def cast_checked(t: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """`t` as `dtype`; CheckpointError (`where`: the file and tensor) when a finite value would become inf, beyond
    the range of `dtype` (float16's is 65504)."""
    out = t.to(dtype)
    if torch.finfo(dtype).max < torch.finfo(t.dtype).max and (torch.isinf(out) & ~torch.isinf(t)).any():
        peak = t[torch.isfinite(t)].abs().max().item()
        raise CheckpointError(f"{where} has values up to {peak:.4g} in magnitude, beyond {DTYPE_NAMES[dtype]}'s range "
                              f"({torch.finfo(dtype).max:.0f}): they would be inf; convert with --dtype bf16")
    return out


def check_tied_head(ckpt: HFCheckpoint, head_key: str, embed_key: str) -> None:
    """An LM head stored beside a tied embedding (`embed_key`, as the checkpoint spells it) is a redundant copy only
    when equal to it; transformers loads a different one untied, so dropping it would change the model:
    CheckpointError naming the file and both keys."""
    head, embed = ckpt.get(head_key), ckpt.get(embed_key)
    if head.shape != embed.shape or not torch.equal(head, embed):
        raise CheckpointError(f"{ckpt.file_of(head_key)}: {head_key} differs from {embed_key}, but config.json says "
                              "\"tie_word_embeddings\": true (transformers loads them untied); set it to false in "
                              f"{ckpt.dir / 'config.json'} to convert both")


def padding_id(tok: Any) -> int | None:
    """A new model's pad_token_id (the embedding's padding_idx, whose row stays zero without a gradient): the
    tokenizer's pad token where it is a token of its own, named so (`<pad>`, `[PAD]`, `<|finetune_right_pad_id|>`),
    not also BOS, EOS or UNK, and not written by the chat template; else None: a pad set to EOS, `<|eot_id|>` or a
    word of the vocabulary (`!`, as `pad_token_id = 0` makes it on a Llama-3 tokenizer; saved, it is an added token
    like `<pad>`) is a real input token that would never learn. None costs nothing: the collator pads with the pad or
    EOS either way and masks the padding out, so no gradient reaches that row."""
    pad = tok.pad_token_id
    if pad is None or pad in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) or "pad" not in tok.pad_token.lower():
        return None
    templates = tok.chat_template if isinstance(tok.chat_template, dict) else {"": tok.chat_template or ""}
    return None if any(tok.pad_token in t or "pad_token" in t for t in templates.values()) else pad


def hg_to_pp(input_path: str | Path, save_path: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """HF dir (safetensors single/sharded, or pytorch_model*.bin; or a Hub id in the local cache) -> pipeline dir,
    one layer in memory at a time."""
    src, dst = resolve_hf_dir(input_path), Path(save_path)
    if src != Path(input_path):
        log(f"{input_path}: the Hugging Face cache's snapshot {src}")
    if not (src / "config.json").is_file() and (problem := pipeline_dir_problem(src)):  # a checkpoint's tag dir
        raise CheckpointError(problem)
    family, config = family_of(src)
    prepare_target(dst, overwrite, [src], say=log)
    if getattr(config, "auto_map", None):
        log(f"note: {src / 'config.json'}: its auto_map (custom model code) is not used: the model trains as "
            f"transformers' {family.hf_model_class.__name__}, and exports drop it (and the tokenizer's)")
    if quant := getattr(config, "quantization_config", None):  # bitsandbytes' absmax / SCB, GPTQ's qweight ...
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise CheckpointError(f"{src / 'config.json'}: a quantised checkpoint (quantization_config, quant_method "
                              f"{method!s}); convert an unquantised (fp16/bf16/fp32) checkpoint of the model")
    ckpt = HFCheckpoint(src)
    n = family.num_blocks(config)
    shapes = expected_layer_shapes(family, config)
    expected = {i: list(v) for i, v in shapes.items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))

    by_layer: dict[int, dict[str, str]] = {i: {} for i in expected}  # layer -> local key -> HF key
    tied_head = None  # an LM head saved beside a tied embedding
    for key in ckpt.keys():
        if family.key_map.is_ignored(key):
            continue
        try:
            idx, local = family.key_map.to_pp(key, n)
        except KeyMapError as e:
            raise CheckpointError(f"{src}: {e}") from None
        if idx not in expected:
            if tied and family.key_map.slot_of(idx, n)[0] == "head":
                tied_head = key  # checked below: only a copy of the embedding may be dropped
                continue
            raise CheckpointError(f"{src}: unexpected tensor {key}")
        if local not in expected[idx]:
            raise CheckpointError(f"{src}: unexpected tensor {key} (the config does not use it)")
        if local in by_layer[idx]:  # e.g. one weight spelled with and without the key table's optional prefix
            raise CheckpointError(f"{src}: tensors {by_layer[idx][local]} and {key} are the same weight")
        if (found := ckpt.shape(key)) != shapes[idx][local]:
            raise CheckpointError(f"{src}: tensor {key} has shape {list(found)} but {src / 'config.json'} expects "
                                  f"{list(shapes[idx][local])}")
        by_layer[idx][local] = key
    embed = family.layer_specs(config)[-1].tied_weight_attr[0] if tied else None  # the tied weight's local key
    if tied_head is not None and embed not in by_layer[0]:
        # only the head stored (safetensors' save_model keeps the first name of shared tensors): transformers loads
        # it as the embedding too
        if (found := ckpt.shape(tied_head)) != shapes[0][embed]:
            raise CheckpointError(f"{src}: tensor {tied_head} has shape {list(found)} but {src / 'config.json'} "
                                  f"expects {list(shapes[0][embed])}")
        by_layer[0][embed], tied_head = tied_head, None
    for idx, keys in expected.items():
        for local in keys:
            if local not in by_layer[idx]:
                raise CheckpointError(f"{src}: missing tensor {family.key_map.to_hf(idx, local, n)}")
    if tied_head is not None:
        check_tied_head(ckpt, tied_head, by_layer[0][embed])

    cast = DTYPES[dtype] if dtype else None
    t0 = time.time()
    needed = ckpt.nbytes((k for keys in by_layer.values() for k in keys.values()), cast)
    with atomic_output_dir(dst, overwrite, needed=needed, say=log, sources=[src]) as tmp:
        for step, idx in enumerate(sorted(expected), 1):
            sd = {}
            for local in expected[idx]:
                key = by_layer[idx][local]
                t = ckpt.get(key)
                if cast is not None and t.is_floating_point():
                    t = cast_checked(t, cast, f"{ckpt.file_of(key)}: tensor {key}")
                sd[local] = t
            torch.save(sd, tmp / LAYER_FILE.format(idx))
            log(f"[{step}/{len(expected)}] {LAYER_FILE.format(idx)} ({_layer_name(family, config, idx)}): "
                f"{len(sd)} tensors, {_mb(sd.values()):.1f} MB")
            del sd
        copied = copy_side_files(src, tmp, transform={"config.json": config_update(cast)} if cast is not None else None)
        # where the weights came from: a PEFT export names it as its base (a Hub id as given, else the dir)
        hub_id = src != Path(input_path)
        (tmp / HF_SOURCE_FILE).write_text(json.dumps({"hf_model": str(input_path) if hub_id else str(src.resolve())}) + "\n")
    log(f"wrote {len(expected)} layer files + {', '.join(copied)} to {dst} in {time.time() - t0:.1f}s")
    return dst


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """A pipeline dir, a checkpoint tag dir, a save dir with `latest`, or a save dir's `best` / `latest` file (the tag
    it names) -> (layer-file dir, config dir)."""
    path = Path(path)
    if path.is_file() and path.name in ("best", "latest"):
        tag = path.read_text(errors="replace").strip()
        if not tag or not (path.parent / tag).is_dir():
            raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint directory beside it")
        path = path.parent / tag
    if not path.is_dir():
        raise no_dir_error(path)
    layers = path
    if (path / "latest").is_file() and not (path / LAYER_FILE.format(0)).is_file():
        layers = path / latest_tag(path)
    if not (layers / LAYER_FILE.format(0)).is_file():
        if (layers / "adapter_config.json").is_file():  # pp_to_hg --lora peft's output
            try:
                base = json.loads((layers / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            model = shlex.quote(str(base)) if base else "BASE"
            raise CheckpointError(f"{layers}: a PEFT adapter (adapter_config.json), not a model: give its base model "
                                  f"with the adapter beside it (demo.py --model-path {model} --adapter "
                                  f"{shlex.quote(str(layers))})")
        if tags := run_tags(path):  # a training save_path without `latest` (lost, or naming a checkpoint since deleted)
            said = (f"its latest names {latest_tag(path)!r}, which is not a checkpoint"
                    if (path / "latest").is_file() else "it has no `latest` file")
            raise CheckpointError(f"{path}: a training save_path, but {said}; give one of its checkpoints, e.g. "
                                  f"{path / tags[-1]} (the newest; it has {', '.join(tags[-3:])})")
        raise CheckpointError(f"{layers}: no {LAYER_FILE.format(0)} (not a pipeline or checkpoint directory)")
    config_dir = layers if (layers / "config.json").is_file() else layers.parent
    return layers, config_dir


def missing_layer_file(layers_dir: Path, family: ModelFamily, config, expected=None) -> str | None:
    """The first layer file the model's config needs that `layers_dir` lacks, or holds empty or cut short (no
    torch.save archive: its end is read), as one line; None if none. Before any work: the layers load much later."""
    if not layers_dir.is_dir():  # it was there when resolve_checkpoint chose it
        return f"{layers_dir}: {GONE}"
    for idx in expected if expected is not None else meta_layers(family, config):
        path = layers_dir / LAYER_FILE.format(idx)
        if not path.is_file():
            return f"{path}: missing ({_layer_name(family, config, idx)})"
        try:
            check_not_lfs_pointer(path)
            with open(path, "rb") as f:  # a zip archive, or torch's legacy (pre-1.6) pickle (load_torch_file reads it)
                whole = zipfile.is_zipfile(f) or (f.seek(0) == 0 and f.read(2) == b"\x80\x02")
        except CheckpointError as e:
            return str(e)
        except OSError as e:  # not readable by this user; removed since
            return str(unreadable(path, e))
        if not whole:  # (an empty file failed after the data were tokenized, in torch's words)
            return (f"{path}: unreadable, the file is corrupt or truncated ({path.stat().st_size} bytes, not a "
                    f"torch.save archive; {_layer_name(family, config, idx)})")
    return None


def iter_hf_tensors(layers_dir: Path, family: ModelFamily, config, progress: bool = True):
    """Yield (HF key, tensor) from a dir of layer files, one layer file in memory at a time; a missing file, a wrong
    key set or shape raises CheckpointError naming the file, for every file before the first tensor is yielded."""
    n = family.num_blocks(config)
    expected = expected_layer_keys(family, config)
    if problem := missing_layer_file(layers_dir, family, config, expected):
        raise CheckpointError(problem)
    shapes = expected_layer_shapes(family, config)

    seen: dict[int, tuple] = {}  # each file as the first pass read it: the second reads the same one

    def checked(idx: int) -> dict[str, torch.Tensor]:
        path = layers_dir / LAYER_FILE.format(idx)
        sd = load_torch_file(path)
        try:
            st = path.stat()
        except OSError as e:
            raise (CheckpointError(f"{path}: {GONE}") if isinstance(e, FileNotFoundError) else unreadable(path, e)) from None
        now = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)  # (not ctime: a chmod or a hard link changes it)
        if seen.setdefault(idx, now) != now:  # a run saving this step again swaps the whole directory: the layers
            # read before and after would be of two checkpoints
            raise CheckpointError(f"{path}: {REPLACED}")
        missing, extra = set(expected[idx]) - set(sd), set(sd) - set(expected[idx])
        if missing or extra:
            what = f"missing {sorted(missing)}" if missing else f"unexpected {sorted(extra)}"
            raise CheckpointError(f"{path}: {what}")
        for local, t in sd.items():
            if tuple(t.shape) != shapes[idx][local]:
                raise CheckpointError(f"{path}: tensor {local} has shape {list(t.shape)} but config.json expects "
                                      f"{list(shapes[idx][local])}")
        return sd

    for idx in expected:  # every file's keys and shapes before the first tensor is yielded (memory-mapped: cheap)
        checked(idx)
    for step, idx in enumerate(sorted(expected), 1):
        path = layers_dir / LAYER_FILE.format(idx)
        sd = checked(idx)
        for local in expected[idx]:
            yield family.key_map.to_hf(idx, local, n), sd[local]
        if progress:
            log(f"[{step}/{len(expected)}] {path.name} ({_layer_name(family, config, idx)}): {len(sd)} tensors")


def data_settings_in(config_dir: Path):
    """data_settings.json of `config_dir` (None when it has none); a bad file is a CheckpointError naming it."""
    from data.settings import read_data_settings

    try:
        return read_data_settings(config_dir)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def end_of_turn_generation_config(config_dir: Path, config, found) -> str | None:
    """generation_config.json's text with `eos_token_id` holding every token the run's samples end with
    (data_settings.json says how they were rendered): the tokenizer's EOS and, for a run trained with "template":
    "chat", the chat template's end-of-turn token ([EOS, end-of-turn], as Llama-3-Instruct ships it). transformers'
    generate stops only on the file's ids, so a base model's file that names another EOS (a tokenizer whose EOS was
    changed to <|im_end|>, a generation config still naming </s>) would generate to max_new_tokens where demo.py stops.
    None when the file names them all already, or the checkpoint records no data settings. `found`:
    `data_settings_in`."""
    from data.settings import DATA_SETTINGS_FILE

    if found is None:
        return None
    tok = load_tokenizer(config_dir, "to look up the tokens generation stops on")
    needed = [tok.eos_token_id]
    if found.template.template == "chat" and found.end_of_turn:
        eot = tok.convert_tokens_to_ids(found.end_of_turn)
        if not isinstance(eot, int) or (eot == tok.unk_token_id and found.end_of_turn != tok.unk_token):
            raise CheckpointError(f"{config_dir / DATA_SETTINGS_FILE}: end_of_turn {found.end_of_turn!r} is not a token "
                                  f"of the tokenizer in {config_dir}")
        needed.append(eot)
    gen_file = config_dir / "generation_config.json"
    body = read_json(gen_file) if gen_file.is_file() else {
        k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(config, k, None) is not None}
    if not isinstance(body, dict):
        raise CheckpointError(f"{gen_file}: not a JSON object")
    eos = body.get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    missing = [i for i in dict.fromkeys(needed) if i is not None and i not in ids]
    if not missing:
        return None
    body["eos_token_id"] = [*ids, *missing]
    return json.dumps(body, indent=2) + "\n"


def chat_template_mismatch(config_dir: Path, found, peft: bool = False) -> str | None:
    """A warning when the run trained records through the default templates ("### Human:" / "### Assistant:", ...)
    but the tokenizer the export carries (`peft`: the base's, which an adapter is used with) has a chat_template of
    its own (kept byte for byte): transformers' apply_chat_template and chat endpoints (vLLM's, TGI's) would prompt
    that format, not the one the model learned. Not for a run of pretrain text only. `found`: `data_settings_in`."""
    from data.settings import DATA_SETTINGS_FILE

    if found is None or found.template.template != "default" or found.prompted is False:
        return None
    tok_config = config_dir / "tokenizer_config.json"
    body = read_json(tok_config) if tok_config.is_file() else {}
    if not (config_dir / "chat_template.jinja").is_file() and not (isinstance(body, dict) and body.get("chat_template")):
        return None
    tokenizer = ("the base model's tokenizer, which the adapter is used with," if peft else "the tokenizer it exports")
    return (f"warning: {config_dir / DATA_SETTINGS_FILE}: this run trained with the default templates (\"### Human:\" / "
            f"\"### Assistant:\", \"### Instruction:\" ...), but {tokenizer} keeps its own chat_template: "
            "apply_chat_template and chat endpoints (vLLM, TGI) would prompt that format, not the one this model learned; "
            "prompt it with demo.py or send the default template's text to a completions endpoint")


def pp_to_hg(input_path: str | Path, save_path: str | Path, max_shard_size: str = "5GB", overwrite: bool = False,
             lora: str | None = None, base: str | Path | None = None) -> Path:
    """Pipeline or checkpoint dir -> HF dir with sharded safetensors + index, config (its dtype that of the weights
    written when they share one, its `architectures` the family's class where it names none), tokenizer and
    generation config (stopping on the tokens the run's answers end with, see `end_of_turn_generation_config`).
    A LoRA checkpoint needs `lora`: "peft" (adapter_config.json + adapter_model.safetensors) or "merge" (the base
    with the adapters merged in, as a full HF dir); `base`: where its base pipeline dir is now, when it moved since
    training (proven the same by its fingerprint)."""
    from .lora import export_peft, located_base, merged_hf_tensors, read_lora_info

    layers_dir, config_dir = resolve_checkpoint(input_path)
    dst = Path(save_path)
    family, config = family_of(config_dir)
    try:
        max_bytes = parse_size(max_shard_size, "--max-shard-size", "5GB, 500MB or 2000000", bare=True)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    info = read_lora_info(layers_dir)
    if base is not None:
        if info is None:
            raise CheckpointError(f"--base {base}: {layers_dir} is not a LoRA checkpoint (no "
                                  f"{layers_dir / 'lora_config.json'}): only an adapters' base can be given")
        info = located_base(info, base, layers_dir)
    base = info.get("base_model_path") if info else None
    sources = [input_path, layers_dir, config_dir, base, hf_source_of(base) if base else None]  # an adapter's base
    prepare_target(dst, overwrite, sources, say=log)
    if info is None and lora is not None:
        raise CheckpointError(f"{layers_dir}: --lora {lora}: not a LoRA checkpoint (no {layers_dir / 'lora_config.json'})")
    if info is not None and lora not in ("peft", "merge"):
        raise CheckpointError(f"{layers_dir}: a LoRA checkpoint (adapters only): pass --lora peft (a PEFT adapter "
                              "dir) or --lora merge (a full HF model with the adapters merged in)")
    found = data_settings_in(config_dir)
    generation_config = end_of_turn_generation_config(config_dir, config, found)
    if mismatch := chat_template_mismatch(config_dir, found, peft=lora == "peft"):
        log(mismatch)
    if generation_config is not None:
        log(f"{config_dir / 'data_settings.json'}: generation_config.json's eos_token_id becomes "
            f"{json.loads(generation_config)['eos_token_id']} (with the EOS{' and end-of-turn' if found.end_of_turn and found.template.template == 'chat' else ''} "
            "token this run's answers end with)")
    if lora == "peft":
        export_peft(layers_dir, info, family, config, dst, overwrite, side_dir=config_dir,
                    generation_config=generation_config)
        q = info.get("quantization")
        log(f"wrote a PEFT adapter (r {info['r']}, alpha {info['alpha']:g}, {', '.join(info['target_modules'])}) "
            f"to {dst}; base: {json.loads((dst / 'adapter_config.json').read_text())['base_model_name_or_path']}" + ("" if not q else f"; the base was trained 4-bit: load it with "
            f"BitsAndBytesConfig(**{json.dumps(q)}) (recorded in {dst / 'quantization_config.json'}, which peft does "
            "not read: pass it to AutoPeftModelForCausalLM.from_pretrained as quantization_config)"))
        return dst
    if lora == "merge":
        if q := info.get("quantization"):
            log(f"QLoRA checkpoint: merging the adapters into the dequantised 4-bit base ({q['bnb_4bit_quant_type']}): "
                "every quantised linear weight is written as its dequantised value, in the base's dtype: a model that "
                "computes what training computed (not the original base weights)")
        tensors = merged_hf_tensors(layers_dir, info, family, config)
    else:
        tensors = iter_hf_tensors(layers_dir, family, config)
    first = next(tensors)  # validates every layer file before anything is written
    # what is written is the size of the weights read: the base's layer files for a merge (a (Q)LoRA checkpoint's
    # own files hold only the adapters), else the checkpoint's
    weights_dir = Path(info["base_model_path"]) if lora == "merge" else layers_dir
    needed = sum(f.stat().st_size for f in weights_dir.glob(LAYER_GLOB))

    t0 = time.time()
    floats: set[torch.dtype] = set()  # the floating dtypes written
    with atomic_output_dir(dst, overwrite, needed=needed, say=log, sources=sources) as tmp:
        writer = ShardWriter(tmp, max_bytes)
        for key, tensor in chain([first], tensors):
            if lora == "merge" and tensor.dtype == torch.float16 and torch.isinf(tensor).any():
                raise CheckpointError(f"{layers_dir}: tensor {key}: the merged weight has values beyond float16's "
                                      "range (65504), which would be inf; export the adapter unmerged (--lora peft)")
            if tensor.is_floating_point():
                floats.add(tensor.dtype)
            writer.add(key, tensor)
        shards = writer.close()
        # weights of mixed dtypes (bf16 linears, fp32 norms) load as the config's dtype, which is kept
        dtype = next(iter(floats)) if len(floats) == 1 else None
        transform = config_update(dtype, family.hf_model_class.__name__)
        copied = copy_side_files(config_dir, tmp, transform={"config.json": transform,
                                                             "tokenizer_config.json": without_auto_map})
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(generation_config)
            copied = list(dict.fromkeys([*copied, "generation_config.json"]))
    log(f"wrote {shards} safetensors shard(s) ({writer.total / 2**20:.1f} MB) + {', '.join(copied)} "
        f"to {dst} in {time.time() - t0:.1f}s")
    return dst


def _is_hf_dir(path: Path) -> bool:
    """An HF model dir (config.json, no layer files), not a pipeline, checkpoint or save dir."""
    return (path / "config.json").is_file() and not (path / LAYER_FILE.format(0)).is_file() \
        and not (path / "latest").is_file()


def config_dir_of(path: str | Path) -> Path:
    """The dir of config.json and the tokenizer of anything `load_hf_model` loads, its weights not read."""
    path = resolve_hf_dir(path)
    return path if _is_hf_dir(path) else resolve_checkpoint(path)[1]


def load_hf_model(path: str | Path, dtype: torch.dtype | None = None):
    """An HF model (`family.hf_model_class`) from an HF dir or from a pipeline / checkpoint dir
    (layer files mapped through the key table in memory), or a Hub id in the local cache. Returns (model, family,
    config dir)."""
    path = resolve_hf_dir(path)
    if _is_hf_dir(path):
        family, config = family_of(path)
        try:
            model, info = family.hf_model_class.from_pretrained(str(path), config=config, dtype=dtype,
                                                                output_loading_info=True)
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # a truncated file, a shape transformers refuses
            raise CheckpointError(f"{path}: cannot load the model's weights ({_first_line(e)})") from None
        for kind, what in (("missing_keys", "missing tensor"), ("unexpected_keys", "unexpected tensor"),
                           ("mismatched_keys", "tensor of another shape")):
            if found := sorted(info.get(kind) or []):  # transformers would run with random or dropped weights
                first = found[0] if isinstance(found[0], str) else found[0][0]
                raise CheckpointError(f"{path}: {what} {first}" + (f" (and {len(found) - 1} more)" if len(found) > 1
                                                                   else ""))
        return model, family, path
    from transformers.initialization import no_init_weights

    from .lora import merged_hf_tensors, read_lora_info

    layers_dir, config_dir = resolve_checkpoint(path)
    family, config = family_of(config_dir)
    with no_init_weights():  # allocated, not randomly initialised: every weight is assigned below
        model = family.hf_model_class(config)
    info = read_lora_info(layers_dir)  # a LoRA checkpoint: its base with the adapters merged in
    tensors = merged_hf_tensors(layers_dir, info, family, config, progress=False) if info else \
        iter_hf_tensors(layers_dir, family, config, progress=False)
    sd = dict(tensors)
    if dtype is not None:
        sd = {k: t.to(dtype) if t.is_floating_point() else t for k, t in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{layers_dir}: tensors do not fit {family.hf_model_class.__name__}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), family, config_dir


def init_model(family_name: str, save_path: str | Path, tokenizer_dir: str | Path, config_json: str | Path | None = None,
               preset: str | None = None, seed: int = 0, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """A freshly initialised model (transformers' init, seeded per layer) written as a pipeline dir."""
    from transformers import GenerationConfig

    family = get_family(family_name, where="--family")
    dst = Path(save_path)
    if (config_json is None) == (preset is None):
        raise CheckpointError("init: give exactly one of --config-json FILE or --preset NAME")
    if preset is not None:
        if preset not in family.presets:
            raise CheckpointError(f"--preset {preset!r}: unknown for {family_name}; known: {', '.join(family.presets)}")
        cfg_dict = dict(family.presets[preset])
    else:
        try:
            cfg_dict = json.loads(Path(config_json).read_text())
        except (OSError, ValueError) as e:  # (JSONDecodeError, UnicodeDecodeError)
            raise CheckpointError(f"{config_json}: cannot read config ({e})") from None
        if not isinstance(cfg_dict, dict):
            raise CheckpointError(f"{config_json}: not a JSON object")
        if cfg_dict.get("model_type", family.model_type) != family.model_type:
            raise CheckpointError(f"{config_json}: model_type {cfg_dict['model_type']!r} is not {family.model_type!r}")
    tokenizer_dir = resolve_hf_dir(tokenizer_dir)  # a local dir, or a Hub id's snapshot in the local cache
    if not tokenizer_dir.is_dir():
        raise no_dir_error(tokenizer_dir)
    sources = [tokenizer_dir, config_json]
    prepare_target(dst, overwrite, sources, say=log)
    tok = load_tokenizer(tokenizer_dir)
    from data.tokenizer_checks import vocabulary_problem

    if problem := vocabulary_problem(tok):
        raise CheckpointError(f"{tokenizer_dir}: {problem}")
    vocab = cfg_dict.get("vocab_size") if config_json is not None else None
    if isinstance(vocab, int) and vocab < len(tok):
        raise CheckpointError(f"{config_json}: vocab_size {vocab} is smaller than the tokenizer's {len(tok)} tokens")
    cfg_dict.pop("model_type", None)
    where = config_json if config_json is not None else f"--preset {preset}"
    with config_errors(where):
        config = family.config_class(**{
            **cfg_dict, "vocab_size": len(tok) if vocab is None else vocab, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": padding_id(tok),
        })
        family.prepare_config(config)
    config.dtype = DTYPE_NAMES[DTYPES[dtype]]
    config.architectures = [family.hf_model_class.__name__]  # as save_pretrained writes it; llama.cpp's converter reads it
    family.check_config(config, where)
    specs = family.layer_specs(config)
    with atomic_output_dir(dst, overwrite, say=log, sources=sources) as tmp:
        owners = sorted(meta_layers(family, config))  # a tied head owns no file: its weight is the embedding's
        for step, idx in enumerate(owners, 1):
            module = specs[idx].build()  # one layer in memory at a time
            family.init_layer(module, config, idx, seed)
            torch.save(module.to(DTYPES[dtype]).state_dict(), tmp / LAYER_FILE.format(idx))
            log(f"[{step}/{len(owners)}] {LAYER_FILE.format(idx)} ({_layer_name(family, config, idx)})")
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        # the tokenizer's own files, byte for byte (save_pretrained would drop a SentencePiece tokenizer.model)
        if not copy_side_files(Path(tokenizer_dir), tmp, (*TOKENIZER_FILES, *TOKENIZER_DIRS)):
            tok.save_pretrained(str(tmp))
    n_params = sum(p.numel() for m in meta_layers(family, config).values() for p in m.parameters())  # tied: once
    log(f"initialised a {family_name} model ({n_params / 1e6:.2f}M parameters, {config.num_hidden_layers} layers) in {dst}")
    return dst

