"""Triton kernels of the exit op and the survivor gather.

``exit_step_triton`` is the fused exit decision: for a block of rows it loads the logits
once, computes the stable softmax statistics (max, sum of exp, entropy) in fp32, the
prediction, the criterion's score and the exit test, writes the exiting rows' results at
their original rows and compacts the survivors' indices, all in one launch. Against the
PyTorch reference (``branchynet.ops._torch.exit_step_torch``, about ten kernels and as
many passes over the logits or the [K] vectors) it moves the minimum: logits read once,
exiting rows written once, survivors' indices written once. Patience (criterion 3, PABEE)
has no score: its test is the streak of equal predictions over the exits, kept in a
state ``[B, 2]`` (previous prediction, streak) by original row, which the same launch
reads (but at the first exit) and rewrites at every row of the call: 16 bytes a row each.

Two kernels, picked by the number of classes ``C``:

* ``C <= MAX_TILE_C`` (8192): a program holds a ``ROWS x BLOCK_C`` tile in registers,
  ``BLOCK_C = next_pow2(C)`` and ``ROWS`` chosen so the tile is at most ``TILE_ELEMS``
  (2K) elements and at most ``MAX_ROWS`` (32) rows: 2 rows of ImageNet's 1000 classes,
  32 rows of CIFAR-10's 10. Every row is read once and every statistic comes from the
  registers. ``ROWS`` and the warp count depend on ``C`` only, and ``K`` and
  ``exit_index`` are not specialised on, so a (dtype, C, criterion, last) compiles once
  whatever the survivor count (tests/test_aot.py counts the variants).
* ``C > MAX_TILE_C``: a 16K-wide fp32 tile would spill, so a program walks the row in
  ``CHUNK_C`` (4096) chunks with an online max / sum-of-exp / sum of ``e * d`` (the
  flash-attention rescaling), keeps a running top-2 for the prediction and the margin,
  and, for the rows that leave, reads the logits a second time to copy them out. Only
  leaving rows are re-read (masked loads of staying rows issue no memory traffic).

Compaction: inside a program an exclusive ``tl.cumsum`` of the "stays" flags gives each
survivor its offset, and one ``tl.atomic_add`` on the device counter per program reserves
a contiguous slot range, so the survivors land at the front of the [K] buffers with no
second pass and no host sync; their order across programs depends on the order the
atomics run in (the contract leaves it unspecified).

Semantics are the reference's (see :mod:`branchynet.exits`): fp32 accumulation for every
input dtype; a row containing NaN or +inf, or only -inf, has NaN entropy and NaN score and
never leaves early; ``pred`` treats NaN as +inf and the first index wins on ties
(``torch.argmax``); classes with ``exp(d) == 0`` contribute 0 to the entropy; the entropy
is clamped at 0 (NaN kept); under patience a row leaves early when its streak reaches
the threshold (the patience P) and its entropy is not NaN. ``exp`` is Triton's, a few ulp
away from torch's, so scores can differ from the reference in the last bits.

``gather_rows_triton`` copies whole per-sample blocks: it sees ``features`` as a
``[K, N]`` matrix over its storage (valid whenever each sample's block is dense, which
covers contiguous, channels_last and channels_last_3d tensors) and the output keeps the
input's strides, so a channels_last input gives a channels_last output without a layout
change. The copy is bitwise (the elements are moved as same-width integers), so any
dtype works.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["exit_step_triton", "gather_rows_triton", "MAX_TILE_C", "CHUNK_C", "TILE_ELEMS",
           "CHECKED_TRITON", "triton_checked"]

#: Triton releases (major.minor) whose sm_90 compilation of every configuration the
#: dispatcher can pick was checked free of spills (``python -m branchynet.kernels.aot
#: --full``; reports in benchmarks/results/aot-sm90/): 3.8 comes with torch 2.14.1, 3.9
#: with torch 2.13. One set of tile sizes and warps serves both, so nothing is picked by
#: version. Outside these the kernels still compile and are checked against the
#: reference on first use, but their registers and spills are unmeasured.
CHECKED_TRITON = ("3.8", "3.9")


def triton_checked(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed Triton) is one of :data:`CHECKED_TRITON`."""
    version = triton.__version__ if version is None else version
    return ".".join(version.split("+")[0].split(".")[:2]) in CHECKED_TRITON

