"""The branchynet command end to end, in a tiny configuration."""

import json
import re
import subprocess
import sys

import pytest

from branchynet.cli import main


# The CLI's timings and threshold choices on a busy 2-core machine: one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_prints_table_and_writes_artifacts(tmp_path, capsys):
    rc = main(["demo", "--epochs", "2", "--limit", "1000", "--lr", "3e-3", "--time-samples", "10", "--repeats", "1",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| network" in out and "| LeNet" in out and "| B-LeNet" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["exit_fractions"]) == 2
    assert abs(sum(summary["exit_fractions"]) - 1) < 1e-9
    assert summary["acc_branchy"] > 0.5  # two epochs on 1000 digits: far above chance (0.1)
    for f in ("model.pt", "calibration.csv", "pareto.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_train_calibrate_bench_info(tmp_path, capsys):
    from branchynet.checkpoint import load_checkpoint, read_checkpoint

    ckpt = tmp_path / "m.pt"
    assert main(["train", "--epochs", "1", "--out", str(ckpt), "--quiet"]) == 0
    assert read_checkpoint(ckpt)["epoch"] == 1
    # the same file resumes: one more epoch on top of the first
    assert main(["train", "--epochs", "2", "--out", str(ckpt), "--resume", "--quiet"]) == 0
    raw = read_checkpoint(ckpt)
    assert raw["epoch"] == 2 and raw["extra"]["dataset"] == "mnist-5k"
    capsys.readouterr()
    assert main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal"), "--write"]) == 0
    out = capsys.readouterr().out
    chosen = re.search(r"chosen thresholds \[([^\]]+)\]", out)
    assert chosen and "written" in out
    assert load_checkpoint(ckpt).exit_config.thresholds == pytest.approx([float(chosen.group(1))])
    assert main(["bench", str(ckpt), "--batch-sizes", "1,16", "--samples", "32", "--samples-b1", "8",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| batch" in out and "| 16" in out
    assert main(["info"]) == 0
    assert "auto_cpu" in capsys.readouterr().out


def test_module_entry_point_and_bad_arguments():
    r = subprocess.run([sys.executable, "-m", "branchynet", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "torch" in r.stdout
    r = subprocess.run([sys.executable, "-m", "branchynet", "demo", "--model", "vgg"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "invalid choice" in r.stderr


@pytest.mark.parametrize("argv,msg", [
    (["bench", "x.pt", "--samples", "0"], "expected an integer >= 1"),
    (["bench", "x.pt", "--batch-sizes", "1,x"], "expected an integer >= 1"),
    (["calibrate", "x.pt", "--max-drop", "5"], "expected a fraction in [0, 1]"),
    (["train", "--weights", "1,a"], "comma-separated numbers"),
])
def test_bad_arguments_are_usage_errors(argv, msg, capsys):
    with pytest.raises(SystemExit, match="^2$") as err:  # argparse's usage-error exit
        main(argv)
    assert err.value.code == 2 and msg in capsys.readouterr().err


def test_weights_of_the_wrong_length(tmp_path):
    # Was a raw ValueError from ExitConfig, after the data set was loaded.
    with pytest.raises(SystemExit, match=r"error: --weights needs 2 values .* got 3: 1.0,1.0,1.0"):
        main(["train", "--epochs", "1", "--weights", "1,1,1",
              "--out", str(tmp_path / "m.pt"), "--quiet"])


def test_resume_with_another_freeze_is_an_error_message(tmp_path, capsys):
    # Was torch's "loaded state dict contains a parameter group that doesn't match" traceback.
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--epochs", "1", "--out", str(ckpt), "--quiet"]) == 0
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--out", str(ckpt), "--resume", "--freeze", "backbone", "--quiet"]) == 2
    assert "trained with freeze=None, this run asks for freeze='backbone'" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_missing_checkpoint_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# -- paths that must end in a clear message ------------------------------------------------


@pytest.fixture(scope="module")
def lenet_ckpt(tmp_path_factory):
    """An untrained B-LeNet checkpoint that names the offline 'digits' set (10 classes,
    1x28x28), and one that names no data set: the CLI paths below need no training."""
    import torch

    from branchynet.checkpoint import save_checkpoint
    from branchynet.models.registry import build_model

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_model("b_lenet")
    return (save_checkpoint(d / "digits.pt", model, extra={"dataset": "digits", "seed": 0}),
            save_checkpoint(d / "nodata.pt", model))


def test_bench_batch_larger_than_the_data(lenet_ckpt):
    with_data, without = lenet_ckpt
    with pytest.raises(SystemExit,
                       match=r"--batch-sizes \[64\] exceed the 32 samples available \(--samples 32\)"):
        main(["bench", str(with_data), "--batch-sizes", "1,64", "--samples", "32", "--repeats", "1"])
    # The data set's test split (359 digits) is smaller than --samples (1024 by default).
    with pytest.raises(SystemExit,
                       match=r"--batch-sizes \[512, 1024\] exceed the 359 samples available \(--samples 1024\)"):
        main(["bench", str(with_data), "--batch-sizes", "8,512,1024", "--repeats", "1"])
    with pytest.raises(SystemExit, match=r"--batch-sizes \[16\] exceed the 8 samples available"):
        main(["bench", str(without), "--batch-sizes", "16", "--samples", "8", "--repeats", "1"])


def test_calibrate_a_checkpoint_without_a_data_set(lenet_ckpt, tmp_path, capsys):
    _, without = lenet_ckpt
    with pytest.raises(SystemExit, match="the checkpoint does not name its data set: pass --dataset"):
        main(["calibrate", str(without), "--out", str(tmp_path)])
    assert not (tmp_path / "calibration.csv").exists()
    assert main(["calibrate", str(without), "--dataset", "digits", "--out", str(tmp_path)]) == 0
    assert "chosen thresholds" in capsys.readouterr().out and (tmp_path / "calibration.csv").exists()


def test_calibrate_value_error_is_an_error_message(lenet_ckpt, tmp_path, monkeypatch):
    import branchynet.calibrate.temperature

    def cannot_fold(model, temperatures, example):  # what a branch with a layer after its Linear gives
        raise ValueError("branch 0: its logits are not its last nn.Linear's output")

    monkeypatch.setattr(branchynet.calibrate.temperature, "fold_temperature", cannot_fold)
    with_data, _ = lenet_ckpt
    before = with_data.read_bytes()
    with pytest.raises(SystemExit, match=r"^error: branch 0: its logits are not its last nn.Linear's output$"):
        main(["calibrate", str(with_data), "--out", str(tmp_path), "--temperature", "--write"])
    assert with_data.read_bytes() == before


def test_calibrate_min_accuracy(lenet_ckpt, tmp_path, capsys, monkeypatch):
    import branchynet.latency
    from branchynet.latency import LatencyProfile

    # Fixed segment times (stage 2 costs 3x stage 1): the cheapest combination is known.
    monkeypatch.setattr(branchynet.latency, "measure_latency", lambda model, example, **k: LatencyProfile(
        batch_size=example.shape[0], sizes=[example.shape[0]], segment=[[1.0], [3.0]]))
    with_data, _ = lenet_ckpt

    def chosen(min_accuracy):
        assert main(["calibrate", str(with_data), "--out", str(tmp_path),
                     "--min-accuracy", min_accuracy]) == 0
        out = capsys.readouterr().out
        m = re.search(r"validation \(predicted\): accuracy ([\d.]+) %, exits \[([^\]]+)\] %", out)
        assert m, out
        return float(m.group(1)), [float(v) for v in m.group(2).split(",")]

    # Any accuracy will do: every sample leaves at the first exit, the cheapest.
    assert chosen("0")[1] == [100.0, 0.0]
    # 100 % is out of reach of an untrained network: an error that names the best reachable
    # accuracy, which is the best row of the sweep written by the run above.
    with open(tmp_path / "calibration.csv") as f:
        best = max(float(row.split(",")[1]) for row in list(f)[1:])
    with pytest.raises(SystemExit, match=r"error: .*min_accuracy") as err:
        main(["calibrate", str(with_data), "--out", str(tmp_path), "--min-accuracy", "1"])
    assert f"{100 * best:.2f}" in str(err.value) or f"{best:.4f}" in str(err.value), str(err.value)


def test_model_and_data_set_that_do_not_fit(lenet_ckpt, tmp_path):
    from branchynet.checkpoint import save_checkpoint
    from branchynet.models.registry import build_model

    with pytest.raises(SystemExit, match=r"b-alexnet takes inputs of shape \(3, 32, 32\) but data set "
                                         r"'digits' has \(1, 28, 28\)"):
        main(["train", "--model", "b-alexnet", "--dataset", "digits", "--out", str(tmp_path / "a.pt")])
    assert not (tmp_path / "a.pt").exists()
    alexnet = save_checkpoint(tmp_path / "alexnet.pt", build_model("b_alexnet"))
    five = save_checkpoint(tmp_path / "five.pt", build_model("b_lenet", num_classes=5))
    for cmd in (["calibrate", "--out", str(tmp_path / "cal")], ["bench", "--repeats", "1"]):
        with pytest.raises(SystemExit, match=r"alexnet.pt takes inputs of shape \(3, 32, 32\) but data "
                                             r"set 'digits' has \(1, 28, 28\)"):
            main([cmd[0], str(alexnet), "--dataset", "digits", *cmd[1:]])
        with pytest.raises(SystemExit, match=r"five.pt predicts 5 classes but data set 'digits' has 10"):
            main([cmd[0], str(five), "--dataset", "digits", *cmd[1:]])


def test_demo_refuses_a_data_set_its_model_cannot_take(tmp_path):
    # Refused before any training, with the message the other subcommands give.
    with pytest.raises(SystemExit, match=r"^error: b-alexnet takes inputs of shape \(3, 32, 32\) but data set "
                                         r"'digits' has \(1, 28, 28\)"):
        main(["demo", "--model", "b-alexnet", "--dataset", "digits", "--out", str(tmp_path), "--quiet"])
    assert not (tmp_path / "model.pt").exists()


def test_table_i_rows_and_summary():
    from branchynet.demo import TABLE_I_HEAD, RowTimes, TableI

    eager = RowTimes(backbone_b1=2e-3, branchy_b1=1e-3, backbone_b256=4e-4, branchy_b256=1e-4)
    table = TableI(label="LeNet", acc_backbone=0.99, acc_branchy=0.985, thresholds=[0.025],
                   exit_fractions=[0.75, 0.25], ideal_gain=3.5, times=eager, backend="cpp", n_test=100,
                   n_b1=10)
    rows = table.rows()
    assert [len(r) for r in rows] == [len(TABLE_I_HEAD)] * 2
    assert rows[0] == ["LeNet", "99.00", "2.000", "-", "0.400", "-", "-", "-", "-"]
    assert rows[1] == ["B-LeNet", "98.50", "1.000", "2.00x", "0.100", "4.00x", "0.025", "75.0, 25.0", "3.50x"]
    table.compiled = RowTimes(1e-3, 5e-4, 2e-4, 1e-4)
    rows = table.rows()
    assert [r[0] for r in rows] == ["LeNet", "B-LeNet", "LeNet (compiled)", "B-LeNet (compiled)"]
    assert rows[3][3] == "2.00x" and rows[3][5] == "2.00x" and rows[3][6:] == rows[1][6:]
    summary = table.summary("mnist-5k", "b-lenet")  # the eager times: summary.json's record
    assert summary["gain_b1"] == pytest.approx(2.0) and summary["gain_b256"] == pytest.approx(4.0)
    assert summary["ms_b1"] == pytest.approx([2.0, 1.0]) and summary["exit_fractions"] == [0.75, 0.25]

def test_dataset_unavailable_exits_with_code_2(tmp_path, monkeypatch, capsys):
    import sys as _sys

    # No files under --data-root and no torchvision to download them.
    monkeypatch.setitem(_sys.modules, "torchvision", None)
    monkeypatch.setitem(_sys.modules, "torchvision.datasets", None)
    assert main(["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--epochs", "1",
                 "--out", str(tmp_path / "m.pt"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'mnist'" in err and "train-images-idx3-ubyte" in err
    assert "Traceback" not in err and not (tmp_path / "m.pt").exists()


def test_process_exit_code_is_mains(tmp_path):
    # `python -m branchynet` hands main's return value to the shell.
    r = subprocess.run([sys.executable, "-m", "branchynet", "calibrate", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True)
    # The error is the last line (an environment may log before it, e.g. that an
    # extension built for another torch is skipped).
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "does not exist" in last


# -- bad flags: an argparse error line and exit 2, before any work -------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Any data set load (the first long step of every command) fails the test: the
    flags must be refused before it."""
    import branchynet.data

    def loaded(*args, **kwargs):
        raise AssertionError("the data set was loaded before the flags were checked")

    monkeypatch.setattr(branchynet.data, "load_dataset", loaded)
    monkeypatch.setattr(branchynet.data, "default_dataset_for", loaded)


@pytest.mark.parametrize("argv,msg", [
    (["train", "--lr", "nan"], "argument --lr: expected a number > 0, got nan"),
    (["demo", "--lr", "-1"], "argument --lr: expected a number > 0, got -1"),
    (["train", "--weights", "1,nan"], "argument --weights: expected comma-separated finite numbers >= 0, got '1,nan'"),
    (["train", "--weights", "1,-2"], "argument --weights: expected comma-separated finite numbers >= 0"),
    (["train", "--dataset", "nosuch"], "argument --dataset: unknown data set 'nosuch'; known: mnist-5k, digits"),
    (["calibrate", "x.pt", "--dataset", "nosuch"], "argument --dataset: unknown data set 'nosuch'"),
    (["train", "--device", "gpu"], "argument --device: 'gpu' is not a device name; expected e.g. cpu, cuda, cuda:0"),
    (["demo", "--device", "gpu"], "argument --device: 'gpu' is not a device name"),
    (["bench", "x.pt", "--device", "gpu"], "argument --device: 'gpu' is not a device name"),
    (["selftest", "--device", "gpu"], "argument --device: 'gpu' is not a device name"),
    (["train", "--device", "cuda:99"], "argument --device: device unavailable: 'cuda:99' ("),
    (["bench", "x.pt", "--backend", "gpu"],
     "argument --backend: expected auto or one of cuda, triton, cpp, torch, got 'gpu'"),
    (["demo", "--backend", "gpu"], "argument --backend: expected auto or one of"),
    (["selftest", "--backend", "gpu"], "argument --backend: expected one of cuda, triton, cpp, torch, got 'gpu'"),
])
def test_bad_flags_are_usage_errors_before_any_work(argv, msg, capsys, no_work):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("command,out", [
    (["train", "--epochs", "1", "--quiet"], "file/m.pt"),      # a folder that is a file
    (["train", "--epochs", "1", "--quiet"], "folder"),         # a file path that is a folder
    (["demo", "--epochs", "1", "--quiet"], "file/demo"),
    (["calibrate", "CKPT"], "file/cal"),
    (["calibrate", "CKPT"], "file"),                           # a folder path that is a file
])
def test_an_unwritable_out_is_refused_before_the_first_epoch(command, out, tmp_path, capsys, no_work):
    # Was found only when the first epoch's checkpoint or the calibration's CSV was written.
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    argv = [str(tmp_path / "m.pt") if a == "CKPT" else a for a in command] + ["--out", str(tmp_path / out)]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert f"argument --out: cannot write {tmp_path / out}" in capsys.readouterr().err


def test_an_unreadable_checkpoint_is_an_error_line(lenet_ckpt, tmp_path, monkeypatch, capsys):
    import os
    import shutil

    import branchynet.checkpoint as ckpt_mod

    path = tmp_path / "locked.pt"
    shutil.copy(lenet_ckpt[0], path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: fail the read the way the OS would
        def denied(file, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(file))

        monkeypatch.setattr(ckpt_mod, "open", denied, raising=False)
    for argv in (["calibrate", str(path), "--out", str(tmp_path / "cal")], ["bench", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {path}: Permission denied"), err


def test_calibrate_write_to_an_unwritable_folder_is_refused_before_calibrating(lenet_ckpt, tmp_path,
                                                                               monkeypatch, capsys):
    import os

    import branchynet.calibrate

    ckpt = lenet_ckpt[0]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ckpt.parent) else real_access(p, mode))
    monkeypatch.setattr(branchynet.calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    assert main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal"), "--write"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --write: cannot write {ckpt}: {ckpt.parent} is not writable")
