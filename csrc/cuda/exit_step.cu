// CUDA kernels of torch.ops.branchynet.exit_step and torch.ops.branchynet.gather_rows.
//
// exit_step: one pass over each row of logits does the whole exit decision (max, sum of
// exp, entropy, argmax, criterion score, threshold test), writes the leaving rows to their
// original rows of the output buffers and compacts the survivors. The logits are read
// from DRAM once: 3x fewer bytes than softmax -> entropy -> mask -> nonzero -> index_put
// as separate ops, and no host sync (the engine reads `count` back itself, 8 bytes).
// Patience (criterion 3, PABEE) tests the streak of equal predictions instead of a score;
// the streak lives in patience_state, indexed by original row, so compaction never moves it.
//
// The math mirrors the PyTorch oracle (branchynet/exits/__init__.py) and the CPU kernel
// in csrc/exit_step.cpp term by term: d = z - max, e = exp(d), S = sum e,
// H = log S - sum(e*d)/S with e == 0 terms skipped, H clamped at 0 (NaN kept), fp32
// accumulation for fp16/bf16 (fp64 for fp64), NaN propagated by the max, argmax with NaN
// as +inf and the first index winning ties.
//
// Only c10/cuda and ATen core headers: ATen/cuda/CUDAContext.h would pull in cuBLAS and
// cuSPARSE headers, which a minimal CUDA toolkit (and the CI compile check) lacks.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "../exit_step_checks.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace branchynet {
namespace {

constexpr int kBlock = 256;  // threads per block in every kernel
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- per-row math ----------------------------------------------------------------------

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }

template <typename T>
__device__ __forceinline__ bool is_nan(T x) {
  return x != x;
}

// max that propagates NaN, like torch.amax (fmaxf would drop it).
template <typename T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (is_nan(a) || a > b) ? a : b;
}

template <typename T>
__device__ __forceinline__ T pos_inf() {
  return std::numeric_limits<T>::infinity();
}

// Pass 1 state: the row max (NaN-propagating) and the argmax key/index (NaN as +inf,
// lowest index on ties). The order (key desc, idx asc) is total, so every lane of a
// butterfly reduction ends with the same answer.
template <typename acc_t>
struct MaxArg {
  acc_t m;
  acc_t key;
  int64_t idx;
};

template <typename acc_t>
__device__ __forceinline__ MaxArg<acc_t> max_arg_identity() {
  return {-pos_inf<acc_t>(), -pos_inf<acc_t>(), std::numeric_limits<int64_t>::max()};
}

template <typename acc_t>
__device__ __forceinline__ MaxArg<acc_t> combine(const MaxArg<acc_t>& a, const MaxArg<acc_t>& b) {
  MaxArg<acc_t> r;
  r.m = nan_max(a.m, b.m);
  const bool take_b = b.key > a.key || (b.key == a.key && b.idx < a.idx);
  r.key = take_b ? b.key : a.key;
  r.idx = take_b ? b.idx : a.idx;
  return r;
}

template <typename acc_t>
__device__ __forceinline__ MaxArg<acc_t> shfl_xor(const MaxArg<acc_t>& a, int off) {
  return {__shfl_xor_sync(kFullMask, a.m, off), __shfl_xor_sync(kFullMask, a.key, off),
          __shfl_xor_sync(kFullMask, a.idx, off)};
}

template <typename acc_t>
__device__ __forceinline__ void push(MaxArg<acc_t>& s, acc_t x, int64_t c) {
  s.m = nan_max(s.m, x);
  const acc_t key = is_nan(x) ? pos_inf<acc_t>() : x;
  // c grows within a thread, so ties keep the earlier index without comparing indices.
  if (key > s.key || s.idx == std::numeric_limits<int64_t>::max()) {
    s.key = key;
    s.idx = c;
  }
}