#: Widest row held as one register tile; wider rows take the chunked kernel. A 16K-wide
#: tile would need 64 warps at ``ELEMS_PER_THREAD`` (32 is the most a program has).
MAX_TILE_C = 8192
#: Chunk width of the chunked kernel (fp32: 16 KB of one row per step).
CHUNK_C = 4096
#: Most elements of a program's tile (rows x padded classes): with ``ELEMS_PER_THREAD``
#: per thread, 8 warps. Twice that per tile (512x16 with 8 warps, 32x128 with 4) uses
#: 255 registers and spills 350-820 B on sm_90 (ptxas -v; tests/test_aot.py).
TILE_ELEMS = 2048
#: Values of the tile per thread. 16 was spill-free with Triton 3.9 but not with 3.8 (the
#: Triton of torch 2.14.1: 4-8 B spilled by 7 of the 78 configurations then in
#: tests/test_aot.py, the 8K-wide last-exit tiles on 16 warps among them); 8 is spill-free
#: with both, at twice the warps.
ELEMS_PER_THREAD = 8
#: Cap on rows per program, so that small-C batches still spread over the SMs: K = 4097
#: rows of C = 10 take 129 programs (132 SMs on an H100), not 9.
MAX_ROWS = 32
#: Under the Triton interpreter (tests on a CPU) every program is a Python loop over the
#: tile, and 4x the programs is 4x the test time: there the tiles are 8K elements and
#: up to 512 rows. Only the compiled configuration matters for registers and spills, and
#: tests/test_aot.py checks that one.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
INTERPRETER_TILE_ELEMS, INTERPRETER_MAX_ROWS = 8192, 512

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


# --- exit step -------------------------------------------------------------------------


@triton.jit
def _log1p(x):
    # log(1 + x) without losing x when x < 6e-8 (Goldberg's correction): S = 1 + R with R
    # the sum of every e but the largest (which is exactly 1), and fp32 log(S) would lose
    # ~5 % of the entropy at 1e-6, where the thresholds of confident networks lie.
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _score(h, s, rest, e2, CRITERION: tl.constexpr):
    """Criterion score from the entropy ``h``, the sum of exp ``s``, ``rest`` (``s``
    without the top class's ``e = exp(0) = 1``) and the runner-up's ``e2``: ``1 - p1 =
    rest / s`` and ``1 - (p1 - p2) = (rest + e2) / s``, which keep a confident row's score
    where fp32 ``1 - 1 / s`` is 0 (below ~6e-8). NaN entropy gives a NaN score (the row
    never leaves early). Patience (3) has no score: it gets the entropy, unused."""
    if CRITERION == 1:
        score = rest / s
    elif CRITERION == 2:
        score = (rest + e2) / s
    else:
        score = h
    return tl.where(h != h, h, score)


