"""`branchynet calibrate` with every target, and --write keeping the training state."""

import re

import pytest

from branchynet.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, update_checkpoint
from branchynet.cli import main


# The CLI's timings and threshold choices on a busy 2-core machine: one intra-op thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibrate_write_keeps_training_state_so_train_resumes(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    assert main(["train", "--epochs", "1", "--out", str(ckpt), "--quiet"]) == 0
    before = read_checkpoint(ckpt)
    with pytest.raises(SystemExit, match=r"error: no threshold combination .* max_flops=0.001 .* least reachable is"):
        main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal"), "--write", "--max-flops", "0.001"])
    assert read_checkpoint(ckpt)["exit_config"] == before["exit_config"]  # nothing written
    capsys.readouterr()
    assert main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal"), "--write", "--max-flops", "0.6",
                 "--temperature", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "test split (measured)" in out and "ECE before" in out and "thresholds and temperatures written" in out
    raw = read_checkpoint(ckpt)
    assert raw["epoch"] == 1 and raw["optimizer"] is not None and raw["rng"] is not None
    assert raw["extra"] == before["extra"]
    temps = [float(t) for t in re.search(r"temperature ([^;]+);", out).group(1).split(",")]
    assert raw["temperature"] == pytest.approx(temps, rel=1e-2)
    chosen = [float(t) for t in re.search(r"chosen thresholds \[([^\]]+)\]", out).group(1).split(",")]
    assert list(load_checkpoint(ckpt).exit_config.thresholds) == pytest.approx(chosen, rel=1e-5)
    assert main(["train", "--epochs", "2", "--out", str(ckpt), "--resume", "--quiet"]) == 0
    resumed = read_checkpoint(ckpt)
    assert resumed["epoch"] == 2
    # The temperatures stay folded into the weights, so their record and the thresholds
    # chosen for them stay too (they used to be reset to the defaults).
    assert resumed["temperature"] == raw["temperature"]
    assert resumed["exit_config"]["thresholds"] == raw["exit_config"]["thresholds"]
    assert resumed["exit_config"]["criterion"] == raw["exit_config"]["criterion"]


def test_update_checkpoint_replaces_only_weights_exit_config_and_temperature(tmp_path):
    import torch

    from branchynet.calibrate.temperature import _last_linear
    from branchynet.models import b_lenet

    model = b_lenet(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 28, 28))[0].sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "m.pt", model, optimizer=opt, epoch=3, rng=True, extra={"dataset": "x"})
    with torch.no_grad():
        _last_linear(model.branches[0]).weight.mul_(0.5)
    model.exit_config.thresholds = [0.25]
    update_checkpoint(path, model, temperature=[2.0, 1.0], extra={"calibration": {"max_flops": 0.5}})
    update_checkpoint(path, model, temperature=[1.5, 1.0])
    raw = read_checkpoint(path)
    assert raw["epoch"] == 3 and raw["optimizer"]["state"] and raw["rng"] is not None
    assert raw["extra"] == {"dataset": "x", "calibration": {"max_flops": 0.5}}
    assert raw["temperature"] == [3.0, 1.0]  # folded twice
    assert raw["exit_config"]["thresholds"] == [0.25]
    assert all(torch.equal(raw["state_dict"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="temperature: expected 2 finite values > 0"):
        update_checkpoint(path, model, temperature=[0.0, 1.0])


@pytest.mark.parametrize("argv,msg", [
    (["calibrate", "x.pt", "--max-flops", "-1"], "expected a number > 0"),
    (["calibrate", "x.pt", "--max-latency-ms", "0"], "expected a number > 0"),
    (["calibrate", "x.pt", "--exit-fraction", "2"], "expected a fraction in [0, 1]"),
    (["calibrate", "x.pt", "--batch-size", "0"], "expected an integer >= 1"),
])
def test_bad_target_flags_are_usage_errors(argv, msg, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and msg in capsys.readouterr().err


def test_temperature_on_a_split_with_a_nan_row_is_an_error_line_and_writes_nothing(tmp_path, monkeypatch):
    # Was torch's "atol ... got nan" traceback, with the branches' weights already divided.
    import dataclasses

    import torch

    import branchynet.data
    from branchynet.models.registry import build_model

    real = branchynet.data.load_dataset

    def with_a_nan_row(*args, **kwargs):
        splits = real(*args, **kwargs)
        x, y = (t.clone() for t in splits.val.tensors)
        x[3] = float("nan")
        return dataclasses.replace(splits, val=torch.utils.data.TensorDataset(x, y))

    monkeypatch.setattr(branchynet.data, "load_dataset", with_a_nan_row)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("b_lenet"), extra={"dataset": "digits", "seed": 0})
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit, match=r"^error: 1 of \d+ validation samples give NaN scores \(first at index 3"):
        main(["calibrate", str(ckpt), "--out", str(tmp_path / "cal"), "--temperature", "--write"])
    assert ckpt.read_bytes() == before
