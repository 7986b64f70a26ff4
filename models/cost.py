"""The one cost and memory model: per-unit compute (the automatic partition's weights), per-unit parameters, and
per-stage training memory (weights, gradients, optimizer states, activations under 1F1B, logits / loss buffers,
overhead). The automatic partition (`unit_costs`), the start-up summary and `python -m training.plan` all use it.

Units are the pipeline's (see models/pipeline.py): unit 0 the embedding, units 1..N the decoder blocks, unit N+1
the head (final norm + LM head). Activation sizes count the tensors autograd saves for backward in this project's
layers (transformers' blocks, SDPA / eager attention, the chunked loss), per token of a micro-batch row.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields

import torch

from .pipeline import LOSS_CHUNK_ELEMENTS, loss_chunk_rows
from .wgrad import deferred_micro_batches, defers

# The cross-entropy's work per logit and token, in multiply-add equivalents: the fp32 cast, max, exp, sum,
# log and the gradient's softmax - onehot, all memory-bound: measured about 54 multiply-adds per logit in fp32 on a CPU
# (hidden 256, vocab 2048), about 0.1 x hidden for bf16 on a GPU; 64 is in between.
CE_COST_PER_VOCAB = 64
REDUCE_BUCKET = 500_000_000  # DeepSpeed flattens gradients in buckets of this many elements to reduce them
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per 64-weight block (bitsandbytes NF4, no double quant)
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # double quant: 8-bit absmax per block, an fp32 one per 256 of those
GPU_OVERHEAD = 1.5 * 2**30  # CUDA context, NCCL buffers (not in max_memory_allocated, but in the device's memory)
GPU_FRAGMENTATION = 0.05  # the caching allocator's slack, as a share of the allocated bytes (assumed, not measured)
# glibc's malloc (the CPU) serves a request of at least this size with its own mmap when no free heap chunk fits it,
# and unmaps it when freed (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the dynamic threshold never rises above it); smaller
# freed blocks stay resident in the heap
GLIBC_MMAP_MAX = 32 * 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class UnitParams:
    total: int  # parameters of the unit's modules
    linear: int  # of which decoder-block nn.Linear weights (what NF4 quantizes; LoRA's base)


@dataclass(frozen=True)
class LoraShape:
    r: int
    targets: tuple[str, ...]
    dropout: float = 0.0


@dataclass(frozen=True)
class Setup:
    """What training memory depends on besides the model and the partition."""

    micro_batch: int
    seq_len: int
    pipe: int
    data: int = 1
    grad_accum: int = 1
    precision: str = "bf16"  # fp32 | bf16 | fp16
    zero_stage: int = 1  # 0 or 1
    offload: bool = False  # ZeRO-1 optimizer states (and fp32 gradients, master weights) in host memory
    grad_ckpt: bool = False
    lora: LoraShape | None = None
    quantization: str | None = None  # "nf4": 4-bit frozen block weights (QLoRA); needs lora
    double_quant: bool = False  # bnb_4bit_use_double_quant: the block scales quantized too (NF4_DQ_BYTES)
    defer_wgrad: bool = True  # full fine-tuning without checkpointing: later stages defer weight gradients (wgrad.py)
    overhead_bytes: tuple[float, ...] = ()  # per stage, measured by the caller (CPU: the process before the model);
    # empty: a GPU's stated overhead (GPU_OVERHEAD + GPU_FRAGMENTATION of the rest)
    fused_norm: bool | None = None  # RMSNorm runs torch's fused kernel; None: fused_rms_norm("cuda"), not on a CPU

    @property
    def fused(self) -> bool:
        return self.fused_norm if self.fused_norm is not None else not self.overhead_bytes and fused_rms_norm("cuda")

    def in_flight(self, stage: int) -> int:
        """Micro-batches whose activations `stage` holds at once under 1F1B (DeepSpeed's TrainSchedule)."""
        return min(self.pipe - stage, self.grad_accum)


@functools.cache  # the planner asks once per stage it sizes
def fused_rms_norm(device: str, version: str | None = None) -> bool:
    """Whether F.rms_norm (models.llama.RMSNorm) runs torch's fused kernel on `device`: CUDA from torch 2.8 (2.7 has
    the op for MPS only), which saves less than the composite torch runs elsewhere (HPU, Neuron, the CPU, an older
    torch). `version`: torch's, default the installed one."""
    major, minor = (int(x) for x in re.findall(r"\d+", version or torch.__version__)[:2])
    return device == "cuda" and (major, minor) >= (2, 8)


@dataclass
class StageMemory:
    """One stage's peak memory split, in bytes; `total` is the predicted peak."""

    units: tuple[int, int]  # [first, last] unit
    params: int
    trainable: int
    weights: float
    gradients: float
    optimizer: float  # optimizer states (+ fp32 master weights) on the device
    activations: float  # saved tensors of the micro-batches in flight + pipe buffers + one backward's working set
    # + the deferred weight-gradient inputs (models/wgrad.py)
    logits: float  # logits and loss buffers (last stage)
    step_buffer: float  # the step's transients: gradient reduction buffer + optimizer temporaries (after backward)
    overhead: float
    host: float = 0.0  # offloaded optimizer states, master weights, fp32 gradients
    in_flight: int = 1

    heap: bool = False  # CPU: freed activation memory stays in the heap, fragmented, so the step's buffers add to it
    logits_unmapped: bool = False  # CPU: the loss buffers are each >= GLIBC_MMAP_MAX, mmapped and unmapped when freed
    # (in the backward, before the step), so the step's buffers reuse their memory as on a GPU

    @property
    def total(self) -> float:
        static = self.weights + self.gradients + self.optimizer
        if not self.heap:
            return static + max(self.activations + self.logits, self.step_buffer) + self.overhead
        if self.logits_unmapped:
            return static + self.activations + max(self.logits, self.step_buffer) + self.overhead
        return static + self.activations + self.logits + self.step_buffer + self.overhead

    def as_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


# ---------------------------------------------------------------------------------------------- parameters


_SHAPES: dict = {}  # (model_type, id(config)) -> (config, shapes): the config is held so its id is not reused


def _block_shapes(family, config) -> tuple[int, dict[str, tuple[int, int]]]:
    """(parameters of one block, {linear name: (in, out)}) from a block built on the meta device."""
    key = (family.model_type, id(config))
    if key not in _SHAPES:
        with torch.device("meta"):
            block = family.block_class(family.prepare_config(config), 0)
        linears = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for n, m in block.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        _SHAPES[key] = (config, (sum(p.numel() for p in block.parameters()), linears))
    return _SHAPES[key][1]


def unit_params(family, config) -> list[UnitParams]:
    """Parameters per unit, from the family's own modules built on the meta device. The head unit of a tied model
    counts the embedding it shares (DeepSpeed builds the tied module on both stages)."""
    key = ("units", family.model_type, id(config))
    if key in _SHAPES:
        return _SHAPES[key][1]
    specs = family.layer_specs(config)
    with torch.device("meta"):
        embed, norm, head = (specs[i].build() for i in (0, -2, -1))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block, linears = _block_shapes(family, config)
    linear = sum(i * o for i, o in linears.values())
    n = family.num_blocks(config)
    units = [UnitParams(count(embed), 0), *[UnitParams(block, linear)] * n, UnitParams(count(norm) + count(head), 0)]
    _SHAPES[key] = (config, units)
    return units


def stage_params(units: list[UnitParams], idx: range, tied: bool) -> tuple[int, int]:
    """(parameters, block linear weights) a stage holding units `idx` builds, as DeepSpeed does: the head unit of a
    tied model counts the shared embedding (built on its stage too), but a stage holding both ends builds it once."""
    total = sum(units[u].total for u in idx) - (units[0].total if tied and 0 in idx and len(units) - 1 in idx else 0)
    return total, sum(units[u].linear for u in idx)


def lora_params(family, config, lora: LoraShape) -> int:
    """Adapter parameters of one block: r x (in + out) per targeted linear."""
    _, linears = _block_shapes(family, config)
    return sum(lora.r * (linears[t][0] + linears[t][1]) for t in lora.targets)


def _largest_param(family, config, units: list[UnitParams], idx: range, full: bool) -> int:
    """Elements of the largest trainable tensor among units `idx` (full fine-tuning; LoRA: an adapter, small)."""
    if not full:
        return 0
    # a block: its largest linear; the embedding and head units: the vocab x hidden matrix (their norms are small)
    sizes = [max(i * o for i, o in _block_shapes(family, config)[1].values()) if 0 < u < len(units) - 1
             else config.vocab_size * config.hidden_size for u in idx]
    return max([0, *sizes])


def unit_costs(family, config, seq_len: int | None = None) -> list[float]:
    """Per-token multiply-adds per unit, the auto-balance weights (the embedding is a lookup). A block: its
    matmul parameters, plus causal attention's scores and weighted sum at `seq_len` tokens (QK^T and AV,
    2 x T x heads x head_dim over the full square, half of it causal: T x heads x head_dim). The head: hidden x vocab, plus the
    cross-entropy's elementwise work over the vocabulary (CE_COST_PER_VOCAB per logit)."""
    block = _block_shapes(family, config)[0] + (seq_len or 0) * _dims(family, config)[2]
    head = config.hidden_size * config.vocab_size + CE_COST_PER_VOCAB * config.vocab_size
    return [0.0] + [float(block)] * family.num_blocks(config) + [float(head)]


# ---------------------------------------------------------------------------------------------- activations


def _dims(family, config) -> tuple[int, int, int, int, int]:
    """(hidden, heads, query width, key / value width, MLP width), the widths from the block's real linears (a
    model's heads x head_dim need not equal its hidden size)."""
    h, heads = config.hidden_size, config.num_attention_heads
    linears = _block_shapes(family, config)[1]
    if "query_key_value" in linears:  # Bloom: fused QKV, heads x (hidden / heads)
        q = kv = linears["query_key_value"][1] // 3
        return h, heads, q, kv, linears["dense_h_to_4h"][1]
    return h, heads, linears["q_proj"][1], linears["k_proj"][1], linears["gate_proj"][1]


def block_activation_bytes(family, config, seq_len: int, b: int, lora: LoraShape | None, mask_bytes: int = 1,
                           fused_norm: bool = True) -> float:
    """Bytes autograd saves per token of one block's forward (b: bytes of the compute dtype). A frozen linear (LoRA
    base) saves no input; an adapter saves its input once (dropout 0) or its dropout output and mask per module
    (`mask_bytes` an element: 1, the bool mask of CUDA's fused dropout; on the CPU, b: torch multiplies by a mask in
    the compute dtype there). `fused_norm`: RMSNorm is torch's fused kernel (CUDA; it saves its input and the
    reciprocal RMS), else torch's composite (the CPU)."""
    h, heads, q, kv, inter = _dims(family, config)

    def linear_inputs(names: tuple[str, ...], width: int) -> float:
        if lora is None:
            return b * width
        hit = [n for n in names if n in lora.targets]
        if not hit:
            return 0.0
        return b * width if lora.dropout == 0 else len(hit) * (b + mask_bytes) * width

    adapters = 0.0 if lora is None else sum(b * lora.r for _ in lora.targets)
    if family.model_type == "bloom":  # LayerNorm, fused QKV, eager ALiBi attention (fp32 softmax), GELU MLP
        attn = 4 * heads * seq_len + (b * heads * seq_len if b != 4 else 0)  # softmax output + its cast
        saved = (b * h + 8  # ln1 input, mean / rstd
                 + linear_inputs(("query_key_value",), h)
                 + 3 * b * q + attn  # q, k, v head-major copies
                 + linear_inputs(("dense",), q)
                 + b * h + 8 + linear_inputs(("dense_h_to_4h",), h)  # ln2
                 + b * inter + linear_inputs(("dense_4h_to_h",), inter))  # GELU input, its output
        return saved + adapters
    # Llama: RMSNorm (fused: its input, 1 / rms; composite: in fp32, its input and the normalised product the weight
    # multiplies), SDPA (q, k, v, output, logsumexp), SwiGLU
    norm = _rms_norm_bytes(h, b, lora is None, fused_norm)
    saved = (2 * norm + linear_inputs(("q_proj", "k_proj", "v_proj"), h) + linear_inputs(("gate_proj", "up_proj"), h)
             + b * (q + 2 * kv) + b * q + 4 * heads  # rotated q, k, v, output, logsumexp
             # o_proj reads the attention output itself ([B, T, heads, D] from SDPA / flash: one storage); only
             # LoRA's dropout makes new tensors of it
             + (linear_inputs(("o_proj",), q) if lora is not None and lora.dropout > 0 else 0.0)
             + 3 * b * inter + linear_inputs(("down_proj",), inter))  # gate, SiLU out, up, product
    return saved + adapters


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears that read one tensor


def deferred_bytes(family, config, b: int) -> float:
    """Bytes per token one block holds for each micro-batch whose weight gradients wait (models/wgrad.py): every
    linear's output gradient, and its input (one per group of linears that read the same tensor)."""
    linears = _block_shapes(family, config)[1]
    shared = {n: g[0] for g in SHARED_INPUTS for n in g if n in linears}
    inputs = sum(i for n, (i, _) in linears.items() if shared.get(n, n) == n)
    return b * (inputs + sum(o for _, o in linears.values()))


def _embed_bytes(family, config, b: int) -> float:
    return 2 * b * config.hidden_size if family.model_type == "bloom" else 0.0  # Bloom's embedding LayerNorm


def _rms_norm_bytes(h: int, b: int, trainable: bool, fused: bool) -> float:
    """What an RMSNorm (models.llama.RMSNorm, F.rms_norm) saves per token: torch's fused kernel its input and the
    fp32 1 / rms; the composite the fp32 input (a copy in half precision), 1 / rms and, when the weight trains, the
    fp32 normalised product."""
    if fused:
        return b * h + 4
    return 4 * h + 4 + (4 * h if trainable else 0)


def _head_bytes(family, config, b: int, lora: LoraShape | None, fused_norm: bool = True) -> float:
    """Final norm + the LM head's saved input, per token (the logits are `_logits_bytes`)."""
    h = config.hidden_size
    if family.model_type == "bloom":
        return b * h + 8 + (b * h if lora is None else 0)
    return _rms_norm_bytes(h, b, lora is None, fused_norm) + (b * h if lora is None else 0)


def _logits_bytes(config, tokens: int, b: int) -> float:
    """The last stage's logits and loss buffers for one micro-batch. The head runs inside the loss, on the positions
    that have a target (models.pipeline.causal_lm_loss), so the pipeline engine never holds the logits until
    backward; this counts every position (an upper bound: prompts and padding have no target). One chunk (<=
    LOSS_CHUNK_ELEMENTS logits): the logits, their fp32 log-softmax output, and in backward its fp32 gradient and
    the logits' gradient. Chunked: the head runs chunk by chunk inside the loss, so no [N, V] logits exist; the
    gradient computed in forward (logits' dtype, kept for backward's two head matmuls) and one chunk's logits, their
    fp32 copy (half precision) and fp32 log-softmax."""
    n = tokens * config.vocab_size
    half = b != 4
    if n <= LOSS_CHUNK_ELEMENTS:
        return n * (b + 8 + (4 if half else 0))  # + the fp32 copy the loss makes of half-precision logits
    return n * b + LOSS_CHUNK_ELEMENTS * (b + 4 + (4 if half else 0))


def _logits_unmapped(config, tokens: int, b: int) -> bool:
    """Whether the loss buffers `_logits_bytes` counts are each at least GLIBC_MMAP_MAX (so glibc unmaps them when
    freed): the smallest is a full chunk's logits in the compute dtype (chunked: loss_chunk_rows positions, fewer
    than LOSS_CHUNK_ELEMENTS logits where the vocabulary does not divide it) or the whole logits (one chunk)."""
    n = tokens * config.vocab_size
    chunk = n if n <= LOSS_CHUNK_ELEMENTS else loss_chunk_rows(config.vocab_size) * config.vocab_size
    return chunk * b >= GLIBC_MMAP_MAX


# ---------------------------------------------------------------------------------------------- stages


def stage_memory(family, config, setup: Setup, parts: list[int],
                 counts: list[tuple[int, int]] | None = None, only: int | None = None) -> list[StageMemory]:
    """Predicted peak memory per pipeline stage for unit counts `parts`. `counts`: the real (total, trainable)
    parameters per stage when the caller has them (the trainer), else derived from the model and `setup.lora`.
    `only`: that stage's alone, as a one-element list (each stage's depends on its position and units only)."""
    s = setup
    b = DTYPE_BYTES[s.precision]
    units = unit_params(family, config)
    n_units, h = len(units), config.hidden_size
    tokens = s.micro_batch * s.seq_len
    tied = getattr(config, "tie_word_embeddings", False)
    cpu = bool(s.overhead_bytes)  # measured overhead: a CPU process
    block_act = block_activation_bytes(family, config, s.seq_len, b, s.lora, mask_bytes=b if cpu else 1,
                                       fused_norm=s.fused) * tokens
    adapters = lora_params(family, config, s.lora) if s.lora else 0
    out, start = [], 0
    for stage, k in enumerate(parts):
        if only is not None and stage != only:
            start += k
            continue
        idx = range(start, start + k)
        blocks = max(0, min(start + k, n_units - 1) - max(start, 1))  # units 1..n_units-2 are the blocks
        has_head, has_embed = n_units - 1 in idx, 0 in idx
        total, linear = stage_params(units, idx, tied)
        trainable = total if s.lora is None else blocks * adapters
        total += 0 if s.lora is None else blocks * adapters
        if counts is not None:
            total, trainable = counts[stage]
        # weights: NF4 block linears (QLoRA), everything else in the compute dtype
        frozen_q = linear if s.quantization == "nf4" else 0
        weights = (total - frozen_q) * b + frozen_q * (NF4_DQ_BYTES if s.double_quant else NF4_BYTES)
        half = b == 2
        grads = trainable * (b + 4 if half else 4)  # half: the bf16 .grad and the fp32 accumulation buffer
        shard = s.data if s.zero_stage >= 1 else 1
        # two fp32 moments, and fp32 master weights: the half precisions' always, and ZeRO's for an fp32 model too
        # (DeepSpeedZeroOptimizer clones its partition of the weights)
        master = 4 if half or s.zero_stage >= 1 else 0
        states = trainable * (8 + master) / shard
        host = 0.0
        if s.offload:  # the states, master weights and the fp32 gradients of the partition on the host
            host, states = states + trainable * 4 / shard, 0.0
            grads = trainable * b
        # the step's transients, one after another (each freed before the next): DeepSpeed's flattened gradients
        # (the reduction, ReduceGrads); on the CPU, torch's per-parameter AdamW's two fp32 temporaries of the largest
        # parameter (the trainer's own gradient norm, fp32 without ZeRO, keeps one fp32 norm per 256 elements)
        step_buffer = max(min(trainable, REDUCE_BUCKET) * (4 if half and not s.offload else b),
                          2 * 4 * _largest_param(family, config, units, idx, s.lora is None) if cpu else 0)
        # activations per micro-batch: saved tensors (checkpointed blocks keep only their input), pipe buffers
        per_micro = blocks * (b * h * tokens if s.grad_ckpt else block_act)
        per_micro += (_embed_bytes(family, config, b) * tokens if has_embed else 0)
        per_micro += (_head_bytes(family, config, b, s.lora, fused_norm=s.fused) * tokens if has_head else 0)
        per_micro += (0 if has_embed else b * h * tokens) + (0 if has_head else b * h * tokens)  # recv / send buffers
        per_micro += 2 * 16 * tokens  # int64 position and segment ids, received and sent
        if family.model_type == "bloom" and blocks:
            per_micro += s.micro_batch * s.seq_len ** 2 * b  # the additive mask eager attention uses
        flight = s.in_flight(stage)
        if defers(s.defer_wgrad, s.lora is not None, s.grad_ckpt):  # the first stage defers none
            per_micro_deferred = blocks * deferred_bytes(family, config, b) * tokens
        else:
            per_micro_deferred = 0.0
        # one backward's working set: the gradients of a block's saved tensors (about their size), and with
        # checkpointing the block recomputed for it; the head's is in `logits`
        working = (block_act * (2 if s.grad_ckpt else 1) if blocks else 2 * b * h * tokens)
        if s.quantization == "nf4" and blocks:
            working += max(i * o for i, o in _block_shapes(family, config)[1].values()) * b  # a dequantized weight
        logits = _logits_bytes(config, tokens, b) if has_head else 0.0
        deferred = deferred_micro_batches(stage, s.grad_accum) * per_micro_deferred
        mem = StageMemory((start, start + k - 1), total, trainable, weights, grads, states,
                          flight * per_micro + working + deferred, logits, step_buffer, 0.0, host, flight,
                          heap=cpu, logits_unmapped=cpu and has_head and _logits_unmapped(config, tokens, b))
        static = mem.total  # without overhead yet
        mem.overhead = s.overhead_bytes[stage] if s.overhead_bytes else GPU_OVERHEAD + GPU_FRAGMENTATION * static
        out.append(mem)
        start += k
    return out


def bubble(pipe: int, micro_batches: int) -> float:
    """The 1F1B pipeline bubble: the share of a step a stage idles, (p - 1) / (m + p - 1)."""
    return (pipe - 1) / (micro_batches + pipe - 1)


@dataclass
class Throughput:
    """A step's modelled time in per-token multiply-add units (relative, unless a device rate is given)."""

    stage_costs: list[float] = field(default_factory=list)  # per stage, per token, forward + backward (+ recompute)
    bubble: float = 0.0
    efficiency: float = 0.0  # useful work / (devices x step time): the recompute is not useful work


def throughput(family, config, setup: Setup, parts: list[int]) -> Throughput:
    """Per-stage work (forward 1 + backward 2, + 1 forward of the blocks when checkpointed) and the efficiency:
    the useful work (3 x every unit's cost; a recompute is not useful) over pipe x the slowest stage's work, times
    (1 - bubble). On a fixed number of devices it is proportional to the modelled tokens per second, so layouts rank
    by it."""
    costs = unit_costs(family, config, setup.seq_len)
    per, start = [], 0
    for k in parts:
        blocks = sum(costs[u] for u in range(start, start + k) if 0 < u < len(costs) - 1)
        per.append(3 * sum(costs[start:start + k]) + (blocks if setup.grad_ckpt else 0))
        start += k
    b = bubble(setup.pipe, setup.grad_accum)
    eff = 3 * sum(costs) / (setup.pipe * max(per)) * (1 - b) if max(per) > 0 else 0.0
    return Throughput(per, b, eff)