// Pass 2 state: S = sum e, T = sum e*d (e > 0 only), the top two e (with multiplicity)
// for the margin criterion, and R = S - e1, the sum of every e but one largest. 0 is the
// identity of the top-2: every e >= 0, and with C == 1 the second probability is 0, as in
// the oracle. R exists for log S: the largest e is exactly 1 (d = 0), so log S =
// log1p(R), while fp32 logf(1 + R) loses R below ~6e-8 and ~5 % of the entropy at 1e-6.
template <typename acc_t>
struct SumTop2 {
  acc_t s;
  acc_t t;
  acc_t e1;
  acc_t e2;
  acc_t r;
};

template <typename acc_t>
__device__ __forceinline__ SumTop2<acc_t> sum_top2_identity() {
  return {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

template <typename acc_t>
__device__ __forceinline__ SumTop2<acc_t> combine(const SumTop2<acc_t>& a, const SumTop2<acc_t>& b) {
  SumTop2<acc_t> r;
  r.s = a.s + b.s;
  r.t = a.t + b.t;
  // Top two of the union; on a tie of the firsts the second is that tie, so the result
  // does not depend on the operand order (all lanes agree).
  r.e1 = a.e1 >= b.e1 ? a.e1 : b.e1;
  const acc_t lo1 = a.e1 >= b.e1 ? b.e1 : a.e1;
  const acc_t second = a.e1 >= b.e1 ? a.e2 : b.e2;
  r.e2 = lo1 >= second ? lo1 : second;
  r.r = a.r + b.r + lo1;  // the smaller of the two largest joins the rest
  return r;
}

template <typename acc_t>
__device__ __forceinline__ SumTop2<acc_t> shfl_xor(const SumTop2<acc_t>& a, int off) {
  return {__shfl_xor_sync(kFullMask, a.s, off), __shfl_xor_sync(kFullMask, a.t, off),
          __shfl_xor_sync(kFullMask, a.e1, off), __shfl_xor_sync(kFullMask, a.e2, off),
          __shfl_xor_sync(kFullMask, a.r, off)};
}

template <typename acc_t>
__device__ __forceinline__ void push(SumTop2<acc_t>& s, acc_t x, acc_t m) {
  const acc_t d = x - m;
  const acc_t e = dev_exp(d);
  s.s += e;
  // 0 * -inf must not become NaN: classes with e == 0 contribute nothing.
  if (e > acc_t(0)) s.t += e * d;
  if (e > s.e1) {
    s.r += s.e1;
    s.e2 = s.e1;
    s.e1 = e;
  } else {
    s.r += e;  // NaN lands here (comparisons are false) and makes R NaN, like S
    if (e > s.e2) s.e2 = e;
  }
}

// Butterfly all-reduce over aligned groups of WIDTH lanes (every lane gets the result).
// All 32 lanes must call it: rows past K still take part with identity values.
template <int WIDTH, typename T>
__device__ __forceinline__ T group_allreduce(T v) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) v = combine(v, shfl_xor(v, off));
  return v;
}

// All-reduce over the block; smem holds kWarpsPerBlock + 1 values.
template <typename T>
__device__ __forceinline__ T block_allreduce(T v, T identity, T* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = group_allreduce<kWarp>(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarpsPerBlock ? smem[lane] : identity;
    w = group_allreduce<kWarp>(w);
    if (lane == 0) smem[kWarpsPerBlock] = w;
  }
  __syncthreads();
  return smem[kWarpsPerBlock];
}

struct RowResult {
  float entropy;
  bool leave;
};

