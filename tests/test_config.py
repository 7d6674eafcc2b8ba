import math

import pytest
import torch
from torch import nn

import branchynet as bn
from branchynet import ExitConfig, joint_loss


def test_defaults_and_round_trip():
    cfg = ExitConfig(3)
    assert cfg.thresholds == (0.0, 0.0) and cfg.weights == (1.0, 1.0, 1.0)
    assert cfg.criterion == "entropy"
    cfg = ExitConfig(3, thresholds=[0.1, 0.2], weights=[1, 0.5, 0.3], criterion="margin")
    assert ExitConfig.from_dict(cfg.to_dict()) == cfg


def test_assignment_is_validated():
    cfg = ExitConfig(3)
    cfg.thresholds = [0.1, 0.2]
    assert cfg.thresholds == (0.1, 0.2)
    with pytest.raises(ValueError, match="NaN"):
        cfg.thresholds = [0.1, float("nan")]
    with pytest.raises(ValueError, match="expected 3"):
        cfg.weights = [1.0]
    with pytest.raises(ValueError, match="criterion"):
        cfg.criterion = "foo"
    with pytest.raises(AttributeError, match="num_exits"):
        cfg.num_exits = 4
    assert cfg.thresholds == (0.1, 0.2) and cfg.weights == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(num_exits=0), ValueError, "num_exits"),
    (dict(num_exits=2.0), TypeError, "num_exits"),
    (dict(num_exits=3, thresholds=[0.1]), ValueError, "expected 2"),
    (dict(num_exits=2, thresholds=[float("nan")]), ValueError, "NaN"),
    (dict(num_exits=2, thresholds=[-1.0]), ValueError, "negative"),
    (dict(num_exits=2, weights=[1.0]), ValueError, "weights"),
    (dict(num_exits=2, weights=[0.0, 0.0]), ValueError, "all zero"),
    (dict(num_exits=2, weights=[1.0, math.inf]), ValueError, "finite"),
    (dict(num_exits=2, criterion="foo"), ValueError, "criterion"),
])
def test_validation(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        ExitConfig(**kwargs)


def test_joint_loss_is_weighted_sum_of_cross_entropies():
    torch.manual_seed(0)
    outs = [torch.randn(5, 4) for _ in range(3)]
    y = torch.randint(0, 4, (5,))
    w = [1.0, 0.5, 0.25]
    want = sum(wi * nn.functional.cross_entropy(z, y) for wi, z in zip(w, outs))
    total, per = joint_loss(outs, y, w, return_per_exit=True)
    torch.testing.assert_close(total, want)
    assert per.shape == (3,)
    torch.testing.assert_close(joint_loss(outs, y), sum(per))
    with pytest.raises(ValueError, match="expected 3"):
        joint_loss(outs, y, [1.0])
    with pytest.raises(ValueError, match=r"outputs\[1\]"):
        joint_loss([outs[0], torch.randn(4, 4)], y)


def test_branchynet_container_validation():
    with pytest.raises(ValueError, match="equal length"):
        bn.BranchyNet([nn.Identity()], [nn.Identity(), nn.Identity()])
    with pytest.raises(TypeError, match=r"stages\[0\]"):
        bn.BranchyNet([lambda x: x], [nn.Identity()])
    with pytest.raises(ValueError, match="num_exits"):
        bn.BranchyNet([nn.Identity()], [nn.Identity()], exit_config=ExitConfig(2))


def test_from_sequential_cuts_and_shares_modules():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
    net.add_module("relu1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(8, 8, 3, padding=1))
    net.add_module("relu2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(8, 5))
    x = torch.randn(4, 3, 8, 8)
    model = bn.from_sequential(net, ["relu1"], num_classes=5, example_input=x)
    assert model.num_exits == 2
    outs = model(x)
    assert [o.shape for o in outs] == [(4, 5), (4, 5)]
    # the final exit is the unchanged backbone
    torch.testing.assert_close(outs[-1], net(x))
    assert model.stages[0][0] is net.conv1
    torch.testing.assert_close(model.backbone_only()(x), net(x))
    with pytest.raises(ValueError, match="not a child"):
        bn.from_sequential(net, ["nope"], num_classes=5)
    with pytest.raises(ValueError, match="network order"):
        bn.from_sequential(net, ["conv2", "relu1"], num_classes=5)
    with pytest.raises(ValueError, match="num_classes"):
        bn.from_sequential(net, ["relu1"])


def test_from_stages_user_backbone_with_engine():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 16), nn.ReLU())]
    model = bn.from_stages(stages, [None, nn.Linear(16, 3)], num_classes=3,
                           example_input=torch.randn(2, 6))
    x = torch.randn(50, 6)
    with torch.no_grad():
        outs = model(x)
    # Half the batch leaves at exit 0: T midway between two entropies, far from either
    # (a T equal to a float32 entropy splits backends that compare in float64 and float32).
    h = bn.entropy(outs[0]).double().sort().values
    t = float(h[24] + h[25]) / 2
    res = bn.EarlyExitEngine(model, [t])(x)
    assert sum(res.counts) == 50
    leave0 = bn.entropy(outs[0]) < t
    assert 0 < int(leave0.sum()) < 50 and res.counts == [int(leave0.sum()), 50 - int(leave0.sum())]
    assert res.exit.tolist() == torch.where(leave0, 0, 1).tolist()
    torch.testing.assert_close(res.logits, torch.where(leave0[:, None], outs[0], outs[1]))


def test_from_sequential_names_positional_children_by_index():
    # nn.Sequential(*modules) names its children "0", "1", ...: the README cuts by the
    # network's own names through an OrderedDict.
    from collections import OrderedDict

    layers = [("conv", nn.Conv2d(3, 4, 3)), ("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
              ("flat", nn.Flatten()), ("fc", nn.Linear(4, 5))]
    with pytest.raises(ValueError, match=r"'relu' is not a child of the backbone; children are \['0', '1'"):
        bn.from_sequential(nn.Sequential(*[m for _, m in layers]), ["relu"], num_classes=5)
    assert bn.from_sequential(nn.Sequential(*[m for _, m in layers]), ["1"], num_classes=5).num_exits == 2
    model = bn.from_sequential(nn.Sequential(OrderedDict(layers)), ["relu"], num_classes=5,
                               example_input=torch.randn(1, 3, 8, 8))
    assert model.stages[0][-1] is layers[1][1] and model.stages[1][0] is layers[2][1]
