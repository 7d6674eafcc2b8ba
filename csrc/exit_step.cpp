// The branchynet op library: the CPU kernels, and the import-only
// Python module `branchynet._C`.
//
// Importing `branchynet._C` runs the TORCH_LIBRARY_IMPL registrations below (and those of
// csrc/cuda/exit_step.cu in a CUDA build): the CPU (and CUDA) implementations of the ops
// torch.ops.branchynet.* whose schemas and fakes live in branchynet/ops/_library.py.
// The module itself exposes has_cuda() and exit_step_direct() (see below).
//
// The CPU kernels are the `cpp` backend of branchynet.ops (one pass per row, no
// temporaries; measured against the PyTorch path in benchmarks/), and they let the
// registration (schema, fake, opcheck, torch.compile) be tested on machines without a GPU. Their math mirrors
// csrc/cuda/exit_step.cu term by term.

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "exit_step_checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace branchynet {
namespace {

// A CPU tensor straight from the CPU allocator, without a trip through the dispatcher
// (at::empty's): ~0.15 us each, six per exit at B = 1. Inference-mode state is read by
// the TensorImpl itself, as for at::empty.
inline at::Tensor empty_cpu(at::IntArrayRef size, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(size, dtype));
}

template <typename T>
inline T nan_max(T a, T b) {
  return (std::isnan(a) || a > b) ? a : b;
}

// The CPU kernel; returns (survivors, survivor_rows, count). The registered op wraps the
// count in a tensor, the direct entry (exit_step_direct below) returns it as an int.
std::tuple<at::Tensor, at::Tensor, int64_t> exit_step_cpu_impl(
    const at::Tensor& logits, const at::Tensor& rows, double threshold, int64_t exit_index,
    const at::Tensor& out_logits, const at::Tensor& out_pred, const at::Tensor& out_exit,
    const at::Tensor& out_entropy, int64_t criterion, bool last,
    const std::optional<at::Tensor>& patience_state) {
  TORCH_CHECK(logits.device().is_cpu(), "branchynet::exit_step (CPU): logits must be on the CPU");
  const ExitStepShape shape = check_exit_step_args(logits, rows, threshold, criterion, out_logits,
                                                   out_pred, out_exit, out_entropy, patience_state);
  const int64_t K = shape.K, C = shape.C, B = shape.B;
  const auto dtype = logits.scalar_type();

  const at::Tensor z = logits.contiguous();
  const at::Tensor r = rows.contiguous();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < B, "exit_step: rows[", i, "] = ", rp[i], " is out of range for B = ", B);
  }
  at::Tensor survivors = empty_cpu({K}, at::kLong);
  at::Tensor survivor_rows = empty_cpu({K}, at::kLong);
  std::vector<uint8_t> leave(static_cast<size_t>(K), 0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "branchynet_exit_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* ol = out_logits.mutable_data_ptr<scalar_t>();
    int64_t* op = out_pred.mutable_data_ptr<int64_t>();
    int64_t* oe = out_exit.mutable_data_ptr<int64_t>();
    float* oh = out_entropy.mutable_data_ptr<float>();
    const int64_t sp = out_pred.stride(0), se = out_exit.stride(0), sh = out_entropy.stride(0);
    // Patience: (previous prediction, streak) of original row r at state[2r], [2r + 1].
    int64_t* state = criterion == kPatience ? patience_state->mutable_data_ptr<int64_t>() : nullptr;
    const acc_t thr = static_cast<acc_t>(threshold);
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    at::parallel_for(0, K, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* row = zp + i * C;
        // Pass 1: NaN-propagating max; argmax with NaN as +inf, first index on ties.
        acc_t m = -inf, best = -inf;
        int64_t arg = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t x = static_cast<acc_t>(row[c]);
          m = nan_max(m, x);
          const acc_t key = std::isnan(x) ? inf : x;
          if (c == 0 || key > best) {
            best = key;
            arg = c;
          }
        }
        // Pass 2: S, sum e*d over e > 0, top two e. The sums run in double: a sequential
        // fp32 sum over C = 4099 terms errs ~100x more than torch's pairwise sum (the
        // GPU's per-lane + tree sums do not have this problem).
        // `rest` is S without the argmax's term (exactly 1 when the max is finite): the
        // max_prob and margin scores are rest / S and (rest + e2) / S, which keep a
        // confident row's score (2.8e-9 for logits [20, 0, -1]) where 1 - e1 / S is 0.
        double s = 0, t = 0, rest = 0;
        acc_t e1 = 0, e2 = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(row[c]) - m;
          const acc_t e = std::exp(d);
          s += static_cast<double>(e);
          if (c != arg) rest += static_cast<double>(e);
          if (e > acc_t(0)) t += static_cast<double>(e * d);
          if (e > e1) {
            e2 = e1;
            e1 = e;
          } else if (e > e2) {
            e2 = e;
          }
        }
        acc_t h = static_cast<acc_t>(std::log(s) - t / s);
        if (h < acc_t(0)) h = acc_t(0);
        const int64_t ri = rp[i];
        bool go;
        if (criterion == kPatience) {
          // PABEE: the streak of agreeing predictions, 0 at the first exit (whose state is
          // not read: the buffer may be uninitialised), kept for every row of the call.
          int64_t* st = state + 2 * ri;
          const int64_t streak = (exit_index != 0 && st[0] == arg) ? st[1] + 1 : 0;
          st[0] = arg;
          st[1] = streak;
          go = last || (static_cast<double>(streak) >= threshold && !std::isnan(h));
        } else {
          acc_t score = h;
          if (criterion == 1) score = static_cast<acc_t>(rest / s);
          else if (criterion == 2) score = static_cast<acc_t>((rest + static_cast<double>(e2)) / s);
          if (std::isnan(h)) score = h;
          go = last || score < thr;
        }
        if (!go) continue;
        leave[i] = 1;
        std::memcpy(ol + ri * C, row, static_cast<size_t>(C) * sizeof(scalar_t));
        op[ri * sp] = arg;
        oe[ri * se] = exit_index;
        oh[ri * sh] = static_cast<float>(h);
      }
    });
  });

  // Serial compaction in input order (the order of the PyTorch oracle), leavers after
  // the survivors: `survivors` is a permutation of 0..K-1, fully deterministic.
  int64_t* sv = survivors.mutable_data_ptr<int64_t>();
  int64_t* sr = survivor_rows.mutable_data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < K; ++i) {
    if (!leave[i]) {
      sv[n] = i;
      sr[n] = rp[i];
      ++n;
    }
  }
  int64_t tail = n;
  for (int64_t i = 0; i < K; ++i) {
    if (leave[i]) {
      sv[tail] = i;
      sr[tail] = rp[i];
      ++tail;
    }
  }
  return {survivors, survivor_rows, n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_step_cpu(
    const at::Tensor& logits, const at::Tensor& rows, double threshold, int64_t exit_index,
    const at::Tensor& out_logits, const at::Tensor& out_pred, const at::Tensor& out_exit,
    const at::Tensor& out_entropy, int64_t criterion, bool last, const std::optional<at::Tensor>& patience_state) {
  auto [survivors, survivor_rows, n] = exit_step_cpu_impl(logits, rows, threshold, exit_index, out_logits, out_pred,
                                                          out_exit, out_entropy, criterion, last, patience_state);
  at::Tensor count = at::empty({1}, rows.options());
  count.mutable_data_ptr<int64_t>()[0] = n;
  return {survivors, survivor_rows, count};
}

at::Tensor gather_rows_cpu(const at::Tensor& features, const at::Tensor& index) {
  TORCH_CHECK(features.device().is_cpu(), "branchynet::gather_rows (CPU): features must be on the CPU");
  GatherPlan plan = plan_gather(features, index);
  const at::Tensor& src = plan.src;
  const at::Tensor& idx = plan.idx;
  at::Tensor out = plan.out;
  const int64_t M = plan.M, K = plan.K, row_bytes = plan.row_bytes;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < M; ++j) {
    TORCH_CHECK(ip[j] >= 0 && ip[j] < K, "gather_rows: index[", j, "] = ", ip[j], " is out of range for ", K, " rows");
  }
  if (M == 0 || row_bytes == 0) return out;
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      std::memcpy(d + j * row_bytes, s + ip[j] * row_bytes, static_cast<size_t>(row_bytes));
    }
  });
  return out;
}

}  // namespace
}  // namespace branchynet

