// Fused CPU kernels for Block AttnRes inference on decoding-sized inputs (a handful of tokens).
//
// The equations are those of SourceStack in modeling_attnres.py (spec §5, the two-phase computation); only the
// cost differs. Decoding a token runs the depth attention once per sublayer on one token, where each PyTorch
// op's fixed cost is the whole cost: the eager form takes six ops per sublayer and about twenty per block,
// this one call each. Between two calls the decoder's weights stream through the caches, so the kernels also
// read as little as they can: each pseudo-query and key-norm weight once per token, nothing precomputed.
//
// Per query column k (every sublayer, then the final aggregation) the effective query is
//     q_k = w_k * gamma_k * sqrt(d),   so that   w_k . RMSNorm(v) = q_k . v / sqrt(|v|^2 + d eps),
// as in SourceStack. Logits, softmax and sums are fp32; sources, partial sums and results are in the
// model's dtype. Built by hf_attnres.kernels with the system's C++ compiler into a Python module (pybind11,
// not torch.ops: a custom op called from Python costs several times a pybind11 call, about as much as the ops
// it replaces).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

// Bump with any change of the interface or its meaning: the modeling code asks for the version it knows.
constexpr int ABI = 1;

namespace {

template <typename scalar_t>
inline float dot(const scalar_t* x, const float* q, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += static_cast<float>(x[j]) * q[j];
  return acc;
}

// sqrt(|x|^2 + d eps) = sqrt(d) rms_eps(x)
template <typename scalar_t>
inline float scaled_rms(const scalar_t* x, int64_t d, float floor2) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) acc += static_cast<float>(x[j]) * static_cast<float>(x[j]);
  return std::sqrt(acc + floor2);
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

// The state of one decoding forward: the pseudo-queries and key-norm weights of every query column, and
// phase 1's results for the current block (mixed [T, S, d], lse [T, S]) that its sublayers' phase 2 reads.
class Decoder {
 public:
  Decoder(std::vector<at::Tensor> w, std::vector<at::Tensor> gamma, int64_t tokens, int64_t d, int64_t block_size,
          double eps)
      : w_(std::move(w)), gamma_(std::move(gamma)), T_(tokens), d_(d), S_(block_size),
        floor2_(static_cast<float>(d * eps)), scale_(static_cast<float>(std::sqrt(static_cast<double>(d)))),
        mixed_(static_cast<size_t>(tokens * block_size * d)), lse_(static_cast<size_t>(tokens * block_size)),
        q_(static_cast<size_t>(d)) {}

  // nullptr (None) where a parameter is not plain: the caller takes the eager path, which has its own checks.
  static std::unique_ptr<Decoder> create(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& gamma,
                                         int64_t tokens, int64_t d, int64_t block_size, double eps) {
    TORCH_CHECK(!w.empty() && w.size() == gamma.size() && block_size >= 1 && tokens >= 1,
                "hf_attnres kernels: one key-norm weight per pseudo-query, and a block size");
    std::vector<at::Tensor> w32, g32;
    bool reads_parameters = true;
    for (size_t k = 0; k < w.size(); ++k) {
      if (!plain(w[k], d) || !plain(gamma[k], d)) return nullptr;
      w32.push_back(fp32(w[k]));
      g32.push_back(fp32(gamma[k]));
      reads_parameters = reads_parameters && w32.back().is_same(w[k]) && g32.back().is_same(gamma[k]);
    }
    auto decoder = std::make_unique<Decoder>(std::move(w32), std::move(g32), tokens, d, block_size, eps);
    decoder->reads_parameters_ = reads_parameters;
    return decoder;
  }

  int64_t columns() const { return static_cast<int64_t>(w_.size()); }
  // whether it reads the parameters themselves (fp32, contiguous), not copies: then it sees in-place changes
  bool reads_parameters() const { return reads_parameters_; }

