// Device-agnostic helpers shared by the CPU and CUDA backends of stochnorm_ext (csrc/ops_impl.h,
// csrc/cpu/, csrc/cuda/): output allocation with the poison fill, the memory format an output
// keeps, the accumulation type, how an (N, C, *S) input is walked as per-segment rows, the
// argument checks of the ops, the BGN grouping rule and the device launch counter. Everything
// is inline and uses only ATen tensor ops, so it works for tensors on any device.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "coefficients.h"

namespace stochnorm_ext::common {

// Device passes the ops have launched since the library was loaded (kernels on CUDA, passes
// and steps on the CPU; the poison fill of tests is not counted): csrc/ops_impl.h counts every
// pass, coefficient step and ATen launch it makes, the CUDA core its split merges. Read by
// the private op stochnorm_ext::_device_launches, so that tests assert launches per op.
inline std::atomic<int64_t>& launch_counter() {
  static std::atomic<int64_t> launches{0};
  return launches;
}

inline void count_launch(int64_t n = 1) { launch_counter().fetch_add(n, std::memory_order_relaxed); }

// True when STOCHNORM_EXT_POISON_OUTPUTS=1 (read once): every output allocated by the ops is
// filled with NaN first, so an element a kernel leaves unwritten fails the tests.
inline bool poison_outputs() {
  static const bool enabled = [] {
    const char* value = std::getenv("STOCHNORM_EXT_POISON_OUTPUTS");
    return value != nullptr && std::string(value) == "1";
  }();
  return enabled;
}

// at::empty + the poison fill (on the tensor's device, on the current stream).
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  at::Tensor t = at::empty(sizes, options.memory_format(format));
  if (poison_outputs()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// t in `dtype`, dense in `format`: t itself when it already is, else one conversion kernel
// (counted: a launch the op makes for this argument).
inline at::Tensor dense_as(const at::Tensor& t, at::ScalarType dtype,
                          at::MemoryFormat format = at::MemoryFormat::Contiguous) {
  if (t.scalar_type() == dtype && t.is_contiguous(format)) return t;
  count_launch();
  // (to() without copy=true would alias a permuted tensor whose suggested format matches.)
  if (t.scalar_type() == dtype) return t.contiguous(format);
  return t.to(dtype, /*non_blocking=*/false, /*copy=*/true, format);
}

// The memory format an output keeps: channels_last(_3d) for such inputs, contiguous otherwise
// (inputs with other strides are made contiguous first). The same rule as
// stochnorm_ext._rules.memory_format_of, which the fake implementations use.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

// Statistics and tables: float32, or float64 for float64 input.
inline at::ScalarType accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline int64_t spatial_size(const at::Tensor& x) {
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return S;
}

// How a dense (N, C, *S) tensor is walked, its S positions cut into P pieces of L = S / P:
//  planar      (contiguous input): memory (N, C * P, L), row r = c * P + p is segment r.
//  interleaved (channels_last input): memory (N, P, L, C), the C channels of one position
//              contiguous; the value at (n, p, l, c) belongs to segment c * P + p.
// A contiguous input with one value per row (L == 1, e.g. a 2d (N, C) input) is walked as
// interleaved with C * P "channels" and P = 1: rows of contiguous values, one per segment.
// Segment s is entry s of the (C, P) tables (row-major), in both layouts.
//
// This is the one description of the geometry; the kernels (csrc/cpu/, csrc/cuda/) only say
// how they split it among threads. "planar" and "interleaved" name the walk everywhere in
// csrc/. "channels_last" names torch's memory format only (at::MemoryFormat::ChannelsLast and
// ChannelsLast3d, which outputs keep: output_format): a channels_last input is walked
// interleaved, but so is a contiguous input with L == 1, so the two words are not synonyms.
struct SegmentGeometry {
  int64_t N = 0;
  int64_t C = 0;  // channels as walked (C * P in the L == 1 case)
  int64_t P = 1;  // pieces per channel as walked
  int64_t L = 1;  // values per (sample, segment)
  bool interleaved = false;

  int64_t segments() const { return C * P; }
  int64_t count() const { return N * L; }  // values per segment
};

// An input made dense in its output format, and how the kernels walk it.
struct SegmentInput {
  at::Tensor x;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t channels = 0;  // C and P of the (C, P) tables (the geometry may read them as (C*P, 1))
  int64_t pieces = 1;
  SegmentGeometry geometry;
};

inline SegmentInput segment_input(const at::Tensor& x, int64_t pieces) {
  TORCH_CHECK(x.dim() >= 2, "stochnorm_ext: expected an input of shape (N, C, *spatial), got ", x.dim(), "D");
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "stochnorm_ext: expected a float16, bfloat16, float32 or float64 input, got ", x.scalar_type());
  TORCH_CHECK(pieces >= 1, "stochnorm_ext: pieces must be >= 1, got ", pieces);
  const int64_t S = spatial_size(x);
  TORCH_CHECK(S % pieces == 0, "stochnorm_ext: cannot cut the ", S, " spatial positions of input ", x.sizes(),
              " into ", pieces, " equal pieces");
  SegmentInput in;
  in.format = output_format(x);
  in.x = dense_as(x, x.scalar_type(), in.format);
  in.channels = x.size(1);
  in.pieces = pieces;
  SegmentGeometry& g = in.geometry;
  g.N = x.size(0);
  g.C = x.size(1);
  g.P = pieces;
  g.L = S / pieces;
  g.interleaved = in.format != at::MemoryFormat::Contiguous;
  if (!g.interleaved && g.L == 1) {
    g.C = in.channels * pieces;
    g.P = 1;
    g.interleaved = true;
  }
  return in;
}

// `other` (e.g. dy) laid out like `like` (made dense in the same format if it is not).
inline at::Tensor same_layout(const at::Tensor& other, const SegmentInput& like) {
  TORCH_CHECK(other.sizes() == like.x.sizes(), "stochnorm_ext: expected a gradient of shape ", like.x.sizes(),
              ", got ", other.sizes());
  TORCH_CHECK(other.device() == like.x.device(), "stochnorm_ext: the gradient is on ", other.device(),
              " but the input is on ", like.x.device());
  return dense_as(other, like.x.scalar_type(), like.format);
}

// A (C, P) (or (C,) when P == 1) table argument in the accumulation type, contiguous.
inline at::Tensor table_arg(const at::Tensor& t, const SegmentInput& in, const char* name) {
  TORCH_CHECK(t.numel() == in.channels * in.pieces, "stochnorm_ext: ", name,
              " must hold one value per (channel, piece), ", in.channels, " x ", in.pieces, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == in.x.device(), "stochnorm_ext: ", name, " is on ", t.device(), " but the input is on ",
              in.x.device());
  return dense_as(t, accumulate_type(in.x.scalar_type()));
}

inline at::TensorOptions table_options(const SegmentInput& in) {
  return in.x.options().dtype(accumulate_type(in.x.scalar_type()));
}

// The statistics tables (segment mean and m2) are float64 whatever the input: a float mean
// rounded at a large common offset (1e6 + randn) would lose the spread between segments that
// are merged into one statistic (BGN groups of channels, distributed ranks).
inline at::TensorOptions stats_table_options(const SegmentInput& in) { return in.x.options().dtype(at::kDouble); }

// The number of pieces P of a (C, P) table, or 1 for a (C,) table.
inline int64_t pieces_of(const at::Tensor& input, const at::Tensor& table) {
  TORCH_CHECK(input.dim() >= 2, "stochnorm_ext: expected an input of shape (N, C, *spatial), got ", input.dim(), "D");
  TORCH_CHECK((table.dim() == 1 || table.dim() == 2) && table.size(0) == input.size(1),
              "stochnorm_ext: expected a (C, P) or (C,) table with C = ", input.size(1), ", got shape ", table.sizes());
  return table.dim() == 2 ? table.size(1) : 1;
}

// ------------------------------------------------------------------------ layer-op arguments
inline void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 2, op, ": expected an input of shape (N, C, *spatial), got ", x.dim(), "D");
  TORCH_CHECK(x.numel() > 0, op, ": expected a non-empty input, got shape ", x.sizes());
}

