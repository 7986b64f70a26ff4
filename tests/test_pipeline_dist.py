"""2 processes with the real deepspeed launcher on CPU (one launch for every case): the pipeline built from converted
layer files (2 stages) gives the HF model's loss on a fixed batch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from models.convert import hg_to_pp
from tests.helpers import llama_config, make_batch, run_deepspeed

pytestmark = pytest.mark.distributed

CASES = {  # name -> (config, parts): explicit parts, and auto balance with the tied head on the other stage
    "untied_parts": ("gqa_llama3_rope", "2,4"),
    "tied_auto": ("gqa_tied", None),
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tokenizer) -> dict:
    """Every case converted, its HF loss computed, then all of them evaluated by one 2-process launch: {case: (HF
    model, HF loss, each rank's output)}."""
    root, cases, out = tmp_path_factory.mktemp("pipe_eval"), [], {}
    for case, (name, parts) in sorted(CASES.items()):
        d = root / case
        torch.manual_seed(0)
        hf = LlamaForCausalLM(llama_config(name, vocab_size=len(tokenizer))).eval()
        hf.save_pretrained(d / "hf", max_shard_size="100KB")
        tokenizer.save_pretrained(d / "hf")
        hg_to_pp(d / "hf", d / "pp")
        ids, mask, pos, seg, labels = make_batch(len(tokenizer), [16, 11, 7, 16], 16, "right", seed=3)
        torch.save(((ids, pos, seg), labels), d / "batch.pt")
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss.item()
        cases += ["--case", str(d / "pp"), str(d / "batch.pt"), str(d), parts or "auto"]
        out[case] = (hf, ref, d)
    run_deepspeed("tests/workers/pipe_eval.py", cases)
    return {case: (hf, ref, [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)])
            for case, (hf, ref, d) in out.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_stage_eval_loss_equals_hf(case, evaluated):
    hf, ref, ranks = evaluated[case]
    parts = CASES[case][1]
    n = hf.config.num_hidden_layers
    assert [r["stage"] for r in ranks] == [0, 1]
    assert ranks[0]["owned"][0] == 0 and ranks[1]["owned"][-1] == n + 2  # embedding first, head last
    assert sorted(ranks[0]["owned"] + ranks[1]["owned"]) == list(range(n + 3))
    if parts:
        assert ranks[0]["parts"] == [0, 2, n + 3]  # units [2, 4]: embed + block 0 | blocks 1..3 + norm + head
    for r in ranks:
        assert r["loss"] == pytest.approx(ref, rel=1e-5)