  // Phase 1 for query columns [first, last) over the completed sources: softmax over them of
  // q_k . v_i / sqrt(|v_i|^2 + d eps), and the weighted sum of their raw values. Keeps the results of columns
  // first+1 .. last-1 for phase 2 and returns the first one's (the block's first sublayer reads it as is) as a
  // tensor of its own. With [first, last) = [K-1, K] it is the final aggregation.
  at::Tensor phase1(const std::vector<at::Tensor>& sources, int64_t first, int64_t last) {
    const int64_t n = static_cast<int64_t>(sources.size());
    TORCH_CHECK(n >= 1 && 0 <= first && first < last && last <= columns() && last - first <= S_,
                "hf_attnres kernels: phase1 of columns [", first, ", ", last, ") over ", n, " sources");
    std::vector<at::Tensor> values;
    for (const auto& s : sources) {
      TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == sources[0].scalar_type() && s.numel() == T_ * d_,
                  "hf_attnres kernels: the sources must be CPU tensors of one dtype and ", T_, " x ", d_, " elements");
      values.push_back(s.contiguous());
    }
    auto out = new_like(values[0]);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values[0].scalar_type(), "hf_attnres phase1", [&] {
      phase1_impl<scalar_t>(values, first, last, out.data_ptr<scalar_t>());
    });
    return out;
  }

  // Phase 2 for the block's s-th sublayer (query column `column`): the online-softmax merge of its partial sum
  // p, h = lerp(p, mixed_s, 1 - beta) with 1 - beta = sigmoid(lse_s - q . p / sqrt(|p|^2 + d eps)).
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
  }

  // q_column into q_ (read once per call: the parameters are cold by then)
  const float* query(int64_t column) {
    const float* w = w_[column].const_data_ptr<float>();
    const float* g = gamma_[column].const_data_ptr<float>();
    float* q = q_.data();
#pragma omp simd
    for (int64_t j = 0; j < d_; ++j) q[j] = w[j] * g[j] * scale_;  // (w * gamma) * sqrt(d), as SourceStack
    return q;
  }

  // (out of the dispatch macro's lambda: a macro argument cannot hold the simd pragmas)
  template <typename scalar_t>
  void phase1_impl(const std::vector<at::Tensor>& values, int64_t first, int64_t last, scalar_t* out) {
    const int64_t n = static_cast<int64_t>(values.size()), T = T_, d = d_, S = S_;
    std::vector<const scalar_t*> v(n);
    std::vector<float> inv_rms(n * T), logits(n), row(d);
    for (int64_t k = first; k < last; ++k) prefetch_query(k);
    for (int64_t i = 0; i < n; ++i) prefetch(values[i].const_data_ptr(), T * d * sizeof(scalar_t));
    prefetch(mixed_.data(), mixed_.size() * sizeof(float), true);
    for (int64_t i = 0; i < n; ++i) {
      v[i] = values[i].const_data_ptr<scalar_t>();
      for (int64_t t = 0; t < T; ++t) inv_rms[i * T + t] = 1.f / scaled_rms(v[i] + t * d, d, floor2_);
    }
    for (int64_t k = first; k < last; ++k) {
      const float* q = query(k);
      for (int64_t t = 0; t < T; ++t) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) m = std::max(m, logits[i] = dot(v[i] + t * d, q, d) * inv_rms[i * T + t]);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) sum += (logits[i] = std::exp(logits[i] - m));
        lse_[t * S + (k - first)] = m + std::log(sum);
        float* h = k == first ? row.data() : mixed_.data() + (t * S + (k - first)) * d;
        std::fill(h, h + d, 0.f);
        for (int64_t i = 0; i < n; ++i) {
          const float a = logits[i] / sum;
          const scalar_t* x = v[i] + t * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) h[j] += a * static_cast<float>(x[j]);
        }
        if (k == first)
          for (int64_t j = 0; j < d; ++j) out[t * d + j] = static_cast<scalar_t>(row[j]);
      }
    }
  }

  template <typename scalar_t>
  void phase2_impl(const scalar_t* p, int64_t column, int64_t s, scalar_t* out) {
    const int64_t d = d_, S = S_;
    prefetch_query(column);
    for (int64_t t = 0; t < T_; ++t) prefetch(mixed_.data() + (t * S + s) * d, d * sizeof(float));
    prefetch(p, T_ * d * sizeof(scalar_t));
    const float* q = query(column);
    for (int64_t t = 0; t < T_; ++t) {
      const scalar_t* x = p + t * d;
      const float* m = mixed_.data() + (t * S + s) * d;
      const float logit = dot(x, q, d) / scaled_rms(x, d, floor2_);
      const float rest = 1.f / (1.f + std::exp(logit - lse_[t * S + s]));
      scalar_t* o = out + t * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const float xj = static_cast<float>(x[j]);
        o[j] = static_cast<scalar_t>(xj + rest * (m[j] - xj));
      }
    }
  }

  std::vector<at::Tensor> w_, gamma_;  // fp32, per query column
  int64_t T_, d_, S_;
  float floor2_, scale_;
  std::vector<float> mixed_, lse_, q_;
  bool reads_parameters_ = false;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ABI") = ABI;
  pybind11::class_<Decoder>(m, "Decoder")
      .def_static("create", &Decoder::create, "The state of a decoding forward, or None (see the source)")
      .def("columns", &Decoder::columns)
      .def_property_readonly("reads_parameters", &Decoder::reads_parameters)
      .def("phase1", &Decoder::phase1, "Phase 1 for query columns [first, last)")
      .def("phase2", &Decoder::phase2, "Phase 2 for a block's s-th sublayer, query column `column`");
}
