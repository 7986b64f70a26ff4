"""HF state-dict keys <-> (pipeline layer index, local key), from ONE table per family.

A family's table maps HF key patterns to (slot, local key); "{}" stands for the decoder block
index. Slots sit at fixed spec indices for every family: embed = 0, block i = 1 + i,
norm = N + 1, head = N + 2. The reverse direction is the inverted table. Export writes the
table's keys; import also accepts them without `optional_prefix` (checkpoints saved from the
base model, e.g. Bloom's published "word_embeddings.weight" for "transformer.word_embeddings.weight").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SLOTS = ("embed", "block", "norm", "head")


class KeyMapError(KeyError):
    def __str__(self) -> str:  # KeyError repr-quotes its message; keep it one plain line
        return str(self.args[0])


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


@dataclass
class KeyMap:
    table: dict[str, tuple[str, str]]  # HF pattern -> (slot, local key)
    ignored: tuple[str, ...] = ()  # HF patterns that are derived buffers, skipped on import
    optional_prefix: str = ""  # import also accepts table keys that start with it without it
    _fwd: list = field(init=False, repr=False)
    _rev: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        assert all(slot in SLOTS for slot, _ in self.table.values()), self.table
        self._fwd = [(_compile(p), slot, local) for p, (slot, local) in self.table.items()]
        self._ign = [_compile(p) for p in self.ignored]
        self._rev = {(slot, local): p for p, (slot, local) in self.table.items()}
        assert len(self._rev) == len(self.table), "key table is not invertible"

    @staticmethod
    def layer_index(slot: str, block: int | None, num_blocks: int) -> int:
        return {"embed": 0, "norm": num_blocks + 1, "head": num_blocks + 2}[slot] if slot != "block" else 1 + block

    @staticmethod
    def slot_of(layer_idx: int, num_blocks: int) -> tuple[str, int | None]:
        if layer_idx == 0:
            return "embed", None
        if 1 <= layer_idx <= num_blocks:
            return "block", layer_idx - 1
        if layer_idx == num_blocks + 1:
            return "norm", None
        if layer_idx == num_blocks + 2:
            return "head", None
        raise KeyMapError(f"layer index {layer_idx} is outside a {num_blocks}-block model")

    def _spellings(self, hf_key: str) -> tuple[str, ...]:
        """The key as given, then with `optional_prefix` added when it lacks it."""
        p = self.optional_prefix
        return (hf_key, p + hf_key) if p and not hf_key.startswith(p) else (hf_key,)

    def is_ignored(self, hf_key: str) -> bool:
        return any(p.match(k) for k in self._spellings(hf_key) for p in self._ign)

    def to_pp(self, hf_key: str, num_blocks: int) -> tuple[int, str]:
        """HF key (with or without `optional_prefix`) -> (layer index, local key); unknown keys raise."""
        for key in self._spellings(hf_key):
            for pat, slot, local in self._fwd:
                m = pat.match(key)
                if not m:
                    continue
                block = int(m.group(1)) if slot == "block" else None
                if block is not None and block >= num_blocks:
                    raise KeyMapError(f"unexpected tensor {hf_key}: the config has only {num_blocks} layers")
                return self.layer_index(slot, block, num_blocks), local
        raise KeyMapError(f"unexpected tensor {hf_key}: no entry in the key table")

    def to_hf(self, layer_idx: int, local_key: str, num_blocks: int) -> str:
        """(layer index, local key) -> HF key; unknown keys raise."""
        slot, block = self.slot_of(layer_idx, num_blocks)
        pattern = self._rev.get((slot, local_key))
        if pattern is None:
            raise KeyMapError(f"unexpected tensor {local_key!r} in layer {layer_idx} ({slot}): no entry in the key table")
        return pattern.replace("{}", str(block)) if block is not None else pattern
