"""Checkpoints: the atomic save, and every way a file can fail to rebuild a model.

(Round trips, foreign and corrupt files are in test_train.py.)
"""

import os

import pytest
import torch

import branchynet.checkpoint as ckpt_mod
from branchynet.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from branchynet.cli import main
from branchynet.config import ExitConfig
from branchynet.models.registry import build_model


def lenet(seed):
    torch.manual_seed(seed)
    return build_model("b_lenet")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def saved(tmp_path):
    """(path, model, raw dict) of a good B-LeNet checkpoint."""
    model = lenet(0)
    path = save_checkpoint(tmp_path / "ok.pt", model)
    return path, model, torch.load(path, weights_only=True)


# -- atomic save ---------------------------------------------------------------------------


def test_save_replaces_the_file_and_leaves_no_temporary(saved, tmp_path):
    path, _, _ = saved
    newer = lenet(1)
    assert save_checkpoint(path, newer) == path
    assert same_weights(load_checkpoint(path), newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]


def test_interrupted_save_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    path, first, _ = saved
    real_save = torch.save

    def save_half_then_die(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:  # what a kill or a full disk leaves: a cut file
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(path, lenet(1))
    monkeypatch.undo()
    # The old file is whole and the cut temporary is gone.
    assert same_weights(load_checkpoint(path), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]


def test_failed_rename_removes_the_temporary(saved, tmp_path, monkeypatch):
    path, first, _ = saved

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(ckpt_mod.os, "replace", refuse)
    with pytest.raises(PermissionError, match="Permission denied"):
        save_checkpoint(path, lenet(1))
    monkeypatch.undo()
    assert same_weights(load_checkpoint(path), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.pt"]


def test_save_creates_missing_folders(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "b" / "m.pt", lenet(0))
    assert path.is_file() and read_checkpoint(path)["arch"]["name"] == "b_lenet"


# -- files that do not rebuild -------------------------------------------------------------


def write(tmp_path, raw, **changes):
    path = tmp_path / "bad.pt"
    torch.save({**raw, **changes}, path)
    return path


@pytest.mark.parametrize("key", ["arch", "exit_config", "state_dict"])
def test_missing_key(saved, tmp_path, key):
    _, _, raw = saved
    path = tmp_path / "bad.pt"
    torch.save({k: v for k, v in raw.items() if k != key}, path)
    with pytest.raises(CheckpointError, match=f"bad.pt: checkpoint is missing {key}"):
        load_checkpoint(path)


@pytest.mark.parametrize("version", [None, "1", True, 1.0])
def test_invalid_format_version(saved, tmp_path, version):
    with pytest.raises(CheckpointError, match=r"no valid format version"):
        load_checkpoint(write(tmp_path, saved[2], version=version))


@pytest.mark.parametrize("exit_config,msg", [
    (None, r"invalid exit_config None"),
    ({"num_exits": 2, "thresholds": [0.1]}, r"invalid exit_config .*'weights'"),
    ({**ExitConfig(2).to_dict(), "thresholds": [-0.5]}, r"invalid exit_config .*threshold"),
    ({**ExitConfig(2).to_dict(), "criterion": "confidence"}, r"invalid exit_config .*criterion"),
])
def test_bad_exit_config(saved, tmp_path, exit_config, msg):
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(write(tmp_path, saved[2], exit_config=exit_config))


def test_exit_config_for_another_number_of_exits(saved, tmp_path):
    # A valid config, but for three exits: B-LeNet has two.
    with pytest.raises(CheckpointError, match=r"could not rebuild 'b_lenet'.*3"):
        load_checkpoint(write(tmp_path, saved[2], exit_config=ExitConfig(3).to_dict()))


@pytest.mark.parametrize("kwargs,msg", [
    ({"num_classes": 10, "in_channels": 1, "width": 3}, r"could not rebuild 'b_lenet' .*TypeError.*width"),
    ({"num_classes": 1, "in_channels": 1}, r"could not rebuild 'b_lenet' .*num_classes"),
])
def test_arch_that_cannot_be_rebuilt(saved, tmp_path, kwargs, msg):
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(write(tmp_path, saved[2], arch={"name": "b_lenet", "kwargs": kwargs}))


@pytest.mark.parametrize("arch,msg", [
    ("b_lenet", r"unknown architecture None"),
    ({"kwargs": {}}, r"unknown architecture None"),
    ({"name": 5, "kwargs": {}}, r"unknown architecture 5"),
    ({"name": "b_lenet", "kwargs": "num_classes=10"}, r"arch\['kwargs'\] must be a dict"),
])
def test_malformed_arch(saved, tmp_path, arch, msg):
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(write(tmp_path, saved[2], arch=arch))


def test_weights_of_another_shape(saved, tmp_path):
    _, _, raw = saved
    sd = dict(raw["state_dict"])
    key = next(k for k, v in sd.items() if v.dim() == 2)
    sd[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=rf"(?s)do not fit 'b_lenet'.*size mismatch for {key}"):
        load_checkpoint(write(tmp_path, raw, state_dict=sd))


def test_cli_reports_a_bad_checkpoint_with_exit_code_2(saved, tmp_path, capsys):
    path = write(tmp_path, saved[2], exit_config=None)
    assert main(["bench", str(path), "--batch-sizes", "1", "--samples", "4", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "invalid exit_config" in err


# -- a good file on the wrong device, a legacy pickle --------------------------------------


@pytest.mark.parametrize("device", ["cuda:99", "cuda", torch.device("cuda", 99)],
                         ids=["index-99", "default-gpu", "device-object"])  # no "cuda" mark: runs on CPU
def test_an_unavailable_device_is_not_called_corruption(saved, device):
    # Was "... is corrupt or truncated": a user could delete a good file.
    from branchynet.checkpoint import load_engine
    from branchynet.devices import DeviceUnavailable

    if str(device) == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    path = saved[0]
    for load in (read_checkpoint, load_checkpoint, load_engine):
        with pytest.raises(DeviceUnavailable, match=r"device unavailable: .*cuda") as err:
            load(path, map_location=device)
        assert "corrupt" not in str(err.value) and "map_location" in str(err.value)


def test_cli_device_unavailable_is_a_usage_error(saved, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", str(saved[0]), "--device", "cuda:99"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "argument --device: device unavailable: 'cuda:99'" in msg and "corrupt" not in msg


def test_legacy_pickle_says_what_the_file_is_and_does_not_suggest_unpickling(tmp_path):
    # Was "corrupt or not a torch file (random bytes?)" followed by torch's hint to load
    # with weights_only=False, which runs the code a file may hold.
    path = tmp_path / "legacy.pt"
    torch.save(lenet(0), path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy .*torch file .* Python objects") as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "random bytes" not in msg and "weights_only=False" not in msg and "corrupt" not in msg