// Entropy, criterion score and the exit test from the two reductions. For patience the
// kernels replace `leave` afterwards (patience_leave): its test needs the row's state,
// which is read only once the reductions are done, so nothing of it is live through them.
template <typename acc_t>
__device__ __forceinline__ RowResult decide(const SumTop2<acc_t>& st, int crit, acc_t threshold,
                                            bool last) {
  // e1 == 1 for every row with a finite max (d = 0 there); otherwise S is NaN or 0 and
  // log S gives the NaN the oracle has.
  const acc_t log_s = st.e1 == acc_t(1) ? dev_log1p(st.r) : dev_log(st.s);
  acc_t h = log_s - st.t / st.s;
  if (h < acc_t(0)) h = acc_t(0);  // rounding of a one-hot softmax; NaN < 0 is false
  acc_t score = h;
  // 1 - max p = R / S and 1 - (p1 - p2) = (R + e2) / S: no cancellation, so a confident
  // row keeps its score (fp32 1 - e1 / S is 0 below ~6e-8 and the row would leave at any
  // threshold). Rows with a non-finite max have a NaN entropy and take it below.
  if (crit == 1) {
    score = st.r / st.s;
  } else if (crit == 2) {
    score = (st.r + st.e2) / st.s;
  }
  if (is_nan(h)) score = h;  // a NaN row never leaves early
  return {static_cast<float>(h), last || score < threshold};
}

// The patience test in double, as the contract states it: fp32 would round a threshold of
// 3.0000001 down to 3 and let a streak of 3 leave. A NaN row never leaves early here either.
__device__ __forceinline__ bool patience_leave(int64_t streak, double patience, float entropy, bool last) {
  return last || (static_cast<double>(streak) >= patience && !is_nan(entropy));
}

template <typename scalar_t>
struct ExitParams {
  const scalar_t* __restrict__ logits;  // [K, C] contiguous
  const int64_t* __restrict__ rows;     // [K]
  scalar_t* __restrict__ out_logits;    // [B, C] contiguous
  int64_t* __restrict__ out_pred;
  int64_t* __restrict__ out_exit;
  float* __restrict__ out_entropy;
  int64_t* __restrict__ survivors;      // [K]
  int64_t* __restrict__ survivor_rows;  // [K]
  unsigned long long* __restrict__ counters;  // [2]: survivors, leavers (zeroed)
  int64_t* __restrict__ state;  // [B, 2] patience_state (previous pred, streak); nullptr unless patience
  int64_t pred_stride, exit_stride, entropy_stride;
  int64_t K, C, B;
  int64_t exit_index;
  double threshold;
  int criterion;
  bool last;
};

// Where the compaction puts row i: survivors from the front (counters[0]), leavers from
// the back (counters[1]). `survivors` is then a permutation of 0..K-1, so even its
// "unspecified" tail is deterministic when one block holds all rows.
template <typename scalar_t>
__device__ __forceinline__ void place(const ExitParams<scalar_t>& p, int64_t pos_from_front,
                                      bool leave, int64_t i, int64_t r) {
  const int64_t pos = leave ? p.K - 1 - pos_from_front : pos_from_front;
  p.survivors[pos] = i;
  p.survivor_rows[pos] = r;
}

// Patience: how many consecutive exits just before this one predicted `pred` too (state
// row r holds the previous exit's prediction and streak). The first exit does not read the state, so
// the caller need not initialise it.
template <typename scalar_t>
__device__ __forceinline__ int64_t patience_streak(const ExitParams<scalar_t>& p, int64_t r, int64_t pred) {
  if (p.exit_index == 0) return 0;
  const int64_t* s = p.state + 2 * r;
  return pred == s[0] ? s[1] + 1 : 0;
}

