// Fused CPU kernels for Block AttnRes: decoding, prefill and training (forward and backward).
//
// The equations are those of SourceStack in modeling_attnres.py (spec §5, the two-phase computation); only the
// cost differs. Decoding a token runs the depth attention once per sublayer on one token, where each PyTorch
// op's fixed cost is the whole cost: the eager form takes six ops per sublayer and about twenty per block,
// this one call each. Between two calls the decoder's weights stream through the caches, so the kernels also
// read as little as they can: each pseudo-query and key-norm weight once per token, nothing precomputed.
// On a prompt the cost is memory traffic instead: the kernels go token by token (threads split the tokens),
// so each token's sources are read from memory once per block and its partial sum once per sublayer, every
// further pass over them hitting the L1 cache; the eager form reads each tensor once per op.
//
// Per query column k (every sublayer, then the final aggregation) the effective query is
//     q_k = w_k * gamma_k * sqrt(d),   so that   w_k . RMSNorm(v) = q_k . v / sqrt(|v|^2 + d eps),
// as in SourceStack. Logits, softmax and sums are fp32; sources, partial sums and results are in the
// model's dtype. Built by hf_attnres.kernels with the system's C++ compiler into a Python module (pybind11,
// not torch.ops: a custom op called from Python costs several times a pybind11 call, about as much as the ops
// it replaces). Decoding calls its two phases through plain CPython functions instead (see bound_calls).
//
// In inference a sublayer's input h is read only by its RMSNorm (input_layernorm, post_attention_layernorm,
// and the final norm after the final aggregation), so the kernels can hand back RMSNorm(h) instead of h (see
// `reading_norm`): h then never leaves the L1 cache, and the norm's four eager ops (each a pass over [tokens, d]
// on a prompt, a few microseconds of fixed cost per token when decoding) are gone. In training the same norm
// runs as one pass forward and one backward (`train_norm`), where the eager one takes about six ops forward and
// ten backward and keeps a normalised copy of h for backward besides h.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

// Bump with any change of the interface or its meaning: the modeling code asks for the version it knows.
constexpr int ABI = 5;

namespace {

// Tokens per thread below which a call stays on the calling thread (decoding: one token, or a short prompt)
constexpr int64_t kGrain = 64;

// The row loops below are built for three instruction sets where the compiler can (GCC 11+ on x86-64 Linux),
// and the loader picks the widest the CPU runs: AVX-512, AVX2 with FMA, or SSE2. One build then serves every
// x86-64 CPU, as the build cache may be shared between machines; SSE2 alone made a prompt's phase 1 slower
// than the eager form's vectorised torch ops.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

constexpr int64_t kLanes = 16, kQueries = 8;

// kLanes floats as one value (GCC/Clang vector extensions): one AVX-512 register, two AVX or four SSE ones, so
// the compiler keeps sums in registers whatever it makes of the loops around them.
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

#define LANES_INLINE __attribute__((always_inline)) inline  // into each clone, compiled for its instruction set

LANES_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

LANES_INLINE void store_lanes(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

LANES_INLINE float total(vfloat v) {
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += v[l];
  return sum;
}

// out[k] += x . rows[k] for KN rows over the first `body` elements (a multiple of kLanes), each summed in kLanes
// lanes of its own: a single running sum would make every add wait for the one before it.
template <int KN>
LANES_INLINE void dot_lanes(const float* x, const float* const* rows, int64_t body, float* out) {
  vfloat acc[KN] = {};
  for (int64_t j = 0; j < body; j += kLanes) {
    const vfloat xj = load(x + j);
    for (int k = 0; k < KN; ++k) acc[k] += xj * load(rows[k] + j);
  }
  for (int k = 0; k < KN; ++k) out[k] = total(acc[k]);
}

// out[k] = x . rows[k] for K >= 1 rows; returns |x|^2. One pass over x per 8 rows.
VECTOR_CLONES float dots(const float* x, const float* const* rows, int64_t K, int64_t d, float* out) {
  const int64_t body = d - d % kLanes;
  float square;
  dot_lanes<1>(x, &x, body, &square);
  for (int64_t j = body; j < d; ++j) square += x[j] * x[j];
  for (int64_t k0 = 0; k0 < K; k0 += kQueries) {
    const int64_t kn = std::min(kQueries, K - k0);
    const float* const* r = rows + k0;
    switch (kn) {  // a constant count, so that the sums stay in registers
      case 1: dot_lanes<1>(x, r, body, out + k0); break;
      case 2: dot_lanes<2>(x, r, body, out + k0); break;
      case 3: dot_lanes<3>(x, r, body, out + k0); break;
      case 4: dot_lanes<4>(x, r, body, out + k0); break;
      case 5: dot_lanes<5>(x, r, body, out + k0); break;
      case 6: dot_lanes<6>(x, r, body, out + k0); break;
      case 7: dot_lanes<7>(x, r, body, out + k0); break;
      default: dot_lanes<8>(x, r, body, out + k0); break;
    }
    for (int64_t k = 0; k < kn; ++k)
      for (int64_t j = body; j < d; ++j) out[k0 + k] += x[j] * r[k][j];
  }
  return square;
}

// |x|^2
VECTOR_CLONES float square_sum(const float* x, int64_t d) {
  const int64_t body = d - d % kLanes;
  float square;
  dot_lanes<1>(x, &x, body, &square);
  for (int64_t j = body; j < d; ++j) square += x[j] * x[j];
  return square;
}

// h = sum_i c[i] rows[i] over `count` rows (accumulate: h += ...), each kLanes-wide slice of h summed in a
// register and stored once, not once per row.
VECTOR_CLONES void mix(float* h, const float* c, const float* const* rows, int64_t count, int64_t d, bool accumulate) {
  const int64_t body = d - d % kLanes;
  for (int64_t j = 0; j < body; j += kLanes) {
    vfloat acc = accumulate ? load(h + j) : vfloat{};
    for (int64_t i = 0; i < count; ++i) acc += c[i] * load(rows[i] + j);
    store_lanes(h + j, acc);
  }
  for (int64_t j = body; j < d; ++j) {
    float acc = accumulate ? h[j] : 0.f;
    for (int64_t i = 0; i < count; ++i) acc += c[i] * rows[i][j];
    h[j] = acc;
  }
}

// RMSNorm as transformers' LlamaRMSNorm computes it from h in the model's dtype (scalar_t): in fp32,
// y = g * (h * (1 / sqrt(mean(h^2) + eps))), the product with g in scalar_t. `h` is the fp32 row the kernel
// computed (overwritten by h rounded to scalar_t).
template <typename scalar_t>
void reading_norm(float* h, const float* g, float eps, int64_t d, scalar_t* out) {
  if constexpr (!std::is_same_v<scalar_t, float>)
    for (int64_t j = 0; j < d; ++j) h[j] = static_cast<float>(static_cast<scalar_t>(h[j]));
  const float r = 1.f / std::sqrt(square_sum(h, d) / static_cast<float>(d) + eps);
  for (int64_t j = 0; j < d; ++j)
    out[j] = static_cast<scalar_t>(g[j] * static_cast<float>(static_cast<scalar_t>(h[j] * r)));
}

// q = w * g * scale
VECTOR_CLONES void scaled_product(float* q, const float* w, const float* g, float scale, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) q[j] = w[j] * g[j] * scale;
}

// o = x + w (m - x)
VECTOR_CLONES void lerp(float* o, const float* x, const float* m, float w, int64_t d) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) o[j] = x[j] + w * (m[j] - x[j]);
}

