"""The branchynet command end to end, in a tiny configuration."""

import json
import re
import subprocess
import sys

import pytest

from branchynet.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_missing_checkpoint_is_an_error_message_not_a_traceback(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "nope.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
