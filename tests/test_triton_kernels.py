"""The Triton exit-step and gather kernels against the PyTorch reference.

On a machine without a GPU these run on the CPU under ``TRITON_INTERPRET=1`` (set by
``conftest.py``); on a GPU the ``cuda`` cases run the compiled kernels. Every case
poisons the output buffers first and compares all B rows, so a write to a row that did
not leave (or a missing write) shows up as a poison mismatch.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")

from branchynet.exits import exit_scores  # noqa: E402
from branchynet.kernels import exit_step as tk  # noqa: E402
from branchynet.ops._torch import exit_step_torch, gather_rows_torch  # noqa: E402
from branchynet.config import CRITERIA  # noqa: E402

# The interpreter evaluates the masked-off lanes too (log(0) of padding rows, NaN rows):
# numpy's warnings about them are expected.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not _INTERPRET, reason="Triton runs on the CPU only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
EXIT_INDEX = 3
POISON_ENTROPY = -3.0  # entropy is >= 0 or NaN, never this


def make_logits(k, c, dtype, device, seed):
    """Random logits whose per-row sharpness varies, so scores spread over their range."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(k, 1, generator=g) * 8 + 0.05
    return (torch.randn(k, c, generator=g) * scale).to(dtype).to(device)


def mixed_threshold(logits, criterion):
    """A threshold in the widest gap between the middle half of the reference scores, so
    that a few-ulp difference between Triton's and torch's exp cannot flip a row."""
    score, _, _ = exit_scores(logits.cpu(), CRITERIA[criterion])
    s = score[torch.isfinite(score)].double().unique().sort().values
    if s.numel() < 2:
        return None
    lo, hi = s.numel() // 4, max(s.numel() * 3 // 4, s.numel() // 4 + 1)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = int(gaps.argmax()) + lo
    assert s[i + 1] - s[i] > 1e-4 * max(1.0, float(s[i + 1]))
    return float((s[i] + s[i + 1]) / 2)


def poisoned(b, c, dtype, device):
    return (torch.full((b, c), float("nan"), dtype=dtype, device=device),
            torch.full((b,), -1, dtype=torch.int64, device=device),
            torch.full((b,), -1, dtype=torch.int64, device=device),
            torch.full((b,), POISON_ENTROPY, dtype=torch.float32, device=device))


def check_against_reference(logits, threshold, criterion, last, *, extra_rows=5, seed=0,
                            out_factory=poisoned):
    """Run both backends on the same inputs and poisoned buffers; compare everything."""
    k, c = logits.shape
    device = logits.device
    b = k + extra_rows
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(b, generator=g)[:k].to(device)
    ref_out = out_factory(b, c, logits.dtype, device)
    # A second call, not clone(): clone makes a non-dense strided buffer contiguous, and
    # the kernel would never see the strides under test.
    tri_out = out_factory(b, c, logits.dtype, device)
    assert [t.stride() for t in tri_out] == [t.stride() for t in ref_out]
    r_surv, r_rows, r_count = exit_step_torch(
        logits, rows, threshold, criterion, EXIT_INDEX, last, *ref_out)
    t_surv, t_rows, t_count = tk.exit_step_triton(
        logits, rows, threshold, criterion, EXIT_INDEX, last, *tri_out)

    assert t_surv.shape == (k,) and t_rows.shape == (k,) and t_count.shape == (1,)
    assert t_surv.dtype == t_rows.dtype == t_count.dtype == torch.int64
    assert t_surv.device == t_rows.device == t_count.device == device
    n = int(r_count)
    assert int(t_count) == n
    # Survivors as a set; survivor_rows consistent with them.
    assert torch.equal(t_surv[:n].sort().values, r_surv[:n].sort().values)
    assert torch.equal(t_rows[:n], rows[t_surv[:n]])

    o_logits, o_pred, o_exit, o_ent = (t.cpu() for t in tri_out)
    e_logits, e_pred, e_exit, e_ent = (t.cpu() for t in ref_out)
    # Exactly the leaving rows changed: the exit index marks them, the rest keep -1.
    leave = torch.ones(k, dtype=torch.bool)
    leave[r_surv[:n].cpu()] = False
    changed = torch.zeros(b, dtype=torch.bool)
    changed[rows.cpu()[leave]] = True
    assert torch.equal(o_exit != -1, changed)
    assert torch.equal(o_exit, e_exit)
    assert torch.equal(o_pred, e_pred)
    assert (o_pred[~changed] == -1).all() and (o_ent[~changed] == POISON_ENTROPY).all()
    # Logits copied bitwise (NaN payloads included); untouched rows keep the NaN poison.
    it = INT_OF[logits.dtype]
    assert torch.equal(o_logits.view(it), e_logits.view(it))
    assert torch.isnan(o_logits[~changed].float()).all()
    torch.testing.assert_close(o_ent, e_ent, rtol=1e-5, atol=1e-5, equal_nan=True)
    return n