// A row as fp32: itself if it is, else converted into `scratch`.
template <typename scalar_t>
inline const float* as_float(const scalar_t* x, int64_t d, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    for (int64_t j = 0; j < d; ++j) scratch[j] = static_cast<float>(x[j]);
    return scratch;
  }
}

// Where to compute a result row that goes to `out`: there if it is fp32, else in `scratch` (then `store`).
template <typename scalar_t>
inline float* float_row(scalar_t* out, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>)
    return out;
  else
    return scratch;
}

template <typename scalar_t>
inline void store(scalar_t* out, const float* row, int64_t d) {
  if constexpr (!std::is_same_v<scalar_t, float>)
    for (int64_t j = 0; j < d; ++j) out[j] = static_cast<scalar_t>(row[j]);
}

// Ask for every cache line of [p, p + bytes) at once. Between two calls the decoder's weights have streamed
// through the caches, so what a call reads comes from memory; the loops alone would wait for it a few lines at
// a time, these requests overlap. Measured in the model: phase 2 13 -> 12 us per call, phase 1 53 -> 46 us per
// block, a gain of the size of the run-to-run noise.
inline void prefetch(const void* p, size_t bytes, bool write = false) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (size_t offset = 0; offset < bytes; offset += 64) {
    if (write)
      __builtin_prefetch(c + offset, 1);
    else
      __builtin_prefetch(c + offset);
  }
#endif
}

// A plain dense CPU tensor of n elements: not sharded, offloaded or a tensor subclass (e.g. a DTensor)
bool plain(const at::Tensor& t, int64_t n) {
  return t.defined() && t.device().is_cpu() && t.layout() == at::kStrided && t.numel() == n &&
         !t.unsafeGetTensorImpl()->is_python_dispatch();
}

// empty_like without the dispatcher's round trips (a few per call, each a cold code path between two calls)
at::Tensor new_like(const at::Tensor& t) { return at::detail::empty_cpu(t.sizes(), t.scalar_type()); }

at::Tensor fp32(const at::Tensor& t) {
  return (t.scalar_type() == at::kFloat ? t : t.to(at::kFloat)).contiguous();
}

std::vector<at::Tensor> contiguous(const std::vector<at::Tensor>& tensors, int64_t numel) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == tensors[0].scalar_type() && t.numel() == numel,
                "hf_attnres kernels: tensors of one dtype on the CPU with ", numel, " elements each");
    out.push_back(t.contiguous());
  }
  return out;
}

template <typename T>
std::vector<T*> pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<T*> out;
  for (const auto& t : tensors) out.push_back(static_cast<T*>(t.data_ptr()));
  return out;
}

// f(begin, end, buffer) over tokens [0, T), `buffer` holding `floats` floats of scratch. Decoding-sized calls
// run on the calling thread with `kept`, a buffer kept between calls (a fresh one costs a malloc and a memset
// of a few KB per call); larger ones are split over torch's threads, each with a buffer of its own.
template <typename F>
void over_tokens(int64_t T, size_t floats, std::vector<float>& kept, const F& f) {
  if (T <= kGrain) {
    if (kept.size() < floats) kept.resize(floats);
    f(int64_t{0}, T, kept.data());
    return;
  }
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(floats);
    f(begin, end, buffer.data());
  });
}

// One token's depth attention weights over its n sources x_i for K queries q_k: a[i K + k] = softmax over i of
// (q_k . x_i) inv_rms_i with inv_rms_i = 1 / sqrt(|x_i|^2 / divisor + floor), and lse[k]. The products and
// inv_rms go to `dot` [n K] and `inv_rms` [n] where given (training keeps them for backward).
void token_softmax(const float* const* x, int64_t n, const float* const* q, int64_t K, int64_t d, float divisor,
                   float floor, float* a, float* lse, float* dot = nullptr, float* inv_rms = nullptr) {
  for (int64_t i = 0; i < n; ++i) {
    float* products = dot != nullptr ? dot + i * K : a + i * K;
    const float r = 1.f / std::sqrt(dots(x[i], q, K, d, products) / divisor + floor);
    if (inv_rms != nullptr) inv_rms[i] = r;
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = products[k] * r;
  }
  for (int64_t k = 0; k < K; ++k) {
    float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, a[i * K + k]);
    for (int64_t i = 0; i < n; ++i) sum += (a[i * K + k] = std::exp(a[i * K + k] - m));  // one exp per logit
    lse[k] = m + std::log(sum);
    for (int64_t i = 0; i < n; ++i) a[i * K + k] /= sum;
  }
}

