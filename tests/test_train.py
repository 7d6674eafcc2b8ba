"""Training, evaluation and checkpoints: B-LeNet learns the offline MNIST subset, a
resumed run equals an uninterrupted one, a checkpoint rebuilds the same engine, and bad
files fail with CheckpointError."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import branchynet as bn
from branchynet import EarlyExitEngine, ExitConfig
from branchynet.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_engine,
    read_checkpoint,
    save_checkpoint,
)
from branchynet.data import DataSplits, load_dataset
from branchynet.models.registry import build_model
from branchynet.train import TrainHistory, TrainSettings, evaluate, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on a shared
    # 2-core box its spin-waiting made the module 3-4x slower (49 s vs 14 s measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-5k", seed=0)


@pytest.fixture(scope="module")
def trained_lenet(mnist):
    """B-LeNet after 2 epochs on the 3,500 training images (~4 s on 2 cores)."""
    torch.manual_seed(0)
    model = build_model("b-lenet")
    history = train(model, mnist, epochs=2, lr=1e-3, batch_size=64, seed=0, progress=False)
    return model, history


def subset(ds: TensorDataset, n: int) -> TensorDataset:
    # The splits are in seeded random order, so a prefix is a class mix.
    return TensorDataset(*(t[:n] for t in ds.tensors))


def tiny_mlp(seed=0, dropout=0.3):
    """A 2-exit MLP on 8x8 digits, with dropout so that resuming must restore the RNG."""
    torch.manual_seed(seed)
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(dropout)),
              nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Dropout(dropout))]
    model = bn.from_stages(stages, [nn.Linear(32, 10), nn.Linear(32, 10)],
                           input_shape=(1, 8, 8), num_classes=10)
    return model


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", seed=0, size=8)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def drop_seconds(h: TrainHistory) -> dict:
    d = h.to_dict()
    d.pop("seconds")
    return d


# -- training ------------------------------------------------------------------------------


def test_b_lenet_learns_mnist_5k(trained_lenet, mnist):
    # Measured over seeds 0..9 (model and split): final exit 0.913-0.950, branch 0.881-0.909
    # after these 2 epochs; chance is 0.10.
    model, history = trained_lenet
    res = evaluate(model, mnist.test)
    assert res["n"] == len(mnist.test) == 1000
    assert res["final_acc"] == res["acc"][-1]
    assert res["final_acc"] > 0.80, res
    assert res["acc"][0] > 0.70, res
    assert history.train_loss[1] < history.train_loss[0]


def test_history_shape(trained_lenet):
    _, h = trained_lenet
    assert len(h) == 2 and h.epoch == [1, 2]
    for per_exit in (h.train_acc, h.train_exit_loss, h.val_acc, h.val_exit_loss, h.weights):
        assert len(per_exit) == 2 and all(len(v) == 2 for v in per_exit)
    assert len(h.train_loss) == len(h.val_loss) == len(h.lr) == len(h.seconds) == 2
    assert h.weights == [[1.0, 1.0], [1.0, 1.0]] and h.lr == [1e-3, 1e-3]
    assert all(0.0 <= a <= 1.0 for v in h.train_acc + h.val_acc for a in v)
    # joint loss = weighted sum of the per-exit losses
    assert h.val_loss[-1] == pytest.approx(sum(h.val_exit_loss[-1]))
    assert TrainHistory.from_dict(h.to_dict()) == h


def test_same_seed_same_weights(digits8):
    runs = []
    for _ in range(2):
        m = tiny_mlp(seed=1)
        h = train(m, digits8, epochs=2, seed=7, progress=True, batch_size=32)
        runs.append((m, h))
    assert same_weights(runs[0][0], runs[1][0])
    assert drop_seconds(runs[0][1]) == drop_seconds(runs[1][1])
    m = tiny_mlp(seed=1)
    train(m, digits8, epochs=2, seed=8, progress=False, batch_size=32)
    assert not same_weights(runs[0][0], m)


@pytest.mark.parametrize("opts", [
    dict(optimizer="adam"),
    dict(optimizer="sgd", lr=0.05, weight_decay=1e-4, schedule="cosine", main_first_epochs=1),
])
def test_resume_equals_uninterrupted_mlp(tmp_path, digits8, opts):
    # Dropout draws from the global RNG: equal weights need the RNG restored too.
    kw = dict(epochs=3, seed=3, progress=False, batch_size=32, **opts)
    whole = tiny_mlp(seed=2)
    whole.arch = {"name": "tiny_mlp", "kwargs": {}}  # lets save_checkpoint write it
    h_whole = train(whole, digits8, **kw)

    ckpt = tmp_path / "run.pt"
    first = tiny_mlp(seed=2)
    first.arch = {"name": "tiny_mlp", "kwargs": {}}

    def crash_after_epoch_2(line):
        # log runs after the epoch's checkpoint is written: a crash here loses nothing.
        if line.startswith("epoch 2"):
            raise KeyboardInterrupt("crash after epoch 2")

    with pytest.raises(KeyboardInterrupt, match="crash after epoch 2"):
        train(first, digits8, **kw, checkpoint=ckpt, log=crash_after_epoch_2)
    assert read_checkpoint(ckpt)["epoch"] == 2
    torch.manual_seed(12345)  # whatever happens in between must not matter
    resumed = tiny_mlp(seed=99)
    resumed.arch = {"name": "tiny_mlp", "kwargs": {}}
    h_resumed = train(resumed, digits8, **kw, checkpoint=ckpt, resume=True)
    assert same_weights(whole, resumed)
    assert drop_seconds(h_whole) == drop_seconds(h_resumed)
    assert read_checkpoint(ckpt)["epoch"] == 3


def test_resume_b_lenet(tmp_path, mnist):
    # B-LeNet on 600 images: train 2 epochs, resume to 3 == 3 uninterrupted.
    small = DataSplits("mnist-600", subset(mnist.train, 600), subset(mnist.val, 100),
                       mnist.test, 10, (1, 28, 28))
    kw = dict(epochs=3, seed=0, progress=False, batch_size=64)
    torch.manual_seed(0)
    whole = build_model("b_lenet")
    train(whole, small, **kw)
    ckpt = tmp_path / "lenet.pt"
    torch.manual_seed(0)
    part = build_model("b_lenet")
    train(part, small, **{**kw, "epochs": 2}, checkpoint=ckpt)
    resumed = build_model("b_lenet")
    h = train(resumed, small, **kw, checkpoint=ckpt, resume=True)
    assert h.epoch == [1, 2, 3]
    assert same_weights(whole, resumed)
    # A finished run resumes to nothing and keeps its weights.
    again = build_model("b_lenet")
    h2 = train(again, small, **kw, checkpoint=ckpt, resume=True)
    assert h2.epoch == [1, 2, 3] and same_weights(whole, again)


def test_resume_without_file_starts_fresh(tmp_path, digits8):
    m = tiny_mlp()
    m.arch = {"name": "tiny_mlp", "kwargs": {}}
    h = train(m, digits8, epochs=1, progress=False, checkpoint=tmp_path / "new.pt", resume=True)
    assert h.epoch == [1] and (tmp_path / "new.pt").is_file()
    other = tiny_mlp()
    other.arch = {"name": "tiny_mlp", "kwargs": {}}
    with pytest.raises(ValueError, match="optimizer='adam'"):
        train(other, digits8, epochs=2, optimizer="sgd", progress=False,
              checkpoint=tmp_path / "new.pt", resume=True)


@pytest.mark.parametrize("change,msg", [
    (dict(freeze="backbone"), r"freeze=None, this run asks for freeze='backbone'"),
    (dict(amp="bf16"), r"amp=None, this run asks for amp='bf16'"),
    (dict(distill=0.5), r"distill=0.0, this run asks for distill=0.5"),
    (dict(arch={"name": "tiny_mlp", "kwargs": {"width": 64}}), r"arch=.*'width': 32.*'width': 64"),
])
def test_resume_with_other_settings_is_a_checkpoint_error(tmp_path, digits8, change, msg):
    # Each used to resume silently (amp, distill) or crash in load_state_dict (freeze, arch).
    m = tiny_mlp()
    m.arch = {"name": "tiny_mlp", "kwargs": {"width": 32}}
    train(m, digits8, epochs=1, progress=False, checkpoint=tmp_path / "a.pt")
    other = tiny_mlp()
    other.arch = change.pop("arch", m.arch)
    with pytest.raises(CheckpointError, match=msg):
        train(other, digits8, epochs=2, progress=False, checkpoint=tmp_path / "a.pt", resume=True, **change)


def test_main_first_trains_only_the_final_exit(digits8):
    m = tiny_mlp()
    branch0 = {k: v.clone() for k, v in m.branches[0].state_dict().items()}
    stage0 = m.stages[0][1].weight.clone()
    h = train(m, digits8, epochs=1, main_first_epochs=1, progress=False)
    assert h.weights == [[0.0, 1.0]]
    assert all(torch.equal(v, m.branches[0].state_dict()[k]) for k, v in branch0.items())
    assert not torch.equal(stage0, m.stages[0][1].weight)
    # Weight 0 on the last exit: the stage after the last live exit is left alone too.
    stage1 = m.stages[1][0].weight.clone()
    train(m, digits8, epochs=1, weights=(1.0, 0.0), progress=False)
    assert torch.equal(stage1, m.stages[1][0].weight)


def test_train_accepts_loaders_and_logs(digits8):
    m = tiny_mlp()
    loader = DataLoader(Subset(digits8.train, range(200)), batch_size=50, shuffle=True)
    lines = []
    h = train(m, loader, val=digits8.val, epochs=2, progress=False, log=lines.append,
              schedule="cosine", lr=1e-2)
    assert len(lines) == 2 and lines[0].startswith("epoch 1") and "val acc" in lines[1]
    assert h.lr == [1e-2, pytest.approx(5e-3)]
    res = evaluate(m, DataLoader(digits8.test, batch_size=100))
    assert set(res) == {"n", "acc", "loss", "joint_loss", "final_acc"} and res["n"] == len(digits8.test)
    m.train()
    evaluate(m, digits8.test)
    assert m.training, "evaluate restores the mode it found"


def test_train_argument_errors(digits8, tmp_path):
    m = tiny_mlp()
    with pytest.raises(ValueError, match="from_stages"):
        train(m, digits8, epochs=1, checkpoint=tmp_path / "x.pt", progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        train(m, digits8, optimizer="lbfgs")
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        train(m, digits8, resume=True)
    with pytest.raises(ValueError, match="weights"):
        train(m, digits8, weights=(1.0,))
    with pytest.raises(TypeError, match="BranchyNet"):
        train(nn.Linear(2, 2), digits8)
    with pytest.raises(TypeError, match="splits.test"):
        evaluate(m, digits8)



def test_settings_object_equals_keywords(digits8):
    by_kw = tiny_mlp(seed=1)
    h_kw = train(by_kw, digits8, epochs=2, seed=7, lr=2e-3, batch_size=32, progress=False)
    by_settings = tiny_mlp(seed=1)
    settings = TrainSettings(epochs=2, seed=7, lr=2e-3, batch_size=32, progress=False)
    h_settings = train(by_settings, digits8, settings)
    assert same_weights(by_kw, by_settings)
    assert drop_seconds(h_kw) == drop_seconds(h_settings)
    # keywords beside settings override them; the settings object is left as it was
    overridden = tiny_mlp(seed=1)
    h = train(overridden, digits8, TrainSettings(epochs=5, seed=7, lr=2e-3, batch_size=32),
              epochs=2, progress=False)
    assert same_weights(by_kw, overridden)
    assert drop_seconds(h) == drop_seconds(h_kw)
    assert settings.epochs == 2 and TrainSettings().epochs == 5
    assert bn.TrainSettings is TrainSettings


def test_settings_errors(digits8):
    m = tiny_mlp()
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        train(m, digits8, epoch=1)
    with pytest.raises(TypeError, match="TrainSettings"):
        train(m, digits8, {"epochs": 1})
    with pytest.raises(ValueError, match="epochs"):
        train(m, digits8, TrainSettings(epochs=-1))

# -- checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def calibrated(trained_lenet, mnist):
    """The trained B-LeNet with a threshold that sends about half the test set out early."""
    model = copy.deepcopy(trained_lenet[0]).eval()
    x = mnist.test.tensors[0][:400]
    with torch.no_grad():
        t = float(bn.entropy(model(x)[0]).median())
    model.exit_config = ExitConfig(2, thresholds=(t,), weights=(1.0, 0.5), criterion="entropy")
    return model, x


def test_checkpoint_round_trip_gives_the_same_engine(tmp_path, calibrated):
    model, x = calibrated
    path = save_checkpoint(tmp_path / "lenet.pt", model, epoch=2,
                           extra={"calibration": {"thresholds": [0.1], "accuracy": 0.9}})
    want = EarlyExitEngine(model, backend="torch")(x)
    assert 0 < want.counts[0] < x.shape[0], "both exits must be used"
    engine = load_engine(path, backend="torch")
    assert engine.thresholds == model.exit_config.thresholds
    got = engine(x)
    for f in ("logits", "pred", "exit", "entropy"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert got.counts == want.counts

    loaded = load_checkpoint(path)
    assert isinstance(loaded, bn.BranchyNet) and not loaded.training
    assert loaded.exit_config == model.exit_config
    assert loaded.arch["name"] == "b_lenet" and loaded.input_shape == (1, 28, 28)
    assert same_weights(loaded, model)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["format"] == FORMAT and raw["version"] == 1 and raw["epoch"] == 2
    assert raw["extra"]["calibration"] == {"thresholds": [0.1], "accuracy": 0.9}
    assert raw["optimizer"] is None and raw["rng"] is None


@pytest.fixture
def lenet_file(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ok.pt", build_model("b_lenet"))


def test_truncated_checkpoint(lenet_file, tmp_path):
    data = lenet_file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(cut)


def test_random_bytes(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(CheckpointError, match="corrupt"):
        load_engine(junk)


def test_plain_state_dict_is_foreign(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(build_model("b_lenet").state_dict(), path)
    with pytest.raises(CheckpointError, match="not a branchynet checkpoint.*plain state_dict"):
        load_checkpoint(path)
    other = tmp_path / "list.pt"
    torch.save([1, 2, 3], other)
    with pytest.raises(CheckpointError, match="no 'branchynet-checkpoint' format tag"):
        read_checkpoint(other)


def test_pickled_model_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model("b_lenet"), path)
    with pytest.raises(CheckpointError, match="not a branchynet checkpoint.*Python objects"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        read_checkpoint(tmp_path)


def test_newer_version_and_unknown_architecture(lenet_file, tmp_path):
    raw = torch.load(lenet_file, weights_only=True)
    torch.save({**raw, "version": 2}, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="newer branchynet.*version 2"):
        load_checkpoint(tmp_path / "v2.pt")
    torch.save({**raw, "arch": {"name": "b_vgg", "kwargs": {}}}, tmp_path / "vgg.pt")
    with pytest.raises(CheckpointError, match="unknown architecture 'b_vgg'.*b_lenet"):
        load_checkpoint(tmp_path / "vgg.pt")
    sd = dict(raw["state_dict"])
    sd.pop(next(iter(sd)))
    torch.save({**raw, "state_dict": sd}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "short.pt")
    assert issubclass(CheckpointError, ValueError)


def test_save_refuses_what_it_cannot_rebuild(tmp_path):
    with pytest.raises(ValueError, match="from_stages.*state_dict"):
        save_checkpoint(tmp_path / "m.pt", tiny_mlp())
    with pytest.raises(ValueError, match="extra\\['obj'\\] is a object"):
        save_checkpoint(tmp_path / "m.pt", build_model("b_lenet"), extra={"obj": object()})
    assert not list(tmp_path.iterdir()), "nothing written"


def test_read_checkpoint_returns_the_raw_dict(lenet_file):
    raw = read_checkpoint(lenet_file)
    assert raw["exit_config"] == ExitConfig(2).to_dict()
    assert raw["arch"] == {"name": "b_lenet", "kwargs": {"num_classes": 10, "in_channels": 1}}
    assert raw["input_shape"] == [1, 28, 28] and raw["num_classes"] == 10


# -- reproducible commands, mixed precision ------------------------------------------------


def _weights(path):
    return read_checkpoint(path)["state_dict"]


def _sweep(folder):
    # accuracy and exit fractions of every combination; the time column is measured
    return [line.split(",")[:3] for line in (folder / "calibration.csv").read_text().splitlines()]


def test_cli_train_is_reproducible(tmp_path):
    from branchynet.cli import main

    args = ["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--seed", "3", "--quiet"]
    for name in ("a", "b"):
        torch.seed()  # whatever the global RNG holds before the command must not matter
        assert main([*args, "--out", str(tmp_path / f"{name}.pt")]) == 0
    a, b = _weights(tmp_path / "a.pt"), _weights(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_demo_and_calibrate_are_reproducible(tmp_path):
    from branchynet.cli import main

    for name in ("a", "b"):
        torch.seed()
        assert main(["demo", "--dataset", "digits", "--epochs", "1", "--limit", "300", "--time-samples", "2",
                     "--repeats", "1", "--quiet", "--out", str(tmp_path / name)]) == 0
    a, b = _weights(tmp_path / "a" / "model.pt"), _weights(tmp_path / "b" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _sweep(tmp_path / "a") == _sweep(tmp_path / "b")
    for name in ("c", "d"):
        assert main(["calibrate", str(tmp_path / "a" / "model.pt"), "--out", str(tmp_path / name)]) == 0
    assert _sweep(tmp_path / "c") == _sweep(tmp_path / "d") == _sweep(tmp_path / "a")


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_trains_in_low_precision_on_cpu(tmp_path, digits8, amp, dtype):
    # Measured, 2 epochs, lr 3e-3: train acc 0.858 / 0.639 (branch / final exit) in fp32,
    # the same to +-0.005 with bf16 and fp16; chance is 0.1.
    ref = train(tiny_mlp(seed=1, dropout=0.0), digits8, epochs=2, seed=0, lr=3e-3, progress=False)
    m = tiny_mlp(seed=1, dropout=0.0)
    m.arch = {"name": "tiny_mlp", "kwargs": {}}
    seen = []
    hook = m.stages[0][1].register_forward_hook(lambda mod, i, out: seen.append(out.dtype))
    h = train(m, digits8, epochs=2, seed=0, lr=3e-3, progress=False, amp=amp, checkpoint=tmp_path / "m.pt")
    hook.remove()
    assert seen[0] == dtype  # a training batch under autocast
    assert h.train_acc[-1] == pytest.approx(ref.train_acc[-1], abs=0.03), (h.train_acc, ref.train_acc)
    assert min(h.train_acc[-1]) > 0.5 and h.train_acc[-1] != ref.train_acc[-1]
    assert all(p.dtype == torch.float32 for p in m.parameters())
    scaler = read_checkpoint(tmp_path / "m.pt")["extra"]["train"]["grad_scaler"]
    assert (scaler is not None and scaler["scale"] > 0) if amp == "fp16" else scaler is None


def test_amp_errors(digits8):
    m = tiny_mlp()
    with pytest.raises(ValueError, match="amp must be None, 'bf16' or 'fp16', got 'fp8'"):
        train(m, digits8, amp="fp8", progress=False)
    with pytest.raises(ValueError, match="no autocast for device type 'meta'"):
        train(m, digits8, amp="bf16", device="meta", progress=False)
