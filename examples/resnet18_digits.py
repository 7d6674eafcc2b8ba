"""A torchvision ResNet-18 with two exits, on the offline digits.

Exits go after ``layer1`` and ``layer2`` by name; the model is trained with the joint
loss, the thresholds are calibrated on the validation split (at most 0.5 pt below the final
exit), and the early-exit engine is timed against the original ResNet-18, whose weights
the model with exits shares (its final exit *is* that ResNet-18).

Needs torchvision and scikit-learn (the digits); nothing is downloaded. From the
repository root: ``python examples/resnet18_digits.py``.
"""

import torch
import torchvision
from torch import nn

import branchynet as bn
from branchynet.calibrate import calibrate, measure_path_times
from branchynet.data import load_dataset
from branchynet.timing import time_fn, time_per_sample
from branchynet.train import evaluate, train

torch.manual_seed(0)
splits = load_dataset("digits", size=32, val_fraction=0.2)  # 8x8 digits resized: [N, 1, 32, 32]
net = torchvision.models.resnet18(num_classes=10)
net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey images: one input channel

model = bn.attach_exits(net, ["layer1", "layer2"], example_input=splits.train.tensors[0][:2])
train(model, splits, epochs=4, lr=1e-3, progress=False)  # joint loss, weights (1, 1, 1)

acc = evaluate(model, splits.test)["acc"]
print("test accuracy per exit:", " / ".join(f"{100 * a:.1f} %" for a in acc))
xv = splits.val.tensors[0]
cal = calibrate(model, splits.val, max_drop=0.005, path_times=measure_path_times(model, xv[:256], repeats=3))
thresholds = cal.chosen["thresholds"]
model.exit_config.thresholds = tuple(thresholds)

engine = bn.EarlyExitEngine(model, thresholds)
xt, yt = splits.test.tensors
res = engine(xt)
print(f"thresholds {[round(t, 3) for t in thresholds]}: accuracy {100 * (res.pred == yt).float().mean():.1f} % "
      f"(the original model: {100 * acc[-1]:.1f} %), exits {[round(100 * f, 1) for f in res.exit_fractions]} %")
net.eval()
for b in (1, 256):
    xs = xt[:50] if b == 1 else xt
    t_net = time_per_sample(net, xs, b, repeats=3)
    if b == 1:  # one sample at a time, each through the exits it needs
        t_eng = time_fn(lambda: engine.per_sample(xs), repeats=3).scaled(1 / xs.shape[0])
    else:
        t_eng = time_per_sample(engine, xs, b, repeats=3)
    print(f"B={b}: ResNet-18 {1e3 * t_net.median:.3f} ms/sample, with exits {1e3 * t_eng.median:.3f} "
          f"ms/sample: {t_net.median / t_eng.median:.2f}x")