// The state of one inference forward: the pseudo-queries and key-norm weights of every query column (with the
// weights and epsilons of the RMSNorms that read the columns' results, where it applies them), and phase 1's
// results for the current block (mixed [T, S, d], lse [T, S]) that its sublayers' phase 2 reads.
class Decoder {
 public:
  Decoder(std::vector<at::Tensor> w, std::vector<at::Tensor> gamma, std::vector<at::Tensor> norm_weight,
          std::vector<double> norm_eps, int64_t tokens, int64_t d, int64_t block_size, double eps)
      : w_(std::move(w)), gamma_(std::move(gamma)), norm_weight_(std::move(norm_weight)),
        norm_eps_(std::move(norm_eps)), T_(tokens), d_(d), S_(block_size),
        floor2_(static_cast<float>(d * eps)), scale_(static_cast<float>(std::sqrt(static_cast<double>(d)))),
        mixed_(at::detail::empty_cpu({block_size, tokens, d}, at::kFloat)),
        lse_(at::detail::empty_cpu({tokens, block_size}, at::kFloat)), q_(static_cast<size_t>(block_size * d)) {}

  // nullptr (None) where a parameter is not plain: the caller takes the eager path, which has its own checks.
  // With `norm_weight` and `norm_eps` (one per column, or both empty) the calls return RMSNorm(h), not h.
  static std::unique_ptr<Decoder> create(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& gamma,
                                         const std::vector<at::Tensor>& norm_weight,
                                         const std::vector<double>& norm_eps, int64_t tokens, int64_t d,
                                         int64_t block_size, double eps) {
    TORCH_CHECK(!w.empty() && w.size() == gamma.size() && block_size >= 1 && tokens >= 1,
                "hf_attnres kernels: one key-norm weight per pseudo-query, and a block size");
    TORCH_CHECK(norm_weight.size() == norm_eps.size() && (norm_weight.empty() || norm_weight.size() == w.size()),
                "hf_attnres kernels: no reading norms, or a weight and an epsilon for each of the ", w.size(),
                " columns");
    std::vector<at::Tensor> w32, g32, n32;
    bool reads_parameters = true;
    const auto keep = [&](std::vector<at::Tensor>& kept, const at::Tensor& parameter) {
      kept.push_back(fp32(parameter));
      reads_parameters = reads_parameters && kept.back().is_same(parameter);
    };
    for (size_t k = 0; k < w.size(); ++k) {
      if (!plain(w[k], d) || !plain(gamma[k], d)) return nullptr;
      keep(w32, w[k]);
      keep(g32, gamma[k]);
    }
    for (const auto& weight : norm_weight) {
      if (!plain(weight, d)) return nullptr;
      keep(n32, weight);
    }
    auto decoder = std::make_unique<Decoder>(std::move(w32), std::move(g32), std::move(n32), norm_eps, tokens, d,
                                             block_size, eps);
    decoder->reads_parameters_ = reads_parameters;
    return decoder;
  }

  int64_t columns() const { return static_cast<int64_t>(w_.size()); }
  // whether its calls return RMSNorm(h) (the reading norms' weights were given)
  bool normalises() const { return !norm_weight_.empty(); }
  // whether it reads the parameters themselves (fp32, contiguous), not copies: then it sees in-place changes
  bool reads_parameters() const { return reads_parameters_; }

  // Phase 1 for query columns [first, last) over the completed sources: softmax over them of
  // q_k . v_i / sqrt(|v_i|^2 + d eps), and the weighted sum of their raw values. Keeps the results of columns
  // first+1 .. last-1 for phase 2 and returns the first one's (the block's first sublayer reads it as is) as a
  // tensor of its own, or its RMSNorm (`normalises`). With [first, last) = [K-1, K] it is the final aggregation.
  at::Tensor phase1(const std::vector<at::Tensor>& sources, int64_t first, int64_t last) {
    const int64_t n = static_cast<int64_t>(sources.size());
    TORCH_CHECK(n >= 1 && 0 <= first && first < last && last <= columns() && last - first <= S_,
                "hf_attnres kernels: phase1 of columns [", first, ", ", last, ") over ", n, " sources");
    const auto values = contiguous(sources, T_ * d_);
    auto out = new_like(values[0]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values[0].scalar_type(), "hf_attnres phase1", [&] {
      phase1_impl<scalar_t>(values, first, last, out.data_ptr<scalar_t>());
    });
    return out;
  }

  // Phase 2 for the block's s-th sublayer (query column `column`): the online-softmax merge of its partial sum
  // p, h = lerp(p, mixed_s, 1 - beta) with 1 - beta = sigmoid(lse_s - q . p / sqrt(|p|^2 + d eps)); or RMSNorm(h).
  at::Tensor phase2(const at::Tensor& partial, int64_t column, int64_t s) {
    TORCH_CHECK(partial.device().is_cpu() && partial.numel() == T_ * d_ && 0 < s && s < S_ && 0 <= column &&
                    column < columns(),
                "hf_attnres kernels: phase2 of column ", column, " (sublayer ", s, " of its block)");
    const auto p = partial.contiguous();
    auto out = new_like(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "hf_attnres phase2", [&] {
      phase2_impl<scalar_t>(p.const_data_ptr<scalar_t>(), column, s, out.data_ptr<scalar_t>());
    });
    return out;
  }

 private:
  void prefetch_query(int64_t column) {
    prefetch(w_[column].const_data_ptr<float>(), d_ * sizeof(float));
    prefetch(gamma_[column].const_data_ptr<float>(), d_ * sizeof(float));
    if (normalises()) prefetch(norm_weight_[column].const_data_ptr<float>(), d_ * sizeof(float));
  }

  // q_column into q (read once per call: the parameters are cold by then)
  void query(int64_t column, float* q) const {
    const float* w = w_[column].const_data_ptr<float>();
    const float* g = gamma_[column].const_data_ptr<float>();
    scaled_product(q, w, g, scale_, d_);  // (w * gamma) * sqrt(d), as SourceStack
  }

  // Whether a call on T tokens is decoding-sized: then it asks for its memory up front (see `prefetch`); a
  // prompt's loop over the tokens streams through it instead.
  bool small() const { return T_ <= kGrain; }