// ---- small C: a group of TPR lanes per row, the row held in registers -----------------
//
// TPR in {4, 8, 16, 32} and VPT values per lane, TPR * VPT >= C (C <= 1024). Loads are
// strided by TPR so a group reads consecutive addresses. Compaction is aggregated per
// block: two ballots per warp, a prefix over the 8 warps, then one atomicAdd per block
// and per counter (instead of one per row), so a 1024-row batch with C = 10 issues 32
// atomics, not 1024.
template <typename scalar_t, int TPR, int VPT>
__global__ void __launch_bounds__(kBlock) exit_step_rows_kernel(const ExitParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kBlock / TPR;
  __shared__ int s_stay[kWarpsPerBlock];
  __shared__ int s_leave[kWarpsPerBlock];
  __shared__ int64_t s_base[2];

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int sub = tid % TPR;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + tid / TPR;
  const bool valid = i < p.K;
  // 32-bit column indices (C <= 1024 here): 64-bit ones, unrolled VPT = 32 times, took
  // the registers that made <32, 32> spill 4 bytes on sm_90 (nvcc -Xptxas -v).
  const int C = static_cast<int>(p.C);
  const scalar_t* z = p.logits + (valid ? i : 0) * p.C;

  acc_t v[VPT];
  MaxArg<acc_t> ma = max_arg_identity<acc_t>();
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = sub + j * TPR;
    v[j] = acc_t(0);
    if (valid && c < C) {
      v[j] = static_cast<acc_t>(z[c]);
      push(ma, v[j], c);
    }
  }
  ma = group_allreduce<TPR>(ma);

  SumTop2<acc_t> st = sum_top2_identity<acc_t>();
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    const int c = sub + j * TPR;
    if (valid && c < C) push(st, v[j], ma.m);
  }
  st = group_allreduce<TPR>(st);

  RowResult res = decide(st, p.criterion, static_cast<acc_t>(p.threshold), p.last);
  int64_t r = 0;
  if (valid) {
    r = p.rows[i];
    // The last line of defence only (it kills the context): checking on the host would
    // cost a sync per exit, so branchynet.ops.exit_step refuses bad rows before the
    // launch and the engine builds its rows itself.
    CUDA_KERNEL_ASSERT(r >= 0 && r < p.B);
  }
  // Every lane of the group reads the state (one broadcast load), so that all of them know
  // whether to copy their columns; the leader overwrites it after the __syncwarp, when no
  // lane can still be reading. Written here, not with the compaction below: keeping the
  // streak and pred live across its barriers took <4, 4> from 40 to 42 registers on
  // sm_90 (48 allocated: 5 blocks per SM instead of 6) for every criterion.
  if (p.criterion == kPatience) {  // uniform over the grid: all 32 lanes reach __syncwarp
    int64_t streak = 0;
    if (valid) {
      streak = patience_streak(p, r, ma.idx);
      res.leave = patience_leave(streak, p.threshold, res.entropy, p.last);
    }
    __syncwarp();
    if (valid && sub == 0) {  // every row of the call, leaving or not
      p.state[2 * r] = ma.idx;
      p.state[2 * r + 1] = streak;
    }
  }
  const bool leave = valid && res.leave;
  const bool stay = valid && !res.leave;
  if (leave) {
    // Copied from the input, not from the fp32 registers: fp16/bf16 -> fp32 -> back
    // changes NaN payloads (quiets them), and every other path copies the bits. The row
    // was just read, so this read hits L1/L2.
    scalar_t* o = p.out_logits + r * p.C;
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int c = sub + j * TPR;
      if (c < C) o[c] = z[c];
    }
    if (sub == 0) {
      p.out_pred[r * p.pred_stride] = ma.idx;
      p.out_exit[r * p.exit_stride] = p.exit_index;
      p.out_entropy[r * p.entropy_stride] = res.entropy;
    }
  }

  // Block-aggregated compaction: one lane (sub == 0) speaks for each row.
  const bool leader = sub == 0;
  const unsigned stay_mask = __ballot_sync(kFullMask, leader && stay);
  const unsigned leave_mask = __ballot_sync(kFullMask, leader && leave);
  if (lane == 0) {
    s_stay[warp] = __popc(stay_mask);
    s_leave[warp] = __popc(leave_mask);
  }
  __syncthreads();
  if (tid == 0) {
    int n_stay = 0, n_leave = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) {
      const int a = s_stay[w], b = s_leave[w];
      s_stay[w] = n_stay;
      s_leave[w] = n_leave;
      n_stay += a;
      n_leave += b;
    }
    s_base[0] = n_stay ? static_cast<int64_t>(atomicAdd(&p.counters[0], static_cast<unsigned long long>(n_stay))) : 0;
    s_base[1] = n_leave ? static_cast<int64_t>(atomicAdd(&p.counters[1], static_cast<unsigned long long>(n_leave))) : 0;
  }
  __syncthreads();
  if (leader && valid) {
    const unsigned lower = (1u << lane) - 1u;
    const unsigned mask = leave ? leave_mask : stay_mask;
    const int64_t rank = (leave ? s_base[1] + s_leave[warp] : s_base[0] + s_stay[warp]) + __popc(mask & lower);
    place(p, rank, leave, i, r);
  }
}

