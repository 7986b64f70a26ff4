"""Worker for tests/test_train_reference.py, started by the real `deepspeed` launcher.

Runs train_ds.py's Trainer (setup, train, save), then every rank holding a tied module compares its copy
of each tied weight with the copy on the first stage of its tie group (broadcast over that group) and
writes tied-rank{R}.json: {"stage", "tied": {"KEY.ATTR": {"ranks", "max_abs_diff", "replica_max_abs_diff" (against
the first replica's copy)}}, "deferred": the micro-batches whose
weight gradients this rank deferred (models/wgrad.py)}. `--defer-more N`: every stage defers N more of its last
micro-batches than train_ds.py would (so the first stage, which receives gradients, keeps received ones too).
"forwards": [rows, row length, the engine's dynamic_shape] of each forward pass this rank ran, in order.
`--loss-chunk N`: the loss's chunk in logits (models.pipeline.LOSS_CHUNK_ELEMENTS), so that on the tests' small
vocabularies the last stage's tied head runs chunk by chunk inside the loss; "head_chunks" counts those chunks."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from training.config import load_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--defer-more", type=int, default=0)
    ap.add_argument("--loss-chunk", type=int, default=0)
    args = ap.parse_args()
    head_chunks = []
    if args.loss_chunk:
        from models import pipeline

        pipeline.LOSS_CHUNK_ELEMENTS = args.loss_chunk
        forward = pipeline._ChunkedCrossEntropy.forward

        def counted(ctx, x, weight, targets, rows, grad):
            if weight is not None:  # the head inside the loss: one F.linear per chunk of `rows` positions
                head_chunks.append(-(-x.shape[0] // rows))
            return forward(ctx, x, weight, targets, rows, grad)

        pipeline._ChunkedCrossEntropy.forward = staticmethod(counted)
    if args.defer_more:
        import training.trainer as trainer_module
        from models.wgrad import deferred_micro_batches

        trainer_module.deferred_micro_batches = lambda s, m: min(m, deferred_micro_batches(s, m) + args.defer_more)

    trainer = Trainer(load_config(args.config, world_size=int(os.environ["WORLD_SIZE"])))
    try:
        trainer.setup()
        engine, forwards = trainer.engine, []
        from deepspeed.runtime.pipe import schedule

        table = dict(engine._INSTRUCTION_MAP)
        forward_pass = table[schedule.ForwardPass]

        def recorded(engine_self, buffer_id):  # the rows this stage's forward pass got (loaded or received)
            forwards.append([*engine_self.pipe_buffers["inputs"][buffer_id][0].shape[:2], engine_self.dynamic_shape])
            forward_pass(engine_self, buffer_id)

        engine._INSTRUCTION_MAP = {**table, schedule.ForwardPass: recorded}
        trainer.train()
        module = trainer.engine.module
        report = {}
        replicas = trainer.engine.grid.get_data_parallel_group()  # this stage's ranks on every replica
        for key, comm in module.tied_comms.items():
            for attr in comm["weight_attr"]:
                mine = module._recursive_getattr(comm["module"], attr).detach()
                first = mine.clone()
                torch.distributed.broadcast(first, src=min(comm["ranks"]), group=comm["group"])
                on_replica_0 = mine.clone()
                torch.distributed.broadcast(on_replica_0, src=min(torch.distributed.get_process_group_ranks(replicas)),
                                            group=replicas)
                report[f"{key}.{attr}"] = {"ranks": comm["ranks"], "max_abs_diff": (mine - first).abs().max().item(),
                                           "replica_max_abs_diff": (mine - on_replica_0).abs().max().item()}
        out = {"stage": trainer.engine.stage_id, "tied": report, "deferred": trainer.wgrad.flushed,
               "head_chunks": sum(head_chunks), "forwards": forwards}
        Path(args.out_dir, f"tied-rank{trainer.rank}.json").write_text(json.dumps(out))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