  // (out of the dispatch macro's lambda: a macro argument cannot hold the simd pragmas)
  template <typename scalar_t>
  void phase1_impl(const std::vector<at::Tensor>& values, int64_t first, int64_t last, scalar_t* out) {
    const int64_t n = static_cast<int64_t>(values.size()), K = last - first, d = d_, S = S_;
    const auto v = pointers<const scalar_t>(values);
    if (small()) {
      for (int64_t k = first; k < last; ++k) prefetch_query(k);
      for (int64_t i = 0; i < n; ++i) prefetch(v[i], T_ * d * sizeof(scalar_t));
      prefetch(mixed_.data_ptr<float>(), T_ * S * d * sizeof(float), true);
    }
    std::vector<const float*> rows(K);
    for (int64_t k = 0; k < K; ++k) {
      query(first + k, q_.data() + k * d);
      rows[k] = q_.data() + k * d;
    }
    float* mixed = mixed_.data_ptr<float>();
    float* lse = lse_.data_ptr<float>();
    const float* norm = normalises() ? norm_weight_[first].const_data_ptr<float>() : nullptr;
    over_tokens(T_, n * K + n + (n + 1) * d, scratch_, [&](int64_t begin, int64_t end, float* buffer) {
      // a: the logits, then the softmax weights alpha_{i -> k}; x: the token's sources as fp32
      float *a = buffer, *alpha = a + n * K, *scratch = alpha + n;
      std::vector<const float*> x(n);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < n; ++i) x[i] = as_float(v[i] + t * d, d, scratch + i * d);
        token_softmax(x.data(), n, rows.data(), K, d, 1.f, floor2_, a, lse + t * S);
        for (int64_t k = 0; k < K; ++k) {  // column 0 goes to `out`, the others stay for phase 2
          float* h = k > 0 ? mixed + (k * T_ + t) * d : norm ? scratch + n * d : float_row(out + t * d, scratch + n * d);
          for (int64_t i = 0; i < n; ++i) alpha[i] = a[i * K + k];
          mix(h, alpha, x.data(), n, d, false);
        }
        if (norm)
          reading_norm(scratch + n * d, norm, norm_eps_[first], d, out + t * d);
        else
          store(out + t * d, scratch + n * d, d);
      }
    });
  }

  template <typename scalar_t>
  void phase2_impl(const scalar_t* p, int64_t column, int64_t s, scalar_t* out) {
    const int64_t d = d_, S = S_;
    const float* mixed = mixed_.data_ptr<float>();
    const float* lse = lse_.data_ptr<float>();
    if (small()) {
      prefetch_query(column);
      prefetch(mixed + s * T_ * d, T_ * d * sizeof(float));
      prefetch(p, T_ * d * sizeof(scalar_t));
    }
    query(column, q_.data());
    const float* q = q_.data();
    const float* norm = normalises() ? norm_weight_[column].const_data_ptr<float>() : nullptr;
    over_tokens(T_, 2 * d, scratch_, [&](int64_t begin, int64_t end, float* scratch) {
      for (int64_t t = begin; t < end; ++t) {
        const float* x = as_float(p + t * d, d, scratch);
        float dot;
        const float square = dots(x, &q, 1, d, &dot);
        const float logit = dot / std::sqrt(square + floor2_);
        const float rest = 1.f / (1.f + std::exp(logit - lse[t * S + s]));
        float* h = norm ? scratch + d : float_row(out + t * d, scratch + d);
        lerp(h, x, mixed + (s * T_ + t) * d, rest, d);
        if (norm)
          reading_norm(h, norm, norm_eps_[column], d, out + t * d);
        else
          store(out + t * d, h, d);
      }
    });
  }

  std::vector<at::Tensor> w_, gamma_;  // fp32, per query column
  std::vector<at::Tensor> norm_weight_;  // fp32, per query column: the RMSNorm reading its result (or none)
  std::vector<double> norm_eps_;
  int64_t T_, d_, S_;
  float floor2_, scale_;
  // phase 1's results for the block: mixed [S, T, d] (each column's rows contiguous, so phase 2 reads one
  // stream) and lse [T, S], column k at index k - first
  at::Tensor mixed_, lse_;
  std::vector<float> q_, scratch_;  // the queries of a call's columns [S, d]; a decoding-sized call's scratch
  bool reads_parameters_ = false;
};


// ------------------------------------------------------------------------------------------------------------
// Training on CPU: the forward and backward of _Phase1 and _Phase2 in modeling_attnres.py, the same equations
// and the same saved tensors, token by token. The eager form passes over every [tokens, d] tensor once per op
// (S x n multiply-adds to mix a block, n + 1 products per sublayer in phase 2's backward, ...); here each
// token's rows are read from memory once per call and the rest of the work hits the L1 cache. Conventions as
// there: q_j = w_j * gamma_j (not scaled), inv_rms = 1 / sqrt(|v|^2 / d + eps), logits = (q_j . v) inv_rms.
// ------------------------------------------------------------------------------------------------------------

// The rows q_j (contiguous [S, d]) of queries [d, S]
at::Tensor query_rows(const at::Tensor& queries) {
  TORCH_CHECK(queries.dim() == 2 && queries.scalar_type() == at::kFloat && queries.device().is_cpu(),
              "hf_attnres kernels: fp32 CPU queries [d, S]");
  return queries.t().contiguous();
}

// A pointer to each row of `rows` (contiguous fp32 [S, d], from query_rows)
std::vector<const float*> row_pointers(const at::Tensor& rows) {
  std::vector<const float*> out;
  for (int64_t j = 0; j < rows.size(0); ++j) out.push_back(rows.const_data_ptr<float>() + j * rows.size(1));
  return out;
}

// The per-token shape of `like` (all but its last dimension) followed by `tail`
std::vector<int64_t> token_shape(const at::Tensor& like, std::initializer_list<int64_t> tail) {
  const auto lead = like.sizes().slice(0, like.dim() - 1);
  std::vector<int64_t> out(lead.begin(), lead.end());
  out.insert(out.end(), tail);
  return out;
}

// Per-thread accumulators for a gradient summed over tokens ([threads, size]), and their sum.
struct ThreadSums {
  at::Tensor sums;
  explicit ThreadSums(int64_t size) : sums(at::zeros({at::get_num_threads(), size}, at::kFloat)) {}
  float* mine() { return sums.data_ptr<float>() + at::get_thread_num() * sums.size(1); }
  at::Tensor total() { return sums.sum(0); }
};

