"""Exported artifacts (branchynet.deploy): one graph per exit, ONNX and torch.export,
run by the deploy runner in a fresh process that cannot import the model definitions,
against the eager engine on the same inputs; the manifest's checks; the CLI.

Exports of B-ResNet-110 take tens of seconds on a 2-core CPU and AOTInductor compiles
about a minute per exit: those cases are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from branchynet import EarlyExitEngine
from branchynet.deploy import ExportError, ManifestError, export, load
from branchynet.models import attach_exits, b_alexnet, b_lenet, b_resnet110, from_stages
from branchynet.testing import random_mlp, split_thresholds

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_TORCHVISION = os.environ.get("BRANCHYNET_REQUIRE_TORCHVISION", "") not in ("", "0")
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
FORMATS = ["pt2", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, "
                                                                   "onnxruntime and onnxscript"))]

# The child: the runner with every branchynet.models import refused, on the saved inputs.
CHILD = r"""
import json, sys, torch

class _NoModels:
    def find_spec(self, name, path=None, target=None):
        if name == "branchynet.models" or name.startswith("branchynet.models."):
            raise ImportError(name + " is blocked: an exported model must run without its definition")
        return None

sys.meta_path.insert(0, _NoModels())
from branchynet.deploy import load

job = json.loads(sys.argv[1])
x = torch.load(job["inputs"])
results = {}
for d in job["dirs"]:
    runner = load(d)
    results[d] = {}
    for b in job["sizes"]:
        r = runner(x[:b])
        results[d][b] = dict(logits=r.logits, pred=r.pred, exit=r.exit, entropy=r.entropy, counts=r.counts)
loaded = sorted(m for m in sys.modules if m.startswith("branchynet.models"))
assert not loaded, loaded
torch.save(results, job["out"])
"""


def _settle_batch_norm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Batch-norm statistics of ``x`` (a fresh init's would let 110 layers blow up the
    activations until every softmax is one-hot and every entropy 0)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: one pass gives the batch's statistics
    if norms:
        with torch.no_grad():
            model.train()(x)
    return model.eval()


class _Pair(nn.Module):
    """A stage whose state is a tuple: features and a skip tensor."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        if isinstance(x, tuple):
            x = x[0] + x[1]
        y = torch.relu(self.conv(x))
        return y, y.mean(dim=1, keepdim=True)


class _PairHead(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.fc = nn.LazyLinear(classes)

    def forward(self, h):
        return self.fc(torch.flatten(h[0] * h[1], 1))


def _from_stages():
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())]
    return from_stages(stages, num_classes=10, example_input=torch.randn(2, 3, 16, 16))


def _torchvision():
    if REQUIRE_TORCHVISION:
        import torchvision  # CI promised torchvision: an ImportError fails the test
        return torchvision
    return pytest.importorskip("torchvision")


def _torchvision_resnet18():
    tv = _torchvision()
    torch.manual_seed(0)
    net = tv.models.resnet18(weights=None, num_classes=10).eval()
    return attach_exits(net, ["layer1", "layer2"], example_input=torch.randn(2, 3, 32, 32))


# name -> (model factory, input shape, batch sizes: one row, a few, one large)
CASES = {
    "b_lenet": (b_lenet, (1, 28, 28), [1, 7, 1024]),
    "b_alexnet": (b_alexnet, (3, 32, 32), [1, 7, 256]),
    "b_resnet110": (b_resnet110, (3, 32, 32), [1, 5, 64]),
    "from_stages": (_from_stages, (3, 16, 16), [1, 7, 1024]),
    "torchvision_resnet18": (_torchvision_resnet18, (3, 32, 32), [1, 6, 128]),
}
SLOW = {"b_resnet110"}