// ---- large C: one block per row ------------------------------------------------------
//
// C > 1024 does not fit in registers; the row is read three times (max/argmax, sums,
// copy when it leaves). Only the first read comes from DRAM: a row of 4 KiB..40 KiB is
// still in L2 (50 MB on an H100) for the next two.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) exit_step_block_kernel(const ExitParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ MaxArg<acc_t> s_ma[kWarpsPerBlock + 1];
  __shared__ SumTop2<acc_t> s_st[kWarpsPerBlock + 1];

  const int64_t i = blockIdx.x;  // grid == K
  const int C = static_cast<int>(p.C);  // < 2^31, checked on the host
  const scalar_t* z = p.logits + i * p.C;

  MaxArg<acc_t> ma = max_arg_identity<acc_t>();
  for (int c = threadIdx.x; c < C; c += kBlock) push(ma, static_cast<acc_t>(z[c]), c);
  ma = block_allreduce(ma, max_arg_identity<acc_t>(), s_ma);

  SumTop2<acc_t> st = sum_top2_identity<acc_t>();
  for (int c = threadIdx.x; c < C; c += kBlock) push(st, static_cast<acc_t>(z[c]), ma.m);
  st = block_allreduce(st, sum_top2_identity<acc_t>(), s_st);

  RowResult res = decide(st, p.criterion, static_cast<acc_t>(p.threshold), p.last);
  const int64_t r = p.rows[i];
  CUDA_KERNEL_ASSERT(r >= 0 && r < p.B);
  int64_t streak = 0;
  if (p.criterion == kPatience) {  // uniform over the block: the barrier is safe
    streak = patience_streak(p, r, ma.idx);
    res.leave = patience_leave(streak, p.threshold, res.entropy, p.last);
    // Thread 0 overwrites the state below; every warp must have read it first.
    __syncthreads();
  }
  if (res.leave) {
    scalar_t* o = p.out_logits + r * p.C;
    for (int c = threadIdx.x; c < C; c += kBlock) o[c] = z[c];
  }
  if (threadIdx.x == 0) {
    if (res.leave) {
      p.out_pred[r * p.pred_stride] = ma.idx;
      p.out_exit[r * p.exit_stride] = p.exit_index;
      p.out_entropy[r * p.entropy_stride] = res.entropy;
    }
    const int64_t rank = static_cast<int64_t>(atomicAdd(&p.counters[res.leave ? 1 : 0], 1ull));
    place(p, rank, res.leave, i, r);
    if (p.criterion == kPatience) {
      p.state[2 * r] = ma.idx;
      p.state[2 * r + 1] = streak;
    }
  }
}

template <typename scalar_t, int TPR, int VPT>
void launch_rows(const ExitParams<scalar_t>& p, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kBlock / TPR;
  const int64_t blocks = (p.K + kRowsPerBlock - 1) / kRowsPerBlock;
  exit_step_rows_kernel<scalar_t, TPR, VPT><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(p);
}