// Phase 1 forward: (mixed_0, ..., mixed_{S-1}, lse [.., S], weights [.., n, S], dot [.., n, S], inv_rms [.., n, 1])
template <typename scalar_t>
void train_phase1_impl(const float* const* q, int64_t S, double eps, const std::vector<const scalar_t*>& v, int64_t T,
                       int64_t d, const std::vector<float*>& mixed, float* lse, float* weights, float* dot,
                       float* inv_rms) {
  const int64_t n = static_cast<int64_t>(v.size());
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(n * d), alpha(n);
    std::vector<const float*> x(n);
    for (int64_t t = begin; t < end; ++t) {
      float* w = weights + t * n * S;
      for (int64_t i = 0; i < n; ++i) x[i] = as_float(v[i] + t * d, d, scratch.data() + i * d);
      token_softmax(x.data(), n, q, S, d, static_cast<float>(d), static_cast<float>(eps), w, lse + t * S,
                    dot + t * n * S, inv_rms + t * n);
      for (int64_t j = 0; j < S; ++j) {
        for (int64_t i = 0; i < n; ++i) alpha[i] = w[i * S + j];
        mix(mixed[j] + t * d, alpha.data(), x.data(), n, d, false);
      }
    }
  });
}

std::vector<at::Tensor> train_phase1(const at::Tensor& queries, double eps, const std::vector<at::Tensor>& sources) {
  const int64_t d = sources.at(0).size(-1), T = sources[0].numel() / d, n = static_cast<int64_t>(sources.size());
  const auto values = contiguous(sources, T * d);
  const auto qrows = query_rows(queries);
  const int64_t S = qrows.size(0);
  TORCH_CHECK(qrows.size(1) == d, "hf_attnres kernels: queries of size ", d);
  const auto q = row_pointers(qrows);
  const auto& like = sources[0];
  auto opts = like.options().dtype(at::kFloat);
  std::vector<at::Tensor> mixed;
  for (int64_t j = 0; j < S; ++j) mixed.push_back(at::empty(like.sizes(), opts));
  auto lse = at::empty(token_shape(like, {S}), opts), weights = at::empty(token_shape(like, {n, S}), opts);
  auto dot = at::empty(token_shape(like, {n, S}), opts), inv_rms = at::empty(token_shape(like, {n, 1}), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values[0].scalar_type(), "hf_attnres train_phase1", [&] {
    train_phase1_impl<scalar_t>(q.data(), S, eps, pointers<const scalar_t>(values), T, d, pointers<float>(mixed),
                                lse.data_ptr<float>(), weights.data_ptr<float>(), dot.data_ptr<float>(),
                                inv_rms.data_ptr<float>());
  });
  mixed.insert(mixed.end(), {lse, weights, dot, inv_rms});
  return mixed;
}

// Phase 1 backward: (grad_queries [d, S], grad of each source in its dtype). merged[j]: phase 2's products
// <grad_mixed_j, v_i> [.., n] where it handed them down, else undefined (taken here).
template <typename scalar_t>
void train_phase1_backward_impl(const float* const* q, int64_t S, const std::vector<const scalar_t*>& v, int64_t T,
                                int64_t d, const std::vector<const float*>& grad_mixed, const float* grad_lse,
                                const std::vector<const float*>& merged, const float* weights, const float* dot,
                                const float* inv_rms, const std::vector<scalar_t*>& grad_v, ThreadSums& grad_q) {
  const int64_t n = static_cast<int64_t>(v.size());
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((n + 1) * d), gl(n * S), gw(n), grad_dot(S * n), coefficients(1 + 2 * S);
    std::vector<const float*> x(n), rows(1 + 2 * S);
    float* gq = grad_q.mine();
    for (int64_t t = begin; t < end; ++t) {
      const float* w = weights + t * n * S;
      for (int64_t i = 0; i < n; ++i) x[i] = as_float(v[i] + t * d, d, scratch.data() + i * d);
      for (int64_t j = 0; j < S; ++j) {  // softmax backward, d lse / d logits = weights
        const float* g = grad_mixed[j] + t * d;
        if (merged[j] != nullptr)
          for (int64_t i = 0; i < n; ++i) gw[i] = merged[j][t * n + i];
        else
          for (int64_t i = 0; i < n; ++i) dots(g, &x[i], 1, d, &gw[i]);
        float mean = 0.f;
        for (int64_t i = 0; i < n; ++i) mean += w[i * S + j] * gw[i];
        for (int64_t i = 0; i < n; ++i) gl[i * S + j] = w[i * S + j] * (gw[i] - mean + grad_lse[t * S + j]);
      }
      // grad v_i = grad_rms_i v_i + sum_j (grad_dot_ij q_j + w_ij grad_mixed_j), one pass over 1 + 2 S rows
      float* out = scratch.data() + n * d;
      rows[0] = nullptr;
      for (int64_t j = 0; j < S; ++j) {
        rows[1 + j] = q[j];
        rows[1 + S + j] = grad_mixed[j] + t * d;
      }
      for (int64_t i = 0; i < n; ++i) {
        const float r = inv_rms[t * n + i];
        float grad_rms = 0.f;
        for (int64_t j = 0; j < S; ++j) grad_rms -= gl[i * S + j] * dot[(t * n + i) * S + j];
        coefficients[0] = grad_rms * r * r * r / d;
        for (int64_t j = 0; j < S; ++j) {
          coefficients[1 + j] = grad_dot[j * n + i] = gl[i * S + j] * r;
          coefficients[1 + S + j] = w[i * S + j];
        }
        rows[0] = x[i];
        float* gv = float_row(grad_v[i] + t * d, out);
        mix(gv, coefficients.data(), rows.data(), 1 + 2 * S, d, false);
        store(grad_v[i] + t * d, out, d);
      }
      // grad q_j += sum_i grad_dot_ij v_i
      for (int64_t j = 0; j < S; ++j) mix(gq + j * d, grad_dot.data() + j * n, x.data(), n, d, true);
    }
  });
}

