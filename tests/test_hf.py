"""Exits on Hugging Face Transformers models (BERT, DistilBERT, ViT with small random
configs; nothing downloaded), cut from their torch.export graphs.

The references: the model itself (the final exit), the paper's rule one sample at a time
(branchynet.testing.per_sample_rule), each sequence alone and unpadded (padding never
changes an answer), PABEE's rule from every exit's logits (branchynet.testing.patience_rule).

They skip without transformers; with BRANCHYNET_REQUIRE_HF=1 (CI, which installs it with
the test extra) a missing transformers fails them instead.
"""

import copy
import json
import os

import pytest
import torch

from branchynet import EarlyExitEngine, attach_exits, joint_loss, load_checkpoint
from branchynet.cli import main
from branchynet.ops import available_backends
from branchynet.testing import compare_engine, patience_rule, per_sample_rule, split_thresholds
from branchynet.train import train

BACKENDS = [b for b in available_backends("cpu") if b in ("torch", "cpp")]
REQUIRE_HF = os.environ.get("BRANCHYNET_REQUIRE_HF", "") not in ("", "0")


def _transformers():
    if not REQUIRE_HF:
        pytest.importorskip("transformers")
    from branchynet.models.hf import import_transformers

    return import_transformers()  # an ImportError here fails the test: CI promised transformers


K, S, VOCAB = 4, 12, 97
SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
             initializer_range=0.2, num_labels=K)


def _config(tf, kind):
    if kind == "bert":
        return tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **SMALL)
    if kind == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=2, hidden_dim=37,
                                   max_position_embeddings=64, initializer_range=0.2, num_labels=K)
    return tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, **SMALL)


CUTS = {"bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
        "distilbert": ["distilbert.transformer.layer.0", "distilbert.transformer.layer.1"],
        "vit": ["vit.layers.0", "vit.layers.1"]}


