"""The Accelerate path with two CPU processes (torch.distributed, gloo): a proximal group-Lasso
stage then a gradually pruned, distilled stage on a tiny random BERT, each rank seeing its own
shard of the batches. Both ranks must end with bit-identical weights and masks: gradients are
all-reduced, and everything the frontend does outside the optimizer (the proximal shrink, the
mask updates, the re-applied masks) must be a deterministic function of the shared weights.
A rank-local decision (say, masks from a rank's own batches) would make them diverge.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from blockprune.frontends.distill import frozen_teacher
    from blockprune.frontends.gradual import CubicSchedule, GradualPruner
    from blockprune.frontends.hard_prune import LayerSelection, select_layers
    from blockprune.frontends.recipe_config import HEAD_PATTERN, RecipeConfig
    from blockprune.frontends.stages import StagePlan, train_stage
    from blockprune.models.zoo import load_model

    acc = Accelerator(cpu=True)
    assert acc.num_processes == world and acc.process_index == rank
    model = load_model("bert-tiny", head="classification", num_labels=2, seed=0).model
    layers = select_layers(model, LayerSelection(block="4x4", exclude=["embed", HEAD_PATTERN]))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 512, (12,), generator=g), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]

    def loader():
        return DataLoader(data, batch_size=8, shuffle=False,
                          collate_fn=lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]})

    cfg = RecipeConfig(rgl_form="proximal", lam=0.5, ratio=0.5, progress=False, distill=0.5, distill_hidden=1.0,
                       warmup_ratio=0.0)
    train_stage(acc, model, loader(), StagePlan("reweighted", 1, 1e-2), cfg, layers=layers)
    teacher = frozen_teacher(model)
    box = []

    def make_pruner(inner, total):
        box.append(GradualPruner(inner, layers, {n: 0.5 for n in layers}, CubicSchedule(ramp_steps=total, every=1)))
        return box[-1]

    _, masked = train_stage(acc, model, loader(), StagePlan("gradual", 2, 1e-2), cfg, teacher=teacher,
                            make_pruner=make_pruner)
    masks = {n: m.mask for n, m in box[-1].masks().items()}
    masked.squash()
    torch.save({"weights": {k: v.detach().clone() for k, v in model.state_dict().items()}, "masks": masks},
               os.path.join(out, f"rank{rank}.pt"))
    acc.wait_for_everyone()


def test_two_cpu_processes_end_with_identical_masks_and_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a["masks"].keys() == b["masks"].keys() and len(a["masks"]) == 12
    for n in a["masks"]:
        assert torch.equal(a["masks"][n], b["masks"][n])
        assert 1 - a["masks"][n].float().mean() == pytest.approx(0.5)
        assert torch.all(a["weights"][n][~a["masks"][n]] == 0)
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    init = __import__("blockprune.models.zoo", fromlist=["load_model"]).load_model(
        "bert-tiny", head="classification", num_labels=2, seed=0).model.state_dict()
    moved = [k for k in a["masks"] if not torch.equal(a["weights"][k], init[k])]
    assert len(moved) == 12  # training happened