std::vector<at::Tensor> train_phase1_backward(const at::Tensor& queries, const std::vector<at::Tensor>& grad_mixed,
                                              const at::Tensor& grad_lse,
                                              const std::vector<std::optional<at::Tensor>>& merged,
                                              const at::Tensor& weights, const at::Tensor& dot,
                                              const at::Tensor& inv_rms, const std::vector<at::Tensor>& sources) {
  const int64_t d = sources.at(0).size(-1), T = sources[0].numel() / d, n = static_cast<int64_t>(sources.size());
  const auto values = contiguous(sources, T * d);
  const auto qrows = query_rows(queries);
  const int64_t S = qrows.size(0);
  TORCH_CHECK(static_cast<int64_t>(grad_mixed.size()) == S && static_cast<int64_t>(merged.size()) == S &&
                  grad_mixed[0].scalar_type() == at::kFloat && weights.numel() == T * n * S,
              "hf_attnres kernels: phase 1 backward with ", S, " fp32 gradients and ", n, " sources");
  const auto gm = contiguous(grad_mixed, T * d);
  const auto gl = grad_lse.contiguous(), w = weights.contiguous(), dt = dot.contiguous(), r = inv_rms.contiguous();
  const auto q = row_pointers(qrows);
  std::vector<const float*> g, m;
  std::vector<at::Tensor> kept;
  for (int64_t j = 0; j < S; ++j) {
    g.push_back(gm[j].const_data_ptr<float>());
    if (merged[j].has_value()) {
      kept.push_back(merged[j]->to(at::kFloat).contiguous());
      TORCH_CHECK(kept.back().numel() == T * n, "hf_attnres kernels: phase 2's products for ", n, " sources");
      m.push_back(kept.back().const_data_ptr<float>());
    } else {
      m.push_back(nullptr);
    }
  }
  std::vector<at::Tensor> grads;
  for (const auto& v : values) grads.push_back(at::empty_like(v));
  ThreadSums grad_q(S * d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values[0].scalar_type(), "hf_attnres train_phase1_backward",
                                  [&] {
    train_phase1_backward_impl<scalar_t>(q.data(), S, pointers<const scalar_t>(values), T, d, g,
                                         gl.const_data_ptr<float>(), m, w.const_data_ptr<float>(),
                                         dt.const_data_ptr<float>(), r.const_data_ptr<float>(),
                                         pointers<scalar_t>(grads), grad_q);
  });
  grads.insert(grads.begin(), grad_q.total().view({S, d}).t());
  return grads;
}

// Phase 2 forward: h = lerp(mixed, partial, beta), beta = sigmoid(q . p inv_rms - lse), into `mixed` if `in_place`.
// Returns (h, beta [..], dot [.., 1], inv_rms [.., 1]).
template <typename scalar_t>
void train_phase2_impl(const float* mixed, const scalar_t* p, const float* q, const float* lse, double eps, int64_t T,
                       int64_t d, float* h, float* beta, float* dot, float* inv_rms) {
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(d);
    for (int64_t t = begin; t < end; ++t) {
      const float* x = as_float(p + t * d, d, scratch.data());
      const float r = 1.f / std::sqrt(dots(x, &q, 1, d, dot + t) / d + static_cast<float>(eps));
      inv_rms[t] = r;
      const float b = 1.f / (1.f + std::exp(lse[t] - dot[t] * r));
      beta[t] = b;
      lerp(h + t * d, mixed + t * d, x, b, d);
    }
  });
}

std::vector<at::Tensor> train_phase2(const at::Tensor& mixed, const at::Tensor& partial, const at::Tensor& query,
                                     const at::Tensor& lse, double eps, bool in_place) {
  const int64_t d = partial.size(-1), T = partial.numel() / d;
  TORCH_CHECK(mixed.scalar_type() == at::kFloat && mixed.numel() == T * d && query.numel() == d &&
                  query.scalar_type() == at::kFloat && lse.numel() == T && (!in_place || mixed.is_contiguous()),
              "hf_attnres kernels: phase 2 on fp32 phase-1 results of ", T, " x ", d);
  const auto p = partial.contiguous(), m = mixed.contiguous(), q = query.contiguous();
  const auto l = lse.to(at::kFloat).contiguous();
  auto h = in_place ? mixed : at::empty_like(m);
  auto opts = m.options();
  auto beta = at::empty(token_shape(partial, {}), opts);
  auto dot = at::empty(token_shape(partial, {1}), opts), inv_rms = at::empty(token_shape(partial, {1}), opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "hf_attnres train_phase2", [&] {
    train_phase2_impl<scalar_t>(m.const_data_ptr<float>(), p.const_data_ptr<scalar_t>(), q.const_data_ptr<float>(),
                                l.const_data_ptr<float>(), eps, T, d, h.data_ptr<float>(), beta.data_ptr<float>(),
                                dot.data_ptr<float>(), inv_rms.data_ptr<float>());
  });
  return {h, beta, dot, inv_rms};
}

// Phase 2 backward: (grad_mixed, phase 1's products <grad_mixed, v_i> [.., n], grad_partial in its dtype,
// grad_query [d], grad_lse [..]). <grad, mixed> = sum_i weights_i <grad, v_i>: mixed itself is not kept.
template <typename scalar_t>
void train_phase2_backward_impl(const float* grad, const scalar_t* p, const float* q, const float* dot,
                                const float* inv_rms, const float* beta, const float* weights,
                                const std::vector<const scalar_t*>& v, int64_t T, int64_t d, float* grad_mixed,
                                float* merge, scalar_t* grad_p, float* grad_lse, ThreadSums& grad_q) {
  const int64_t n = static_cast<int64_t>(v.size());
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((n + 2) * d), products(n + 1);
    std::vector<const float*> rows(n + 1);
    float* gq = grad_q.mine();
    for (int64_t t = begin; t < end; ++t) {
      const float* g = grad + t * d;
      rows[0] = as_float(p + t * d, d, scratch.data());
      for (int64_t i = 0; i < n; ++i) rows[i + 1] = as_float(v[i] + t * d, d, scratch.data() + (i + 1) * d);
      dots(g, rows.data(), n + 1, d, products.data());
      const float b = beta[t], r = inv_rms[t];
      float mixed_product = 0.f;
      for (int64_t i = 0; i < n; ++i) mixed_product += weights[t * n + i] * products[i + 1];
      const float grad_logit = (products[0] - mixed_product) * b * (1.f - b);
      grad_lse[t] = -grad_logit;
      for (int64_t i = 0; i < n; ++i) merge[t * n + i] = products[i + 1] * (1.f - b);
      const float grad_dot = grad_logit * r, grad_rms = -grad_logit * dot[t] * r * r * r / d;
      float* gp = float_row(grad_p + t * d, scratch.data() + (n + 1) * d);
      const float* x = rows[0];
      float* gm = grad_mixed + t * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        gp[j] = grad_dot * q[j] + grad_rms * x[j] + b * g[j];
        gm[j] = (1.f - b) * g[j];
      }
      store(grad_p + t * d, gp, d);
      mix(gq, &grad_dot, &x, 1, d, true);
    }
  });
}

