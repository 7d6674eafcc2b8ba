"""Exits by module name (torch.fx): the final exit is the model, the cuts are checked, the
side branches fit what flows at each cut, a frozen backbone stays bit-identical, and
self-distillation is the SDN/BYOT formula.

The torchvision cases (resnet18, mobilenet_v3_small, a small ViT, all with random weights)
skip without torchvision; with BRANCHYNET_REQUIRE_TORCHVISION=1 (the second CI step) a
missing torchvision fails them instead.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from branchynet import EarlyExitEngine, attach_exits, entropy, joint_loss
from branchynet.checkpoint import load_checkpoint, save_checkpoint
from branchynet.models.attach import (
    auto_branch,
    conv_branch,
    linear_branch,
    pool_linear_branch,
    token_branch,
)
from branchynet._build import env_flag
from branchynet.train import train

REQUIRE_TORCHVISION = env_flag("BRANCHYNET_REQUIRE_TORCHVISION")


def _torchvision():
    if REQUIRE_TORCHVISION:
        import torchvision  # an ImportError here fails the test: CI promised torchvision

        return torchvision
    return pytest.importorskip("torchvision")


# -- a small residual network, no torchvision needed ----------------------------------------


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = Block(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    # Non-trivial batch-norm statistics, so eval mode differs from train mode.
    with torch.no_grad():
        net.train()(torch.randn(32, 1, 12, 12))
    return net.eval()


def _x(b=6, shape=(1, 12, 12), seed=1):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))


def test_final_exit_is_the_model_and_shares_its_parameters():
    net = _net()
    model = attach_exits(net, ["layer1", "down"], example_input=_x(2))
    assert model.num_exits == 3 and model.input_shape == (1, 12, 12) and model.num_classes == 10
    x = _x()
    model.eval()
    with torch.no_grad():
        outs = model(x)
        assert torch.equal(outs[-1], net(x))
        assert [tuple(z.shape) for z in outs] == [(6, 10)] * 3
        # Shared, not copied: every backbone parameter is the model's own object.
        backbone = {id(p) for s in model.stages for p in s.parameters()}
        assert backbone == {id(p) for p in net.parameters()}
        net.fc.bias += 1.0
        torch.testing.assert_close(model(x)[-1], outs[-1] + 1.0)
    # Train mode too (batch statistics): the same graph runs.
    model.train(), net.train()
    assert torch.allclose(model(x)[-1], net(x), rtol=0, atol=1e-6)


def test_default_branches_fit_the_cut():
    model = attach_exits(_net(), ["layer1", "down"], example_input=_x(2))
    for branch, channels in zip(model.branches[:-1], (8, 16)):
        assert isinstance(branch.pool, nn.AdaptiveAvgPool2d) and branch.head.fc.in_features == channels
    assert isinstance(model.branches[-1], nn.Identity)


def test_branches_and_factory_are_used():
    mine = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = attach_exits(_net(), ["layer1", "down"], example_input=_x(2), branches=[mine, None],
                         branch_factory=conv_branch)
    assert model.branches[0] is mine
    assert model.branches[1].conv.conv.in_channels == 16
    with pytest.raises(ValueError, match="branches: expected 2"):
        attach_exits(_net(), ["layer1", "down"], example_input=_x(2), branches=[mine])


@pytest.mark.parametrize("after,match", [
    (["layer3"], r"'layer3' is not a module of Net .*close names: \['layer2', 'layer1'"),
    (["down", "layer1"], r"network order: got \['down', 'layer1'\], the forward runs them as \['layer1', 'down'\]"),
    (["layer1.0.conv1"], r"cannot cut at 'layer1.0.conv1': more than its output flows on .*enclosing block 'layer1.0'"),
    (["layer2.bn1"], r"cannot cut at 'layer2.bn1'.*enclosing block 'layer2'"),
    (["layer1", "layer1.0"], r"'layer1.0' is inside 'layer1'"),
    (["fc"], r"'fc' gives the model's output, which is the final exit already"),
    (["layer1", "layer1"], r"names a module twice"),
    ([], r"at least one module"),
])
def test_bad_cuts_are_refused(after, match):
    with pytest.raises(ValueError, match=match):
        attach_exits(_net(), after, example_input=_x(2))


def test_bad_arguments():
    with pytest.raises(TypeError, match="list of module names"):
        attach_exits(_net(), "layer1", example_input=_x(2))
    with pytest.raises(ValueError, match="example_input must be a tensor"):
        attach_exits(_net(), ["layer1"], example_input=torch.zeros(0, 1, 12, 12))
    with pytest.raises(ValueError, match="num_classes = 7 but the model returns 10 classes"):
        attach_exits(_net(), ["layer1"], example_input=_x(2), num_classes=7)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 4)
        self.enc = nn.TransformerEncoderLayer(4, 1, 8, batch_first=True)

    def forward(self, x):
        return self.b(self.a(self.a(self.enc(x)).mean(1)))


@pytest.mark.parametrize("after,match", [
    (["a"], r"'a' runs 2 times in the forward"),
    (["unused"], r"cannot cut at 'unused': the forward never calls it"),
    (["enc.self_attn.out_proj"], r"inside 'enc', which torch.fx keeps whole"),
])
def test_cuts_torch_fx_cannot_make(after, match):
    with pytest.raises(ValueError, match=match):
        attach_exits(Twice(), after, example_input=torch.randn(2, 5, 4))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.gate = nn.Linear(4, 4), nn.Linear(4, 3), Gate()

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


def test_untraceable_model_points_to_from_stages_and_leaf_modules():
    with pytest.raises(RuntimeError, match=r"torch.fx cannot trace DataDependent .*leaf_modules=.*from_stages"):
        attach_exits(DataDependent(), ["a"], example_input=torch.randn(2, 4))
    net = DataDependent()
    for leaf in (Gate, "gate"):
        model = attach_exits(net, ["a"], example_input=torch.randn(2, 4), leaf_modules=[leaf])
        x = torch.randn(3, 4)
        assert torch.equal(model(x)[-1], net(x))


class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.a(x)), x


def test_model_must_return_one_tensor():
    with pytest.raises(ValueError, match="returns tuple, not one tensor of logits"):
        attach_exits(Tuple(), ["a"], example_input=torch.randn(2, 4))


class ModeDependent(nn.Module):
    """A forward that reads self.training: torch.fx specialises it, so one graph per mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h * 2
        return self.b(h)


