"""Run by tests/test_distributed.py twice: as one plain process and under torchrun with
2 processes; the test compares what the two launches write into the folder argv[1].

Synthetic data with sizes that exercise the sharding's edge cases: 193 training samples
with global batch 64 (last global batch of 1: rank 1's part is empty), 37 val samples
(shards of 19 and 18).
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

import branchynet as bn
import branchynet.checkpoint
from branchynet.calibrate import collect_exit_outputs
from branchynet.data import DataSplits
from branchynet.distributed import gather_exit_table, init_from_env
from branchynet.models.registry import build_model
from branchynet.train import TrainSettings, evaluate, train


def synthetic(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))


def dropout_mlp():
    torch.manual_seed(1)
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3)),
              nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.3))]
    model = bn.from_stages(stages, [nn.Linear(32, 10), nn.Linear(32, 10)], input_shape=(1, 8, 8),
                           num_classes=10)
    model.arch = {"name": "dropout_mlp", "kwargs": {}}  # lets save_checkpoint write it
    return model


def main(out: Path) -> None:
    info = init_from_env("cpu")
    torch.set_num_threads(1)
    r, world = info.rank, info.world_size
    saves = []
    real_save = branchynet.checkpoint.save_checkpoint
    branchynet.checkpoint.save_checkpoint = lambda *a, **k: (saves.append(str(a[0])), real_save(*a, **k))[1]

    splits = DataSplits("synthetic", synthetic(193, (1, 28, 28), 0), synthetic(37, (1, 28, 28), 1),
                        synthetic(41, (1, 28, 28), 2), 10, (1, 28, 28))
    result = {"rank": r, "world": world}

    # Reductions on a fresh model: the same weights in both launches, so the results must agree.
    torch.manual_seed(0)
    fresh = build_model("b-lenet")
    result["eval_fresh"] = evaluate(fresh, splits.test, batch_size=16)
    table = gather_exit_table(fresh, splits.test, batch_size=16)
    if r == 0:
        torch.save({"score": table.score, "pred": table.pred, "target": table.target}, out / f"table_w{world}.pt")
        one = collect_exit_outputs(fresh, splits.test, batch_size=16)
        result["table_equals_local"] = bool(torch.equal(one.pred, table.pred) and torch.equal(one.target, table.target))

    # B-LeNet, global batch 64, warm-up epoch on the final exit alone (unused parameters).
    torch.manual_seed(0)
    model = build_model("b-lenet")
    lines = []
    hist = train(model, splits, epochs=2, main_first_epochs=1, batch_size=64, seed=5, progress=False,
                 checkpoint=out / f"lenet_w{world}.pt", log=lines.append)
    result["log_lines"] = len(lines)
    result["history"] = {k: v for k, v in hist.to_dict().items() if k != "seconds"}
    result["eval_trained"] = evaluate(model, splits.test)

    # Resume under the same launcher == uninterrupted (dropout: every rank's RNG is restored).
    data8 = DataSplits("synthetic8", synthetic(150, (1, 8, 8), 3), synthetic(0, (1, 8, 8), 4),
                       synthetic(10, (1, 8, 8), 5), 10, (1, 8, 8))
    # One TrainSettings, keywords on top of it for the interrupted and the resumed run.
    settings = TrainSettings(epochs=3, seed=2, batch_size=32, progress=False)
    whole = dropout_mlp()
    train(whole, data8, settings)
    part = dropout_mlp()
    train(part, data8, settings, epochs=2, checkpoint=out / f"mlp_w{world}.pt")
    torch.manual_seed(123)  # whatever the RNG holds before resuming must not matter
    resumed = dropout_mlp()
    train(resumed, data8, settings, checkpoint=out / f"mlp_w{world}.pt", resume=True)
    # A Dataset that is not a TensorDataset (collated per sample); 65 samples, global
    # batch 64: rank 1's part of the last batch is empty.
    generic = dropout_mlp()
    for mod in generic.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    train(generic, torch.utils.data.Subset(data8.train, range(65)), epochs=1, batch_size=64, progress=False)
    if r == 0:
        torch.save(generic.state_dict(), out / f"generic_w{world}.pt")
    # Frozen backbone + self-distillation (the stages and final exit run outside autograd,
    # also under DDP): the side branch trains as in one process, the rest stays put.
    frozen = dropout_mlp()
    for mod in frozen.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    train(frozen, data8, epochs=2, seed=4, batch_size=32, progress=False, freeze="backbone", distill=0.5)
    if r == 0:
        torch.save(frozen.state_dict(), out / f"frozen_w{world}.pt")
    result["resume_equal"] = all(torch.equal(a, b) for a, b in
                                 zip(whole.state_dict().values(), resumed.state_dict().values()))
    result["saves"] = saves
    (out / f"result_w{world}_r{r}.json").write_text(json.dumps(result))
    if world > 1:
        # Leaving with the gloo group alive can abort the process at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