@triton.jit
def _decide(score, h, pred, r, rmask, rows_ptr, s_rows, threshold, exit_index, state_ptr,
            CRITERION: tl.constexpr, LAST: tl.constexpr):
    """``(leave, orow)``: which rows leave, and their original rows. Criteria 0-2:
    ``score < threshold`` (NaN < T is false). Patience (3): the streak ``cnt`` of equal
    predictions, ``cnt >= threshold`` with a non-NaN entropy, from the state ``[B, 2]``
    (contiguous int64: previous prediction, streak) read at the original rows and
    rewritten there for every row of the call, leaving or not, last exit or not. For
    criteria 0-2 ``state_ptr`` is a dummy never touched: the branch is a constexpr, so
    their code has no trace of the state.

    Patience's side exit is the kernel's heaviest code on sm_90 (122 registers with
    Triton 3.9, 139 with 3.8, at BLOCK_C 128; no spills): its decision waits on two
    dependent loads (rows, then state). Loading them before the softmax, or the state as
    one ``[ROWS, 2]`` block, took as many registers or more."""
    if CRITERION == 3:
        # The state is by original row (like the out_* buffers: nothing to gather at
        # compaction), so the rows come first here.
        orow = tl.load(rows_ptr + r * s_rows, mask=rmask, other=0)
        p = pred.to(tl.int64)
        # The first exit's state is not read (it may be uninitialised): its loads are
        # masked off, and the -1 they give never equals a prediction, so cnt is 0 there.
        # exit_index is a runtime value (not specialised: one compiled variant per exit);
        # a where, not `rmask & (exit_index != 0)`, whose mask the interpreter refuses.
        rd = tl.where(exit_index != 0, rmask, False)
        prev = tl.load(state_ptr + orow * 2, mask=rd, other=-1)
        cnt = tl.where(p == prev, tl.load(state_ptr + orow * 2 + 1, mask=rd, other=0) + 1, 0)
        tl.store(state_ptr + orow * 2, p, mask=rmask)
        tl.store(state_ptr + orow * 2 + 1, cnt, mask=rmask)
        if LAST:
            leave = rmask
        else:
            # fp32 like the threshold (streaks are small integers, exact in fp32).
            leave = rmask & (cnt.to(tl.float32) >= threshold) & (h == h)
    else:
        if LAST:
            leave = rmask
        else:
            leave = rmask & (score < threshold)  # NaN < T is false
        # After the decision, where it was before patience, so that criteria 0-2 compile
        # to the code measured in benchmarks/results/aot-sm90 (loaded first, 5 of their
        # configurations take 1-2 registers fewer on sm_90: other code than was checked).
        orow = tl.load(rows_ptr + r * s_rows, mask=rmask, other=0)
    return leave, orow


@triton.jit
def _write_and_compact(
    r, rmask, orow, leave, pred, h, exit_index,
    out_pred_ptr, so_pred, out_exit_ptr, so_exit, out_ent_ptr, so_ent,
    surv_ptr, surv_rows_ptr, count_ptr,
    LAST: tl.constexpr,
):
    """Per-row outputs of the leaving rows, and the survivors compacted to the front."""
    tl.store(out_pred_ptr + orow * so_pred, pred.to(tl.int64), mask=leave)
    tl.store(out_exit_ptr + orow * so_exit, tl.zeros_like(orow) + exit_index, mask=leave)
    tl.store(out_ent_ptr + orow * so_ent, h, mask=leave)
    if not LAST:  # the last exit has no survivors: no atomic at all
        stay = rmask & (leave == 0)
        flag = stay.to(tl.int32)
        pos = tl.cumsum(flag, axis=0) - flag  # exclusive scan: slot inside the block
        # One atomic per program reserves the block's slot range.
        base = tl.atomic_add(count_ptr, tl.sum(flag, axis=0).to(tl.int64))
        slot = base + pos.to(tl.int64)
        tl.store(surv_ptr + slot, r, mask=stay)
        tl.store(surv_rows_ptr + slot, orow, mask=stay)