def test_train_and_eval_mode_forwards_both_kept():
    net = ModeDependent()
    model = attach_exits(net, ["a"], example_input=torch.randn(2, 4))
    x = torch.randn(5, 4)
    with torch.no_grad():
        for mode in (True, False, True):
            model.train(mode), net.train(mode)
            assert torch.equal(model(x)[-1], net(x))
        assert not torch.equal(net.train()(x), net.eval()(x))  # the modes do differ
    # One set of weights in the state dict, whichever graph runs.
    assert sorted(model.state_dict()) == ["branches.0.fc.bias", "branches.0.fc.weight",
                                          "stages.0.a.bias", "stages.0.a.weight",
                                          "stages.1.b.bias", "stages.1.b.weight"]


def test_engine_equals_per_sample_and_the_exit_rule():
    torch.manual_seed(0)
    model = attach_exits(_net(), ["layer1", "down"], example_input=_x(2)).eval()
    _check_engine(model, _x(40, seed=3))


def _check_engine(model, x):
    """Thresholds at the median branch entropy: a mix of exits; the engine, the per-sample
    loop and the rule applied to the full forward must agree row by row."""
    with torch.no_grad():
        outs = model(x)
    ents = [entropy(z) for z in outs]
    thresholds = [float(e.median()) for e in ents[:-1]]
    engine = EarlyExitEngine(model, thresholds)
    res, one = engine(x), engine.per_sample(x)
    want = torch.full((x.shape[0],), len(outs) - 1)
    for n in reversed(range(len(outs) - 1)):
        want = torch.where(ents[n] < thresholds[n], n, want)
    assert torch.equal(res.exit, want) and torch.equal(one.exit, want)
    assert len(set(want.tolist())) >= 2  # the check covers more than one exit
    ref = torch.stack([outs[e][i] for i, e in enumerate(want.tolist())])
    torch.testing.assert_close(res.logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.pred, ref.argmax(1)) and torch.equal(one.pred, ref.argmax(1))


# -- side branches --------------------------------------------------------------------------