// TPR = 4 lanes up to C = 16 (a 32-lane warp would idle 22 of 32 lanes at C = 10), then
// the narrowest group with VPT = 4, then 32 lanes with up to 32 values each.
template <typename scalar_t>
void launch_exit_step(const ExitParams<scalar_t>& p, cudaStream_t stream) {
  const int64_t C = p.C;
  if (C <= 4) launch_rows<scalar_t, 4, 1>(p, stream);
  else if (C <= 8) launch_rows<scalar_t, 4, 2>(p, stream);
  else if (C <= 16) launch_rows<scalar_t, 4, 4>(p, stream);
  else if (C <= 32) launch_rows<scalar_t, 8, 4>(p, stream);
  else if (C <= 64) launch_rows<scalar_t, 16, 4>(p, stream);
  else if (C <= 128) launch_rows<scalar_t, 32, 4>(p, stream);
  else if (C <= 256) launch_rows<scalar_t, 32, 8>(p, stream);
  else if (C <= 512) launch_rows<scalar_t, 32, 16>(p, stream);
  else if (C <= 1024) launch_rows<scalar_t, 32, 32>(p, stream);
  else exit_step_block_kernel<scalar_t><<<static_cast<unsigned>(p.K), kBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_step_cuda(
    const at::Tensor& logits, const at::Tensor& rows, double threshold, int64_t exit_index,
    const at::Tensor& out_logits, const at::Tensor& out_pred, const at::Tensor& out_exit,
    const at::Tensor& out_entropy, int64_t criterion, bool last,
    const std::optional<at::Tensor>& patience_state) {
  TORCH_CHECK(logits.is_cuda(), "branchynet::exit_step (CUDA): logits must be a CUDA tensor");
  const ExitStepShape shape = check_exit_step_args(logits, rows, threshold, criterion, out_logits,
                                                   out_pred, out_exit, out_entropy, patience_state);
  const int64_t K = shape.K, C = shape.C, B = shape.B;
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), "exit_step: at most 2^31 - 1 rows, got ", K);
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "exit_step: at most 2^31 - 1 classes, got ", C);

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const at::Tensor r = rows.contiguous();
  at::Tensor survivors = at::empty({K}, r.options());
  at::Tensor survivor_rows = at::empty({K}, r.options());
  // counters[0] is the survivor count returned to the caller; counters[1] places the
  // leavers at the tail. One 16-byte memset on the stream, no fill kernel, no sync.
  at::Tensor counters = at::empty({2}, r.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(counters.data_ptr(), 0, 2 * sizeof(int64_t), stream));
  at::Tensor count = counters.narrow(0, 0, 1);
  if (K == 0) return {survivors, survivor_rows, count};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "branchynet_exit_step_cuda", [&] {
    ExitParams<scalar_t> p;
    p.logits = z.const_data_ptr<scalar_t>();
    p.rows = r.const_data_ptr<int64_t>();
    p.out_logits = out_logits.mutable_data_ptr<scalar_t>();
    p.out_pred = out_pred.mutable_data_ptr<int64_t>();
    p.out_exit = out_exit.mutable_data_ptr<int64_t>();
    p.out_entropy = out_entropy.mutable_data_ptr<float>();
    p.survivors = survivors.mutable_data_ptr<int64_t>();
    p.survivor_rows = survivor_rows.mutable_data_ptr<int64_t>();
    p.counters = reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>());
    // Checked above: given (contiguous [B, 2] int64) exactly when the criterion is patience.
    p.state = criterion == kPatience ? patience_state->mutable_data_ptr<int64_t>() : nullptr;
    p.pred_stride = out_pred.stride(0);
    p.exit_stride = out_exit.stride(0);
    p.entropy_stride = out_entropy.stride(0);
    p.K = K;
    p.C = C;
    p.B = B;
    p.exit_index = exit_index;
    p.threshold = threshold;
    p.criterion = static_cast<int>(criterion);
    p.last = last;
    launch_exit_step(p, stream);
  });
  return {survivors, survivor_rows, count};
}

