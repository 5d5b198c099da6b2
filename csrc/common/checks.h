#pragma once
// Host-side input checks. Every failure is a ValueError whose message names the argument and says
// what was expected, raised before any kernel runs.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#define NSA_CHECK_ARG(cond, name, ...) TORCH_CHECK_VALUE(cond, "nsa: argument '", name, "' ", __VA_ARGS__)

namespace nsa {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// A q/k/v-like tensor: given rank, supported float dtype, contiguous last dim, on `device`.
inline void check_qkv_tensor(const at::Tensor& t, const char* name, int64_t rank, const at::Device& device,
                             const char* shape) {
  NSA_CHECK_ARG(t.dim() == rank, name, "must have shape ", shape, " (rank ", rank, "), got ", t.sizes());
  NSA_CHECK_ARG(is_supported_float(t.scalar_type()), name,
                "must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  NSA_CHECK_ARG(t.device() == device, name, "must be on ", device, " like q, got ", t.device());
  NSA_CHECK_ARG(t.size(-1) == 0 || t.stride(-1) == 1, name, "must have a contiguous last dimension, got strides ",
                t.strides());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& q) {
  NSA_CHECK_ARG(t.scalar_type() == q.scalar_type(), name, "must have q's dtype ", q.scalar_type(), ", got ",
                t.scalar_type());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected, const char* what) {
  NSA_CHECK_ARG(t.size(dim) == expected, name, "must have ", what, " = ", expected, " (dim ", dim, "), got shape ",
                t.sizes());
}

// Whether the host checks a tensor's values (offsets, lengths): only on the CPU, where reading them
// costs no device sync; on a GPU the kernels hold themselves to the tensors instead (seq_span, and
// decoding's clamped lengths). NSA_EMULATE_DEVICE_VALUES=1 makes the CUDA emulator's CPU tensors
// unchecked like a GPU's, so that tests can show the kernels alone stay in bounds.
inline bool host_checks_values(const at::Tensor& t) {
#ifdef NSA_EMULATE_CUDA
  const char* device_values = std::getenv("NSA_EMULATE_DEVICE_VALUES");
  if (device_values != nullptr && std::strcmp(device_values, "1") == 0) return false;
#endif
  return t.is_cpu();
}

// cu_seqlens: int32 [N+1], on q's device. On the CPU (host_checks_values) also: starts at 0,
// non-decreasing, ends within `total_rows`, no sequence longer than max_seqlen.
inline int64_t check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Device& device, int64_t total_rows,
                                int64_t max_seqlen, const char* max_name) {
  NSA_CHECK_ARG(cu.scalar_type() == at::kInt, name, "must be int32, got ", cu.scalar_type());
  NSA_CHECK_ARG(cu.dim() == 1 && cu.size(0) >= 1, name, "must have shape [num_seqs + 1], got ", cu.sizes());
  NSA_CHECK_ARG(cu.device() == device, name, "must be on ", device, " like q, got ", cu.device());
  NSA_CHECK_ARG(cu.is_contiguous(), name, "must be contiguous");
  NSA_CHECK_ARG(max_seqlen >= 0, max_name, "must be >= 0, got ", max_seqlen);
  // No sequence is longer than the packed rows (nor than int32, for keys no tensor holds): a larger
  // bound only sizes the kernels' loops (max_seqlen_q = 2^40 looped over empty tiles for minutes).
  const int64_t longest = std::min<int64_t>(total_rows, std::numeric_limits<int32_t>::max());
  NSA_CHECK_ARG(max_seqlen <= longest, max_name, "must be <= ", longest, ", the most rows a sequence of ", name,
                " can have, got ", max_seqlen);
  if (host_checks_values(cu)) {
    const int32_t* p = cu.data_ptr<int32_t>();
    NSA_CHECK_ARG(p[0] == 0, name, "must start at 0, got ", p[0]);
    for (int64_t i = 1; i < cu.size(0); ++i) {
      const int64_t len = int64_t(p[i]) - p[i - 1];
      NSA_CHECK_ARG(len >= 0, name, "must be non-decreasing, but entry ", i, " (", p[i], ") < entry ", i - 1, " (",
                    p[i - 1], ")");
      NSA_CHECK_ARG(len <= max_seqlen, max_name, "(", max_seqlen, ") is smaller than sequence ", i - 1,
                    " of length ", len, " in ", name);
    }
    NSA_CHECK_ARG(p[cu.size(0) - 1] <= total_rows, name, "ends at ", p[cu.size(0) - 1],
                  " but the tensor has only ", total_rows, " rows");
  }
  return cu.size(0) - 1;
}

}  // namespace nsa