def test_branch_factories_by_rank():
    maps, tokens, flat = torch.randn(2, 8, 5, 5), torch.randn(2, 7, 12), torch.randn(2, 20)
    assert isinstance(auto_branch(maps, 4).pool, nn.AdaptiveAvgPool2d)
    assert isinstance(auto_branch(tokens, 4).norm, nn.LayerNorm)
    assert auto_branch(flat, 4).fc.in_features == 20
    for factory, feat in ((pool_linear_branch, maps), (conv_branch, maps), (token_branch, tokens),
                          (linear_branch, flat)):
        assert tuple(factory(feat, 4)(feat).shape) == (2, 4)
    assert conv_branch(maps, 4, width=3).head.fc.in_features == 3
    with pytest.raises(ValueError, match=r"no default side branch for features of shape \(2, 3, 4, 5, 6\)"):
        auto_branch(torch.randn(2, 3, 4, 5, 6), 4)
    with pytest.raises(ValueError, match=r"token_branch takes features \[B, S, D\], got \(2, 8, 5, 5\)"):
        token_branch(maps, 4)
    with pytest.raises(ValueError, match="pool must be 'mean' or 'cls'"):
        token_branch(tokens, 4, pool="max")


def test_token_branch_cls_reads_token_zero_and_mean_every_token():
    tokens = torch.randn(3, 5, 8)
    other = tokens.clone()
    other[:, 1:] += torch.randn(3, 4, 8)
    cls, mean = token_branch(tokens, 4, pool="cls"), token_branch(tokens, 4, pool="mean")
    assert torch.equal(cls(tokens), cls(other))
    assert not torch.allclose(mean(tokens), mean(other))
    torch.testing.assert_close(mean(tokens), mean.fc(mean.norm(tokens.mean(1))))


# -- self-distillation and the frozen backbone ----------------------------------------------


def test_joint_loss_distillation_formula():
    g = torch.Generator().manual_seed(0)
    z0, z1, z2 = (torch.randn(8, 5, generator=g) for _ in range(3))
    y = torch.randint(0, 5, (8,), generator=g)
    w, a, t = [0.5, 0.7, 1.0], 0.3, 2.0
    soft = F.softmax(z2 / t, 1)

    def kl(z):  # KL(teacher || student), mean over the batch
        return (soft * (soft.log() - F.log_softmax(z / t, 1))).sum(1).mean()

    want = (w[0] * ((1 - a) * F.cross_entropy(z0, y) + a * t * t * kl(z0))
            + w[1] * ((1 - a) * F.cross_entropy(z1, y) + a * t * t * kl(z1))
            + w[2] * F.cross_entropy(z2, y))
    got, per = joint_loss([z0, z1, z2], y, w, distill=a, temperature=t, return_per_exit=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(per[2], F.cross_entropy(z2, y))
    torch.testing.assert_close(joint_loss([z0, z1, z2], y, w, distill=0.0),
                               sum(wk * F.cross_entropy(z, y) for wk, z in zip(w, (z0, z1, z2))))


def test_distillation_teaches_the_branches_only():
    z0, z1 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    joint_loss([z0], y, [1.0], distill=1.0, teacher=z1).backward()
    assert z1.grad is None and z0.grad.abs().sum() > 0
    # A branch that already equals the teacher has nothing left to learn from it.
    assert joint_loss([z1.detach().clone(), z1], y, [1.0, 0.0], distill=1.0).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match=r"distill must be in \[0, 1\], got 1.5"):
        joint_loss([z0], y, distill=1.5)
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        joint_loss([z0], y, distill=0.5, temperature=0)
    with pytest.raises(ValueError, match=r"teacher must be logits of shape \(4, 3\), got \(4, 2\)"):
        joint_loss([z0], y, distill=0.5, teacher=torch.randn(4, 2))