def _run_child(dirs, x: torch.Tensor, sizes, tmp: Path) -> dict:
    torch.save(x, tmp / "inputs.pt")
    job = {"dirs": [str(d) for d in dirs], "inputs": str(tmp / "inputs.pt"), "sizes": sizes,
           "out": str(tmp / "results.pt")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "results.pt")


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                        for n in CASES])
def case(request, tmp_path_factory):
    """One model exported in every available format, run by the child process."""
    name = request.param
    factory, shape, sizes = CASES[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(max(sizes), *shape, generator=g)
    model = _settle_batch_norm(factory(), x[:256])
    thresholds = split_thresholds(model, x[:256])
    tmp = tmp_path_factory.mktemp(name)
    dirs = {}
    for fmt in ("pt2", "onnx") if HAS_ONNX else ("pt2",):
        dirs[fmt] = tmp / fmt
        export(model, dirs[fmt], fmt, thresholds=thresholds, progress=False)
    results = _run_child(dirs.values(), x, sizes, tmp)
    engine = EarlyExitEngine(model, thresholds=thresholds)
    want = {b: engine(x[:b]) for b in sizes}
    return {"name": name, "dirs": dirs, "results": {f: results[str(d)] for f, d in dirs.items()},
            "want": want, "model": model, "x": x, "thresholds": thresholds}


def _assert_same(got: dict, want, where: str) -> None:
    assert torch.equal(got["exit"], want.exit), f"{where}: exits differ"
    assert torch.equal(got["pred"], want.pred), f"{where}: predictions differ"
    assert got["counts"] == want.counts, where
    scale = want.logits.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    err = ((got["logits"] - want.logits).abs() / scale).max().item()
    assert err <= 1e-4, f"{where}: logits differ by {err:.3g} relative"
    torch.testing.assert_close(got["entropy"], want.entropy, rtol=1e-4, atol=1e-5, msg=where)


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_equals_engine_without_model_code(case, fmt):
    sizes = CASES[case["name"]][2]
    for b in sizes:
        _assert_same(case["results"][fmt][b], case["want"][b], f"{case['name']} {fmt} B={b}")
    big = case["want"][sizes[-1]].counts
    # Thresholds from the widest gap of the middle third: every exit is taken by some rows.
    assert big[0] > 0 and big[-1] > 0, big


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def lenet_dirs(tmp_path_factory):
    model = _settle_batch_norm(b_lenet(), torch.randn(64, 1, 28, 28))
    tmp = tmp_path_factory.mktemp("lenet")
    dirs = {}
    for fmt in ("pt2", "onnx") if HAS_ONNX else ("pt2",):
        dirs[fmt] = tmp / fmt
        export(model, dirs[fmt], fmt, thresholds=[0.5], progress=False)
    return model, dirs


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_changed_byte_in_any_file_is_refused_naming_it(lenet_dirs, fmt, tmp_path):
    src = lenet_dirs[1][fmt]
    names = sorted(p.name for p in src.iterdir())
    assert "manifest.json" in names and len(names) >= 3
    for name in names:
        d = tmp_path / name
        shutil.copytree(src, d)
        _flip_a_byte(d / name)
        with pytest.raises(ManifestError, match=name.replace(".", r"\.")):
            load(d)
    # A file added after export, and one taken away.
    d = tmp_path / "added"
    shutil.copytree(src, d)
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"extra\.bin: not listed"):
        load(d)
    d = tmp_path / "removed"
    shutil.copytree(src, d)
    (d / f"exit1.{fmt}").unlink()
    with pytest.raises(ManifestError, match=rf"exit1\.{fmt}: listed in manifest\.json but missing"):
        load(d)


def test_a_newer_manifest_format_is_refused_clearly(lenet_dirs, tmp_path):
    d = tmp_path / "newer"
    shutil.copytree(lenet_dirs[1]["pt2"], d)
    doc = json.loads((d / "manifest.json").read_text())
    doc["format_version"] += 1
    (d / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"format version 2 is newer than this branchynet reads "
                                            r"\(up to 1\); upgrade branchynet"):
        load(d)
    (d / "manifest.json").write_text("{}")
    with pytest.raises(ManifestError, match="not a branchynet export manifest"):
        load(d)
    with pytest.raises(ManifestError, match="no manifest.json"):
        load(tmp_path)


def test_thresholds_are_the_runners_and_inputs_are_checked(lenet_dirs):
    model, dirs = lenet_dirs
    runner = load(dirs["pt2"])
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    for t in ([0.0], [10.0], split_thresholds(model, x)):
        runner.thresholds = t
        want = EarlyExitEngine(model, thresholds=t)(x)
        got = runner(x)
        _assert_same(vars(got), want, f"thresholds {t}")
    empty = runner(x[:0])
    assert empty.counts == [0, 0] and empty.logits.shape == (0, 10)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 28, 28\]"):
        runner(torch.randn(2, 1, 28, 27))
    with pytest.raises(TypeError, match="exported for torch.float32"):
        runner(x.double())
    with pytest.raises(ValueError, match="max_batch = 1024"):
        runner(torch.zeros(1025, 1, 28, 28))
    with pytest.raises(ValueError, match="thresholds"):
        runner.thresholds = [0.1, 0.2]


