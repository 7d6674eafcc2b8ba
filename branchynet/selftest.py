"""``branchynet selftest``: every available exit-op backend on every device, against the
PyTorch reference, then the engine against the per-sample rule.

The fused kernels (CUDA, Triton) have been checked in this project only by compiling
them and under the Triton interpreter; this is how a user checks them on their own GPU.

1. ``exit_step`` of each backend over a grid: dtypes; C from 1 to 20000 (both CUDA
   kernels, both Triton kernels); K = 0, 1, an odd count and more than one block; every
   criterion; everyone leaves / nobody leaves / a mixed split / the last exit; output
   buffers poisoned (a write to a row that stays, or a missed write, shows); per-row
   outputs strided. Rows with NaN, flat rows and very confident rows are in every batch.
2. ``gather_rows`` against ``index_select`` (contiguous, channels_last, odd widths).
3. The engine on the paper's three networks (random weights, thresholds that split the
   batch) against the paper's rule applied one sample at a time.
4. On a GPU: the engine syncs with the host once per side exit that still has samples.

Prints a table (device x backend x check: pass / fail, worst error) and returns non-zero
on any failure. Samples, poisoned buffers, thresholds, the comparisons and the per-sample
rule are the verification harness's (:mod:`branchynet.testing`), as in the tests.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import ops, testing
from .config import OP_CRITERIA
from .ops import _verify
from .tables import markdown_table

__all__ = ["Row", "run", "format_table", "main"]

CLASSES = (1, 2, 10, 100, 1000, 4099, 20000)
BATCHES = (0, 1, 7, 300)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Largest K x C per case (the reference runs in float64 on the host).
MAX_ELEMS = 2_000_000
#: Under the Triton interpreter every program is a Python loop: a smaller grid.
MAX_ELEMS_INTERPRETED = 40_000
MODELS = ("b_lenet", "b_alexnet", "b_resnet110")
#: The ``--quick`` grid.
QUICK = dict(dtypes=(torch.float32, torch.float16), classes=(1, 10, 1000, 20000), batches=(0, 1, 7, 70))


@dataclass
class Row:
    """One line of the table."""

    device: str
    backend: str
    check: str
    cases: int = 0
    failures: list = field(default_factory=list)
    worst: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, failure, err: float, where: str) -> None:
        self.cases += 1
        if failure is not None:
            self.failures.append(f"{where}: {failure}")
        if math.isfinite(err):
            self.worst = max(self.worst, err)


@contextlib.contextmanager
def _no_first_use_check():
    # The public op and the engine resolve named backends through the first-use check,
    # which could swap in another backend; here every backend is tested as itself.
    old = os.environ.get(_verify.ENV)
    os.environ[_verify.ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_verify.ENV, None)
        else:
            os.environ[_verify.ENV] = old


def _interpreted(device: torch.device) -> bool:
    return device.type == "cpu"


@_no_first_use_check()
def check_exit_step(device, backend, dtype, *, classes=CLASSES, batches=BATCHES, strided=False) -> Row:
    name = f"exit_step {str(dtype).replace('torch.', '')}" + (" strided out" if strided else "")
    row = Row(str(device), backend, name)
    step = testing.backend_impl(backend)[0]
    cap = MAX_ELEMS_INTERPRETED if backend == "triton" and _interpreted(device) else MAX_ELEMS
    for c in classes:
        for k in batches:
            if k * c > cap and k > 7:
                continue
            logits = testing.sample_logits(k, c, dtype, device, seed=31 * c + k, special=True)
            b = k + 5
            rows = testing.sample_rows(k, b, device, seed=k + c)
            for crit, crit_name in enumerate(OP_CRITERIA):
                for _, t, last in testing.exit_patterns(logits, crit):
                    where = f"C={c} K={k} {crit_name} T={t:.3g}{' last' if last else ''}"
                    try:
                        failure, err = testing.compare_exit_step(step, logits, rows, b, t, crit, 2, last,
                                                                 strided=strided)
                    except Exception as e:  # noqa: BLE001 - a crash is a failed case
                        failure, err = f"raised {type(e).__name__}: {e}", math.inf
                    row.add(failure, err, where)
    return row


@_no_first_use_check()
def check_gather(device, backend) -> Row:
    row = Row(str(device), backend, "gather_rows")
    gather = testing.backend_impl(backend)[1]
    g = torch.Generator().manual_seed(0)
    cases = [*testing.gather_samples(300, device),
             ("wide_bf16", torch.randn(7, 5000, generator=g).bfloat16().to(device))]
    for name, f in cases:
        for m in (0, 1, 7, f.shape[0]):
            index = torch.randint(0, f.shape[0], (m,), generator=g).to(device)
            try:
                failure = testing.compare_gather(gather, f, index)
            except Exception as e:  # noqa: BLE001
                failure = f"raised {type(e).__name__}: {e}"
            row.add(failure, 0.0 if failure is None else math.inf, f"{name} M={m}")
    return row


def _engine_batch(name: str, device: torch.device) -> int:
    if device.type == "cuda":
        return 256
    return {"b_lenet": 16, "b_alexnet": 8, "b_resnet110": 3}[name]


@contextlib.contextmanager
def _full_fp32():
    # cuDNN convolutions default to TF32 on Ampere and later (~1e-3 relative): the
    # engine and the per-sample rule must see the same fp32 network.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def check_engine(device, backend, model_name: str, models: dict) -> Row:
    from .engine import EarlyExitEngine
    from .models import build_model

    row = Row(str(device), backend, f"engine {model_name}")
    if model_name not in models:
        torch.manual_seed(0)
        model = build_model(model_name, num_classes=10).eval()
        b = _engine_batch(model_name, device)
        x = torch.randn(b, *model.input_shape, generator=torch.Generator().manual_seed(1))
        models[model_name] = (model, x, testing.split_thresholds(model, x))
    model, x, t = models[model_name]
    model = model.to(device)
    try:
        with _full_fp32():
            key = (model_name, str(device))
            if key not in models:  # the rule on the engine's device, once per network
                models[key] = testing.per_sample_rule(model, x.to(device), t)
            want = models[key]
            with _no_first_use_check():
                res = EarlyExitEngine(model, t, backend=backend)(x.to(device))
        for i, (failure, err) in enumerate(testing.compare_engine(res, want, rel_tol=1e-4, abs_tol=1e-5)):
            row.add(failure, err, f"sample {i}")
        if sum(res.counts) != x.shape[0]:
            row.add(f"counts {res.counts} do not sum to {x.shape[0]}", math.inf, "batch")
    except Exception as e:  # noqa: BLE001
        row.add(f"raised {type(e).__name__}: {e}", math.inf, "engine call")
    finally:
        model.cpu()
    return row


def check_host_syncs(device, backend) -> Row:
    """GPU only: one host sync per side exit that still had samples (the count read-back)."""
    from .engine import EarlyExitEngine
    from .models import build_model

    row = Row(str(device), backend, "engine host syncs")
    model = build_model("b_alexnet", num_classes=10).to(device).eval()
    x = torch.randn(256, *model.input_shape, device=device)
    t = testing.split_thresholds(model, x)
    with _no_first_use_check():  # the first call resolves the backend: the one named
        eng = EarlyExitEngine(model, t, backend=backend)
        eng(x)  # lazy initialisation (cuDNN, Triton compilation) may sync
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            res = eng(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sum(1 for w in caught if "synchroniz" in str(w.message))
    expected = sum(1 for n in range(model.num_exits - 1) if sum(res.counts[n:]) > 0)
    row.add(None if syncs == expected else f"{syncs} host syncs, expected {expected}",
            float(abs(syncs - expected)), "b_alexnet, 256 samples")
    return row


def devices() -> list:
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def run(device_list=None, backend_list=None, *, dtypes=None, classes=None, batches=None,
        models=None, progress=None) -> list:
    """Run the self-test; a list of :class:`Row`. ``progress(row)`` is called per row.

    Args:
        device_list: devices (default: the CPU and every GPU).
        backend_list: backends (default: every one available on each device).
        dtypes, classes, batches, models: the grid (default: the module's ``DTYPES``,
            ``CLASSES``, ``BATCHES``, ``MODELS``).
    """
    dtypes = DTYPES if dtypes is None else dtypes
    classes = CLASSES if classes is None else classes
    batches = BATCHES if batches is None else batches
    models = MODELS if models is None else models
    rows, ran = [], set()
    built: dict = {}

    def done(row):
        rows.append(row)
        if progress is not None:
            progress(row)

    for dev in device_list or devices():
        dev = torch.device(dev)
        for be in ops.available_backends(dev):
            if backend_list and be not in backend_list:
                continue
            ran.add(be)
            for dt in dtypes:
                if dt == torch.float64 and be == "triton":
                    continue  # Triton takes fp32/fp16/bf16 (the op refuses fp64 for it)
                t0 = time.perf_counter()
                r = check_exit_step(dev, be, dt, classes=classes, batches=batches)
                r.seconds = time.perf_counter() - t0
                done(r)
            t0 = time.perf_counter()
            r = check_exit_step(dev, be, torch.float32, classes=classes, batches=tuple(b for b in batches if b),
                                strided=True)
            r.seconds = time.perf_counter() - t0
            done(r)
            t0 = time.perf_counter()
            r = check_gather(dev, be)
            r.seconds = time.perf_counter() - t0
            done(r)
            for name in models:
                t0 = time.perf_counter()
                r = check_engine(dev, be, name, built)
                r.seconds = time.perf_counter() - t0
                done(r)
            if dev.type == "cuda":
                done(check_host_syncs(dev, be))
    for be in backend_list or []:
        if be not in ran:  # asked for, never run: that is a failure, not a silent pass
            r = Row("-", be, "available")
            r.add(f"not available on {', '.join(str(d) for d in device_list or devices())}", math.inf, "backend")
            done(r)
    return rows


def format_table(rows) -> str:
    head = ("device", "backend", "check", "result", "worst error", "cases", "seconds")
    body = [(r.device, r.backend, r.check, "pass" if r.ok else f"FAIL ({len(r.failures)})",
             f"{r.worst:.2e}", str(r.cases), f"{r.seconds:.1f}") for r in rows]
    out = [markdown_table(head, body)]
    for r in rows:
        for f in r.failures[:5]:
            out.append(f"FAIL {r.device} {r.backend} {r.check}: {f}")
        if len(r.failures) > 5:
            out.append(f"FAIL {r.device} {r.backend} {r.check}: ... {len(r.failures) - 5} more")
    return "\n".join(out)


def main(device_list=None, backend_list=None, quick: bool = False, print_fn=print, **grid) -> int:
    """Run, print the table, return the exit status (1 on any failure). ``grid``: the
    keyword arguments of :func:`run` (``--quick`` sets a smaller one)."""
    kw = {**(QUICK if quick else {}), **grid}
    with warnings.catch_warnings():
        # The Triton interpreter evaluates masked-off lanes too (log(0) and the like).
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        rows = run(device_list, backend_list, **kw)
    return report(rows, print_fn)


def report(rows, print_fn=print) -> int:
    """Print the table and a summary line; the exit status (1 on any failure)."""
    print_fn(format_table(rows))
    bad = sum(not r.ok for r in rows)
    print_fn(f"{len(rows) - bad} of {len(rows)} checks passed" + ("" if not bad else f"; {bad} FAILED"))
    return 1 if bad else 0