std::vector<at::Tensor> train_phase2_backward(const at::Tensor& grad, const at::Tensor& partial,
                                              const at::Tensor& query, const at::Tensor& dot,
                                              const at::Tensor& inv_rms, const at::Tensor& beta,
                                              const at::Tensor& weights, const std::vector<at::Tensor>& sources) {
  const int64_t d = partial.size(-1), T = partial.numel() / d, n = static_cast<int64_t>(sources.size());
  TORCH_CHECK(grad.numel() == T * d && query.numel() == d && weights.numel() == T * n && n >= 1,
              "hf_attnres kernels: phase 2 backward of ", T, " x ", d, " over ", n, " sources");
  const auto g = grad.to(at::kFloat).contiguous(), p = partial.contiguous(), q = query.contiguous();
  const auto dt = dot.contiguous(), r = inv_rms.contiguous(), b = beta.contiguous(), w = weights.contiguous();
  const auto values = contiguous(sources, T * d);
  TORCH_CHECK(values[0].scalar_type() == p.scalar_type(), "hf_attnres kernels: sources and partial sum of one dtype");
  auto grad_mixed = at::empty_like(g), grad_p = at::empty_like(p);
  auto merge = at::empty(w.sizes(), w.options()), grad_lse = at::empty(b.sizes(), b.options());
  ThreadSums grad_q(d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "hf_attnres train_phase2_backward", [&] {
    train_phase2_backward_impl<scalar_t>(g.const_data_ptr<float>(), p.const_data_ptr<scalar_t>(),
                                         q.const_data_ptr<float>(), dt.const_data_ptr<float>(),
                                         r.const_data_ptr<float>(), b.const_data_ptr<float>(),
                                         w.const_data_ptr<float>(), pointers<const scalar_t>(values), T, d,
                                         grad_mixed.data_ptr<float>(), merge.data_ptr<float>(),
                                         grad_p.data_ptr<scalar_t>(), grad_lse.data_ptr<float>(), grad_q);
  });
  return {grad_mixed, merge, grad_p, grad_q.total(), grad_lse};
}

// ------------------------------------------------------------------------------------------------------------
// Training's reading norm: x = RMSNorm(h) as LlamaRMSNorm computes it (see `reading_norm`) from the fp32 depth-
// attention result h, first rounded to the model's dtype scalar_t as the module would see it. Keeps only h and
// 1 / rms per token for backward.
// ------------------------------------------------------------------------------------------------------------
template <typename scalar_t>
inline const float* rounded(const float* h, int64_t d, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return h;
  } else {
    for (int64_t j = 0; j < d; ++j) scratch[j] = static_cast<float>(static_cast<scalar_t>(h[j]));
    return scratch;
  }
}

template <typename scalar_t>
void train_norm_impl(const float* h, const scalar_t* w, float eps, int64_t T, int64_t d, scalar_t* x,
                     float* inv_rms) {
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * d);
    const float* g = as_float(w, d, scratch.data() + d);
    for (int64_t t = begin; t < end; ++t) {
      const float* hb = rounded<scalar_t>(h + t * d, d, scratch.data());
      const float r = 1.f / std::sqrt(square_sum(hb, d) / static_cast<float>(d) + eps);
      inv_rms[t] = r;
      for (int64_t j = 0; j < d; ++j)
        x[t * d + j] = static_cast<scalar_t>(g[j] * static_cast<float>(static_cast<scalar_t>(hb[j] * r)));
    }
  });
}

// Checks shared by the norm's two directions: h fp32 [.., d] on the CPU, a weight [d] of the model's dtype
void check_norm(const at::Tensor& h, const at::Tensor& weight) {
  const int64_t d = h.size(-1);
  TORCH_CHECK(h.scalar_type() == at::kFloat && plain(h, h.numel()) && plain(weight, d) && weight.dim() == 1,
              "hf_attnres kernels: reading norm of fp32 CPU rows of ", d, " with a plain CPU weight of ", d);
}

// (x in the weight's dtype, inv_rms [..])
std::vector<at::Tensor> train_norm(const at::Tensor& h, const at::Tensor& weight, double eps) {
  check_norm(h, weight);
  const int64_t d = h.size(-1), T = h.numel() / d;
  const auto hc = h.contiguous(), w = weight.contiguous();
  auto x = at::empty(h.sizes(), h.options().dtype(w.scalar_type()));
  auto inv_rms = at::empty(token_shape(h, {}), hc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "hf_attnres train_norm", [&] {
    train_norm_impl<scalar_t>(hc.const_data_ptr<float>(), w.const_data_ptr<scalar_t>(), static_cast<float>(eps), T,
                              d, x.data_ptr<scalar_t>(), inv_rms.data_ptr<float>());
  });
  return {x, inv_rms};
}

// Backward, as autograd differentiates the eager module: with hb = h rounded, xn = hb r and gx = g * w (rounded to
// scalar_t, as the product is), grad_w = sum over tokens of g * xn (rounded), grad_hb = r gx - hb r^3 <gx, hb> / d
// (rounded to scalar_t, the module input's dtype).
template <typename scalar_t>
void train_norm_backward_impl(const scalar_t* grad, const float* h, const scalar_t* w, const float* inv_rms,
                              int64_t T, int64_t d, float* grad_h, ThreadSums& grad_w) {
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(4 * d);
    float *gx = scratch.data() + d, *xn = scratch.data() + 2 * d;
    const float* wf = as_float(w, d, scratch.data() + 3 * d);
    float* gw = grad_w.mine();
    for (int64_t t = begin; t < end; ++t) {
      const float* hb = rounded<scalar_t>(h + t * d, d, scratch.data());
      const scalar_t* g = grad + t * d;
      const float r = inv_rms[t];
      for (int64_t j = 0; j < d; ++j) {
        const float gj = static_cast<float>(g[j]);
        gx[j] = static_cast<float>(static_cast<scalar_t>(gj * wf[j]));
        xn[j] = static_cast<float>(static_cast<scalar_t>(hb[j] * r));
        gw[j] += gj * xn[j];
      }
      const float* row = hb;
      float product;
      dots(gx, &row, 1, d, &product);
      const float scale = -product * r * r * r / static_cast<float>(d);
      float* gh = grad_h + t * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) gh[j] = r * gx[j] + scale * hb[j];
      if constexpr (!std::is_same_v<scalar_t, float>)
        for (int64_t j = 0; j < d; ++j) gh[j] = static_cast<float>(static_cast<scalar_t>(gh[j]));
    }
  });
}

