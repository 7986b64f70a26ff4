"""Worker for tests/test_pipeline_dist.py, started by the real `deepspeed` launcher.

For each --case (one launch for all of them), builds the pipeline from converted layer files (explicit parts or auto
balance), evaluates one fixed batch with engine.eval_batch and writes {"loss", "parts", "stage", "owned"} per rank
into the case's out dir."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.pipe.topology import ProcessTopology  # noqa: E402

from models import PipelineModel, causal_lm_loss, parse_topology, plan_stages  # noqa: E402
from models.convert import family_of  # noqa: E402
from training.distributed import shutdown_distributed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=4, action="append", required=True, metavar=("MODEL_DIR", "BATCH", "OUT_DIR", "PARTS"),
                    help="PARTS: comma-separated units per stage, or 'auto'")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    for model_dir, batch, out_dir, parts in args.case:
        evaluate(Path(model_dir), batch, out_dir, None if parts == "auto" else [int(p) for p in parts.split(",")])
    shutdown_distributed()


def evaluate(model_dir: Path, batch_file: str, out_dir: str, parts: list[int] | None) -> None:
    world = torch.distributed.get_world_size()
    family, config = family_of(model_dir)
    axes, dims = parse_topology({"process_topology": {"axes": ["pipe", "data"], "dims": [world, 1]}}, world)
    model = PipelineModel(
        family.layer_specs(config),
        lambda stages: plan_stages(family.unit_sizes(config), family.unit_costs(config), stages, parts),
        ProcessTopology(axes=axes, dims=dims),
        loss_fn=causal_lm_loss,
    )
    model.load_layer_files(model_dir)
    batch = torch.load(batch_file)
    engine, *_ = deepspeed.initialize(
        model=model,
        config={"train_micro_batch_size_per_gpu": batch[1].shape[0], "gradient_accumulation_steps": 1,
                "steps_per_print": 10**9},
    )
    loss = engine.eval_batch(iter([batch]))
    rank = torch.distributed.get_rank()
    owned = list(range(model._local_start, model._local_stop))
    out = {"loss": float(loss), "parts": model.parts, "stage": engine.stage_id, "owned": owned}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