def _snapshot(modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def _same(a, b):
    return all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def _digits_like(n=48, shape=(1, 12, 12), classes=10):
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_frozen_backbone_stays_bit_identical(distill):
    net = _net()
    model = attach_exits(net, ["layer1", "down"], example_input=_x(2))
    fixed = [*model.stages, model.branches[-1], net]
    before, side = _snapshot(fixed), _snapshot(model.branches[:-1])
    train(model, _digits_like(), epochs=1, batch_size=16, freeze="backbone", distill=distill, progress=False)
    assert _same(_snapshot(fixed), before)  # weights and batch-norm statistics
    assert not any(_same([a], [b]) for a, b in zip(_snapshot(model.branches[:-1]), side))
    # The same run without freeze moves the backbone: the check above can fail.
    train(model, _digits_like(), epochs=1, batch_size=16, progress=False)
    assert not _same(_snapshot(fixed), before)


def test_freeze_arguments_checked():
    model = attach_exits(_net(), ["layer1"], example_input=_x(2))
    data = _digits_like(8)
    with pytest.raises(ValueError, match=r"freeze must be one of \(None, 'backbone'\), got 'all'"):
        train(model, data, epochs=1, freeze="all", progress=False)
    with pytest.raises(ValueError, match="main_first_epochs trains the final exit alone"):
        train(model, data, epochs=2, freeze="backbone", main_first_epochs=1, progress=False)
    with pytest.raises(ValueError, match="every side exit's weight is 0"):
        train(model, data, epochs=1, freeze="backbone", weights=[0.0, 1.0], progress=False)
    with pytest.raises(ValueError, match=r"distill must be in \[0, 1\], got -0.1"):
        train(model, data, epochs=1, distill=-0.1, progress=False)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        train(model, data, epochs=1, distill=0.5, temperature=float("nan"), progress=False)


# -- torchvision models (random weights) ----------------------------------------------------

TV_CUTS = {
    "resnet18": ["layer1", "layer2", "layer3"],
    "mobilenet_v3_small": ["features.3", "features.8"],
    "vit": ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"],
}
TV_NAMES = list(TV_CUTS)


def _tv_net(tv, name):
    torch.manual_seed(0)
    if name == "vit":
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32,
                                 mlp_dim=64, num_classes=10)
    return tv.models.get_model(name, weights=None, num_classes=10)


@pytest.fixture(scope="module")
def tv_models():
    """name -> (torchvision model, the same model with exits); 32x32 inputs keep it fast."""
    tv = _torchvision()
    out = {}
    for name in TV_NAMES:
        net = _tv_net(tv, name).eval()
        with torch.no_grad():  # non-trivial batch-norm statistics
            net.train()(torch.randn(8, 3, 32, 32))
        net.eval()
        out[name] = (net, attach_exits(net, TV_CUTS[name], example_input=torch.randn(2, 3, 32, 32)).eval())
    return out


def _tv_x(b=8, seed=2):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TV_NAMES)
def test_tv_final_exit_is_the_model(tv_models, name):
    net, model = tv_models[name]
    x = _tv_x()
    with torch.no_grad():
        outs = model.eval()(x)
        assert torch.equal(outs[-1], net.eval()(x))
    assert len(outs) == len(TV_CUTS[name]) + 1 and all(tuple(z.shape) == (8, 10) for z in outs)
    if name == "vit":
        assert all(isinstance(b.norm, nn.LayerNorm) for b in model.branches[:-1])  # token branches
    else:
        assert all(isinstance(b.pool, nn.AdaptiveAvgPool2d) for b in model.branches[:-1])


@pytest.mark.parametrize("name", TV_NAMES)
def test_tv_huge_thresholds_send_everything_out_at_branch_1(tv_models, name):
    _, model = tv_models[name]
    x = _tv_x()
    res = EarlyExitEngine(model.eval(), [1e9] * len(TV_CUTS[name]))(x)
    assert res.counts == [8] + [0] * len(TV_CUTS[name])
    with torch.no_grad():
        torch.testing.assert_close(res.logits, model(x)[0])


@pytest.mark.parametrize("name", TV_NAMES)
def test_tv_joint_loss_reaches_every_branch(tv_models, name):
    model = copy.deepcopy(tv_models[name][1]).train()  # train mode: batch-norm statistics would change
    x, y = _tv_x(), torch.arange(8) % 10
    joint_loss(model(x), y).backward()
    missing = [k for k, p in model.named_parameters() if p.grad is None]
    assert not missing
    for n, branch in enumerate(model.branches[:-1]):
        assert all(p.grad.abs().sum() > 0 for p in branch.parameters()), f"branch {n}"


