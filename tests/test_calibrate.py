"""Measured break-even densities: interpolation, the table's lookup, calibration, and the policy using it."""

from __future__ import annotations

import json

import onnx
import pytest

from blockprune.backends.tvm.cost.calibrate import BreakEven, BreakEvenTable, break_even_density
from blockprune.cli import main
from blockprune.errors import BlockpruneError


def test_break_even_interpolation():
    dens = [1.0, 0.5, 0.25]
    assert break_even_density(dens, [4.0, 2.0, 1.0], dense_seconds=3.0) == pytest.approx(0.75)
    assert break_even_density(dens, [2.0, 1.0, 0.5], dense_seconds=3.0) == 1.0  # faster already at 1.0
    assert break_even_density(dens, [9.0, 8.0, 7.0], dense_seconds=3.0) is None  # never


def test_table_lookup_exact_nearest_default(tmp_path):
    t = BreakEvenTable("x86-64", 128, 1, [BreakEven(768, 3072, "16x1", 0.9), BreakEven(768, 768, "16x1", 0.7),
                                          BreakEven(3072, 768, "1x32", None)], default=0.6)
    assert t.lookup(3072, 768, "16x1") == (0.9, "measured on x86-64")
    be, src = t.lookup(1536, 384, "16x1")  # nearest by size: 768x768
    assert be == 0.7 and "768x768" in src
    assert t.lookup(768, 3072, "1x32")[0] == 0.0  # never faster: never block-sparse
    assert t.lookup(64, 64, "4x4") == (0.6, "default (no 4x4 measurement)")
    again = BreakEvenTable.load(t.save(tmp_path / "be.json"))
    assert again.lookup(3072, 768, "16x1") == t.lookup(3072, 768, "16x1")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(BlockpruneError, match="not a blockprune calibration"):
        BreakEvenTable.load(tmp_path / "bad.json")


def test_calibrate_command_and_compress_uses_it(capsys, exports, tmp_path):
    be = tmp_path / "be.json"
    assert main(["calibrate", "-o", str(be), "--shapes", "64x64,128x64", "--blocks", "16x1",
                 "--densities", "1.0,0.5,0.1", "--m", "16", "--runs", "3"]) == 0
    table = BreakEvenTable.load(be)
    from blockprune.backends.tvm.cost.calibrate import host_isa

    assert table.isa == host_isa()  # which vector unit the kernels ran on is part of the table
    assert {(e.n, e.k, e.block) for e in table.entries} == {(64, 64, "16x1"), (128, 64, "16x1")}
    for e in table.entries:
        assert e.dense_ms > 0 and set(e.sweep_ms) == {"1", "0.5", "0.1"}
        assert e.density is None or 0.1 <= e.density <= 1.0
    capsys.readouterr()
    out = tmp_path / "c.onnx"
    assert main(["compress", str(exports.path("bert-tiny", "legacy")), "-o", str(out), "--block", "16x1",
                 "--sparsity", "0.8", "--no-reorder", "--form", "bsr", "--break-even-file", str(be)]) == 0
    capsys.readouterr()
    assert main(["compress", str(exports.path("bert-tiny", "legacy")), "-o", str(tmp_path / "d.onnx"),
                 "--block", "16x1", "--sparsity", "0.8", "--break-even-file", str(be)]) == 0
    layers = json.loads(next(p.value for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props
                             if p.key == "blockprune.layers"))
    reasons = [v["reason"] for v in layers.values() if v.get("reason")]
    assert reasons and all("on x86-64" in r or "not pruned" in r or "compacted" in r for r in reasons)


def test_calibrate_refuses_cross_targets(capsys, tmp_path):
    assert main(["calibrate", "-o", str(tmp_path / "x.json"), "--target", "cortex-a72"]) == 2
    assert "--rpc HOST:PORT" in capsys.readouterr().err  # the fix: time it on the board over RPC
    assert not (tmp_path / "x.json").exists()


def test_compress_defaults_to_the_shipped_measured_table(exports):
    """No --break-even: every pruned layer's form is decided by the shipped table, not by 0.6."""
    import json

    from blockprune.backends.tvm.cost.calibrate import default_break_even_table
    from blockprune.compress_api import compress_model
    from blockprune.passes import PruneConfig

    table = default_break_even_table()
    assert {"16x1", "1x32", "4x4", "32x32"} <= {e.block for e in table.entries}
    dense = exports("bert-tiny", "legacy", "encoder")[1].model
    res = compress_model(dense, prune=PruneConfig(block="16x1", sparsity=0.5), verify=False)
    layers = json.loads({p.key: p.value for p in res.model.metadata_props}["blockprune.layers"])
    reasons = [v["reason"] for v in layers.values() if v.get("form")]
    assert reasons and all("measured" in r for r in reasons), reasons
    forced = compress_model(dense, prune=PruneConfig(block="16x1", sparsity=0.5), break_even=0.3, verify=False)
    layers = json.loads({p.key: p.value for p in forced.model.metadata_props}["blockprune.layers"])
    assert all(v["form"].endswith("dense") for v in layers.values() if v.get("form")), layers


def test_shipped_tables_per_vector_unit():
    """AVX2 (Zen 3) and AVX-512 (Xeon) hosts each get their own measured table; an unmeasured
    vector unit falls back to AVX2's; the host's pick follows /proc/cpuinfo."""
    from blockprune.backends.tvm.cost.calibrate import default_break_even_table, host_isa, shipped_table_path

    avx2, avx512 = default_break_even_table("avx2"), default_break_even_table("avx512")
    assert (avx2.isa, avx512.isa) == ("avx2", "avx512")
    assert "Xeon" in avx512.machine
    assert shipped_table_path("neon") == shipped_table_path("avx2")
    assert default_break_even_table().isa == (host_isa() if host_isa() in ("avx2", "avx512") else "avx2")
    same = {(e.n, e.k, e.block) for e in avx2.entries} & {(e.n, e.k, e.block) for e in avx512.entries}
    assert len(same) >= 30
    # the two hosts really differ: the AVX-512 dense matmul is ~2x faster on MiniLM's shapes
    d2 = {(e.n, e.k): e.dense_ms for e in avx2.entries}
    minilm = [e for e in avx512.entries if 384 in (e.n, e.k)]
    assert minilm and all(e.dense_ms < 0.7 * d2[(e.n, e.k)] for e in minilm)
