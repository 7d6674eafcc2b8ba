"""The BranchyNet container: a backbone cut into stages, one exit after each stage."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ExitConfig
from ..state import state_input


class BranchyNet(nn.Module):
    """A backbone cut into stages with an exit (branch) after every stage.

    Branch ``n`` reads the output of stage ``n``; the last branch is the backbone's own
    classifier (the final exit). What flows between stages (the *state*) is one tensor,
    or a tuple or dict of tensors (hidden states and attention mask of a Transformer):
    the first stage takes the input, or the model's keyword arguments as one dict. ``model(x)`` runs every stage and every branch on the
    whole batch and returns every exit's logits, which is what the joint loss trains;
    batched early exit at inference is :class:`branchynet.EarlyExitEngine`'s job.

    Args:
        stages: N modules; stage ``n`` maps the output of stage ``n-1`` (or the input).
        branches: N modules; branch ``n`` maps stage ``n``'s output to logits [B, C].
        exit_config: thresholds, loss weights and criterion; default: N exits, all
            thresholds 0, all weights 1, entropy.
        input_shape: the shape of one sample (e.g. ``(1, 28, 28)``), if fixed; lets the
            engine check inputs and FLOP counting build an example.
        num_classes: C, if known.
        arch: name and keyword arguments of the factory that built the model, kept in
            checkpoints so :func:`branchynet.load_checkpoint` can rebuild it.

    Shapes:
        input [B, *input_shape] -> list of N tensors [B, C].
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        branches: Sequence[nn.Module],
        exit_config: ExitConfig | None = None,
        input_shape: Sequence[int] | None = None,
        num_classes: int | None = None,
        arch: dict | None = None,
    ) -> None:
        super().__init__()
        stages, branches = list(stages), list(branches)
        if not stages:
            raise ValueError("stages must hold at least one module")
        if len(stages) != len(branches):
            raise ValueError(
                f"stages and branches must have equal length (branch n reads stage n), "
                f"got {len(stages)} stages and {len(branches)} branches"
            )
        for kind, mods in (("stages", stages), ("branches", branches)):
            for i, m in enumerate(mods):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"{kind}[{i}] must be an nn.Module, got {type(m).__name__}")
        self.stages = nn.ModuleList(stages)
        self.branches = nn.ModuleList(branches)
        if exit_config is None:
            exit_config = ExitConfig(num_exits=len(stages))
        elif exit_config.num_exits != len(stages):
            raise ValueError(
                f"exit_config.num_exits = {exit_config.num_exits} but the model has {len(stages)} exits"
            )
        self.exit_config = exit_config
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes
        self.arch = arch
        #: True when the stages pass a tuple or dict of tensors even for a one-tensor
        #: input (exits on an exported graph): the engine then compacts every tensor.
        self.multi_tensor = False

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    def forward(self, x: torch.Tensor | tuple | dict | None = None, **inputs) -> list[torch.Tensor]:
        """Every exit's logits on the whole batch: ``model(x)`` or ``model(**inputs)``
        (the wrapped model's keyword arguments, e.g. ``input_ids=, attention_mask=``)."""
        outputs = []
        h = x if not inputs else state_input(x, inputs)
        for stage, branch in zip(self.stages, self.branches):
            h = stage(h)
            outputs.append(branch(h))
        return outputs

    def backbone_only(self) -> "BackboneOnly":
        """The same network without side branches: every stage, then the final classifier.

        Shares this model's modules (and so its trained weights): it is the baseline
        every speedup is measured against.
        """
        return BackboneOnly(self)


class BackboneOnly(nn.Module):
    """A BranchyNet's backbone without side branches (shares the modules).

    Shapes:
        input [B, *input_shape] -> logits [B, C] of the final exit.
    """

    def __init__(self, model: BranchyNet) -> None:
        super().__init__()
        self.stages = model.stages
        self.classifier = model.branches[-1]
        self.input_shape = model.input_shape

    def forward(self, x: torch.Tensor | tuple | dict | None = None, **inputs) -> torch.Tensor:
        x = x if not inputs else state_input(x, inputs)
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x)