def test_export_refuses_bad_arguments(tmp_path):
    model = random_mlp(num_exits=2)
    with pytest.raises(ExportError, match="format must be one of"):
        export(model, tmp_path / "a", "tflite")
    with pytest.raises(ExportError, match="aoti=True compiles torch.export programs"):
        export(model, tmp_path / "a", "onnx", aoti=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and holds no earlier export"):
        export(model, tmp_path / "busy", "pt2")
    with pytest.raises(TypeError, match="must be a branchynet.BranchyNet"):
        export(nn.Linear(2, 2), tmp_path / "a", "pt2")
    no_shape = from_stages([nn.Linear(4, 4), nn.Linear(4, 4)], num_classes=3)
    with pytest.raises(ExportError, match="no input_shape: pass example_input"):
        export(no_shape, tmp_path / "b", "pt2")
    # One example row is enough: the input shape comes from it, the batch stays dynamic.
    export(no_shape.eval(), tmp_path / "b", "pt2", thresholds=[0.9], example_input=torch.randn(1, 4),
           progress=False)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    _assert_same(vars(load(tmp_path / "b")(x)), EarlyExitEngine(no_shape, thresholds=[0.9])(x), "example row")


def test_export_of_tuple_states_and_reexport_in_place(tmp_path):
    torch.manual_seed(0)
    model = from_stages([_Pair(3, 8), _Pair(8, 8)], num_classes=5, input_shape=(3, 8, 8),
                        example_input=torch.randn(2, 3, 8, 8),
                        branches=[_PairHead(5) for _ in range(2)])
    model(torch.randn(2, 3, 8, 8))
    model.eval()
    x = torch.randn(33, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = split_thresholds(model, x)
    out = tmp_path / "pairs"
    export(model, out, "pt2", thresholds=[0.0], progress=False)
    export(model, out, "pt2", thresholds=t, progress=False)  # replaces the earlier export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["thresholds"] == t and [e["packed"] for e in manifest["exits"]] == [None, 2]
    got = load(out)(x)
    # The engine takes one tensor per stage; the paper's rule, one sample at a time, any state.
    from branchynet.testing import per_sample_rule
    want = per_sample_rule(model, x, t)
    assert got.exit.tolist() == [w.exit for w in want] and got.pred.tolist() == [w.pred for w in want]
    assert 0 < got.counts[0] < 33


def test_cli_export_of_a_checkpoint(tmp_path):
    from branchynet import load_engine, save_checkpoint
    from branchynet.cli import main

    model = _settle_batch_norm(b_lenet(), torch.randn(64, 1, 28, 28))
    model.exit_config.thresholds = (0.3,)
    ckpt = tmp_path / "lenet.pt"
    save_checkpoint(ckpt, model)
    assert main(["export", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "art"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["thresholds"] == [0.3] and manifest["input"] == {"shape": [1, 28, 28], "dtype": "float32",
                                                                     "max_batch": 1024}
    x = torch.randn(50, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    _assert_same(vars(load(tmp_path / "art")(x)), load_engine(ckpt)(x), "cli")
    with pytest.raises(SystemExit):
        main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "b"), "--aoti"])
    assert main(["export", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "p"), "--quiet",
                 "--patience", "1"]) == 0
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["criterion"] == "patience" and manifest["patience"] == 1
    with pytest.raises(SystemExit) as err:
        main(["export", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "q"), "--patience", "0"])
    assert err.value.code == 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_patience_export_decides_as_the_engine(fmt, tmp_path):
    # PABEE in an export: the graphs give prediction and entropy, the runner keeps each
    # row's streak (the exit op for pt2, numpy for ONNX); P can be changed on the runner.
    from branchynet.testing import patience_rule

    model = random_mlp(seed=3, num_exits=6, classes=3)
    x = torch.randn(257, 12, generator=torch.Generator().manual_seed(0))
    x[5, 3] = float("nan")  # a NaN row never leaves early
    export(model, tmp_path / "p", fmt, criterion="patience", patience=2, progress=False)
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["patience"] == 2
    runner = load(tmp_path / "p")
    with torch.no_grad():
        exits = model(x)
    for p in (2, 1):
        runner.patience = p
        got = runner(x)
        want = patience_rule(exits, p)
        assert got.exit.tolist() == [e for e, _ in want] and got.pred.tolist() == [q for _, q in want]
        eng = EarlyExitEngine(model, criterion="patience", patience=p)(x)
        assert got.counts == eng.counts
        # ONNX Runtime's kernels are not torch's: logits agree to ~1e-4 of their scale (_assert_same).
        torch.testing.assert_close(got.logits, eng.logits, rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(got.entropy, eng.entropy, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert len(set(got.exit.tolist())) > 2 and int(got.exit[5]) == 5
    assert runner(x[:0]).exit.shape == (0,)
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        runner.patience = 0
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        export(model, tmp_path / "q", fmt, criterion="patience", progress=False)


@pytest.fixture(scope="module")
def aoti_dir(tmp_path_factory):
    """The one AOTInductor build of these tests: a two-exit MLP (about a minute an exit)."""
    model = random_mlp(num_exits=2, width=16, classes=6)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    thresholds = split_thresholds(model, x)
    out = tmp_path_factory.mktemp("aoti") / "mlp"
    export(model, out, "pt2", aoti=True, thresholds=thresholds, progress=False)
    return model, x, thresholds, out


@pytest.mark.slow
def test_aoti_runner_equals_engine_without_model_code(aoti_dir, tmp_path):
    model, x, thresholds, out = aoti_dir
    assert json.loads((out / "manifest.json").read_text())["backend"] == "aoti"
    sizes = [1, 5, 300]
    results = _run_child([out], x, sizes, tmp_path)[str(out)]
    engine = EarlyExitEngine(model, thresholds=thresholds)
    for b in sizes:
        _assert_same(results[b], engine(x[:b]), f"aoti B={b}")
    assert all(c > 0 for c in results[300]["counts"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("criterion", ["entropy", "max_prob", "margin"])
def test_exit_rule_in_the_graph_follows_the_engine_on_special_logits(fmt, criterion, tmp_path):
    """Identity stages and branches: the graphs' input is the logits, so the exported
    score (softmax in float64, NaN propagated, NaN as +inf in argmax) meets the engine's
    exit op on rows of NaN, +-inf, ties and logits 1e4 apart."""
    from branchynet import BranchyNet
    from branchynet.testing import special_logits

    c = 7
    z = special_logits(c, torch.float32, "cpu", seed=0)
    model = BranchyNet([nn.Identity(), nn.Identity()], [nn.Identity(), nn.Identity()], input_shape=(c,),
                       num_classes=c).eval()
    threshold = {"entropy": 0.8, "max_prob": 0.4, "margin": 0.6}[criterion]
    export(model, tmp_path / "rule", fmt, thresholds=[threshold], criterion=criterion, progress=False)
    got = load(tmp_path / "rule")(z)
    want = EarlyExitEngine(model, thresholds=[threshold], criterion=criterion)(z)
    assert torch.equal(got.exit, want.exit) and torch.equal(got.pred, want.pred)
    assert 0 < got.counts[0] < z.shape[0]
    torch.testing.assert_close(got.entropy, want.entropy, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_on_the_gpu_equals_the_engine(fmt, tmp_path):
    """Exported on the GPU (pt2: the runner's tensors and exit op stay there; ONNX: the
    CUDA provider where this onnxruntime has one), and a CPU export moved to the GPU."""
    model = _settle_batch_norm(b_lenet(), torch.randn(64, 1, 28, 28)).cuda()
    x = torch.randn(300, 1, 28, 28, generator=torch.Generator().manual_seed(5)).cuda()
    t = split_thresholds(model, x)
    want = EarlyExitEngine(model, thresholds=t)(x)
    export(model, tmp_path / "gpu", fmt, thresholds=t, device="cuda", progress=False)
    runner = load(tmp_path / "gpu", device="cuda")
    got = runner(x if fmt == "pt2" else x.cpu())
    _assert_same({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(got).items()},
                 _cpu(want), f"{fmt} cuda")
    if fmt == "pt2":
        assert got.logits.is_cuda
        export(model.cpu(), tmp_path / "cpu", fmt, thresholds=t, progress=False)
        moved = load(tmp_path / "cpu", device="cuda")(x)
        _assert_same({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(moved).items()},
                     _cpu(want), "pt2 cpu export on cuda")


def _cpu(res):
    from branchynet.engine import ExitResult
    return ExitResult(res.logits.cpu(), res.pred.cpu(), res.exit.cpu(), res.entropy.cpu(), res.counts)
