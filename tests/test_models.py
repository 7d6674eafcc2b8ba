"""Smoke tests for the paper's networks (timm style): shapes, gradients, backbone, registry."""

import json

import pytest
import torch
from torch import nn

from branchynet import ExitConfig, joint_loss
from branchynet.blocks import BasicBlock, chainer_lrn, max_pool, pool_out
from branchynet.models.alexnet import b_alexnet
from branchynet.models.branchynet import BranchyNet
from branchynet.models.lenet import b_lenet
from branchynet.models.registry import MODELS, build_model
from branchynet.models.resnet import b_resnet110

# factory, number of exits, input shape, in_features of every Linear in the authors' code
SPECS = {
    "b_lenet": (b_lenet, 2, (1, 28, 28), {640, 720, 84}),
    "b_alexnet": (b_alexnet, 3, (3, 32, 32), {512, 128, 1024, 256}),
    "b_resnet110": (b_resnet110, 3, (3, 32, 32), {7200, 3600, 14400, 576}),
}
NAMES = list(SPECS)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: spec[0]() for name, spec in SPECS.items()}


def _input(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.input_shape, generator=g)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_forward_shapes(name, num_classes):
    factory, num_exits, input_shape, _ = SPECS[name]
    model = factory(num_classes=num_classes).eval()
    assert isinstance(model, BranchyNet)
    assert model.num_exits == num_exits and model.exit_config.num_exits == num_exits
    assert model.input_shape == input_shape and model.num_classes == num_classes
    with torch.no_grad():
        outs = model(_input(model, 2))
    assert len(outs) == num_exits
    for z in outs:
        assert z.shape == (2, num_classes) and torch.isfinite(z).all()


@pytest.mark.parametrize("name", NAMES)
def test_authors_classifier_widths(models, name):
    widths = {m.in_features for m in models[name].modules() if isinstance(m, nn.Linear)}
    assert widths == SPECS[name][3]


@pytest.mark.parametrize("name", NAMES)
def test_joint_loss_reaches_every_parameter(models, name):
    model = models[name].train()
    model.zero_grad(set_to_none=True)
    x = _input(model, 4, seed=1)
    target = torch.tensor([0, 1, 2, 3])
    loss = joint_loss(model(x), target, model.exit_config.weights)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_backbone_only_is_the_last_exit(models, name):
    model = models[name].eval()
    x = _input(model, 3, seed=2)
    with torch.no_grad():
        last = model(x)[-1]
        base = model.backbone_only()(x)
    torch.testing.assert_close(base, last, rtol=0, atol=0)
    n_model = sum(p.numel() for p in model.parameters())
    n_base = sum(p.numel() for p in model.backbone_only().parameters())
    assert n_base < n_model


@pytest.mark.parametrize("name", NAMES)
def test_arch_rebuilds_the_model(models, name):
    model = models[name]
    arch = json.loads(json.dumps(model.arch))
    assert arch["name"] == name and "exit_config" not in arch["kwargs"]
    rebuilt = MODELS[arch["name"]](**arch["kwargs"])
    assert [(k, p.shape) for k, p in rebuilt.state_dict().items()] == \
        [(k, p.shape) for k, p in model.state_dict().items()]
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize("name,total,backbone", [
    ("b_lenet", 74_694, 67_824),
    ("b_alexnet", 605_886, 544_074),
    ("b_resnet110", 27_859_934, 1_737_754),  # branch 0's Linear(7200, 3600) holds 25.9M
])
def test_parameter_counts(models, name, total, backbone):
    model = models[name]
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.backbone_only().parameters()) == backbone


def test_lenet_in_channels():
    model = b_lenet(num_classes=3, in_channels=3)
    assert model.input_shape == (3, 28, 28)
    assert model.arch["kwargs"] == {"num_classes": 3, "in_channels": 3}
    assert [z.shape for z in model(torch.randn(2, 3, 28, 28))] == [(2, 3)] * 2
    with pytest.raises(ValueError, match="in_channels"):
        b_lenet(in_channels=0)


@pytest.mark.parametrize("name", NAMES)
def test_exit_config_is_kept_and_checked(name):
    factory, num_exits, _, _ = SPECS[name]
    cfg = ExitConfig(num_exits, thresholds=[0.1] * (num_exits - 1))
    assert factory(exit_config=cfg).exit_config is cfg
    with pytest.raises(ValueError, match="num_exits"):
        factory(exit_config=ExitConfig(num_exits + 1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [1, 0, -3, 2.0, True, "10", None])
def test_bad_num_classes(name, bad):
    with pytest.raises(ValueError, match="num_classes"):
        SPECS[name][0](num_classes=bad)


def test_registry():
    assert set(MODELS) == set(NAMES) | {"torchvision", "hf"}  # + exits on torchvision and Hugging Face models
    for spelling in ("b-lenet", "b_lenet", "B-LeNet"):
        model = build_model(spelling, num_classes=5)
        assert model.arch["name"] == "b_lenet" and model.num_classes == 5
    assert build_model("b-resnet110").num_exits == 3
    assert build_model("b_alexnet").num_exits == 3
    with pytest.raises(ValueError, match="b_alexnet.*b_lenet.*b_resnet110"):
        build_model("b-vgg16")


# --- blocks: the Chainer semantics the layer lists rely on ------------------------------

def test_chainer_lrn_matches_chainer_formula():
    x = torch.randn(2, 7, 4, 4, dtype=torch.float64)
    n, k, alpha, beta = 3, 2.0, 5e-5 * 1e4, 0.75  # a large alpha, so the window shows
    sq = torch.nn.functional.pad(x * x, (0, 0, 0, 0, 1, 1))
    window = sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:]
    expected = x / (k + alpha * window) ** beta  # Chainer: alpha is not divided by n
    torch.testing.assert_close(chainer_lrn(n, alpha, beta, k)(x), expected)


@pytest.mark.parametrize("size,k,s", [(30, 2, 2), (15, 2, 2), (17, 2, 2), (11, 2, 2),
                                      (32, 3, 2), (16, 3, 2), (8, 3, 2), (4, 3, 2), (30, 3, 2)])
def test_pool_out_is_chainer_cover_all(size, k, s):
    cover_all = (size - k + s - 1) // s + 1  # chainer.utils.conv.get_conv_outsize(cover_all=True)
    assert pool_out(size, k, s) == cover_all
    assert max_pool(k, s)(torch.zeros(1, 1, size, size)).shape[-1] == cover_all


def test_basic_block_shortcut_pads_in_front_and_subsamples():
    block = BasicBlock(2, 4, stride=2).eval()
    x = torch.randn(1, 2, 5, 5)
    sc = block.shortcut(x)
    assert sc.shape == (1, 4, 3, 3) and block(x).shape == (1, 4, 3, 3)
    assert (sc[:, :2] == 0).all()
    torch.testing.assert_close(sc[:, 2:], x[:, :, ::2, ::2])
    with pytest.raises(ValueError, match="out_channels"):
        BasicBlock(4, 2)


def test_resnet110_depth():
    model = b_resnet110()
    backbone_blocks = sum(isinstance(m, BasicBlock) for m in model.stages.modules())
    assert backbone_blocks == 55  # authors' code: 1 + 18 + 18 + 18
    convs = [m for m in model.backbone_only().modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(convs) == 112