// ---- gather_rows -------------------------------------------------------------------------
//
// Copies whole per-sample blocks. In a contiguous or channels_last tensor the block of
// sample k is the contiguous byte range [k * row_bytes, (k + 1) * row_bytes), so the copy
// is dtype-agnostic and uses 16-byte vectors whenever the pointers and the row size allow
// (a 64x8x8 fp16 feature map is 8 KiB = 512 uint4 per row).
template <typename vec_t, typename idx_t>
__global__ void __launch_bounds__(kBlock) gather_rows_kernel(const vec_t* __restrict__ src,
                                                             vec_t* __restrict__ dst,
                                                             const int64_t* __restrict__ index,
                                                             idx_t m_rows, idx_t k_rows, idx_t row_vecs) {
  const idx_t total = m_rows * row_vecs;
  const idx_t step = static_cast<idx_t>(gridDim.x) * kBlock;
  for (idx_t t = static_cast<idx_t>(blockIdx.x) * kBlock + threadIdx.x; t < total; t += step) {
    const idx_t m = t / row_vecs;
    const idx_t c = t - m * row_vecs;
    const int64_t k = index[m];
    CUDA_KERNEL_ASSERT(k >= 0 && k < static_cast<int64_t>(k_rows));
    dst[t] = src[static_cast<idx_t>(k) * row_vecs + c];
  }
}

template <typename vec_t>
void launch_gather(const char* src, char* dst, const int64_t* index, int64_t M, int64_t K,
                   int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t total = M * row_vecs;
  // Enough blocks to fill any current GPU (132 SMs x 8 resident blocks), grid-stride past that.
  const int64_t blocks = std::min<int64_t>((total + kBlock - 1) / kBlock, 8192);
  const auto* s = reinterpret_cast<const vec_t*>(src);
  auto* d = reinterpret_cast<vec_t*>(dst);
  if (K * row_vecs <= std::numeric_limits<int32_t>::max() && total <= std::numeric_limits<int32_t>::max()) {
    gather_rows_kernel<vec_t, uint32_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        s, d, index, static_cast<uint32_t>(M), static_cast<uint32_t>(K), static_cast<uint32_t>(row_vecs));
  } else {
    gather_rows_kernel<vec_t, uint64_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
        s, d, index, static_cast<uint64_t>(M), static_cast<uint64_t>(K), static_cast<uint64_t>(row_vecs));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_rows_cuda(const at::Tensor& features, const at::Tensor& index) {
  TORCH_CHECK(features.is_cuda(), "branchynet::gather_rows (CUDA): features must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(features.device());
  GatherPlan plan = plan_gather(features, index);
  const at::Tensor& src = plan.src;
  const at::Tensor& idx = plan.idx;
  at::Tensor out = plan.out;
  const int64_t M = plan.M, K = plan.K, row_bytes = plan.row_bytes;
  if (M == 0 || row_bytes == 0) return out;
  TORCH_CHECK(K > 0, "gather_rows: index into an empty batch");

  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(out.mutable_data_ptr());
  const auto aligned = [&](int64_t n) {
    return row_bytes % n == 0 && reinterpret_cast<uintptr_t>(s) % n == 0 && reinterpret_cast<uintptr_t>(d) % n == 0;
  };
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  if (aligned(16)) launch_gather<uint4>(s, d, ip, M, K, row_bytes, stream);
  else if (aligned(8)) launch_gather<uint2>(s, d, ip, M, K, row_bytes, stream);
  else if (aligned(4)) launch_gather<uint32_t>(s, d, ip, M, K, row_bytes, stream);
  else if (aligned(2)) launch_gather<uint16_t>(s, d, ip, M, K, row_bytes, stream);
  else launch_gather<uint8_t>(s, d, ip, M, K, row_bytes, stream);
  return out;
}

}  // namespace
}  // namespace branchynet

TORCH_LIBRARY_IMPL(branchynet, CUDA, m) {
  m.impl("exit_step", &branchynet::exit_step_cuda);
  m.impl("gather_rows", &branchynet::gather_rows_cuda);
}