def _inputs(kind, b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return {"pixel_values": torch.randn(b, 3, 16, 16, generator=g)}
    ids = torch.randint(1, VOCAB, (b, S), generator=g)
    lengths = torch.randint(2, S + 1, (b,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}  # padded with token 0


_BUILT = {}


def _built(kind):
    """(hf model, BranchyNet), built once per kind for the module (an export is seconds)."""
    if kind not in _BUILT:
        tf = _transformers()
        torch.manual_seed(0)
        cls = {"bert": tf.BertForSequenceClassification, "distilbert": tf.DistilBertForSequenceClassification,
               "vit": tf.ViTForImageClassification}[kind]
        hf = cls(_config(tf, kind)).eval()
        x = _inputs(kind, b=2, seed=9)
        example = x["pixel_values"] if kind == "vit" else x  # ViT: one tensor, positional
        net = attach_exits(hf, after=CUTS[kind], num_classes=K, example_input=example)
        _BUILT[kind] = (hf, net.eval())
    return _BUILT[kind]


@pytest.mark.parametrize("kind", ["bert", "distilbert", "vit"])
def test_final_exit_is_the_model(kind):
    hf, net = _built(kind)
    x = _inputs(kind)
    with torch.no_grad():
        outs = net(**x)
        want = hf(**x).logits
    assert len(outs) == 3 and all(z.shape == (16, K) for z in outs)
    torch.testing.assert_close(outs[-1], want, rtol=0, atol=0)
    assert net.multi_tensor and net.num_classes == K


@pytest.mark.parametrize("kind", ["bert", "distilbert", "vit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_equals_per_sample_rule_on_mixed_lengths(kind, backend):
    _, net = _built(kind)
    x = _inputs(kind, b=24, seed=1)
    th = split_thresholds(net, x)
    eng = EarlyExitEngine(net, th, backend=backend)
    res = eng(**x)
    want = per_sample_rule(net, x, th)
    assert [f for f, _ in compare_engine(res, want)] == [None] * 24
    assert all(c > 0 for c in res.counts), res.counts  # every exit is exercised
    one = eng.per_sample(**x)
    assert torch.equal(one.exit, res.exit) and torch.equal(one.pred, res.pred)
    if kind == "vit":  # one tensor, positionally, as the model takes it
        again = eng(x["pixel_values"])
        assert torch.equal(again.exit, res.exit) and torch.equal(again.pred, res.pred)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_padding_never_changes_an_answer(kind):
    _, net = _built(kind)
    x = _inputs(kind, b=24, seed=2)
    th = split_thresholds(net, x)
    eng = EarlyExitEngine(net, th)
    res = eng(**x)
    lengths = x["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 3
    for i, n in enumerate(lengths):
        alone = eng(input_ids=x["input_ids"][i:i + 1, :n], attention_mask=x["attention_mask"][i:i + 1, :n])
        assert (int(alone.exit), int(alone.pred)) == (int(res.exit[i]), int(res.pred[i])), i
        torch.testing.assert_close(alone.logits[0], res.logits[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "vit"])
@pytest.mark.parametrize("patience", [1, 2])
def test_patience_against_the_rule_from_every_exit(kind, patience):
    _, net = _built(kind)
    x = _inputs(kind, b=32, seed=3)
    res = EarlyExitEngine(net, criterion="patience", patience=patience)(**x)
    with torch.no_grad():
        exits = net(**x)
    want = patience_rule(exits, patience)
    assert res.exit.tolist() == [e for e, _ in want]
    assert res.pred.tolist() == [p for _, p in want]


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_joint_loss_reaches_every_branch(kind):
    _, net = _built(kind)
    net = copy.deepcopy(net).train()
    x = _inputs(kind, b=8, seed=4)
    y = torch.arange(8) % K
    joint_loss(net(**x), y, [1.0, 1.0, 1.0]).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    for b in net.branches[:-1]:
        assert all(p.grad.abs().sum() > 0 for p in b.parameters())
    net.eval()


def _loader(kind, b=8, n=24):
    x = _inputs(kind, b=n, seed=5)
    y = torch.arange(n) % K
    rows = [({k: v[i] for k, v in x.items()}, y[i]) for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=b)


def test_frozen_backbone_left_bit_identical():
    hf, net = _built("bert")
    net = copy.deepcopy(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train(net, _loader("bert"), epochs=2, lr=0.05, freeze="backbone", progress=False, device="cpu")
    after = net.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("branches.") for k in changed), changed[:5]
    assert all(any(k.startswith(f"branches.{n}.") for k in changed) for n in range(2))


def test_train_joint_loss_moves_the_backbone_and_branches():
    _, net = _built("distilbert")
    net = copy.deepcopy(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hist = train(net, _loader("distilbert"), epochs=1, lr=0.01, progress=False, device="cpu")
    assert len(hist.train_loss) == 1
    after = net.state_dict()
    assert not torch.equal(before["branches.0.fc.weight"], after["branches.0.fc.weight"])
    moved = [k for k in before if k.startswith("stages.") and not torch.equal(before[k], after[k])]
    assert moved


def test_from_pretrained_local_directory_only(tmp_path):
    tf = _transformers()
    from branchynet.models.hf import hf_exits, load_hf_model

    hf, _ = _built("bert")
    hf.save_pretrained(tmp_path / "bert")
    again = load_hf_model(tmp_path / "bert")
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), again.state_dict().values()))
    net = hf_exits(tmp_path / "bert", CUTS["bert"][:1], K).eval()
    x = _inputs("bert", b=5)
    with torch.no_grad():
        torch.testing.assert_close(net(**x)[-1], hf(**x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="never downloaded"):
        load_hf_model("bert-base-uncased-not-here")
    with pytest.raises(ValueError, match="model_type"):
        load_hf_model({"hidden_size": 8})
    with pytest.raises(ValueError, match="text model"):
        hf_exits(tmp_path / "bert", CUTS["bert"][:1], K, input_shape=(1, 28, 28))
    assert isinstance(again, tf.BertForSequenceClassification)


def test_cut_errors():
    hf, _ = _built("bert")
    x = _inputs("bert", b=2)
    with pytest.raises(ValueError, match="not a module"):
        attach_exits(hf, after=["bert.encoder.layer.9"], num_classes=K, example_input=x)
    with pytest.raises(ValueError, match="network order"):
        attach_exits(hf, after=["bert.encoder.layer.1", "bert.encoder.layer.0"], num_classes=K, example_input=x)
    _, net = _built("bert")
    with pytest.raises(ValueError, match="missing model inputs"):
        net(input_ids=x["input_ids"])


def test_cli_trains_a_local_hf_config_and_reloads_it(tmp_path):
    tf = _transformers()
    cfg = tf.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=24).to_dict()
    path = tmp_path / "vit.json"
    path.write_text(json.dumps(cfg))
    ckpt = tmp_path / "vit.pt"
    assert main(["train", "--arch", f"hf:{path}", "--after", "vit.layers.0", "--epochs", "1",
                 "--batch-size", "64", "--out", str(ckpt), "--quiet"]) == 0
    model = load_checkpoint(ckpt)
    assert model.arch["name"] == "hf" and model.num_exits == 2
    res = EarlyExitEngine(model, [0.5])(torch.randn(5, 1, 28, 28))
    assert sum(res.counts) == 5
    with pytest.raises(SystemExit, match="hf:PATH_OR_CONFIG"):
        main(["train", "--arch", "hf", "--after", "x"])


class CheckedNet(torch.nn.Module):
    """torch.fx cannot trace a test on the input's shape; torch.export can: the exported
    cut serves it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[-1] != 8:
            raise ValueError("CheckedNet takes 8 features")
        return self.b(torch.relu(self.a(x)))


def test_a_model_fx_cannot_trace_is_cut_from_its_exported_graph():
    net = CheckedNet().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(net)
    model = attach_exits(net, ["a"], example_input=torch.randn(4, 8)).eval()
    x = torch.randn(9, 8)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
    assert model.multi_tensor and model.input_shape == (8,)
    th = split_thresholds(model, x)
    res = EarlyExitEngine(model, th)(x)
    assert [f for f, _ in compare_engine(res, per_sample_rule(model, x, th))] == [None] * 9


def test_compiled_stages_give_the_eager_answers():
    _, net = _built("bert")
    x = _inputs("bert", b=24, seed=1)
    th = split_thresholds(net, x)
    want = EarlyExitEngine(net, th)(**x)
    got = EarlyExitEngine(net, th, compile={"backend": "eager"})(**x)  # dynamo over the cut graphs
    assert torch.equal(got.exit, want.exit) and torch.equal(got.pred, want.pred)
    torch.testing.assert_close(got.logits, want.logits)