// The schemas are defined once, in Python (branchynet/ops/_library.py), so that the op
// exists with or without this extension; here only the CPU implementations are registered.
// The C++ arguments follow the schema's order.
TORCH_LIBRARY_IMPL(branchynet, CPU, m) {
  m.impl("exit_step", &branchynet::exit_step_cpu);
  m.impl("gather_rows", &branchynet::gather_rows_cpu);
}

// ---- the Python module: has_cuda() and the engine's direct CPU entry -------------------
//
// Plain CPython API instead of pybind11: two functions, and this keeps torch/extension.h
// (and its compile time) out of the build.

namespace {

// exit_step_direct(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit,
//                  out_entropy, criterion, last[, patience_state])
// The CPU kernel called straight from Python, in the op's argument order, for
// branchynet.ops' bound exit op (the eager engine's step): no dispatcher, no count tensor.
// At B = 1 the dispatcher path (schema parsing, out-argument handling, a cold path after
// the convolutions) and four output allocations from Python were ~11 us of a ~100 us
// B-LeNet sample. With the four out_* None it allocates them with B = K rows (the first
// exit, whose rows are 0..K-1) and returns them after the three results: (survivors,
// survivor_rows, count[, out_logits, out_pred, out_exit, out_entropy]), count a Python
// int. Same checks and errors as the op. Not traceable: under torch.compile the bound op
// calls torch.ops.branchynet.exit_step instead.
PyObject* exit_step_direct(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *logits_o, *rows_o, *ol_o, *op_o, *oe_o, *oh_o, *state_o = Py_None;
  double threshold;
  long long criterion, exit_index;
  int last;
  if (!PyArg_ParseTuple(args, "OOdLOOOOLp|O:exit_step_direct", &logits_o, &rows_o, &threshold, &exit_index,
                        &ol_o, &op_o, &oe_o, &oh_o, &criterion, &last, &state_o)) {
    return nullptr;
  }
  if (state_o != Py_None && !THPVariable_Check(state_o)) {
    PyErr_SetString(PyExc_TypeError, "exit_step_direct: patience_state must be a tensor or None");
    return nullptr;
  }
  std::optional<at::Tensor> patience_state;
  if (state_o != Py_None) patience_state = THPVariable_Unpack(state_o);
  const bool alloc = ol_o == Py_None;
  if (alloc != (op_o == Py_None) || alloc != (oe_o == Py_None) || alloc != (oh_o == Py_None)) {
    PyErr_SetString(PyExc_TypeError, "exit_step_direct: pass all four out_* buffers or four None");
    return nullptr;
  }
  for (PyObject* o : {logits_o, rows_o, ol_o, op_o, oe_o, oh_o}) {
    if (o != Py_None && !THPVariable_Check(o)) {
      PyErr_SetString(PyExc_TypeError, "exit_step_direct: tensors expected");
      return nullptr;
    }
  }
  if (logits_o == Py_None || rows_o == Py_None) {
    PyErr_SetString(PyExc_TypeError, "exit_step_direct: logits and rows must be tensors");
    return nullptr;
  }
  const at::Tensor& logits = THPVariable_Unpack(logits_o);
  const at::Tensor& rows = THPVariable_Unpack(rows_o);
  at::Tensor out_logits, out_pred, out_exit, out_entropy;
  if (alloc) {
    TORCH_CHECK(logits.dim() == 2, "exit_step: logits must be [K, C], got rank ", logits.dim());
    const int64_t K = logits.size(0);
    TORCH_CHECK(logits.device().is_cpu(), "branchynet::exit_step (CPU): logits must be on the CPU");
    out_logits = branchynet::empty_cpu({K, logits.size(1)}, logits.scalar_type());
    out_pred = branchynet::empty_cpu({K}, at::kLong);
    out_exit = branchynet::empty_cpu({K}, at::kLong);
    out_entropy = branchynet::empty_cpu({K}, at::kFloat);
  } else {
    out_logits = THPVariable_Unpack(ol_o);
    out_pred = THPVariable_Unpack(op_o);
    out_exit = THPVariable_Unpack(oe_o);
    out_entropy = THPVariable_Unpack(oh_o);
  }
  std::tuple<at::Tensor, at::Tensor, int64_t> res;
  {
    // Large batches run long enough for other Python threads to use the interpreter.
    const bool release = logits.numel() > 65536;
    PyThreadState* state = release ? PyEval_SaveThread() : nullptr;
    try {
      res = branchynet::exit_step_cpu_impl(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit,
                                           out_entropy, criterion, last != 0, patience_state);
    } catch (...) {
      if (state != nullptr) PyEval_RestoreThread(state);
      throw;
    }
    if (state != nullptr) PyEval_RestoreThread(state);
  }
  PyObject* n = PyLong_FromLongLong(std::get<2>(res));
  if (n == nullptr) return nullptr;
  if (!alloc) {
    return Py_BuildValue("(NNN)", THPVariable_Wrap(std::get<0>(res)), THPVariable_Wrap(std::get<1>(res)), n);
  }
  return Py_BuildValue("(NNNNNNN)", THPVariable_Wrap(std::get<0>(res)), THPVariable_Wrap(std::get<1>(res)), n,
                       THPVariable_Wrap(out_logits), THPVariable_Wrap(out_pred), THPVariable_Wrap(out_exit),
                       THPVariable_Wrap(out_entropy));
  END_HANDLE_TH_ERRORS
}

PyObject* has_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef BRANCHYNET_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"has_cuda", has_cuda, METH_NOARGS,
     "True when this build registered the CUDA kernels of torch.ops.branchynet.*."},
    {"exit_step_direct", exit_step_direct, METH_VARARGS,
     "The CPU exit_step kernel without the dispatcher, for the eager engine (not traceable)."},
    {nullptr, nullptr, 0, nullptr},
};

#define BRANCHYNET_STR_(x) #x
#define BRANCHYNET_STR(x) BRANCHYNET_STR_(x)
#define BRANCHYNET_CAT_(a, b) a##b
#define BRANCHYNET_CAT(a, b) BRANCHYNET_CAT_(a, b)

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    BRANCHYNET_STR(TORCH_EXTENSION_NAME),
    "Compiled branchynet ops; importing this module registers torch.ops.branchynet.*.",
    -1,
    kMethods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC BRANCHYNET_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&kModule);
}