@pytest.mark.parametrize("name", TV_NAMES)
def test_tv_frozen_backbone_is_untouched(tv_models, name):
    net, model = copy.deepcopy(tv_models[name])
    fixed = [*model.stages, net]
    before, side = _snapshot(fixed), _snapshot(model.branches[:-1])
    data = TensorDataset(_tv_x(16, seed=4), torch.arange(16) % 10)
    train(model, data, epochs=1, batch_size=8, freeze="backbone", distill=0.5, progress=False)
    assert _same(_snapshot(fixed), before)
    assert not any(_same([a], [b]) for a, b in zip(_snapshot(model.branches[:-1]), side))


@pytest.mark.parametrize("name", TV_NAMES)
def test_tv_engine_equals_per_sample(tv_models, name):
    _check_engine(tv_models[name][1].eval(), _tv_x(24, seed=6))


@pytest.mark.parametrize("name,cut,block", [
    ("resnet18", "layer1.0.conv1", "layer1.0"),
    ("mobilenet_v3_small", "features.3.block.0", "features.3"),
])
def test_tv_cut_inside_a_residual_block_is_refused(tv_models, name, cut, block):
    net, _ = tv_models[name]
    with pytest.raises(ValueError, match=f"cannot cut at '{cut}'.*enclosing block '{block}'"):
        attach_exits(net, [cut], example_input=torch.randn(2, 3, 32, 32))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A resnet18 state_dict with an ImageNet-sized classifier, as pretrained files have."""
    tv = _torchvision()
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(tv.models.resnet18(num_classes=1000).state_dict(), path)
    return path


def test_torchvision_exits_loads_weights_and_round_trips(resnet18_file, tmp_path):
    from branchynet.models.attach import torchvision_exits

    with pytest.warns(UserWarning, match=r"fc.weight \(1000, 512\) -> \(10, 512\)"):
        model = torchvision_exits("resnet18", ["layer1", "layer2"], 10, (1, 28, 28), weights=str(resnet18_file))
    state = torch.load(resnet18_file, weights_only=True)
    # Grey inputs are repeated to RGB in front of the first stage; the weights are the file's.
    assert torch.equal(model.stages[0].stage.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.stages[2].get_submodule("layer4.1.bn2").running_var, state["layer4.1.bn2.running_var"])
    save_checkpoint(tmp_path / "m.pt", model)
    again = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), again(x)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown torchvision model 'resnet19'"):
        torchvision_exits("resnet19", ["layer1"], 10, (3, 32, 32))
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad.pt does not fit ResNet: missing \['conv1.weight'"):
        torchvision_exits("resnet18", ["layer1"], 10, (3, 32, 32), weights=str(tmp_path / "bad.pt"))


def test_cli_train_torchvision_frozen_keeps_pretrained_backbone(resnet18_file, tmp_path):
    from branchynet.cli import main

    pytest.importorskip("sklearn")  # the offline digits
    out = tmp_path / "m.pt"
    with pytest.warns(UserWarning, match="fc.weight"):
        rc = main(["train", "--arch", "torchvision:resnet18", "--after", "layer1,layer2", "--pretrained",
                   str(resnet18_file), "--freeze", "backbone", "--distill", "0.3", "--epochs", "1",
                   "--dataset", "digits", "--quiet", "--out", str(out)])
    assert rc == 0
    model = load_checkpoint(out)
    assert model.arch["kwargs"]["after"] == ["layer1", "layer2"] and model.num_exits == 3
    state = torch.load(resnet18_file, weights_only=True)
    # stages.<n>.<torchvision name>, stage 0 behind the grey-to-RGB wrapper
    got = {k.removeprefix("stages.0.stage.") if k.startswith("stages.0.") else k.split(".", 2)[2]: v
           for k, v in model.state_dict().items() if k.startswith("stages.")}
    assert len(got) == len(state)
    for k, v in got.items():
        if not k.startswith("fc."):
            assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("argv,match", [
    (["--arch", "resnet18", "--after", "layer1"], "--arch must be torchvision:NAME"),
    (["--arch", "torchvision:resnet18"], "--arch needs --after"),
    (["--after", "layer1"], "--after and --pretrained go with --arch"),
])
def test_cli_arch_errors(argv, match):
    from branchynet.cli import main

    with pytest.raises(SystemExit, match=match):
        main(["train", "--dataset", "digits", "--epochs", "1", *argv])
