"""Data parallelism: the sharding reproduces the 1-process batches, and 2 processes under
torchrun (gloo, CPU) train the weights 1 process trains, reduce evaluation and gather
calibration scores to the 1-process results, write one checkpoint, resume exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler, TensorDataset

from branchynet import distributed as bd
from branchynet.calibrate import collect_exit_outputs
from branchynet.checkpoint import load_engine, read_checkpoint
from branchynet.cli import main
from branchynet.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    # This checkout's branchynet in the child processes, one thread each (2 ranks on a
    # 2-core CI box), and none of a parent torchrun's variables.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(args, nproc=None):
    launcher = [sys.executable]
    if nproc:
        # --standalone: a rendezvous on a free local port.
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    r = subprocess.run(launcher + args, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, f"{' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- sharding -----------------------------------------------------------------------------


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (5, 2), (7, 3), (64, 2), (3, 4)])
def test_shard_range_splits_in_order(n, world):
    parts = [bd.shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("n,batch,world", [(193, 64, 2), (10, 4, 3), (5, 8, 2), (64, 64, 1)])
def test_sampler_cuts_the_single_process_batches(n, batch, world):
    # The 1-process loader: BatchSampler(RandomSampler(generator)); same generator seed.
    single = list(BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(7)),
                               batch, drop_last=False))
    per_rank = [list(bd.ShardedBatchSampler(n, batch, torch.Generator().manual_seed(7), r, world))
                for r in range(world)]
    assert all(len(p) == len(single) == len(bd.ShardedBatchSampler(n, batch, None, 0, world))
               for p in per_rank)
    for i, global_batch in enumerate(single):
        assert sum((p[i] for p in per_rank), []) == global_batch
        assert bd.ShardedBatchSampler(n, batch, None, 0, world).global_size(i) == len(global_batch)
    # Another seed, another order (the permutation is drawn, not fixed).
    other = list(bd.ShardedBatchSampler(n, batch, torch.Generator().manual_seed(8), 0, 1))
    assert n < 3 or other != single


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        bd.ShardedBatchSampler(10, 0, None, 0, 1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        bd.ShardedBatchSampler(0, 4, None, 0, 1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        bd.ShardedBatchSampler(10, 4, None, 2, 2)


def test_without_torchrun_everything_is_one_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = bd.init_from_env("cpu")
    assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
    assert bd.is_main() and not bd.is_distributed() and bd.world_size() == 1
    t = torch.tensor([3.0])
    bd.all_reduce_sum(t)
    assert t.item() == 3.0 and bd.gather_objects({"a": 1}) == [{"a": 1}]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        bd.init_from_env("cpu")


def test_gather_exit_table_alone_is_collect_exit_outputs():
    torch.manual_seed(0)
    model = build_model("b-lenet")
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(9, 1, 28, 28, generator=g), torch.randint(0, 10, (9,), generator=g))
    a, b = bd.gather_exit_table(model, ds, batch_size=4), collect_exit_outputs(model, ds, batch_size=4)
    assert torch.equal(a.score, b.score) and torch.equal(a.pred, b.pred) and torch.equal(a.target, b.target)


# -- 2 processes (gloo) against 1 ---------------------------------------------------------


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """tests/dist_worker.py run by one plain process and by torchrun with 2 (~20 s)."""
    out = tmp_path_factory.mktemp("dist")
    worker = str(ROOT / "tests" / "dist_worker.py")
    _run([worker, str(out)])
    _run([worker, str(out)], nproc=2)
    res = {key: json.loads((out / f"result_{key}.json").read_text()) for key in ("w1_r0", "w2_r0", "w2_r1")}
    return out, res


def test_two_ranks_train_the_single_process_weights(launches):
    out, res = launches
    # 193 samples, global batch 64: the last global batch (1 sample) leaves rank 1 empty;
    # the warm-up epoch leaves the side branch without gradients.
    one = read_checkpoint(out / "lenet_w1.pt")["state_dict"]
    two = read_checkpoint(out / "lenet_w2.pt")["state_dict"]
    assert _max_diff(one, two) < 1e-5
    # The same through a Dataset collated sample by sample.
    assert _max_diff(torch.load(out / "generic_w1.pt"), torch.load(out / "generic_w2.pt")) < 1e-6
    h1, h2 = res["w1_r0"]["history"], res["w2_r0"]["history"]
    assert h1["epoch"] == h2["epoch"] == [1, 2] and h1["weights"] == h2["weights"]
    # Train and val statistics are reduced over the ranks: those of the whole data set.
    for key in ("train_loss", "train_exit_loss", "val_loss", "val_exit_loss"):
        assert torch.allclose(torch.tensor(h1[key]), torch.tensor(h2[key]), rtol=1e-5), key
    assert h1["train_acc"] == h2["train_acc"] and h1["val_acc"] == h2["val_acc"]
    assert res["w2_r1"]["history"] == h2


def test_two_ranks_train_frozen_backbone_with_distillation_like_one(launches):
    out, _ = launches
    from tests.dist_worker import dropout_mlp

    start = dropout_mlp().state_dict()
    one, two = torch.load(out / "frozen_w1.pt"), torch.load(out / "frozen_w2.pt")
    assert _max_diff(one, two) < 1e-5
    side = {k for k in start if k.startswith("branches.0.")}
    assert side and all(not torch.equal(one[k], start[k]) for k in side)  # the branch trained
    assert all(torch.equal(two[k], start[k]) for k in start if k not in side)  # the rest did not


def test_two_ranks_evaluate_and_gather_like_one(launches):
    out, res = launches
    one, two, other = (res[k]["eval_fresh"] for k in ("w1_r0", "w2_r0", "w2_r1"))
    assert one["n"] == two["n"] == other["n"] == 41
    assert one["acc"] == two["acc"] == other["acc"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6) and two == other
    t1, t2 = torch.load(out / "table_w1.pt"), torch.load(out / "table_w2.pt")
    assert torch.equal(t1["pred"], t2["pred"]) and torch.equal(t1["target"], t2["target"])
    assert torch.allclose(t1["score"], t2["score"], rtol=1e-5, atol=1e-7)
    assert res["w2_r0"]["table_equals_local"]


def test_two_ranks_write_one_checkpoint_log_on_rank_0_and_resume_exactly(launches):
    _, res = launches
    assert res["w2_r0"]["log_lines"] == 2 and res["w2_r1"]["log_lines"] == 0
    assert res["w2_r1"]["saves"] == [] and len(res["w2_r0"]["saves"]) == len(res["w1_r0"]["saves"]) == 5
    # Dropout model: equal only if every rank's RNG state came back from the checkpoint.
    assert res["w2_r0"]["resume_equal"] and res["w2_r1"]["resume_equal"] and res["w1_r0"]["resume_equal"]


def test_torchrun_cli_train_and_calibrate(tmp_path):
    # The documented torchrun command (docs/torchrun.md), on the smaller offline data set
    # (1,259 training images: the last global batch of 43 splits 22 / 21).
    args = ["train", "--model", "b-lenet", "--dataset", "digits", "--epochs", "1", "--batch-size", "64",
            "--seed", "3", "--quiet"]
    _run(["-m", "branchynet", *args, "--out", str(tmp_path / "two.pt")], nproc=2)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one.pt")]) == 0
    finally:
        torch.set_num_threads(before)
    one = read_checkpoint(tmp_path / "one.pt")["state_dict"]
    two = read_checkpoint(tmp_path / "two.pt")["state_dict"]
    assert _max_diff(one, two) < 1e-3
    engine = load_engine(tmp_path / "two.pt")
    res = engine(torch.randn(5, 1, 28, 28))
    assert res.pred.shape == (5,)

    r = _run(["-m", "branchynet", "calibrate", str(tmp_path / "two.pt"), "--out", str(tmp_path / "cal2")],
             nproc=2)
    assert r.stdout.count("chosen thresholds") == 1, r.stdout  # rank 0 reports
    assert main(["calibrate", str(tmp_path / "two.pt"), "--out", str(tmp_path / "cal1")]) == 0
    # Accuracy and exit fractions of every threshold combination: the same sweep (the
    # time column is measured, so it differs). The candidate thresholds sit between
    # neighbouring float32 scores, which the sharded pass computes in other batches: equal
    # to float rounding.
    rows = lambda p: [line.split(",") for line in (p / "calibration.csv").read_text().splitlines()]  # noqa: E731
    two_rows, one_rows = rows(tmp_path / "cal2"), rows(tmp_path / "cal1")
    assert [r[1:3] for r in two_rows] == [r[1:3] for r in one_rows]
    assert two_rows[0] == one_rows[0]  # the header
    for a, b in zip(two_rows[1:], one_rows[1:]):
        assert [float(t) for t in a[0].split()] == pytest.approx([float(t) for t in b[0].split()], rel=1e-5)


def test_torchrun_calibrate_with_an_unreachable_target_ends_every_rank(tmp_path):
    # Rank 0 alone searches; when no threshold meets the target, every rank must exit with
    # a non-zero status (not fail waiting in the final barrier), with rank 0's message once.
    args = ["train", "--model", "b-lenet", "--dataset", "digits", "--epochs", "1", "--batch-size", "64",
            "--seed", "3", "--quiet", "--out", str(tmp_path / "m.pt")]
    assert main(args) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "branchynet", "calibrate", str(tmp_path / "m.pt"), "--out", str(tmp_path / "cal"),
           "--min-accuracy", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    assert r.returncode != 0
    assert r.stderr.count("error: no threshold combination meets the target") == 1, r.stderr[-3000:]
    # the other rank leaves with rank 0 instead of failing in the final barrier
    assert "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]
