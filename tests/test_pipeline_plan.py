"""Topology parsing and stage planning: the seed's layouts, auto balance, and one-line errors."""

from __future__ import annotations

import itertools
import random

import pytest

from models import ModelConfigError, get_family, parse_topology, plan_stages
from models.cost import CE_COST_PER_VOCAB
from models.pipeline import balance
from tests.helpers import llama_config


def test_seed_topology_keys():
    assert parse_topology({"process_topology": {"axis": ["pipe", "data"], "dims": [8, 2]}}, 16) == (["pipe", "data"], [8, 2])
    assert parse_topology({"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}}, 2) == (["pipe", "data"], [2, 1])
    assert parse_topology(None, 4) == (["pipe", "data"], [4, 1])
    assert parse_topology({"parts": [3, 3]}, 4) == (["pipe", "data"], [2, 2])


@pytest.mark.parametrize("topo, world, message", [
    ({"process_topology": {"axes": ["pipe", "data"], "dims": [8, 1]}}, 2,
     "model_topo.process_topology.dims [8, 1] needs 8 processes but 2 were started (start 8 in all: deepspeed "
     "--num_gpus or hostfile slots, torchrun --nnodes x --nproc-per-node, srun --ntasks)"),
    ({"process_topology": {"axes": ["pipe", "data"], "axis": ["pipe", "data"], "dims": [2, 1]}}, 2, "not both"),
    ({"process_topology": {"axes": ["pipe"], "dims": [2]}}, 2, "must name 'pipe' and 'data'"),
    ({"process_topology": {"axes": ["pipe", "data"], "dims": [2]}}, 2, "dims must be 2 positive integers"),
    ({"process_topology": {"axes": ["pipe", "data", "model"], "dims": [1, 1, 2]}}, 2, "tensor parallelism"),
    ({"process_topology": {"axes": ["pipe", "data"], "dims": [True, 2]}}, 2, "dims must be 2 positive integers"),
    ({"parts": [1, 2, 3]}, 4, "does not divide"),
    ({"partz": [3, 3]}, 2, "model_topo: unknown key 'partz'; did you mean 'parts'?"),  # not an automatic balance
    ({"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1], "foo": 1}}, 2,
     "model_topo.process_topology: unknown key 'foo' (known: axes, axis, dims)"),
])
def test_bad_topology_is_one_line(topo, world, message):
    with pytest.raises(ModelConfigError) as e:
        parse_topology(topo, world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_seed_parts_for_a_30_block_model():
    sizes = [1] * 31 + [2]  # embedding, 30 blocks, head unit (norm + LM head)
    bounds = plan_stages(sizes, [1.0] * 32, 8, [1, 5, 5, 5, 5, 5, 5, 1])
    assert bounds == [0, 1, 6, 11, 16, 21, 26, 31, 33]


@pytest.mark.parametrize("parts, message", [
    ([1, 5, 5, 5, 5, 5, 5, 2], "sums to 33 but the model has 32 pipeline units (embedding + 30 blocks + head)"),
    ([6, 5, 5, 5, 5, 6], "has 6 entries but the topology has 8 pipeline stages"),
    ([1, 6, 5, 5, 5, 5, 5, 0], "at least one unit"),
    ([1, 5, 5, 5, 5, 5, 5, 1.0], "list of integers"),
])
def test_bad_parts_are_one_line(parts, message):
    with pytest.raises(ModelConfigError) as e:
        plan_stages([1] * 31 + [2], [1.0] * 32, 8, parts)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_more_stages_than_units():
    with pytest.raises(ModelConfigError, match=r"^model_topo.process_topology.dims: 5 pipeline stages but the model "
                                               r"has only 4 pipeline units"):
        plan_stages([1, 1, 1, 2], [0, 1, 1, 1], 5)


def test_balance_is_optimal_and_non_empty():
    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randint(1, 8), rng.randint(1, 4)
        if k > n:
            continue
        costs = [rng.choice([0, 1, 2, 5, 9]) for _ in range(n)]
        counts = balance(costs, k)
        assert len(counts) == k and all(c >= 1 for c in counts) and sum(counts) == n
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n), strict=True))
                   for cuts in itertools.combinations(range(1, n), k - 1))
        bounds = list(itertools.accumulate(counts, initial=0))
        assert max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)) == best


def test_auto_balance_gives_the_heavy_head_stage_fewer_blocks():
    family = get_family("llama")
    config = llama_config("gqa_llama3_rope", vocab_size=32000, num_hidden_layers=8)
    costs = family.unit_costs(config)
    assert costs[0] == 0 and costs[-1] == (config.hidden_size + CE_COST_PER_VOCAB) * config.vocab_size
    bounds = plan_stages(family.unit_sizes(config), costs, 2)
    first, last = bounds[1] - bounds[0], bounds[2] - bounds[1]
    assert bounds[-1] == config.num_hidden_layers + 3 and first > last


def test_attention_cost_grows_with_seq_len_and_moves_blocks_to_the_head_stage():
    """At a long max_seq_len attention's T^2 term makes blocks dearer against the (fixed) head: the head's
    stage then takes more blocks than at a short one."""
    family = get_family("llama")
    config = llama_config("gqa_llama3_rope", vocab_size=2000, num_hidden_layers=8, hidden_size=64)
    short, long = family.unit_costs(config, 128), family.unit_costs(config, 8192)
    assert long[1] - short[1] == (8192 - 128) * config.hidden_size and long[-1] == short[-1]
    last = [b[2] - b[1] for b in (plan_stages(family.unit_sizes(config), c, 2) for c in (short, long))]
    assert last[1] > last[0]