def patterns(logits, criterion, full=True):
    """(threshold, last) pairs: everyone leaves, nobody leaves, the last exit (when
    ``full``; the interpreter is slow, so large batches only run the mixed split), and a
    mixed split."""
    out = [(math.inf, False), (0.0, False), (1.0, True)] if full else []
    t = mixed_threshold(logits, criterion)
    if t is not None:
        out.append((t, False))
    return out


# --- exit step -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", [0, 1, 2])
@pytest.mark.parametrize("c", [2, 10, 100, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_step_matches_reference(device, dtype, c, criterion):
    # 4097 x 1000 is in the large test below; the interpreter is slow.
    for k in (0, 1, 7, 1023) + ((4097,) if c <= 100 else ()):
        logits = make_logits(k, c, dtype, device, seed=k * 7 + c + criterion)
        for threshold, last in patterns(logits, criterion, full=k <= 7):
            n = check_against_reference(logits, threshold, criterion, last, seed=k)
            if last or threshold == math.inf:
                assert n == 0
            elif threshold == 0.0:
                assert n == k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", [0, 2])
def test_exit_step_large(device, criterion):
    logits = make_logits(4097, 1000, torch.float32, device, seed=11)
    n = check_against_reference(logits, mixed_threshold(logits, criterion), criterion, False,
                                extra_rows=3000, seed=1)
    assert 0 < n < 4097


def extreme_logits(c, dtype, device, seed):
    """Rows that break naive softmax/entropy code, between ordinary rows."""
    g = torch.Generator().manual_seed(seed)
    inf, nan = float("inf"), float("nan")
    rows = []
    one_hot = torch.full((c,), -1e4)
    one_hot[c // 2] = 1e4
    rows.append(one_hot)                                        # entropy 0, pred c//2
    rows.append(torch.where(torch.rand(c, generator=g) < 0.5, 1e4, -1e4))
    r = torch.randn(c, generator=g)
    r[::2] = -inf
    rows.append(r)                                              # -inf entries: exp = 0
    rows.append(torch.full((c,), -inf))                         # all -inf: NaN entropy
    r = torch.randn(c, generator=g)
    r[c - 1] = nan
    rows.append(r)                                              # NaN row, pred c-1
    rows.append(torch.full((c,), nan))                          # all NaN, pred 0
    r = torch.randn(c, generator=g)
    r[c // 2] = inf
    rows.append(r)                                              # +inf: NaN entropy
    r = torch.randn(c, generator=g)
    r[-1], r[0] = inf, nan
    rows.append(r)                                              # NaN before +inf: pred 0
    rows.append(torch.zeros(c))                                 # uniform: ties, pred 0
    r = torch.randn(c, generator=g)
    r[[c // 3, c - 1]] = 50.0
    rows.append(r)                                              # tied top-2: margin 1
    rows.append(torch.full((c,), -1e4))                         # all equal, huge negative
    body = torch.stack(rows)
    normal = torch.randn(16, c, generator=g) * torch.rand(16, 1, generator=g) * 10
    z = torch.cat([normal[:8], body, normal[8:]])
    return z.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_step_extreme_logits(device, dtype, criterion):
    for c in (2, 10, 100):
        logits = extreme_logits(c, dtype, device, seed=c)
        for threshold, last in patterns(logits, criterion):
            n = check_against_reference(logits, threshold, criterion, last, seed=c)
            if threshold == math.inf and not last:
                assert n == 5  # the NaN-entropy rows never leave early


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_exit_step_strided_inputs_and_outputs(device, dtype):
    base = make_logits(40, 2 * 37, dtype, device, seed=5)
    transposed = make_logits(10, 37, dtype, device, seed=6).t()     # [37, 10], stride (1, 37)

    def strided_out(b, c, dt, dev):
        # Per-row outputs as columns of wider tensors: stride 2, not 1.
        lg, pred, ex, ent = poisoned(b, c, dt, dev)
        wide = lambda t: torch.stack([t, t], 1)[:, 0]  # noqa: E731
        out = lg, wide(pred), wide(ex), wide(ent)
        assert [t.stride() for t in out[1:]] == [(2,)] * 3
        return out

    for logits in (base[:, ::2], transposed):
        assert not logits.is_contiguous()
        for criterion in (0, 2):
            t = mixed_threshold(logits, criterion)
            check_against_reference(logits, t, criterion, False, seed=2)
            check_against_reference(logits, t, criterion, False, seed=3, out_factory=strided_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exit_step_chunked_kernel(device, dtype, criterion, monkeypatch):
    # Force the wide-C kernel at small C: 64-wide chunks, the last one partial, the max,
    # ties, NaN and +inf placed in different chunks.
    monkeypatch.setattr(tk, "MAX_TILE_C", 64)
    monkeypatch.setattr(tk, "CHUNK_C", 64)
    for c in (100, 1000):
        z = make_logits(300, c, torch.float32, "cpu", seed=c + criterion)
        z[0, [5, c - 3]] = 40.0                 # tie across chunks: first wins
        z[1, c - 1] = 60.0                      # max in the last, partial chunk
        z[2, c // 2] = float("nan")
        z[3, [c - 2, c // 2 + 1]] = torch.tensor([float("inf"), float("nan")])
        z[4, :] = float("-inf")
        z[5, 70:] = float("-inf")               # whole -inf chunks after a finite one
        z[6, :70] = float("-inf")               # whole -inf chunk before finite ones
        z[7, :] = -1e4
        z[7, c - 1] = 1e4
        z[8, :] = 0.0
        z[9, [3, 90]] = 30.0                    # tied top-2 in two chunks: margin 1
        logits = z.to(dtype).to(device)
        for k in (1, 7, 300):
            for threshold, last in patterns(logits[:k], criterion, full=k <= 7):
                check_against_reference(logits[:k], threshold, criterion, last, seed=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exit_step_wide_rows_default_chunking(device, dtype):
    logits = make_logits(6, 20000, dtype, device, seed=8)
    logits[1, 19999] = 1e4
    for criterion in (0, 2):
        for threshold, last in patterns(logits, criterion):
            check_against_reference(logits, threshold, criterion, last, seed=4)


@pytest.mark.parametrize("device", DEVICES)
def test_exit_step_k0_and_dtype_errors(device):
    logits = torch.zeros(0, 10, device=device)
    rows = torch.zeros(0, dtype=torch.int64, device=device)
    out = poisoned(4, 10, torch.float32, device)
    surv, srows, count = tk.exit_step_triton(logits, rows, 0.5, 0, 0, False, *out)
    assert surv.shape == srows.shape == (0,) and count.tolist() == [0]
    assert (out[2] == -1).all()
    with pytest.raises(TypeError):
        tk.exit_step_triton(logits.double(), rows, 0.5, 0, 0, False,
                            out[0].double(), *out[1:])


# --- through the public op -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("criterion", CRITERIA)
def test_public_exit_step_triton_backend(device, criterion):
    from branchynet.ops import _verify, available_backends, exit_step

    assert "triton" in available_backends(device)
    # Else backend="triton" would run the next backend (with a warning) and pass.
    assert _verify.passes("triton", torch.device(device))
    logits = make_logits(100, 10, torch.float16, device, seed=9)
    cid = CRITERIA.index(criterion)
    t = mixed_threshold(logits, cid)
    rows = torch.randperm(120)[:100].to(device)
    outs = [poisoned(120, 10, torch.float16, device) for _ in range(2)]
    ref = exit_step(logits, rows, t, 1, *outs[0], criterion=criterion, backend="torch")
    tri = exit_step(logits, rows, t, 1, *outs[1], criterion=criterion, backend="triton")
    n = int(ref[2])
    assert int(tri[2]) == n and 0 < n < 100
    assert torch.equal(tri[0][:n].sort().values, ref[0][:n].sort().values)
    for a, b in zip(outs[1][1:3], outs[0][1:3]):
        assert torch.equal(a, b)
    assert torch.equal(outs[1][0].view(torch.int16), outs[0][0].view(torch.int16))
    torch.testing.assert_close(outs[1][3], outs[0][3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_public_gather_rows_triton_backend(device):
    from branchynet.ops import gather_rows

    f = torch.randn(9, 4, 5, 3, device=device).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([8, 0, 4], device=device)
    out = gather_rows(f, idx, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, f.index_select(0, idx))


# --- gather ----------------------------------------------------------------------------


def _features(layout, dtype, k, device):
    g = torch.Generator().manual_seed(k)
    shape = {"2d": (k, 37), "4d": (k, 6, 5, 7), "channels_last": (k, 6, 5, 7),
             "1d": (k,), "strided": (k, 6, 10)}[layout]
    x = torch.randn(shape, generator=g) * 100
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        x = x[:, :, ::2]                    # not dense: made contiguous first
    if dtype == torch.bool:
        x = x > 0
    else:
        x = x.to(dtype)
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64,
                                   torch.bool])
@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last", "1d", "strided"])
def test_gather_rows_matches_index_select(device, dtype, layout):
    k = 50
    f = _features(layout, dtype, k, device)
    g = torch.Generator().manual_seed(1)
    for m in (0, 1, 17, k):
        idx = torch.randperm(k, generator=g)[:m].to(device)
        out = tk.gather_rows_triton(f, idx)
        ref = gather_rows_torch(f, idx)
        assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == f.device
        assert torch.equal(out, ref)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
        elif layout != "strided":
            assert out.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_gather_rows_bitwise_nan_payload_and_wide_rows(device):
    # Wide rows (several column blocks per row) and NaN payloads copied bit for bit.
    f = torch.randn(5, 3 * 4096 + 17, device=device)
    f[2, 100] = float("nan")
    idx = torch.tensor([2, 4, 0], device=device)
    out = tk.gather_rows_triton(f, idx)
    assert torch.equal(out.view(torch.int32), f.index_select(0, idx).view(torch.int32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,chunked", [(10, False), (1000, False), (300, True)])
def test_small_entropies_are_accurate_relative_to_themselves(device, c, chunked, monkeypatch):
    # Confident rows (entropies down to 1e-10): fp32 log(S) with S = 1 + R would lose R
    # and miss the entropy by ~5 % at 1e-6; the kernels take log1p of R instead.
    if chunked:
        monkeypatch.setattr(tk, "MAX_TILE_C", 64)
        monkeypatch.setattr(tk, "CHUNK_C", 64)
    g = torch.Generator().manual_seed(c)
    k = 256
    z = torch.randn(k, c, generator=g, dtype=torch.float64)
    z[torch.arange(k), torch.randint(0, c, (k,), generator=g)] += 8 + 16 * torch.rand(k, generator=g)
    z = z.float().to(device)
    out = poisoned(k, c, torch.float32, device)
    tk.exit_step_triton(z, torch.arange(k, device=device), 0.0, 0, 0, True, *out)
    want = torch.empty(k)
    exit_step_torch(z.cpu(), torch.arange(k), 0.0, 0, 0, True, torch.empty(k, c), torch.empty(k, dtype=torch.int64),
                    torch.empty(k, dtype=torch.int64), want)
    assert float(want.min()) < 1e-6
    rel = ((out[3].cpu().double() - want.double()).abs() / want.double().clamp_min(1e-30)).max()
    assert rel < 1e-5, float(rel)


@pytest.mark.parametrize("device", DEVICES)
def test_column_strided_logits_past_2_31_elements(device):
    # A transposed view (stride (1, S)) whose last column starts past element 2**31: the
    # column offset col * S must be int64. The 4 GiB fp16 storage is never touched
    # except at the 3 x 8 elements in use (pages are allocated lazily on the CPU).
    s_c = 2**30 + 16
    k, c = 8, 3
    store = torch.empty(2 * s_c + k, dtype=torch.float16, device=device)
    logits = store.as_strided((k, c), (1, s_c))
    logits.copy_((torch.randn(k, c, generator=torch.Generator().manual_seed(0)) * 4).to(device))
    assert logits.storage_offset() + (c - 1) * s_c >= 2**31
    for criterion in (0, 1):
        check_against_reference(logits, mixed_threshold(logits, criterion), criterion, False, seed=1)
