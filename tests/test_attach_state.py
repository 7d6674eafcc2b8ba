"""attach_exits and what torch.fx cannot see: a forward that updates buffers, one that
branches on a Python attribute, and an in-place op on a cut's output. Attaching never
changes the user's model; what cannot be cut faithfully is refused with the module's
name and what to do; what can be handled is (and the result equals the model)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from branchynet import attach_exits, joint_loss


class RunningScale(nn.Module):
    """Divides by a running mean of |x| that its forward updates in place."""

    def __init__(self, d=8):
        super().__init__()
        self.register_buffer("running", torch.ones(d))

    def forward(self, x):
        self.running.mul_(0.9).add_(0.1 * x.detach().abs().mean(0))
        return x / self.running


class WithRunningScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.norm = RunningScale()
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.norm(torch.relu(self.a(x))))


class CountsCalls(nn.Module):
    """The model itself updates a buffer in its forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.b(torch.relu(self.a(x)))


class Flagged(nn.Module):
    """A forward that branches on a plain Python attribute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.double = False

    def forward(self, x):
        h = self.a(x)
        if self.double:
            h = h * 2
        return self.b(h)


def buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def x_batch(seed=0, b=6):
    return torch.randn(b, 4, generator=torch.Generator().manual_seed(seed))


def test_attaching_does_not_change_buffers_and_a_buffer_update_is_refused_by_name():
    # Used to run the update on the real buffer while tracing (running moved from 1.0)
    # and keep only part of it in the graph (the final exit drifted from model(x)).
    torch.manual_seed(0)
    model = WithRunningScale()
    before = buffers(model)
    with pytest.raises(ValueError, match=r"'norm' \(RunningScale\) updates its buffer 'norm.running' in place "
                                         r"\(mul_\).*leaf_modules=\['norm'\]"):
        attach_exits(model, ["a"], example_input=x_batch())
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())


def test_a_buffer_update_kept_whole_as_a_leaf_module_is_faithful():
    torch.manual_seed(0)
    model = WithRunningScale()
    twin = copy.deepcopy(model)
    before = buffers(model)
    net = attach_exits(model, ["a"], example_input=x_batch(), leaf_modules=["norm"])
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())  # attaching ran nothing for real
    for i in range(4):  # every call updates the buffer once, as the model does
        x = x_batch(i)
        assert torch.equal(net(x)[-1], twin(x))
        assert torch.equal(model.norm.running, twin.norm.running)


def test_the_model_updating_its_own_buffer_is_refused_pointing_to_from_stages():
    model = CountsCalls()
    with pytest.raises(ValueError, match=r"the model \(CountsCalls\) updates its buffer 'calls' in place "
                                         r"\(add_\).*from_stages"):
        attach_exits(model, ["a"], example_input=x_batch())
    assert float(model.calls) == 0.0


def test_a_python_flag_frozen_by_tracing_is_guarded():
    # Used to be frozen at its value when attaching, without a word: the final exit no
    # longer equalled model(x) once the flag changed.
    torch.manual_seed(0)
    model = Flagged()
    net = attach_exits(model, ["a"], example_input=x_batch())
    x = x_batch(1)
    assert torch.equal(net(x)[-1], model(x))
    model.double = True
    with pytest.raises(RuntimeError, match=r"self.double of the model \(Flagged\) was False when attach_exits "
                                           r"traced it and is True now.*attach_exits again.*leaf_modules"):
        net(x)
    model.double = False
    assert torch.equal(net(x)[-1], model(x))
    twin = copy.deepcopy(net)  # the copy checks its own model's attribute
    assert torch.equal(twin(x)[-1], model(x))
    twin.stages[0].a.weight.data.zero_()
    assert not torch.equal(twin(x)[-1], model(x))  # nothing shared with the original
    model.double = True
    assert torch.equal(twin(x)[0], twin(x)[0])  # the copy's flag did not change
    flags = [r[0] for h in twin.stages[0]._forward_pre_hooks.values() for r in h.reads]
    assert flags and all(f is not model for f in flags)
    flags[0].double = True
    with pytest.raises(RuntimeError, match=r"self.double of the model \(Flagged\)"):
        twin(x)


class ReluInPlace(nn.Module):
    """Kept whole (a leaf module): its in-place op is seen only when it runs."""

    def forward(self, x):
        return x.relu_()


class InplaceAfterCut(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(4, 8)
        self.act = nn.ReLU(inplace=True)
        self.leaf = ReluInPlace()
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        if self.how == "method":
            h.relu_()
        elif self.how == "function":
            h = F.relu(h, inplace=True)
        elif self.how == "module":
            h = self.act(h)
        elif self.how == "leaf":
            h = self.leaf(h)
        else:
            h = torch.relu(h)
        return self.b(h)


@pytest.mark.parametrize("how", ["method", "function", "module", "leaf"])
@pytest.mark.parametrize("freeze", [False, True])
def test_an_inplace_op_on_a_cuts_output_trains(how, freeze):
    # Used to fail in backward: "one of the variables needed for gradient computation
    # has been modified by an inplace operation", frozen backbone or not.
    torch.manual_seed(0)
    model = InplaceAfterCut(how)
    reference = InplaceAfterCut("out of place")
    reference.load_state_dict(model.state_dict())
    net = attach_exits(model, ["a"], example_input=x_batch(), leaf_modules=[ReluInPlace]).train()
    ref = attach_exits(reference, ["a"], example_input=x_batch(), branches=[copy.deepcopy(net.branches[0])]).train()
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in reference.parameters():
            p.requires_grad_(False)
    x, y = x_batch(2), torch.tensor([0, 1, 2, 0, 1, 2])
    outs = net(x)
    joint_loss(outs, y).backward()
    ref_outs = ref(x)
    joint_loss(ref_outs, y).backward()
    for a, b in zip(outs, ref_outs):
        assert torch.allclose(a, b)
    for p, q in zip(net.branches[0].parameters(), ref.branches[0].parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad)


class CountsInPython(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.b(torch.relu(self.a(x)))


def test_a_forward_changing_python_state_is_refused_and_the_state_put_back():
    # Tracing ran the increment (twice: train and eval graphs); the stages never would.
    model = CountsInPython()
    with pytest.raises(ValueError, match=r"tracing CountsInPython changed calls \(0 -> 2\) \(put back\)"):
        attach_exits(model, ["a"], example_input=x_batch())
    assert model.calls == 0
