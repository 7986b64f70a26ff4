"""hg_to_pp streams: on a ~0.5 GB model its peak RSS grows by less than half the model size."""

from __future__ import annotations

from bench.convert_memory import measure, write_random_llama


def test_hg_to_pp_peak_memory_is_bounded(tmp_path):
    size = write_random_llama(tmp_path / "hf")
    assert size > 500 * 2**20
    r = measure(tmp_path / "hf", tmp_path / "pp")
    assert r["rc"] == 0
    assert len(list((tmp_path / "pp").glob("layer_*-model_states.pt"))) == 12 + 3
    grew = (r["peak_kb"] - r["baseline_kb"]) * 1024
    assert grew < size / 2, f"peak RSS grew {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
