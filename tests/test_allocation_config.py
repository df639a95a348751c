"""benchmarks/allocation_config.py: a trained cell's per-layer ratios from its results JSON as a
pruning config. What can fail: a layer resolved to another layer's ratio (an unanchored regex:
``layer.1.`` also matches ``layer.10.``), a layer the cell left alone pruned by a default, the
file written somewhere other than the cell's run dir in this checkout, a bad key accepted."""

from __future__ import annotations

import json

import pytest

from blockprune.passes.prune_config import PruneConfig
from test_frontend_accuracy_grid import _bench


def test_the_config_prunes_each_layer_at_the_cells_own_ratio_and_nothing_else(tmp_path):
    mod = _bench("allocation_config.py", "bench_allocation_config")
    alloc = {f"bert.encoder.layer.{i}.attention.self.query.weight": r for i, r in ((1, 0.25), (10, 0.9), (0, 0.0))}
    results = tmp_path / "acc.json"
    results.write_text(json.dumps({"cells": {
        "STS-B/gradual/16x1/0.6": {"block": "16x1", "allocation": alloc, "compression_rate": 2.45,
                                   "run_dir": "/elsewhere/clone/runs/aug/STS-B/g/r0.6"},
        "STS-B/dense": {"block": None, "allocation": None, "run_dir": "/x/runs/aug/STS-B/dense-baseline"}}}))
    root = tmp_path / "checkout"
    out = mod.write_allocation_config(results, "STS-B/gradual/16x1/0.6", mod.run_dir_here(
        "/elsewhere/clone/runs/aug/STS-B/g/r0.6", root) / "allocation.yaml")
    assert out == root / "runs/aug/STS-B/g/r0.6/allocation.yaml" and [p.name for p in out.parent.iterdir()] == ["allocation.yaml"]
    cfg = PruneConfig.from_yaml(out)
    for name, r in alloc.items():
        spec = cfg.resolve(name)
        assert (str(spec.block), spec.sparsity) == ("16x1", r)
    assert cfg.resolve("bert.encoder.layer.1.output.dense.weight").sparsity == 0.0  # not in the allocation
    assert cfg.resolve("bert.encoder.layer.2.attention.self.query.weight").sparsity == 0.0
    assert "STS-B/gradual/16x1/0.6" in out.read_text().splitlines()[0]

    with pytest.raises(SystemExit, match="no cell 'STS-B/gradual/16x1/0.7'.*STS-B/gradual/16x1/0.6"):
        mod.write_allocation_config(results, "STS-B/gradual/16x1/0.7")
    with pytest.raises(SystemExit, match="no per-layer allocation"):
        mod.write_allocation_config(results, "STS-B/dense")
