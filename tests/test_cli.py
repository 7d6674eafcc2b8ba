"""The branchynet command end to end, in a tiny configuration."""

import json
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
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--epochs", "1", "--out", str(ckpt), "--quiet"]) == 0
    assert ckpt.exists()
    assert main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal"), "--write"]) == 0
    out = capsys.readouterr().out
    assert "chosen thresholds" in out and "written" in out
    from branchynet.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt).exit_config.thresholds[0] >= 0
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