// A per-channel (or per-group) vector in the accumulation type, contiguous; undefined if absent.
inline at::Tensor acc_vector(const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& x, const char* op,
                             const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->numel() == size && t->dim() == 1, op, ": ", name, " must have shape (", size, "), got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but the input is on ", x.device());
  return dense_as(*t, accumulate_type(x.scalar_type()));
}

inline at::Tensor required_acc_vector(const std::optional<at::Tensor>& t, int64_t size, const at::Tensor& x,
                                      const char* op, const char* name) {
  TORCH_CHECK(t.has_value() && t->defined(), op, ": ", name, " is required here");
  return acc_vector(t, size, x, op, name);
}

// A bool tensor of the given shape, contiguous.
inline at::Tensor bool_arg(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x, const char* op,
                           const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBool && t.sizes() == shape, op, ": ", name, " must be a bool tensor of shape ",
              shape, ", got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but the input is on ", x.device());
  return dense_as(t, at::kBool);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<T>() : nullptr;
}

// What the apply pass reads (coefficients::ApplyTables): dense tables in the accumulation type,
// checked by the op that builds them. Per statistic (norm_apply: spg, P of the grouping) or
// per segment (the segment_apply op: var undefined, weight = scale, bias = shift, spg = P = 1).
struct ApplyArgs {
  at::Tensor center, var, weight, bias;
  int64_t segments_per_stat = 1, pieces = 1;
  double eps = 0.0;

  template <typename T>
  coefficients::ApplyTables<T> tables() const {
    return {segments_per_stat, pieces, center.const_data_ptr<T>(), ptr_or_null<T>(var), ptr_or_null<T>(weight),
            ptr_or_null<T>(bias), T(eps)};
  }
};

// Parameter gradients come back in the weight's dtype (the accumulation type without weight).
inline at::Tensor in_weight_dtype(const at::Tensor& grad, const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? dense_as(grad, weight->scalar_type()) : grad;
}

// BGN: G | C gives groups of C/G whole channels (P = 1); G = P * C cuts each channel into P
// pieces of its flattened positions, one group per (channel, piece).
inline int64_t bgn_pieces(const at::Tensor& input, int64_t num_groups, const char* op) {
  const int64_t C = input.size(1);
  TORCH_CHECK(num_groups >= 1 && (C % num_groups == 0 || num_groups % C == 0), op, ": num_groups=", num_groups,
              " must divide the ", C, " channels or be a multiple of them");
  const int64_t pieces = C % num_groups == 0 ? 1 : num_groups / C;
  TORCH_CHECK(spatial_size(input) % pieces == 0, op, ": num_groups=", num_groups, " cuts each channel into ", pieces,
              " pieces, which needs the spatial size (", spatial_size(input), " positions of input ", input.sizes(),
              ") to be a multiple of ", pieces);
  return pieces;
}

}  // namespace stochnorm_ext::common