# K and exit_index vary from launch to launch: specialising on them (K == 1, K % 16 == 0,
# exit_index == 1) would compile a new variant per survivor count class.
@triton.jit(do_not_specialize=["K", "exit_index"])
def _exit_step_tile_kernel(
    logits_ptr, sl_k, sl_c,
    rows_ptr, s_rows,
    out_logits_ptr, so_k, so_c,
    out_pred_ptr, so_pred, out_exit_ptr, so_exit, out_ent_ptr, so_ent,
    surv_ptr, surv_rows_ptr, count_ptr, state_ptr,
    K, C, threshold, exit_index,
    CRITERION: tl.constexpr, LAST: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row index: K * C can pass 2**31 elements.
    r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = r < K
    # int64 columns too: column-strided logits (a transposed view, sl_c = K) pass 2**31
    # at col * sl_c once K * C does.
    col = tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = col < C
    m2 = rmask[:, None] & cmask[None, :]

    # One pass: the raw tile stays in registers for the copy-out of leaving rows.
    raw = tl.load(logits_ptr + r[:, None] * sl_k + col[None, :] * sl_c, mask=m2, other=0.0)
    x = raw.to(tl.float32)
    z = tl.where(m2, x, float("-inf"))
    # NaN as +inf for the prediction (and the max: compiled tl.max ignores NaN, the
    # interpreter's propagates it, so neither may see one).
    zp = tl.where(z != z, float("inf"), z)
    m, pred = tl.max(zp, axis=1, return_indices=True, return_indices_tie_break_left=True)

    # Entropy exactly as the reference: d = z - m (NaN for +inf/NaN entries and for
    # all -inf rows, which makes s NaN), H = log s - sum_{e>0} e d / s.
    d = x - m[:, None]
    e = tl.where(m2, tl.exp(d), 0.0)
    ed = tl.where(e > 0, e * d, 0.0)
    s = tl.sum(e, axis=1)
    # Every e but the argmax column's (exactly 1): log S = log1p(rest). Rows whose max
    # is not finite have a NaN s, and so a NaN entropy, either way.
    rest = tl.sum(tl.where(col[None, :] == pred[:, None], 0.0, e), axis=1)
    h = _log1p(rest) - tl.sum(ed, axis=1) / s
    h = tl.where(h < 0, 0.0, h)

    if CRITERION == 2:
        # Runner-up: the max once the argmax column is removed (ties give p2 == p1).
        z2 = tl.max(tl.where(col[None, :] == pred[:, None], float("-inf"), zp), axis=1)
        e2 = tl.exp(z2 - m)
    else:
        e2 = s
    score = _score(h, s, rest, e2, CRITERION)

    leave, orow = _decide(score, h, pred, r, rmask, rows_ptr, s_rows, threshold, exit_index, state_ptr,
                          CRITERION, LAST)
    tl.store(out_logits_ptr + orow[:, None] * so_k + col[None, :] * so_c, raw,
             mask=m2 & leave[:, None])
    _write_and_compact(r, rmask, orow, leave, pred, h, exit_index,
                       out_pred_ptr, so_pred, out_exit_ptr, so_exit, out_ent_ptr, so_ent,
                       surv_ptr, surv_rows_ptr, count_ptr, LAST)


@triton.jit(do_not_specialize=["K", "exit_index"])
def _exit_step_chunked_kernel(
    logits_ptr, sl_k, sl_c,
    rows_ptr, s_rows,
    out_logits_ptr, so_k, so_c,
    out_pred_ptr, so_pred, out_exit_ptr, so_exit, out_ent_ptr, so_ent,
    surv_ptr, surv_rows_ptr, count_ptr, state_ptr,
    K, C, threshold, exit_index,
    CRITERION: tl.constexpr, LAST: tl.constexpr,
    ROWS: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = r < K
    col = tl.arange(0, CHUNK).to(tl.int64)
    ninf = float("-inf")

    # Running state per row. `best`/`idx`/`second`: top-2 of the logits with NaN as +inf
    # (the prediction and the margin's runner-up). `mr`, `s`, `t`: online max, sum of
    # exp(z - mr) and sum of exp(z - mr) * (z - mr) over the finite entries. `bad`: a NaN
    # or +inf entry was seen (the reference's entropy is NaN then).
    best = tl.full([ROWS], ninf, tl.float32)
    second = tl.full([ROWS], ninf, tl.float32)
    idx = tl.zeros([ROWS], tl.int32)
    mr = tl.full([ROWS], ninf, tl.float32)
    s = tl.zeros([ROWS], tl.float32)
    t = tl.zeros([ROWS], tl.float32)
    rest = tl.zeros([ROWS], tl.float32)  # s minus its largest term (exactly 1): log s = log1p(rest)
    bad = tl.zeros([ROWS], tl.int1)
    for c0 in range(0, C, CHUNK):
        cc = c0 + col
        m2 = rmask[:, None] & (cc < C)[None, :]
        x = tl.load(logits_ptr + r[:, None] * sl_k + cc[None, :] * sl_c, mask=m2,
                    other=0.0).to(tl.float32)
        z = tl.where(m2, x, ninf)
        zp = tl.where(z != z, float("inf"), z)
        bad = bad | (tl.max(zp, axis=1) == float("inf"))

        cmax, carg = tl.max(zp, axis=1, return_indices=True, return_indices_tie_break_left=True)
        c2 = tl.max(tl.where(col[None, :] == carg[:, None], ninf, zp), axis=1)
        # Top-2 of the union of {best, second} and {cmax, c2}; strict > keeps the
        # earlier chunk's index on ties (first index wins, like torch.argmax).
        second = tl.maximum(tl.minimum(best, cmax), tl.maximum(second, c2))
        idx = tl.where(cmax > best, carg + c0, idx)
        best = tl.maximum(best, cmax)

        # Online softmax statistics over the finite entries (bad rows are NaN anyway).
        zf = tl.where(zp == float("inf"), ninf, zp)
        mn = tl.maximum(mr, tl.max(zf, axis=1))
        alpha = tl.where(mr == ninf, 0.0, tl.exp(mr - mn))
        d = zf - mn[:, None]
        e = tl.where(zf != ninf, tl.exp(d), 0.0)
        ed = tl.where(e > 0, e * d, 0.0)
        # Rescale: sum e'(d + mr - mn) with e' = alpha e; s == 0 while nothing finite
        # has been seen (0 * -inf would be NaN).
        t = tl.where(s > 0, alpha * (t + s * (mr - mn)), 0.0) + tl.sum(ed, axis=1)
        csum = tl.sum(e, axis=1)
        # A chunk with a new maximum: the old top term (1, rescaled by alpha) joins the
        # rest, and the chunk's first maximum (exactly 1) becomes the top. Otherwise every
        # term of the chunk, ties with the running maximum included, joins the rest.
        cf, cfarg = tl.max(zf, axis=1, return_indices=True, return_indices_tie_break_left=True)
        crest = tl.sum(tl.where(col[None, :] == cfarg[:, None], 0.0, e), axis=1)
        rest = tl.where(cf > mr, alpha * (1.0 + rest) + crest, rest + csum)
        s = alpha * s + csum
        mr = mn

    nan = float("nan")
    h = _log1p(rest) - t / s
    h = tl.where(h < 0, 0.0, h)
    h = tl.where(bad | (best == ninf), nan, h)
    e2 = tl.exp(second - best)
    score = _score(h, s, rest, e2, CRITERION)
    leave, orow = _decide(score, h, idx, r, rmask, rows_ptr, s_rows, threshold, exit_index, state_ptr,
                          CRITERION, LAST)

    # Second read, leaving rows only: the copy-out.
    for c0 in range(0, C, CHUNK):
        cc = c0 + col
        m2 = leave[:, None] & (cc < C)[None, :]
        raw = tl.load(logits_ptr + r[:, None] * sl_k + cc[None, :] * sl_c, mask=m2, other=0.0)
        tl.store(out_logits_ptr + orow[:, None] * so_k + cc[None, :] * so_c, raw, mask=m2)
    _write_and_compact(r, rmask, orow, leave, idx, h, exit_index,
                       out_pred_ptr, so_pred, out_exit_ptr, so_exit, out_ent_ptr, so_ent,
                       surv_ptr, surv_rows_ptr, count_ptr, LAST)


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' one.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _warps(tile: int) -> int:
    # ELEMS_PER_THREAD values of the tile per thread: 2 warps for 32x16, 8 for 2K tiles,
    # 32 (the most) for one 8K-wide row.
    return max(1, min(32, tile // (32 * ELEMS_PER_THREAD)))


def exit_step_config(c: int) -> tuple:
    """The launch configuration the dispatcher picks for ``C`` classes:
    ``("tile", ROWS, BLOCK_C, num_warps)`` or ``("chunked", ROWS, CHUNK, num_warps)``.
    It depends on ``C`` alone (not on the number of rows), so the compiled variants are
    one per (dtype, C, criterion, last)."""
    tile, cap = (INTERPRETER_TILE_ELEMS, INTERPRETER_MAX_ROWS) if _INTERPRETED else (TILE_ELEMS, MAX_ROWS)
    if c <= MAX_TILE_C:
        block_c = triton.next_power_of_2(c)
        rows_per = max(1, min(tile // block_c, cap))
        return "tile", rows_per, block_c, _warps(rows_per * block_c)
    chunk = triton.next_power_of_2(min(CHUNK_C, c))
    # One row of 4096-wide chunks a program on a GPU (several only when a test shrinks
    # CHUNK_C, or under the interpreter).
    rows_per = max(1, min(tile // 2 // chunk, cap))
    # Twice the warps of a tile this size (32 for 4096-wide chunks): the online statistics
    # keep more temporaries per element (4096-wide chunks on 8 warps spilled 12 B, fp32,
    # last exit; sm_90).
    return "chunked", rows_per, chunk, _warps(2 * rows_per * chunk)


def exit_step_triton(
    logits: torch.Tensor,
    rows: torch.Tensor,
    threshold: float,
    exit_index: int,
    out_logits: torch.Tensor,
    out_pred: torch.Tensor,
    out_exit: torch.Tensor,
    out_entropy: torch.Tensor,
    criterion: int = 0,
    last: bool = False,
    patience_state: torch.Tensor | None = None,
):
    """The exit op in one Triton launch. Same contract as
    :func:`branchynet.ops.exit_step` (criterion as its integer id), which validates the
    arguments; this launcher only checks what the kernel itself relies on (for patience,
    criterion 3: a contiguous int64 ``patience_state`` of 2 columns, read and written).

    Returns:
        ``(survivors [K] int64, survivor_rows [K] int64, count [1] int64)`` on the device;
        the survivors' order is whatever order the programs' atomics ran in.
    """
    if logits.dtype not in _SUPPORTED:
        # The one place this limit is checked: fp64 has no fast path on GPUs.
        raise TypeError(f"backend 'triton' takes float32, float16 or bfloat16 logits, got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [K, C] with C >= 1, got {tuple(logits.shape)}")
    if criterion not in (0, 1, 2, 3):
        raise ValueError(f"criterion id must be 0, 1, 2 or 3, got {criterion}")
    if criterion == 3:
        st = patience_state
        if (st is None or st.dtype != torch.int64 or st.dim() != 2 or st.shape[1] != 2
                or not st.is_contiguous() or st.device != logits.device):
            raise ValueError("criterion 3 (patience) needs patience_state: a contiguous int64 [B, 2] "
                             "tensor on the logits' device")
    else:
        # The kernels' state_ptr is never dereferenced for criteria 0-2; the rows (int64,
        # like a state) stand in, so the argument adds no specialisation of its own.
        patience_state = rows
    k, c = logits.shape
    dev = logits.device
    survivors = torch.empty(k, dtype=torch.int64, device=dev)
    survivor_rows = torch.empty(k, dtype=torch.int64, device=dev)
    # The count is the atomic counter: zeroed on the device (a memset, no host sync).
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    if k == 0:
        return survivors, survivor_rows, count

    # Strided access: a non-contiguous view is read in place, never copied first.
    args = (
        logits, logits.stride(0), logits.stride(1),
        rows, rows.stride(0),
        out_logits, out_logits.stride(0), out_logits.stride(1),
        out_pred, out_pred.stride(0), out_exit, out_exit.stride(0),
        out_entropy, out_entropy.stride(0),
        survivors, survivor_rows, count, patience_state,
        k, c, float(threshold), int(exit_index),
    )
    kind, rows_per, width, warps = exit_step_config(c)
    grid = (triton.cdiv(k, rows_per),)
    with _device_guard(logits):
        if kind == "tile":
            _exit_step_tile_kernel[grid](
                *args, CRITERION=int(criterion), LAST=bool(last),
                ROWS=rows_per, BLOCK_C=width, num_warps=warps,
            )
        else:
            _exit_step_chunked_kernel[grid](
                *args, CRITERION=int(criterion), LAST=bool(last),
                ROWS=rows_per, CHUNK=width, num_warps=warps,
            )
    return survivors, survivor_rows, count


# --- gather ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def _gather_rows_kernel(src_ptr, idx_ptr, dst_ptr, M, N,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    i = pid_m.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    j = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    imask = i < M
    src_row = tl.load(idx_ptr + i, mask=imask, other=0)
    mask = imask[:, None] & (j < N)[None, :]
    v = tl.load(src_ptr + src_row[:, None] * N + j[None, :], mask=mask)
    tl.store(dst_ptr + i[:, None] * N + j[None, :], v, mask=mask)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def gather_config(n: int) -> tuple:
    """``(ROWS, BLOCK_N, num_warps)`` for rows of ``n`` elements: 4K elements a program
    (16 KB of int32), many short rows per program or one block of a wide row. It does
    not depend on the number of rows gathered (one compiled variant per row width)."""
    block_n = min(triton.next_power_of_2(n), 4096)
    # 8 warps, 16 elements a thread: with 4, ptxas spills 52 B for 2-byte elements.
    return max(1, 4096 // block_n), block_n, 8


def _dense_sample_strides(t: torch.Tensor):
    """Strides of ``t`` if each sample ``t[i]`` is one dense block of ``N`` elements at
    offset ``i * N`` (contiguous, channels_last, channels_last_3d, ...), else None."""
    n = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape[1:], t.stride()[1:]) if sz != 1),
                               key=lambda p: p[1]):
        if stride != n:
            return None
        n *= size
    if t.shape[0] > 1 and t.stride(0) != n:
        return None
    return (n,) + tuple(t.stride()[1:])


def gather_rows_triton(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``features.index_select(0, index)`` as one Triton copy of whole per-sample blocks.

    Args:
        features: [K, ...] any dtype; contiguous, channels_last or any layout whose
            samples are dense blocks (others are made contiguous first).
        index: [M] int64 in ``[0, K)`` (not checked: that would need a host sync).

    Returns:
        [M, ...] with the same per-sample layout as ``features`` (channels_last stays
        channels_last), bitwise equal to ``index_select``.
    """
    strides = _dense_sample_strides(features)
    if strides is None:
        features = features.contiguous()
        strides = _dense_sample_strides(features)
    m = index.shape[0]
    n = strides[0]
    out = torch.empty_strided((m,) + tuple(features.shape[1:]), strides,
                              dtype=features.dtype, device=features.device)
    if m == 0 or n == 0:
        return out
    # [K, N] / [M, N] views of the storage, as same-width integers: a bitwise copy for
    # every dtype (bool, complex, fp8) and NaN payloads kept.
    k = features.shape[0]
    size = features.element_size()
    src = features.as_strided((k, n), (n, 1))
    dst = out.as_strided((m, n), (n, 1))
    if size in _INT_OF_SIZE:
        src, dst = src.view(_INT_OF_SIZE[size]), dst.view(_INT_OF_SIZE[size])
    else:
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)
        n *= size
    rows_per, block_n, warps = gather_config(n)
    grid = (triton.cdiv(m, rows_per), triton.cdiv(n, block_n))
    with _device_guard(features):
        _gather_rows_kernel[grid](src, index.contiguous(), dst, m, n,
                                  ROWS=rows_per, BLOCK_N=block_n, num_warps=warps)
    return out