def default_branch(num_classes: int) -> nn.Module:
    """A minimal side branch: global average pool (for feature maps), flatten, linear.

    The linear layer is lazy, so it fits any stage's output; run one forward pass (or
    pass ``example_input`` to :func:`from_sequential`) before counting parameters.
    """
    return nn.Sequential(_GlobalPoolIfSpatial(), nn.Flatten(), nn.LazyLinear(num_classes))


class _GlobalPoolIfSpatial(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x


def from_stages(
    stages: Sequence[nn.Module],
    branches: Sequence[nn.Module] | None = None,
    *,
    num_classes: int | None = None,
    branch_factory: Callable[[int], nn.Module] = default_branch,
    exit_config: ExitConfig | None = None,
    input_shape: Sequence[int] | None = None,
    example_input: torch.Tensor | None = None,
) -> BranchyNet:
    """Put exits on a user's backbone given as a list of stages.

    Either pass ``branches`` (one per stage, the last is the final classifier) or
    ``num_classes`` and get ``branch_factory(num_classes)`` for every stage that has
    none. ``branches`` may hold ``None`` entries to be filled by the factory.
    ``example_input`` [B, ...] runs one forward pass to materialise lazy layers.
    """
    stages = list(stages)
    if branches is None:
        branches = [None] * len(stages)
    branches = list(branches)
    if len(branches) != len(stages):
        raise ValueError(f"branches: expected {len(stages)} (one per stage), got {len(branches)}")
    if any(b is None for b in branches):
        if num_classes is None:
            raise ValueError("num_classes is required to build the missing branches")
        branches = [branch_factory(num_classes) if b is None else b for b in branches]
    if input_shape is None and example_input is not None:
        input_shape = tuple(example_input.shape[1:])
    model = BranchyNet(stages, branches, exit_config=exit_config, input_shape=input_shape,
                       num_classes=num_classes)
    if example_input is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_input)
        model.train(was_training)
    return model


def from_sequential(
    backbone: nn.Sequential,
    cut_after: Sequence[str],
    *,
    head: nn.Module | None = None,
    branches: Sequence[nn.Module] | None = None,
    num_classes: int | None = None,
    branch_factory: Callable[[int], nn.Module] = default_branch,
    exit_config: ExitConfig | None = None,
    example_input: torch.Tensor | None = None,
) -> BranchyNet:
    """Cut an ``nn.Sequential`` after the named children and put a side branch at each cut.

    Args:
        backbone: the network; its children run in order.
        cut_after: names of the children (as in ``backbone.named_children()``) after
            which a side branch reads the features, in network order.
        head: the final classifier. Default: the children after the last cut form the
            last stage and its output is taken as the final logits (identity head).
        branches: one side branch per cut (default: ``branch_factory(num_classes)``).

    Returns:
        A BranchyNet with ``len(cut_after) + 1`` exits sharing ``backbone``'s modules.
    """
    names = [n for n, _ in backbone.named_children()]
    cut_after = list(cut_after)
    if not cut_after:
        raise ValueError("cut_after must name at least one child of the backbone")
    for n in cut_after:
        if n not in names:
            raise ValueError(f"cut_after: {n!r} is not a child of the backbone; children are {names}")
    positions = [names.index(n) for n in cut_after]
    if positions != sorted(set(positions)):
        raise ValueError(f"cut_after must list distinct children in network order, got {cut_after}")
    if positions[-1] == len(names) - 1 and head is None:
        raise ValueError("the last cut is after the last child: pass head= for the final classifier")
    children = list(backbone.children())
    bounds = [-1] + positions + [len(names) - 1]
    stages = [nn.Sequential(*children[a + 1:b + 1]) for a, b in zip(bounds[:-1], bounds[1:])]
    if branches is not None and len(branches) != len(cut_after):
        raise ValueError(f"branches: expected {len(cut_after)} (one per cut), got {len(branches)}")
    side = list(branches) if branches is not None else [None] * len(cut_after)
    final = head if head is not None else nn.Identity()
    return from_stages(stages, side + [final], num_classes=num_classes,
                       branch_factory=branch_factory, exit_config=exit_config,
                       example_input=example_input)