// (grad_h fp32, grad_weight in the weight's dtype)
std::vector<at::Tensor> train_norm_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& weight,
                                            const at::Tensor& inv_rms) {
  check_norm(h, weight);
  const int64_t d = h.size(-1), T = h.numel() / d;
  TORCH_CHECK(grad.numel() == T * d && inv_rms.numel() == T && inv_rms.scalar_type() == at::kFloat,
              "hf_attnres kernels: reading norm backward of ", T, " x ", d);
  const auto w = weight.contiguous(), hc = h.contiguous(), r = inv_rms.contiguous();
  const auto g = grad.to(w.scalar_type()).contiguous();
  auto grad_h = at::empty_like(hc);
  ThreadSums grad_w(d);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "hf_attnres train_norm_backward", [&] {
    train_norm_backward_impl<scalar_t>(g.const_data_ptr<scalar_t>(), hc.const_data_ptr<float>(),
                                       w.const_data_ptr<scalar_t>(), r.const_data_ptr<float>(), T, d,
                                       grad_h.data_ptr<float>(), grad_w);
  });
  return {grad_h, grad_w.total().to(w.scalar_type())};
}

// ------------------------------------------------------------------------------------------------------------
// The decoder's two calls as plain CPython functions bound to it. Inside a decoding step a pybind11 call costs
// about 6 us, several times the phase it runs: its dispatch code and type tables are cold by then, after a
// sublayer's ops. A builtin function (METH_FASTCALL) bound to a capsule holding the decoder costs what a
// torch op's binding does. Errors are raised as torch's are (HANDLE_TH_ERRORS).
// ------------------------------------------------------------------------------------------------------------
constexpr const char* kCapsule = "hf_attnres_kernels.Decoder";

Decoder& bound_decoder(PyObject* capsule) {
  return *static_cast<Decoder*>(PyCapsule_GetPointer(capsule, kCapsule));
}

int64_t index_argument(PyObject* arg, const char* call) {
  const long long value = PyLong_AsLongLong(arg);
  if (value == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, "hf_attnres kernels: ", call, " takes integer indices");
  }
  return value;
}

const at::Tensor& tensor_argument(PyObject* arg, const char* call) {
  TORCH_CHECK_TYPE(THPVariable_Check(arg), "hf_attnres kernels: ", call, " takes tensors");
  return THPVariable_Unpack(arg);
}

// phase1(sources: list[Tensor], first: int, last: int) -> Tensor
PyObject* bound_phase1(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3 && (PyList_Check(args[0]) || PyTuple_Check(args[0])),
                   "hf_attnres kernels: phase1(sources: list[Tensor], first: int, last: int)");
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  std::vector<at::Tensor> sources;
  sources.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) sources.push_back(tensor_argument(items[i], "phase1"));
  const int64_t first = index_argument(args[1], "phase1"), last = index_argument(args[2], "phase1");
  return THPVariable_Wrap(bound_decoder(capsule).phase1(sources, first, last));
  END_HANDLE_TH_ERRORS
}

// phase2(partial: Tensor, column: int, s: int) -> Tensor
PyObject* bound_phase2(PyObject* capsule, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "hf_attnres kernels: phase2(partial: Tensor, column: int, s: int)");
  const at::Tensor& partial = tensor_argument(args[0], "phase2");
  const int64_t column = index_argument(args[1], "phase2"), s = index_argument(args[2], "phase2");
  return THPVariable_Wrap(bound_decoder(capsule).phase2(partial, column, s));
  END_HANDLE_TH_ERRORS
}

template <PyObject* (*call)(PyObject*, PyObject* const*, Py_ssize_t)>
constexpr PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call));
}

PyMethodDef kBoundCalls[] = {
    {"phase1", fastcall<bound_phase1>(), METH_FASTCALL, "Decoder.phase1, bound"},
    {"phase2", fastcall<bound_phase2>(), METH_FASTCALL, "Decoder.phase2, bound"},
};

// (phase1, phase2) bound to `self`; they keep it alive.
pybind11::tuple bound_calls(const pybind11::object& self) {
  Decoder* decoder = self.cast<Decoder*>();
  pybind11::object capsule = pybind11::reinterpret_steal<pybind11::object>(PyCapsule_New(
      decoder, kCapsule, [](PyObject* c) { Py_XDECREF(static_cast<PyObject*>(PyCapsule_GetContext(c))); }));
  if (!capsule) throw pybind11::error_already_set();
  Py_INCREF(self.ptr());  // the capsule's context, released with it
  PyCapsule_SetContext(capsule.ptr(), self.ptr());
  pybind11::tuple calls(2);
  for (size_t k = 0; k < 2; ++k) {
    PyObject* call = PyCFunction_New(&kBoundCalls[k], capsule.ptr());
    if (call == nullptr) throw pybind11::error_already_set();
    calls[k] = pybind11::reinterpret_steal<pybind11::object>(call);
  }
  return calls;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI") = ABI;
  pybind11::class_<Decoder>(m, "Decoder")
      .def_static("create", &Decoder::create, "The state of a decoding forward, or None (see the source)")
      .def("columns", &Decoder::columns)
      .def_property_readonly("normalises", &Decoder::normalises)
      .def_property_readonly("reads_parameters", &Decoder::reads_parameters)
      .def("bound_calls", &bound_calls,
           "(phase1, phase2) bound to this decoder: phase1(sources, first, last) for query columns [first, last), "
           "phase2(partial, column, s) for a block's s-th sublayer");
  m.def("train_phase1", &train_phase1, "_Phase1.forward (see the source)");
  m.def("train_phase1_backward", &train_phase1_backward, "_Phase1.backward");
  m.def("train_phase2", &train_phase2, "_Phase2.forward");
  m.def("train_phase2_backward", &train_phase2_backward, "_Phase2.backward");
  m.def("train_norm", &train_norm, "_ReadingNorm.forward: (RMSNorm(h), 1 / rms)");
  m.def("train_norm_backward", &train_norm_backward, "_ReadingNorm.backward: (grad_h, grad_weight)");
}
