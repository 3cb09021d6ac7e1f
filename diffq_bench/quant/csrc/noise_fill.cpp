// Parallel chunked noise fill for DiffQ's pseudo quantization noise (diffq_bench/quant/rng.py;
// diffq_bench/quant/native.py builds it).
//
// The buffer is cut into chunks of `chunk` entries (the last one shorter); chunk i is filled by
// torch's own CPU generator (MT19937) seeded with seeds[i], through torch's normal_ (gaussian) or
// uniform_(low, high):
// exactly the values of filling the chunks one after another from Python. The chunks are spread
// over torch's intra-op (OpenMP) threads, so on a busy machine the fill runs on threads that are
// already awake instead of Python worker threads competing with them.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

at::Tensor fill_noise_chunks(at::Tensor buffer, const at::Tensor& seeds, int64_t chunk, bool gaussian,
                             double low, double high) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.dim() == 1 && buffer.is_contiguous(),
              "fill_noise_chunks: buffer must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1,
              "fill_noise_chunks: seeds must be a 1-D int64 CPU tensor");
  TORCH_CHECK(chunk > 0, "fill_noise_chunks: chunk must be positive");
  const int64_t n = buffer.numel();
  const int64_t count = seeds.numel();
  TORCH_CHECK(count == (n + chunk - 1) / chunk, "fill_noise_chunks: one seed per chunk of the buffer");
  const at::Tensor own = seeds.contiguous();
  const int64_t* seed = own.data_ptr<int64_t>();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::Generator generator = at::detail::createCPUGenerator(static_cast<uint64_t>(seed[i]));
      at::Tensor part = buffer.narrow(0, i * chunk, std::min(chunk, n - i * chunk));
      if (gaussian) {
        part.normal_(0.0, 1.0, generator);
      } else {
        part.uniform_(low, high, generator);
      }
    }
  });
  return buffer;
}

}  // namespace

TORCH_LIBRARY(diffq_bench, m) {
  m.def("fill_noise_chunks(Tensor(a!) buffer, Tensor seeds, int chunk, bool gaussian, float low, float high) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(diffq_bench, CPU, m) {
  m.impl("fill_noise_chunks", &fill_noise_chunks);
}
