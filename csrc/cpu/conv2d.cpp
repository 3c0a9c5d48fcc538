// conv2d on the CPU: im2col + GEMM, forward and backward.
//
// Which kernel runs (conv2d_algorithm() in Python reports the same choice):
//  - groups with few channels each (depthwise): the direct kernels of cpu/depthwise_conv2d.h;
//  - float32 on AVX-512 CPUs: the packed engine of cpu/conv2d_avx512.h (implicit im2col into panels,
//    register-blocked micro-kernel, every pass);
//  - otherwise (float64, CPUs without AVX-512, FASTCONV_CPU_GEMM=aten): the portable path below.
//
// Portable path: work is split into (image, band of output rows) items run in parallel with at::parallel_for.
// Each item builds the column tile of its band in a per-thread buffer small enough to stay in
// cache and multiplies it at once with the weight (at::mm through ATen's BLAS). Per-item GEMMs are single-threaded; the
// parallelism is ours. This keeps the column buffer bounded at any batch size (one tile per thread) and writes the
// output in NCHW directly, with no transpose pass. Backward runs per image: grad_weight accumulates into one partial
// per thread (summed in a fixed order), grad_input goes through col2im band by band.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "conv_params.h"
#include "cpu/channels_last_conv2d.h"
#include "cpu/channels_last_depthwise.h"
#include "cpu/channels_last_weight_grad.h"
#include "cpu/channels_last_weight_grad_in_place.h"
#include "cpu/conv2d_avx512.h"
#include "cpu/depthwise_conv2d.h"
#include "cpu/gemm.h"
#include "cpu/gemm_avx2.h"
#include "cpu/grouped_conv2d.h"
#include "cpu/im2col.h"
#include "cpu/narrow_conv2d.h"
#include "cpu/phase_backward_input.h"
#include "cpu/winograd_avx2.h"
#include "cpu/winograd_conv2d.h"

namespace fastconv {
namespace {

// A column tile of about this size stays in L2 between im2col and the GEMM that reads it.
constexpr int64_t kColTileBytes = 256 * 1024;

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

int64_t band_rows(const Conv2dParams& p, int64_t elem_size, int64_t tile_bytes = kColTileBytes) {
  if (p.is_pointwise()) return p.out_h;
  const int64_t row_bytes = p.in_channels * p.kernel_h * p.kernel_w * p.out_w * elem_size;
  return std::clamp<int64_t>(tile_bytes / std::max<int64_t>(row_bytes, 1), 1, p.out_h);
}

// Whether the portable path's GEMMs run on cpu/gemm_avx2.h (float32 on AVX2 CPUs without AVX-512) rather
// than at::mm.
template <typename T>
bool avx2_gemm() {
#if FASTCONV_HAVE_AVX2_GEMM
  return std::is_same_v<T, float> && cpu::avx2::available();
#else
  return false;
#endif
}

// Winograd F(2x2, 3x3) for the float32 forward on the AVX2 path (cpu/winograd_avx2.h): under "winograd"
// wherever it applies, never under "gemm"; FASTCONV_AVX2_WINOGRAD=1 / =0 (read per call) forces it on /
// off (tests, comparisons).
bool avx2_winograd_wanted(const Conv2dParams& p);

// The AVX2 GEMM's column tiles: larger than at::mm's, so that each packed weight block read from L3 feeds
// more columns (measured, Zen 3, 2 threads, batch 8, time against 256 KiB: AlexNet conv2 forward 0.70,
// backward-weight 0.76; conv3 0.84 / 0.98; ResNet's 3x3 128 at 28x28 0.83 / 1.15).
constexpr int64_t kAvx2ColTileBytes = 1024 * 1024;

// The A operand of the AVX2 GEMM for each of the G groups, packed once per call: rows [g*rows, (g+1)*rows)
// of A(i, k) = a[i*a_rs + k*a_cs] (K per group). Empty where the AVX2 GEMM does not run.
template <typename T>
struct GroupedA {
  std::vector<float> data;
  int64_t rows = 0, K = 0, per_group = 0;
  GroupedA(bool use, int64_t G, int64_t rows_, int64_t K_, const T* a, int64_t a_rs, int64_t a_cs, int64_t group_stride)
      : rows(rows_), K(K_) {
#if FASTCONV_HAVE_AVX2_GEMM
    if constexpr (std::is_same_v<T, float>) {
      if (!use) return;
      per_group = cpu::avx2::packed_a_floats(rows, K);
      data.resize(G * per_group);
      for (int64_t g = 0; g < G; ++g) {
        cpu::avx2::pack_a(rows, K, a + g * group_stride, a_rs, a_cs, data.data() + g * per_group);
      }
    }
#endif
  }
#if FASTCONV_HAVE_AVX2_GEMM
  cpu::avx2::PackedA group(int64_t g) const { return {data.data() + g * per_group, rows, K}; }
#endif
};

// C[M][N] (rows ldc apart) = init + sum_k A(m, k) * B[k][n]: A(m, k) = a[m*a_rs + k*a_cs], B rows ldb
// apart; init is C when accumulate, else bias[m] (or 0).
template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs, const T* b, int64_t ldb, T* c,
             int64_t ldc, const T* bias, bool accumulate) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor A = at::from_blob(const_cast<T*>(a), {M, K}, {a_rs, a_cs}, opts);
  const at::Tensor B = at::from_blob(const_cast<T*>(b), {K, N}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {M, N}, {ldc, 1}, opts);
  if (!accumulate) {
    if (bias) {
      C.copy_(at::from_blob(const_cast<T*>(bias), {M, 1}, opts).expand({M, N}));
    } else {
      C.zero_();
    }
  }
  C.addmm_(A, B);
}

// The column tile of output rows [oh0, oh1) of image n: returns its first row and sets ld, the
// distance between its rows. Row r of group g is at (result + (g*CKK/G + r) * ld).
template <typename T>
const T* column_tile(const T* input, T* buffer, const Conv2dParams& p, int64_t n, int64_t oh0, int64_t oh1,
                     int64_t& ld) {
  const T* image = input + n * p.in_channels * p.in_plane();
  if (p.is_pointwise()) {
    ld = p.in_plane();
    return image + oh0 * p.out_w;
  }
  ld = (oh1 - oh0) * p.out_w;
  cpu::im2col_band(image, p.in_channels, p, oh0, oh1, buffer, ld);
  return buffer;
}

// float32 on an AVX-512 CPU: the packed engine
template <typename T>
bool use_engine() {
#if FASTCONV_HAVE_AVX512_KERNELS
  return std::is_same_v<T, float> && cpu::has_avx512();
#else
  return false;
#endif
}

// Whether a pass runs on the direct kernels of cpu/depthwise_conv2d.h: depthwise layers (one input
// channel per group) everywhere; groups of 2-4 channels only off the engine, which beats the direct
// kernels there (measured, 2 threads, Intel host, batch 8, time against torch, direct -> engine:
// ResNeXt's 32 groups of 4 at 56x56 forward 1.56 -> 0.70, backward-input 1.57 -> 0.72, backward-weight
// 0.43 -> 0.25; groups of 4 at 14x14 backward-input 2.67 -> 0.71; stride 2 forward 4.8 -> 0.89,
// backward-input 7.6 -> 1.31; groups of 3 at 28x28 backward-input 0.31 -> 0.14): the direct kernels
// pass over an output row once per input channel of its group.
template <typename T>
bool run_direct(const Conv2dParams& p) {
  return cpu::direct::use_direct(p) && (p.in_channels_per_group() == 1 || !use_engine<T>());
}

// The algorithm choice, settable from Python (fastconv.set_conv_algorithm): "auto" (default: rules
// by shape), "gemm" (never Winograd), "winograd" (Winograd wherever it applies) or "benchmark" (each
// pass of each new shape times every kernel that can run it once, on its real data, and keeps the
// fastest for the process: the rules were measured on some machines, this measures the one it runs
// on). The FASTCONV_CONV_ALGORITHM environment variable sets the starting value.
constexpr int kSettingAuto = 0, kSettingGemm = 1, kSettingWinograd = 2, kSettingBenchmark = 3;
std::atomic<int> g_algorithm_setting{[] {
  const char* env = std::getenv("FASTCONV_CONV_ALGORITHM");
  if (env && std::string(env) == "gemm") return kSettingGemm;
  if (env && std::string(env) == "winograd") return kSettingWinograd;
  if (env && std::string(env) == "benchmark") return kSettingBenchmark;
  return kSettingAuto;
}()};

// "benchmark": the measured choice per (pass, shape, thread count), kept for the process.
using ChoiceKey = std::array<int64_t, 18>;
std::mutex g_choices_mutex;
std::map<ChoiceKey, int> g_choices;

ChoiceKey choice_key(const Conv2dParams& p, int pass) {
  return {pass,           at::get_num_threads(),
          p.batch,        p.in_channels,
          p.in_h,         p.in_w,
          p.out_channels, p.kernel_h,
          p.kernel_w,     p.stride_h,
          p.stride_w,     p.pad_h,
          p.pad_w,        p.dilation_h,
          p.dilation_w,   p.groups,
          p.out_h,        p.out_w};
}

// -1 when not measured yet
int measured_choice(const ChoiceKey& key) {
  std::lock_guard<std::mutex> lock(g_choices_mutex);
  const auto it = g_choices.find(key);
  return it == g_choices.end() ? -1 : it->second;
}

// The fastest of make_candidates() for `key`: measured on the first call (a warm-up run, then the better
// of two timed runs each; run(c) computes the pass with candidate c into the real output), then cached
// (later calls only look it up). After measuring, the output holds the last candidate's result.
template <typename Candidates, typename Run>
int benchmark_choice(const ChoiceKey& key, Candidates&& make_candidates, Run&& run) {
  int choice = measured_choice(key);
  if (choice >= 0) return choice;
  const std::vector<int> candidates = make_candidates();
  choice = candidates.front();
  if (candidates.size() > 1) {
    double best = 0;
    for (const int c : candidates) {
      run(c);
      double t = 0;
      for (int rep = 0; rep < 2; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        run(c);
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        t = rep == 0 ? dt : std::min(t, dt);
      }
      if (c == candidates.front() || t < best) best = t, choice = c;
    }
  }
  std::lock_guard<std::mutex> lock(g_choices_mutex);
  return g_choices.emplace(key, choice).first->second;
}

bool avx2_winograd_wanted(const Conv2dParams& p) {
#if FASTCONV_HAVE_AVX2_GEMM
  const int setting = g_algorithm_setting.load();
  if (setting == kSettingGemm || !cpu::avx2::winograd_applicable(p)) return false;
  if (const int f = cpu::forced("FASTCONV_AVX2_WINOGRAD", '0', '1'); f >= 0) return f == 1;
  if (setting == kSettingWinograd) return true;
  // 16+ channels each way with 2048+ channel pairs (the transforms cost about as much as 16 channels of
  // products), rows of 6+ tiles (each row is padded to a multiple of 8: 7x7 outputs left half the lanes
  // idle, 1.4-1.6x the GEMM's time) and 256+ tiles (the weight transform costs as much as ~40 tiles of
  // products: AlexNet conv3 at batch 1, 49 tiles, 2.2-2.3x). Measured (Zen 4 under FASTCONV_CPU_GEMM=avx2,
  // 256-bit FMAs as on Zen 2/3, in one process alternated with the AVX2 GEMM; one thread in CPU time / two
  // threads): 3x3 64 at 56x56 0.75 / 0.78x the time at batch 8 and 0.73 / 0.84x at batch 1, 128 at 28x28
  // 0.63 / 0.65x, 256 at 14x14 0.67 / 0.77x, MNIST conv2 at batch 100 0.82 / 0.75x, AlexNet conv3 and conv4
  // at batch 8 0.85 / 0.82x and 0.93 / 0.85x; not taken: 16->32 at 28x28 0.97x, 512 at 7x7 1.42x.
  const int64_t tiles = p.batch * ((p.out_h + 1) / 2) * ((p.out_w + 1) / 2);
  return p.in_channels >= 16 && p.out_channels >= 16 && p.in_channels * p.out_channels >= 2048 && p.out_w >= 11 &&
         tiles >= 256;
#else
  (void)p;
  return false;
#endif
}

// The same for a stride-1 backward-input, as the forward convolution of grad_output (flipped weights), by
// the forward's rule on that convolution and, unless forced, on planes 14+ wide. Measured as the forward's
// rule (Zen 4 under FASTCONV_CPU_GEMM=avx2, against the AVX2 GEMM's col2im route; one thread in CPU time
// / two threads): 3x3 64 at 56x56 0.83 / 0.82x at batch 8, 0.83 / 0.95x at batch 1, 128 at 28x28 0.75 /
// 0.69x, 256 at 14x14 0.69 / 0.76x, MNIST conv2 0.90-0.92 / 0.89x; AlexNet conv3 and conv4 at batch 8
// (13x13: 7 tiles a row padded to 8) 0.94-1.05 / 1.03x and 0.93 / 1.25x, not taken.
bool avx2_winograd_backward_input(const Conv2dParams& p) {
  if (!cpu::backward_input_as_forward(p)) return false;
  const bool forced =
      cpu::forced("FASTCONV_AVX2_WINOGRAD", '0', '1') >= 0 || g_algorithm_setting.load() == kSettingWinograd;
  return (forced || p.in_w >= 14) && avx2_winograd_wanted(cpu::backward_input_params(p));
}

// Winograd for the forward pass (and backward-input, a forward pass itself) / backward-weight.
// auto: measured on Zen 4 and on the Intel host (benchmarks/README.md): the transforms cost about as
// much as 8-16 channels of products, so narrow layers keep GEMM; the transformed weight matrices
// (16 or 36 x OC x C floats) are re-read for every block of tiles, so very wide layers on small planes
// take Winograd only over whole tiles (read once). Backward-weight transposes its grad_output
// transform, which only pays from 64 channels up.
bool winograd_wanted(const Conv2dParams& p, bool weight_grad = false) {
#if FASTCONV_HAVE_AVX512_KERNELS
  const int setting = g_algorithm_setting.load();
  if (setting == kSettingGemm || !cpu::winograd::applicable(p)) return false;
  if (setting == kSettingWinograd) return true;
  const int64_t C = p.in_channels, OC = p.out_channels;
  // F(2x2, 5x5) (kernels of 4x4 and up): 0.39-0.45x the direct convolution's multiplications. Measured
  // (2 threads, Intel host, against the GEMM): AlexNet conv2 at batch 2-32 forward 0.63-0.78x,
  // backward-input 0.70-0.81x, backward-weight 0.69-0.91x (batch 1 too: its whole-tiles form splits
  // over transform points, not tiles), 5x5 256->256 at 14x14 0.50-0.72x, 32->32 at 28x28 0.71-0.95x;
  // at batch 1 too since the weight transform is vectorised and few tiles run over whole tiles (AlexNet
  // conv2: forward 0.77x, backward-input 0.79x; 32->64 at 28x28 0.96-1.01x), with the tile-count
  // rule of 3x3 below (16->32 on an 8x8 output at batch 1-8: 1.1-2x the GEMM's time).
  const bool few_tiles =
      cpu::winograd::grid_tiles(p) < 128 || (cpu::winograd::work_items(p) < 3 * at::get_num_threads() && C * OC < 4096);
  if (cpu::winograd::tile_kernel(p) == 5) {
    const int64_t subs = cpu::winograd::sub_kernel_count(p);
    return C >= 16 && OC >= 16 && C * OC * subs <= 131072 && !few_tiles;
  }
  // Few tiles: 3x3 from 128 of F(2x2,3x3)'s tiles (over whole tiles where items would be few: the
  // products split over transform points, not tiles); below that (batch 1-2 on 13x13 planes) the GEMM,
  // which also splits output channels, wins (AlexNet conv3 at batch 1: 1.40x the GEMM's time, 256 at
  // 13x13 at batch 2: 1.04x), and where items are few also under 4096 input x output channels (16->32
  // at 28x28 and 32->64 at 14x14, 196 tiles: 1.2-1.4x; 64->64 at 28x28 0.9x). Sums of sub-kernels need
  // 3+ items per thread.
  if (p.kernel_h == 3 && p.kernel_w == 3 ? few_tiles : cpu::winograd::work_items(p) < 3 * at::get_num_threads())
    return false;
  // backward-weight: measured (2 threads, Zen 4) ahead of the GEMM on 28x28 and 56x56 planes at 64-128
  // channels, behind it on 13x13/14x14 planes (odd sizes waste a tile row; short tile reductions);
  // taken there as measured. The "benchmark" setting measures the host it runs on.
  if (weight_grad) {
    // 3x3 on an Intel host (two 512-bit FMA units), since grad_output is read in place (its padded copy
    // had cost 20-25%): measured (2 threads, interleaved, time against the narrow-direct kernel or the
    // GEMM that auto took before): ahead from 16 channels on planes of 144+ pixels (MNIST conv2 32->64
    // at batch 100 0.80x, 32->64 at 28x28 0.76x, 16->16 / 16->32 / 32->32 0.84-0.96x, 96 at 12x12 0.75x,
    // 32->64 at 13x13 and 27x27 0.92-0.95x) and from 8192 input x output channels on any plane (128 at
    // 14x14 0.65-0.68x; at 7x7 0.70x at batch 32, 0.97x at batch 8; 192 and 256 at 7x7 0.89-0.94x;
    // 64->128 at 8x8 0.80x; AlexNet conv3-5 at batch 4 0.76-0.79x; earlier: AlexNet conv3-5, ResNet
    // layer3, VGG's 512 at 14x14 at batch 8-32 0.70-0.93x); behind at 64->64 on 7x7-10x10 planes
    // (0.99-1.14x).
    if (p.kernel_h == 3 && p.kernel_w == 3 && cpu::intel_avx512()) {
      return C >= 16 && OC >= 16 && C * OC <= 262144 && (p.out_plane() >= 144 || C * OC >= 8192);
    }
    if (C < 64 || OC < 64) return false;
    const int64_t tiles = cpu::winograd::grid_tiles(p);
    if (p.kernel_h != 3 || p.kernel_w != 3) {
      // kernels 3 wide one way and longer the other (sums of 3x3 sub-kernels) on planes of 400+ pixels
      // with 1024+ grid tiles, as the forward saves multiplications (measured when 5x5 too ran as sums
      // of 3x3 sub-kernels: Intel host, 2 threads: AlexNet conv2 at batch 8/32 0.96/0.94x the GEMM's
      // time, 5x5 128->128 at 28x28 0.83x, 96->96 at 56x56 0.91x; behind at batch 2 (1.19x), at 32
      // channels (1.43x) and for 7x7 at 28x28 (1.30x, multiplication ratio 0.96))
      const int64_t subs = cpu::winograd::sub_kernel_count(p);
      return p.out_plane() >= 400 && tiles >= 1024 && C * OC * subs <= 131072 &&
             cpu::winograd::multiplication_ratio(p) <= 0.85;
    }
    return C * OC <= 65536 && p.out_plane() >= 400;
  }
  // 3x3: up to 512x512 channels on planes of 144+ pixels (VGG's 512 at 14x14, Intel host: forward
  // 0.74x and backward-input 0.81x the GEMM's time; U, 16 MiB there, stays in L3 across the blocks
  // of tiles) or over whole tiles (U read once: ResNet's 512 at 7x7, batch 8, 0.90x), up to 131072
  // otherwise (ResNet's 512 at 7x7 in blocks of tiles: 1.24-1.33x the GEMM's time)
  if (p.kernel_h == 3 && p.kernel_w == 3) {
    return C >= 16 && OC >= 16 &&
           (C * OC <= 131072 || ((p.out_plane() >= 144 || cpu::winograd::whole_tiles_forward(p)) && C * OC <= 262144));
  }
  // kernels 3 wide one way and longer the other (sums of 3x3 sub-kernels): where they save at least 15%
  // of the multiplications (measured when 5x5 too ran as such sums, 2 threads on Zen 4: ahead of the
  // GEMM at ratios 0.74-0.84, behind it at 0.97)
  const int64_t subs = cpu::winograd::sub_kernel_count(p);
  return C >= 16 && OC >= 16 && C * OC * subs <= 131072 && cpu::winograd::multiplication_ratio(p) <= 0.85;
#else
  (void)p;
  (void)weight_grad;
  return false;
#endif
}

// The narrow direct kernels (cpu/narrow_conv2d.h) for forward / backward-weight where they apply,
// unless the setting is "gemm" (which runs the im2col+GEMM engine there: tests and comparisons).
bool narrow_wanted(const Conv2dParams& p, bool weight_grad = false) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if (g_algorithm_setting.load() == kSettingGemm) return false;
  return weight_grad ? cpu::narrow::backward_weight_applicable(p) : cpu::narrow::forward_applicable(p);
#else
  (void)p;
  (void)weight_grad;
  return false;
#endif
}

// The float32 kernels of the forward and backward-weight passes on the AVX-512 engine, as numbers for
// the "benchmark" cache.
enum EngineKernel { kWinograd, kNarrow, kGemm, kChannelsLast };
const char* const kEngineKernelNames[] = {"winograd", "narrow-direct", "im2col+gemm", "channels-last-direct"};

#if FASTCONV_HAVE_AVX512_KERNELS
// The rule's kernel for the forward pass (weight_grad false) or backward-weight.
// Backward-weight's channels-last direct kernel (cpu/channels_last_weight_grad.h): before every other one
// under FASTCONV_CPU_WEIGHT_GRAD=channels-last, never under =gemm or the "gemm" setting, else by its rule.
int engine_rule(const Conv2dParams& p, bool weight_grad) {
  const int channels_last = weight_grad ? cpu::engine::channels_last_weight_grad_forced(p) : 0;
  if (channels_last == 1) return kChannelsLast;
  if (winograd_wanted(p, weight_grad)) return kWinograd;
  if (narrow_wanted(p, weight_grad)) return kNarrow;
  if (channels_last == -1 && g_algorithm_setting.load() != kSettingGemm &&
      cpu::engine::channels_last_weight_grad_wanted(p))
    return kChannelsLast;
  return kGemm;
}

// Every kernel that can run the pass ("benchmark" times them all).
std::vector<int> engine_candidates(const Conv2dParams& p, bool weight_grad) {
  std::vector<int> c;
  if (cpu::winograd::applicable(p)) c.push_back(kWinograd);
  if (weight_grad ? cpu::narrow::backward_weight_applicable(p) : cpu::narrow::forward_applicable(p)) {
    c.push_back(kNarrow);
  }
  if (weight_grad && cpu::engine::channels_last_weight_grad_applicable(p)) c.push_back(kChannelsLast);
  c.push_back(kGemm);
  return c;
}

void run_forward(int algo, const float* input, const float* weight, const float* bias, float* output,
                 const Conv2dParams& p, bool relu) {
  if (algo == kWinograd) return cpu::winograd::forward(input, weight, bias, output, p, relu);
  if (algo == kNarrow) return cpu::narrow::forward(input, weight, bias, output, p, relu);
  if (cpu::engine::use_grouped_direct(p)) return cpu::engine::grouped_forward(input, weight, bias, output, p, relu);
  cpu::engine::forward(input, weight, bias, output, p, relu);
}
#endif

// A float32 forward convolution on the AVX-512 engine, Winograd when wanted (also the transformed
// convolution of a stride-1 backward-input and of each phase of a strided one).
void engine_forward(const float* input, const float* weight, const float* bias, float* output, const Conv2dParams& p,
                    bool relu = false) {
#if FASTCONV_HAVE_AVX512_KERNELS
  const int algo = g_algorithm_setting.load() == kSettingBenchmark
                       ? benchmark_choice(
                             choice_key(p, 0), [&] { return engine_candidates(p, false); },
                             [&](int c) { run_forward(c, input, weight, bias, output, p, relu); })
                       : engine_rule(p, false);
  run_forward(algo, input, weight, bias, output, p, relu);
#else
  (void)input, (void)weight, (void)bias, (void)output, (void)p, (void)relu;
  TORCH_INTERNAL_ASSERT(false, "fastconv: the AVX-512 engine is not compiled in");
#endif
}

// How the AVX-512 engine computes grad_input: stride 1 is a forward convolution of grad_output with the
// flipped weights (flipped_conv.h), on Winograd where wanted, else on the forward engine from batch 2
// (cpu::engine::backward_input_through_forward); otherwise grad_cols and col2im. One stride-1
// convolution per phase of grad_input (phase_backward_input.h) is a candidate of "benchmark" only;
// FASTCONV_STRIDE_PHASES=1 (read per call; tests) takes it wherever it applies.
enum class BackwardInputRoute { kWinograd, kForwardEngine, kPhases, kGroupedPhases, kCol2im };
BackwardInputRoute backward_input_rule(const Conv2dParams& p) {
#if FASTCONV_HAVE_AVX512_KERNELS
  if (cpu::forced("FASTCONV_STRIDE_PHASES", '0', '1') == 1 && cpu::backward_input_by_phases_applicable(p)) {
    return BackwardInputRoute::kPhases;
  }
#endif
  if (cpu::backward_input_as_forward(p) && winograd_wanted(cpu::backward_input_params(p))) {
    return BackwardInputRoute::kWinograd;
  }
#if FASTCONV_HAVE_AVX512_KERNELS
  if (cpu::engine::backward_input_through_forward(p)) return BackwardInputRoute::kForwardEngine;
  if (cpu::engine::grouped_backward_input_by_phases(p)) return BackwardInputRoute::kGroupedPhases;
#endif
  return BackwardInputRoute::kCol2im;
}

#if FASTCONV_HAVE_AVX512_KERNELS
std::vector<int> backward_input_candidates(const Conv2dParams& p) {
  std::vector<int> c;
  if (cpu::backward_input_as_forward(p)) {
    if (cpu::winograd::applicable(cpu::backward_input_params(p))) c.push_back(int(BackwardInputRoute::kWinograd));
    c.push_back(int(BackwardInputRoute::kForwardEngine));
  }
  if (cpu::backward_input_by_phases_applicable(p)) c.push_back(int(BackwardInputRoute::kPhases));
  if (cpu::engine::grouped_backward_input_by_phases(p)) c.push_back(int(BackwardInputRoute::kGroupedPhases));
  c.push_back(int(BackwardInputRoute::kCol2im));
  return c;
}

void run_backward_input(BackwardInputRoute route, const float* grad_output, const float* weight, float* grad_input,
                        const Conv2dParams& p) {
  switch (route) {
    case BackwardInputRoute::kWinograd:  // one group: the weights flip inside the weight transform
      cpu::winograd::forward(grad_output, weight, nullptr, grad_input, cpu::backward_input_params(p), false, true);
      break;
    case BackwardInputRoute::kForwardEngine:
      if (cpu::engine::use_grouped_direct(cpu::backward_input_params(p))) {
        cpu::engine::grouped_backward_input_stride1(grad_output, weight, grad_input, p);
        break;
      }
      cpu::engine::backward_input_stride1(grad_output, weight, grad_input, p);
      break;
    case BackwardInputRoute::kPhases:
      cpu::backward_input_by_phases(grad_output, weight, grad_input, p,
                                    [](const float* in, const float* w, const float* b, float* out,
                                       const Conv2dParams& q) { engine_forward(in, w, b, out, q); });
      break;
    case BackwardInputRoute::kGroupedPhases:
      cpu::engine::grouped_backward_input_phases(grad_output, weight, grad_input, p);
      break;
    case BackwardInputRoute::kCol2im:
      cpu::engine::backward_input_col2im(grad_output, weight, grad_input, p, cpu::engine::col2im_band_add_avx512);
      break;
  }
}

void run_weight_grad(int algo, const float* grad_output, const float* input, float* grad_weight,
                     const Conv2dParams& p) {
  if (algo == kWinograd) return cpu::winograd::backward_weight(grad_output, input, grad_weight, p);
  if (algo == kNarrow) return cpu::narrow::backward_weight(grad_output, input, grad_weight, p);
  if (algo == kChannelsLast) return cpu::engine::backward_weight_channels_last(grad_output, input, grad_weight, p);
  if (cpu::engine::grouped_weight_grad_wanted(p))
    return cpu::engine::grouped_backward_weight(grad_output, input, grad_weight, p);
  cpu::engine::backward_weight(grad_output, input, grad_weight, p);
}
#endif

// The route each pass takes: the rule's, or under "benchmark" the measured one (once measured).
BackwardInputRoute backward_input_route(const Conv2dParams& p) {
  if (g_algorithm_setting.load() == kSettingBenchmark) {
    const int c = measured_choice(choice_key(p, 1));
    if (c >= 0) return BackwardInputRoute(c);
  }
  return backward_input_rule(p);
}

bool channels_last_direct(const Conv2dParams& p, bool weight_nhwc = false);
bool channels_last_grouped_forward(const Conv2dParams& p);
bool channels_last_grouped_backward_input(const Conv2dParams& p);
bool channels_last_grouped_weight_grad(const Conv2dParams& p);
bool channels_last_weight_grad_from_nhwc(const Conv2dParams& p);
bool channels_last_backward_input(const Conv2dParams& p, bool weight_nhwc = false);
bool channels_last_strided_pointwise_backward_input(const Conv2dParams& p);
bool channels_last_phases_backward_input(const Conv2dParams& p);
bool channels_last_weight_grad_in_place(const Conv2dParams& p);
bool channels_last_pointwise_weight_grad(const Conv2dParams& p);

// Which kernel each CPU pass runs for these arguments (what conv2d_algorithm() reports):
// "forward/backward-input/backward-weight", or one name when all three agree. channels_last: of a
// channels_last input (its forward and backward-input may run on the NHWC direct kernel);
// channels_last_result: the results are channels_last (the input's or the weight's layout suggests it:
// backward-weight may read grad_output in place); weight_nhwc: the weight is channels_last (and not also
// NCHW-contiguous, weight_is_nhwc).
std::string algorithm_name(const Conv2dParams& p, bool float32, bool channels_last, bool channels_last_result,
                           bool weight_nhwc) {
  if (float32 ? run_direct<float>(p) : run_direct<double>(p)) return "direct";
  if (float32 && avx2_gemm<float>()) {
    const bool fwd = avx2_winograd_wanted(p), bwi = avx2_winograd_backward_input(p);
    if (fwd || bwi) {
      const char* gemm = "im2col+gemm-avx2";
      return std::string(fwd ? "winograd-avx2" : gemm) + "/" + (bwi ? "winograd-avx2" : gemm) + "/" + gemm;
    }
  }
  if (!float32 || !use_engine<float>()) return float32 && avx2_gemm<float>() ? "im2col+gemm-avx2" : "im2col+gemm-aten";
#if FASTCONV_HAVE_AVX512_KERNELS
  const auto gemm_name = [](const Conv2dParams& q) {
    if (cpu::engine::use_grouped_direct(q)) return std::string("grouped-direct");
    return cpu::engine::use_padded_direct(cpu::engine::flatten_pointwise(q)) ? std::string("implicit-gemm")
                                                                             : std::string("im2col+gemm");
  };
  const bool measured = g_algorithm_setting.load() == kSettingBenchmark;
  const int fwd_measured = measured ? measured_choice(choice_key(p, 0)) : -1;
  const int fwd_algo = fwd_measured >= 0 ? fwd_measured : engine_rule(p, false);
  const std::string fwd = channels_last && float32 && channels_last_grouped_forward(p)       ? "channels-last-grouped"
                          : channels_last && float32 && channels_last_direct(p, weight_nhwc) ? "channels-last-direct"
                          : fwd_algo == kGemm ? gemm_name(p)
                                              : kEngineKernelNames[fwd_algo];
  const BackwardInputRoute route = backward_input_route(p);
  const bool bwi_nhwc =
      channels_last_backward_input(p, weight_nhwc) || channels_last_strided_pointwise_backward_input(p);
  const std::string bwi = channels_last && float32 && bwi_nhwc                                 ? "channels-last-direct"
                          : channels_last && float32 && channels_last_phases_backward_input(p) ? "channels-last-phases"
                          : channels_last && float32 && channels_last_grouped_backward_input(p)
                              ? "channels-last-grouped"
                          : route == BackwardInputRoute::kWinograd      ? "winograd"
                          : route == BackwardInputRoute::kForwardEngine ? gemm_name(cpu::backward_input_params(p))
                          : route == BackwardInputRoute::kPhases        ? "stride-phases"
                          : route == BackwardInputRoute::kGroupedPhases ? "grouped-direct-phases"
                                                                        : "im2col+gemm+col2im";
  const int bww_measured = measured ? measured_choice(choice_key(p, 2)) : -1;
  const int bww_algo = bww_measured >= 0 ? bww_measured : engine_rule(p, true);
  const std::string bww =
      channels_last_result && float32 && channels_last_weight_grad_in_place(p) ? "channels-last-direct"
      : channels_last && float32 && channels_last_pointwise_weight_grad(p)     ? "channels-last-pointwise"
      : channels_last && float32 && channels_last_grouped_weight_grad(p)       ? "channels-last-grouped"
      : bww_algo == kGemm && cpu::engine::grouped_weight_grad_wanted(p)        ? std::string("grouped-direct")
                                                                               : kEngineKernelNames[bww_algo];
  if (fwd == bwi && bwi == bww) return fwd;
  return fwd + "/" + bwi + "/" + bww;
#else
  return float32 && avx2_gemm<float>() ? "im2col+gemm-avx2" : "im2col+gemm-aten";
#endif
}

// Returns whether ReLU was applied too (the packed engine does it in its epilogue).
template <typename T>
bool conv2d_forward_kernel(const T* input, const T* weight, const T* bias, T* output, const Conv2dParams& p,
                           bool relu = false) {
  if (run_direct<T>(p)) {
    cpu::direct::forward<T>(input, weight, bias, output, p);
    return false;
  }
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (use_engine<T>()) {
      engine_forward(input, weight, bias, output, p, relu);
      return relu;
    }
  }
#endif
#if FASTCONV_HAVE_AVX2_GEMM
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_gemm<T>() && avx2_winograd_wanted(p)) {
      cpu::avx2::winograd_forward(input, weight, bias, output, p, relu);
      return relu;
    }
  }
#endif
  const int64_t G = p.groups, L = p.out_plane();
  const int64_t OCg = p.out_channels_per_group(), CKKg = p.col_rows_per_group();
  const bool avx2 = avx2_gemm<T>();
  const GroupedA<T> packed_weight(avx2, G, OCg, CKKg, weight, CKKg, 1, OCg * CKKg);
  int64_t rows = band_rows(p, sizeof(T), avx2 ? kAvx2ColTileBytes : kColTileBytes);
  int64_t bands = (p.out_h + rows - 1) / rows;
  // AVX2: bands of equal height, and where images x bands are too few to keep the threads busy (batch 1),
  // the output channels split into chunks of whole micro-panels too (each builds its own column tile).
  int64_t msplit = 1, mchunk = OCg;
  if (avx2) {
    rows = (p.out_h + bands - 1) / bands;
    bands = (p.out_h + rows - 1) / rows;
    const int64_t threads = at::get_num_threads();
    if (p.batch * bands < 2 * threads) {  // (at least two items per thread: 3 on 2 threads leave one idle a third)
      msplit = std::clamp<int64_t>((2 * threads + p.batch * bands - 1) / (p.batch * bands), 1, (OCg + 23) / 24);
      mchunk = (OCg + msplit - 1) / msplit;
      mchunk = (mchunk + 5) / 6 * 6;
      msplit = (OCg + mchunk - 1) / mchunk;
    }
  }
  at::parallel_for(0, p.batch * bands * msplit, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer(p.is_pointwise() ? 0 : CKKg * G * rows * p.out_w);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (bands * msplit), band = item / msplit % bands, m0 = item % msplit * mchunk;
      const int64_t oh0 = band * rows, oh1 = std::min(p.out_h, oh0 + rows);
      int64_t ld;
      const T* col = column_tile(input, buffer.data(), p, n, oh0, oh1, ld);
      for (int64_t g = 0; g < G; ++g) {
        T* out = output + (n * p.out_channels + g * OCg) * L + oh0 * p.out_w;
        const T* b = bias ? bias + g * OCg : nullptr;
#if FASTCONV_HAVE_AVX2_GEMM
        if constexpr (std::is_same_v<T, float>) {
          if (avx2) {
            cpu::avx2::PackedA a = packed_weight.group(g);
            a.data += m0 * a.K;  // m0: a multiple of 6, the first row of a micro-panel
            a.M = std::min(mchunk, OCg - m0);
            cpu::avx2::gemm(a, (oh1 - oh0) * p.out_w, cpu::avx2::RowsB{col + g * CKKg * ld, ld}, out + m0 * L, L,
                            b ? b + m0 : nullptr, false);
            continue;
          }
        }
#endif
        gemm_nn<T>(OCg, (oh1 - oh0) * p.out_w, CKKg, weight + g * OCg * CKKg, CKKg, 1, col + g * CKKg * ld, ld, out, L,
                   b, false);
      }
    }
  });
  return false;
}

#if FASTCONV_HAVE_AVX2_GEMM
// Backward on the AVX2 GEMM, per band of output rows:
//   grad_input[chunk]  = col2im(weight[g][:, chunk]^T (A, packed once) @ grad_output tile)
//   grad_weight[g][:, chunk] += grad_output tile (A, packed) @ column tile of the chunk^T (read transposed as B)
// A chunk is a range of one group's input channels: an item owns grad_input's planes and grad_weight's
// columns of its chunk, so items never race and nothing is scattered between them. Backward-input's
// items are (image, group, chunk); backward-weight's are (block of images, group, chunk), each block
// adding its images in order into its own partial, the partials summed in block order. The blocks depend
// on the shape only (more than one where a group has few channels to split), so grad_weight has the same
// bits at any thread count; the chunks follow the thread count (at least two items per thread) and do not
// change any sum.
void conv2d_backward_avx2(const float* grad_output, const float* input, const float* weight, float* grad_input,
                          float* grad_weight, const Conv2dParams& p) {
  namespace av = cpu::avx2;
  const int64_t G = p.groups, L = p.out_plane(), plane = p.in_plane(), KK = p.kernel_h * p.kernel_w;
  const int64_t OCg = p.out_channels_per_group(), Cg = p.in_channels_per_group(), CKKg = p.col_rows_per_group();
  const bool pointwise = p.is_pointwise();
  const int64_t threads = at::get_num_threads();
  int64_t rows = band_rows(p, sizeof(float), kAvx2ColTileBytes);
  const int64_t bands = (p.out_h + rows - 1) / rows;
  rows = (p.out_h + bands - 1) / bands;
  const auto chunks_for = [&](int64_t outer) {  // channel chunks per group for `outer` x G other items
    return outer * G >= 2 * threads ? int64_t(1) : std::min(Cg, (2 * threads + outer * G - 1) / (outer * G));
  };

  if (grad_input) {
    const int64_t chunks = chunks_for(p.batch), cchunk = (Cg + chunks - 1) / chunks;
    // weight[g][:, chunk]^T per (group, chunk), packed once: chunk rows (c, kh, kw) x OCg
    std::vector<std::vector<float>> packed(G * chunks);
    for (int64_t i = 0; i < G * chunks; ++i) {
      const int64_t g = i / chunks, c0 = i % chunks * cchunk, c1 = std::min(Cg, c0 + cchunk);
      if (c0 >= c1) continue;
      packed[i].resize(av::packed_a_floats((c1 - c0) * KK, OCg));
      av::pack_a((c1 - c0) * KK, OCg, weight + g * OCg * CKKg + c0 * KK, 1, CKKg, packed[i].data());
    }
    at::parallel_for(0, p.batch * G * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> gcol(pointwise ? 0 : cchunk * KK * rows * p.out_w);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / (G * chunks), g = item / chunks % G, chunk = item % chunks;
        const int64_t c0 = chunk * cchunk, c1 = std::min(Cg, c0 + cchunk);
        if (c0 >= c1) continue;
        float* gi = grad_input + (n * p.in_channels + g * Cg + c0) * plane;
        if (!pointwise) std::fill(gi, gi + (c1 - c0) * plane, 0.0f);
        for (int64_t oh0 = 0; oh0 < p.out_h; oh0 += rows) {
          const int64_t oh1 = std::min(p.out_h, oh0 + rows), width = (oh1 - oh0) * p.out_w;
          const float* go = grad_output + (n * p.out_channels + g * OCg) * L + oh0 * p.out_w;  // rows L apart
          float* dst = pointwise ? gi + oh0 * p.out_w : gcol.data();
          av::gemm(av::PackedA{packed[g * chunks + chunk].data(), (c1 - c0) * KK, OCg}, width, av::RowsB{go, L}, dst,
                   pointwise ? plane : width, nullptr, false);
          if (!pointwise) cpu::col2im_band_add(gcol.data(), width, c1 - c0, p, oh0, oh1, gi);
        }
      }
    });
  }

  if (grad_weight) {
    const int64_t weight_numel = p.out_channels * CKKg;
    const int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / (weight_numel * int64_t(sizeof(float))));
    const int64_t blocks = std::min({p.batch, (16 + G * Cg - 1) / (G * Cg), cap});
    const int64_t chunks = chunks_for(blocks), cchunk = (Cg + chunks - 1) / chunks;
    std::vector<float> parts(blocks > 1 ? blocks * weight_numel : 0);
    float* const sums = blocks > 1 ? parts.data() : grad_weight;
    at::parallel_for(0, blocks * G * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> col(pointwise ? 0 : cchunk * KK * rows * p.out_w);
      av::Scratch go_packed;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t block = item / (G * chunks), g = item / chunks % G, chunk = item % chunks;
        const int64_t c0 = chunk * cchunk, c1 = std::min(Cg, c0 + cchunk);
        if (c0 >= c1) continue;
        float* gw = sums + block * weight_numel + g * OCg * CKKg + c0 * KK;  // rows CKKg apart
        for (int64_t oc = 0; oc < OCg; ++oc) std::fill(gw + oc * CKKg, gw + oc * CKKg + (c1 - c0) * KK, 0.0f);
        for (int64_t n = block * p.batch / blocks; n < (block + 1) * p.batch / blocks; ++n) {
          const float* image = input + (n * p.in_channels + g * Cg + c0) * plane;
          for (int64_t oh0 = 0; oh0 < p.out_h; oh0 += rows) {
            const int64_t oh1 = std::min(p.out_h, oh0 + rows), width = (oh1 - oh0) * p.out_w;
            const float* go = grad_output + (n * p.out_channels + g * OCg) * L + oh0 * p.out_w;
            const float* cols = image + oh0 * p.out_w;
            int64_t ld = plane;
            if (!pointwise) {
              ld = width;
              cpu::im2col_band(image, c1 - c0, p, oh0, oh1, col.data(), ld);
              cols = col.data();
            }
            float* a = go_packed.get(av::packed_a_floats(OCg, width));
            av::pack_a(OCg, width, go, L, 1, a);
            av::gemm(av::PackedA{a, OCg, width}, (c1 - c0) * KK, av::ColsB{cols, ld}, gw, CKKg, nullptr, true);
          }
        }
      }
    });
    if (blocks > 1) {  // grad_weight = the partials summed in block order
      at::parallel_for(0, weight_numel, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          float acc = parts[i];
          for (int64_t b = 1; b < blocks; ++b) acc += parts[b * weight_numel + i];
          grad_weight[i] = acc;
        }
      });
    }
  }
}
#endif

template <typename T>
void conv2d_backward_kernel(const T* grad_output, const T* input, const T* weight, T* grad_input, T* grad_weight,
                            const Conv2dParams& p) {
  if (run_direct<T>(p)) {
    if (grad_input) cpu::direct::backward_input<T>(grad_output, weight, grad_input, p);
    if (grad_weight) cpu::direct::backward_weight<T>(grad_output, input, grad_weight, p);
    return;
  }
#if FASTCONV_HAVE_AVX512_KERNELS
  if constexpr (std::is_same_v<T, float>) {
    if (use_engine<T>()) {
      const bool benchmark = g_algorithm_setting.load() == kSettingBenchmark;
      if (grad_input) {
        const auto run = [&](int c) {  // (every route writes grad_input whole: no zeroing needed)
          run_backward_input(BackwardInputRoute(c), grad_output, weight, grad_input, p);
        };
        const int route = benchmark ? benchmark_choice(
                                          choice_key(p, 1), [&] { return backward_input_candidates(p); }, run)
                                    : int(backward_input_rule(p));
        run_backward_input(BackwardInputRoute(route), grad_output, weight, grad_input, p);
      }
      if (grad_weight) {
        // (every kernel writes grad_weight whole, so the measured runs leave nothing to reset)
        const int algo = benchmark ? benchmark_choice(
                                         choice_key(p, 2), [&] { return engine_candidates(p, true); },
                                         [&](int c) { run_weight_grad(c, grad_output, input, grad_weight, p); })
                                   : engine_rule(p, true);
        run_weight_grad(algo, grad_output, input, grad_weight, p);
      }
      return;
    }
  }
#endif
#if FASTCONV_HAVE_AVX2_GEMM
  if constexpr (std::is_same_v<T, float>) {
    if (avx2_gemm<T>()) {
      // a stride-1 backward-input is the forward convolution of grad_output with the flipped weights
      if (grad_input && avx2_winograd_backward_input(p)) {
        cpu::avx2::winograd_forward(grad_output, weight, nullptr, grad_input, cpu::backward_input_params(p), false,
                                    true);
        grad_input = nullptr;
        if (!grad_weight) return;
      }
      return conv2d_backward_avx2(grad_output, input, weight, grad_input, grad_weight, p);
    }
  }
#endif
  const int64_t G = p.groups, L = p.out_plane(), C = p.in_channels;
  const int64_t OCg = p.out_channels_per_group(), CKKg = p.col_rows_per_group();
  const int64_t rows = band_rows(p, sizeof(T));
  const bool pointwise = p.is_pointwise();
  const int64_t weight_numel = p.out_channels * CKKg;
  // grad_weight's GEMM needs the column tile transposed against grad_output. im2row builds it
  // transposed directly, which pays per kernel row of KW elements: fine for wide kernels (LeNet's
  // 5x5, AlexNet's 11x11) and few channels, slow for many 3x3 rows (MNIST conv2: 96 rows of 3).
  // There, im2col + a transposed grad_output tile is faster (measured, see benchmarks/).
  const bool transposed_weight_grad = p.kernel_w <= 3 && p.in_channels_per_group() * p.kernel_h >= 32;
  // One partial grad_weight per thread, summed at the end: no races, and a fixed order.
  const int64_t slots = at::get_num_threads();
  std::vector<T> weight_parts(grad_weight ? slots * weight_numel : 0, T(0));

  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    const int64_t slot = std::min<int64_t>(at::get_thread_num(), slots - 1);
    const int64_t tile = pointwise ? 0 : CKKg * G * rows * p.out_w;
    std::vector<T> col_buf(grad_weight ? CKKg * G * rows * p.out_w : 0), gcol_buf(grad_input ? tile : 0);
    std::vector<T> goT_buf(grad_weight && transposed_weight_grad ? rows * p.out_w * p.out_channels : 0);
    T* gw = grad_weight ? weight_parts.data() + slot * weight_numel : nullptr;
    for (int64_t n = begin; n < end; ++n) {
      T* gi = grad_input ? grad_input + n * C * p.in_plane() : nullptr;
      if (gi && !pointwise) std::fill(gi, gi + C * p.in_plane(), T(0));
      for (int64_t oh0 = 0; oh0 < p.out_h; oh0 += rows) {
        const int64_t oh1 = std::min(p.out_h, oh0 + rows), width = (oh1 - oh0) * p.out_w;
        const T* go = grad_output + n * p.out_channels * L + oh0 * p.out_w;  // rows L apart
        if (gw && transposed_weight_grad) {
          // grad_weight[g]^T [CKKg x OCg] += column tile [CKKg x width] @ grad_output tile^T [width x OCg]
          int64_t ld;
          const T* col = column_tile(input, col_buf.data(), p, n, oh0, oh1, ld);
          T* goT = goT_buf.data();
          for (int64_t oc = 0; oc < p.out_channels; ++oc) {
            const T* src = go + oc * L;
            for (int64_t l = 0; l < width; ++l) goT[l * p.out_channels + oc] = src[l];
          }
          for (int64_t g = 0; g < G; ++g) {
            gemm_nn<T>(CKKg, OCg, width, col + g * CKKg * ld, ld, 1, goT + g * OCg, p.out_channels, gw + g * CKKg * OCg,
                       OCg, nullptr, true);
          }
        } else if (gw) {
          // grad_weight[g] [OCg x CKKg] += grad_output tile [OCg x width] @ colT [width x CKKg]
          cpu::im2row_band(input + n * C * p.in_plane(), C, p, oh0, oh1, col_buf.data(), CKKg * G);
          for (int64_t g = 0; g < G; ++g) {
            gemm_nn<T>(OCg, CKKg, width, go + g * OCg * L, L, 1, col_buf.data() + g * CKKg, CKKg * G,
                       gw + g * OCg * CKKg, CKKg, nullptr, true);
          }
        }
        if (gi) {
          // grad of the column tile = W^T @ grad_output tile, written in place when the image is its own column matrix
          T* gcol = pointwise ? gi + oh0 * p.out_w : gcol_buf.data();
          const int64_t ldc = pointwise ? p.in_plane() : width;
          for (int64_t g = 0; g < G; ++g) {
            gemm_nn<T>(CKKg, width, OCg, weight + g * OCg * CKKg, 1, CKKg, go + g * OCg * L, L, gcol + g * CKKg * ldc,
                       ldc, nullptr, false);
          }
          if (!pointwise) cpu::col2im_band_add(gcol, width, C, p, oh0, oh1, gi);
        }
      }
    }
  });
  if (grad_weight) {
    for (int64_t s = 1; s < slots; ++s) {  // sum the partials in slot order
      const T* part = weight_parts.data() + s * weight_numel;
      for (int64_t i = 0; i < weight_numel; ++i) weight_parts[i] += part[i];
    }
    if (!transposed_weight_grad) {
      std::copy(weight_parts.begin(), weight_parts.begin() + weight_numel, grad_weight);
    } else {  // the partials hold grad_weight^T per group, [G][CKKg][OCg]
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t r = 0; r < CKKg; ++r) {
          for (int64_t oc = 0; oc < OCg; ++oc) {
            grad_weight[(g * OCg + oc) * CKKg + r] = weight_parts[(g * CKKg + r) * OCg + oc];
          }
        }
      }
    }
  }
}

#if FASTCONV_HAVE_AVX512_KERNELS
// Whether a channels_last float32 depthwise layer runs its three passes on the NHWC depthwise kernels
// (cpu/channels_last_depthwise.h; its 5x5/7x7 stride-1 forwards on the lane kernel's NHWC slab copies)
// rather than on the NCHW direct kernels between transposes (the forward: the lane kernel's slab copies
// for every depthwise layer). Always: measured in-process, 2 threads, Zen 4, batch 8,
// time against that path (forward / backward-input / backward-weight): MobileNetV2's 3x3 144 at 56x56
// 0.32/0.24/0.49, 576 at 14x14 0.46/0.35/0.24, 960 at 7x7 0.46/0.50/0.62, 3x3/2 144 from 56x56
// 0.17/0.21/0.19, 96 from 112x112 0.28/0.19/0.34, EfficientNet's 5x5 672 at 14x14 0.96/0.70/0.91.
bool channels_last_depthwise(const Conv2dParams& p) {
  return run_direct<float>(p) && cpu::direct::is_depthwise(p) && cpu::has_avx512();
}

// A strided 1x1 layer without padding (ResNet's shortcuts)'s backward-input on NHWC tensors: grad_input is
// zero but at the stride's pixels, which hold the dense 1x1 backward-input (strided_pointwise_dense_params).
// Where the forward's rule takes that dense convolution, ungrouped. Measured, 2 threads, Zen 4, batch
// 8, in-process, against the NCHW kernels between transposes (backward-input alone / the whole
// backward): ResNet-18's 64->128 from 56x56 0.49 / 0.88, 128->256 from 28x28 0.74 / 0.94, ResNet-50's
// 256->512 from 56x56 0.61 / 0.92 (the denser ones, 822+ FLOPs an element, stay on the NCHW kernels).
bool channels_last_strided_pointwise_backward_input(const Conv2dParams& p);

// Whether `channels` output channels in 16-lane vectors leave at most a quarter of the lanes idle (the NHWC
// direct kernel's lanes).
bool few_idle_lanes(int64_t channels) { return 4 * channels >= 3 * cpu::engine::ceil_div(channels, 16) * 16; }

// Elements of a layer's input and output together, and of its weight.
double activation_elements(const Conv2dParams& p) {
  return double(p.batch) * (p.in_channels * p.in_plane() + p.out_channels * p.out_plane());
}
double weight_elements(const Conv2dParams& p) { return double(p.out_channels) * p.col_rows_per_group(); }

// FLOPs per element of a layer's input and output: what its transposes weigh against its arithmetic; and
// of the weight too where `weight` (a channels_last weight, which the NCHW route copies to NCHW).
double flops_per_element(const Conv2dParams& p, bool weight = false) {
  const double flops = 2.0 * p.batch * p.out_plane() * p.out_channels * p.col_rows_per_group();
  return flops / (activation_elements(p) + (weight ? weight_elements(p) : 0.0));
}

// Whether a channels_last float32 layer's backward-weight runs on the in-place kernel
// (cpu/channels_last_weight_grad_in_place.h) rather than on the NCHW kernels after transposes of
// grad_output and the input: ungrouped layers of at most 420 FLOPs an element of input and output, with
// a grad_weight of at most 2^16 elements. Measured in-process, 2 threads, Zen 4, time against those NCHW
// kernels (FLOPs an element): the MNIST CNN's conv1 at batch 512 (17) 0.16, at batch 100 0.32, LeNet's
// conv1 (batch 100) 0.85, SimpleConvNet's 5x5 1->30 (batch 512) 0.37, 3x3 3->64 at 32x32 (batch 128)
// 0.41, the ResNet stem (247) 0.81, AlexNet's conv1 (408) 0.94, 1x1 64->128/2 from 56x56 (43) 0.52,
// 128->256/2 (85) 0.85, 1x1 64->256 at 56x56 (102) 0.75, 256->128 at 28x28 (170) 0.84, 3x3 32->64 at
// 56x56 (384) 0.91, the MNIST CNN's conv2 (384) 0.96. Not taken: 1x1 256->512/2 from 14x14 (170, 2^17
// elements: 392 pixels make 2 blocks, and each 6-row tile re-reads the input's pixels from L2) 1.17,
// 512->1024/2 (341) 1.09, 512->2048 at 7x7 (819) 1.60, 3x3 64->64 at 56x56 (576, Winograd) 1.69; 3x3/2
// 64->128 from 56x56 (384, 2^16 + 2^13 elements) 0.94.
// Session 27 (2 threads, Zen 4, in-process, in-place / the NCHW route's im2col+GEMM between transposes),
// strided layers by the size of the blocks' partial sums: ResNet-18's 3x3/2 64->128 at batch 8 (2.1 MB)
// 0.82, at batch 1 0.94, 128->256 (3.5 MB) 0.96, 256->512 (4.7 MB) 0.97, ResNet-50's 3x3/2 128 (5.9 MB)
// 0.88, 3x3/2 32->64 from 112x112 (1.4 MB) 0.95; behind past 6 MB: ResNet-50's 3x3/2 256 (9.4 MB) 1.09,
// 512 (9.4 MB) 1.02, ResNet-18's 128->256 at batch 32 (11.8 MB) 1.11, 5x5/2 64->192 (8.6 MB) 1.05, and on
// 49 pixels (256->512 at batch 1) 1.14.
// Not under the "gemm" setting. FASTCONV_CPU_CHANNELS_LAST_WEIGHT_GRAD=0/1 forces it off/on where it
// applies (tests, comparisons).
bool channels_last_weight_grad_in_place(const Conv2dParams& p) {
  if (!use_engine<float>() || run_direct<float>(p) || !cpu::engine::weight_grad_in_place_applicable(p)) return false;
  if (cpu::forced("FASTCONV_CPU_CHANNELS_LAST_POINTWISE", '0', '1') == 1 &&
      cpu::engine::pointwise_weight_grad_applicable(p))
    return false;  // channels_last_pointwise_weight_grad forced on
  const int f = cpu::forced("FASTCONV_CPU_CHANNELS_LAST_WEIGHT_GRAD", '0', '1');
  if (f >= 0) return f == 1;
  if (g_algorithm_setting.load() == kSettingGemm) return false;
  if (flops_per_element(p) <= 420.0 && weight_elements(p) <= double(int64_t(1) << 16)) return true;
  // strided layers of 2+ taps (which the NCHW route runs on im2col+GEMM between transposes) where the
  // blocks' partial sums stay within 6 MB and each block sums 128+ pixels
  const int64_t blocks = cpu::engine::weight_grad_in_place_blocks(p);
  const double partial_floats =
      double(blocks) * p.col_rows_per_group() * cpu::engine::ceil_div(p.out_channels, 16) * 16;
  return (p.stride_h > 1 || p.stride_w > 1) && p.kernel_h * p.kernel_w >= 2 && partial_floats * 4 <= 6e6 &&
         p.batch * p.out_plane() >= 128 * blocks;
}

// Whether a channels_last float32 layer's forward runs on the NHWC direct kernel
// (cpu/channels_last_conv2d.h) rather than on an NCHW kernel between two transposes. By rule where the
// transposes weigh: at most 600 FLOPs per element of input and output (1300 since session 27, below) (measured
// in-process, 2 threads, Zen 4, time against torch's channels_last conv, direct / transposed, batch 8: 1x1 256->64 at
// 56x56 (102 FLOPs an element) 1.06 / 1.70, ResNeXt's 32 groups of 32 at 7x7 (288) 1.13 / 1.41, 3x3/2 64->128 from
// 56x56 (385) 1.06 / 1.23; behind at 1x1 512->2048 at 7x7 (822) 1.04 / 0.95, 3x3/2 256->512 from 14x14 (1540) 1.27
// / 1.14, AlexNet conv4 at batch 1 (2770) 1.21 / 1.07), and not where Winograd takes the layer (3x3 64-512 at batch
// 8: 1.11-1.19 / 0.65-0.95), nor under the "gemm" setting. The narrow kernel's strided layers of few output channels
// run here too (time against it between the transposes, in-process: the ResNet stem 0.86, AlexNet's conv1 at batch
// 1/8/32 0.86/0.95/0.87, 3x3/2 16->32, 32->64, 8->16 and 64->64 0.72-0.76). FASTCONV_CPU_CHANNELS_LAST=0/1 forces it
// off/on (tests, comparisons). A channels_last weight (weight_nhwc) counts among the elements: the NCHW route copies it
// to NCHW, the direct kernel packs it as it is. Measured in-process, 2 threads, Zen 4, channels_last weights, direct /
// NCHW route: batch 1 AlexNet conv3 (295 FLOPs an element with the weight) 0.92, conv5 0.86-0.90, conv4 (301) 1.00, 3x3
// 512->512 at 7x7 (96) 0.74-0.82, 3x3/2 256->512 from 14x14 0.83; at batch 8 (519) 0.83. Session 27 (Zen 4, one thread,
// thread CPU time, in-process, direct / NCHW route, NCHW and channels_last weights): from 600 to 1300 FLOPs an element
// the direct kernel is ahead where the weight is at most twice the input and output: 3x3/2 128->256 from 28x28 at batch
// 8 (616 with the weight, 770 without) 0.85-0.92, at batch 32 0.85-0.88, 3x3/2 256->256 from 28x28 0.85-0.91, 5x5/2
// 64->192 from 56x56 (1240) 0.93, 1x1 512->2048 at 7x7 (822) 0.90 (batch 32: 0.93), 2048->512 0.91, 1x1/2 1024->2048
// 0.83; even at 1535 (3x3/2 256->512 from 14x14, batch 8 and 32) 0.93-1.0; behind where the weight is larger: batch 1,
// 1x1 512->2048 at 7x7 (822) 1.17, 3x3/2 512->512 from 14x14 (1843) 1.52.
bool channels_last_direct(const Conv2dParams& p, bool weight_nhwc) {
  if (!use_engine<float>() || run_direct<float>(p)) return false;
  const int f = cpu::forced("FASTCONV_CPU_CHANNELS_LAST", '0', '1');
  if (f >= 0) return f == 1;
  if (g_algorithm_setting.load() == kSettingGemm || winograd_wanted(p)) return false;
  // at most a quarter of the vector lanes idle: output channels in the lanes, no group shares a vector
  // (ResNeXt-50's groups of 4 and 8 took 1.23x torch's channels_last time through it)
  const int64_t OCg = p.out_channels_per_group();
  if (!few_idle_lanes(OCg)) return false;
  // up to 1300 where the weight, which the direct kernel packs on every call, is at most twice the input
  // and output together; 600 where it is larger (batch-1 layers of big weights)
  return flops_per_element(p, weight_nhwc) <= (weight_elements(p) <= 2.0 * activation_elements(p) ? 1300.0 : 600.0);
}

// Whether a channels_last float32 grouped layer's forward runs on the grouped direct kernel's NHWC form
// (cpu/grouped_conv2d.h: each item's zero-padded input made from the input's pixels, the output stored
// as NHWC pixels) rather than on the NHWC direct kernel or on the NCHW grouped kernel between transposes
// of the whole tensors (cpu::engine::use_grouped_direct_nhwc).
// FASTCONV_CPU_CHANNELS_LAST_GROUPED=0 turns it off (comparisons), FASTCONV_CPU_CHANNELS_LAST=1 too.
// Measured in-process, 2 threads, Zen 4, batch 8 (time against torch's channels_last): see
// benchmarks/README.md.
bool channels_last_grouped_forward(const Conv2dParams& p) {
  if (!use_engine<float>() || run_direct<float>(p) || p.groups == 1 || engine_rule(p, false) != kGemm) return false;
  if (cpu::forced("FASTCONV_CPU_CHANNELS_LAST_GROUPED", '0', '1') == 0) return false;
  if (cpu::forced("FASTCONV_CPU_CHANNELS_LAST", '0', '1') == 1) return false;  // the NHWC direct kernel forced
  return cpu::engine::use_grouped_direct_nhwc(p);
}

// The same for a backward-input: at stride 1 the forward over grad_output with the flipped weights, where
// the NCHW route runs it on the grouped kernel; strided, the grouped kernel's phases of grad_input
// (grouped_backward_input_phases), where the NCHW route takes them.
bool channels_last_grouped_backward_input(const Conv2dParams& p) {
  if (!use_engine<float>() || run_direct<float>(p) || p.groups == 1) return false;
  if (cpu::forced("FASTCONV_CPU_CHANNELS_LAST_GROUPED", '0', '1') == 0) return false;
  const BackwardInputRoute route = backward_input_route(p);
  Conv2dParams q = cpu::backward_input_params(p);
  if (route == BackwardInputRoute::kGroupedPhases) {
    q.stride_h = q.stride_w = 1;  // the phases' convolutions (grouped_backward_input_phases)
    return cpu::engine::grouped_nhwc_applicable(q);
  }
  return route == BackwardInputRoute::kForwardEngine && cpu::engine::use_grouped_direct_nhwc(q);
}

// Whether the backward-weight of a channels_last input runs the channels-last kernel straight from the
// NHWC tensors: where the NCHW route's rule takes that kernel (cpu/channels_last_weight_grad.h).
bool channels_last_weight_grad_from_nhwc(const Conv2dParams& p) {
  return use_engine<float>() && !run_direct<float>(p) && g_algorithm_setting.load() != kSettingBenchmark &&
         engine_rule(p, true) == kChannelsLast;
}

// Whether the backward-weight of a channels_last 1x1 layer (padding 0, ungrouped, input channels a multiple of
// 16) runs as the GEMM of the NHWC tensors themselves (backward_weight_pointwise_channels_last) rather than
// on the NCHW kernels after transposes of grad_output and the whole input (a strided layer reads a quarter
// of it), where the in-place kernel does not take it. Measured in-process, 2 threads, Zen 4, batch 8,
// against that route: ResNet's strided 1x1 256->512 from 14x14 0.71, 256->512 from 56x56 0.64, 512->1024
// from 28x28 0.69, 1x1 1024->256 at 14x14 0.80 (0.95-1.03 of torch's channels_last time after); 512->2048
// at 7x7, 128->512 at 28x28, 256->64 at 56x56 0.95-0.98.
// FASTCONV_CPU_CHANNELS_LAST_POINTWISE=0/1 forces it off/on where it applies.
bool channels_last_pointwise_weight_grad(const Conv2dParams& p) {
  if (!use_engine<float>() || run_direct<float>(p) || !cpu::engine::pointwise_weight_grad_applicable(p)) return false;
  const int f = cpu::forced("FASTCONV_CPU_CHANNELS_LAST_POINTWISE", '0', '1');
  if (f >= 0) return f == 1;
  return g_algorithm_setting.load() != kSettingGemm;
}

// The same for a backward-weight that the NCHW route runs on the grouped kernel with the input channels in
// the lanes (grouped_weight_grad_nhwc_applicable: groups of at most 16 channels, ResNeXt's 4, 8 and 16).
bool channels_last_grouped_weight_grad(const Conv2dParams& p) {
  if (!use_engine<float>() || run_direct<float>(p) || p.groups == 1) return false;
  if (cpu::forced("FASTCONV_CPU_CHANNELS_LAST_GROUPED", '0', '1') == 0) return false;
  return engine_rule(p, true) == kGemm && cpu::engine::grouped_weight_grad_wanted(p) &&
         cpu::engine::grouped_weight_grad_nhwc_applicable(p);
}

// Whether a channels_last float32 layer's backward-input runs on the NHWC direct kernel, as the forward
// of grad_output with the flipped, transposed weights (flipped_conv.h; stride 1; the grad_input is
// channels_last, as torch's): where the forward's rule takes that convolution, ungrouped. Measured in-process, 2
// threads, Zen 4, batch 8, the whole backward (input, weight and bias gradients; backward-weight still transposes
// grad_output), NHWC / NCHW kernels between transposes: 1x1 256->64 and 64->256 at 56x56 (102 FLOPs an element) 0.89,
// 0.94 (backward-input alone 0.54, 0.57), 64->64 0.84, 512->128 and 128->512 at 28x28 (204) 0.96, 0.99; 1024->256 and
// 256->1024 at 14x14 (409) 0.98, 1.08; ResNeXt's 32 groups of 32 at 7x7 1.18 (its grouped kernel).
// FASTCONV_CPU_CHANNELS_LAST forces it as the forward's. With a channels_last weight (counted as in
// channels_last_direct, and read in place: its 16 consecutive input channels are a vector of the flipped
// weights), batch 1 (FLOPs an element with the weight): AlexNet conv3 (295) 0.84, conv5 0.86, 3x3 512->512
// at 7x7 0.61 against the NCHW route; conv4 (301) 0.93, hence 320 here until session 27, which measured
// (in-process, 2 threads, Zen 4, backward-input alone, direct / NCHW route) 1x1 layers at batch 8 of 409
// (1024->256 and 256->1024 at 14x14) 0.84, 0.76, 512 (512->512) 0.79, 819 (512<->2048 at 7x7) 0.83-0.85,
// 1024 (1024->1024 at 14x14) 0.89, at batch 32 0.77, at batch 1 0.83-0.91, and a dilated 3x3 256->256 at
// 28x28 (2304) 0.96: now the forward's rule for the convolution it runs (up to 1300, or 600 where the
// weight is more than twice the input and output).
bool channels_last_backward_input(const Conv2dParams& p, bool weight_nhwc) {
  if (!cpu::backward_input_as_forward(p)) return false;
  const Conv2dParams q = cpu::backward_input_params(p);
  if (!channels_last_direct(q, weight_nhwc)) return false;
  if (cpu::forced("FASTCONV_CPU_CHANNELS_LAST", '0', '1') == 1) return true;
  return p.groups == 1;
}

// The dense convolution of a strided 1x1 backward-input: grad_output (out_h x out_w, out_channels) by the
// transposed weights into in_channels at the same pixels.
Conv2dParams strided_pointwise_dense_params(const Conv2dParams& p) {
  Conv2dParams q = p;
  q.in_channels = p.out_channels;
  q.in_h = p.out_h;
  q.in_w = p.out_w;
  q.out_channels = p.in_channels;
  q.stride_h = q.stride_w = q.dilation_h = q.dilation_w = 1;
  return q;
}

// Whether a channels_last float32 layer's strided backward-input runs as one NHWC direct forward a phase of
// grad_input (cpu/phase_backward_input.h, backward_input_by_phases_channels_last) rather than on the NCHW
// route between transposes of grad_output and grad_input: strided, dilation 1, ungrouped, kernel at least
// the stride, not 1x1 (channels_last_strided_pointwise_backward_input), at most a quarter of the lanes
// idle. Measured in-process, 2 threads, Zen 4, against that route: ResNet's 3x3/2 64->128 from 56x56,
// 128->256 from 28x28, 256->512 from 14x14 at batch 8 0.86, 0.86, 0.82 (1.10, 1.07, 1.05 of torch's
// channels_last time), at batch 1 0.89 and 0.76; ResNet-50's 3x3/2 128 from 56x56 0.83.
// FASTCONV_CPU_CHANNELS_LAST_PHASES=0/1 forces it off/on where it applies.
bool channels_last_phases_backward_input(const Conv2dParams& p) {
  if (!use_engine<float>() || run_direct<float>(p) || !cpu::backward_input_by_phases_applicable(p) ||
      !cpu::phases_are_padded_forwards(p) || (p.kernel_h == 1 && p.kernel_w == 1))
    return false;
  const int f = cpu::forced("FASTCONV_CPU_CHANNELS_LAST_PHASES", '0', '1');
  if (f >= 0) return f == 1;
  if (g_algorithm_setting.load() == kSettingGemm) return false;
  return few_idle_lanes(p.in_channels);  // grad_input's channels are the phases' output lanes
}

bool channels_last_strided_pointwise_backward_input(const Conv2dParams& p) {
  const bool strided = p.stride_h > 1 || p.stride_w > 1;
  return strided && p.kernel_h == 1 && p.kernel_w == 1 && p.pad_h == 0 && p.pad_w == 0 && p.groups == 1 &&
         channels_last_direct(strided_pointwise_dense_params(p));
}

// grad_input (NHWC, in_channels C) = dense (NHWC, out_h x out_w pixels) at the pixels (oh*stride_h,
// ow*stride_w), zero elsewhere.
void scatter_strided_pixels(const float* dense, const Conv2dParams& p, float* grad_input) {
  const int64_t C = p.in_channels, H = p.in_h, W = p.in_w, OH = p.out_h, OW = p.out_w;
  at::parallel_for(0, p.batch * H, cpu::engine::grain_for(W * C), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / H, ih = b % H;
      float* row = grad_input + b * W * C;
      const int64_t oh = ih / p.stride_h;
      if (ih % p.stride_h != 0 || oh >= OH) {
        std::memset(row, 0, sizeof(float) * W * C);
        continue;
      }
      const float* src = dense + (n * OH + oh) * OW * C;
      for (int64_t iw = 0; iw < W; ++iw) {
        const int64_t ow = iw / p.stride_w;
        if (iw % p.stride_w == 0 && ow < OW) {
          std::memcpy(row + iw * C, src + ow * C, sizeof(float) * C);
        } else {
          std::memset(row + iw * C, 0, sizeof(float) * C);
        }
      }
    }
  });
}
#endif

// A channels_last tensor (or a slice of one) as an NCHW-contiguous one, and an NCHW-contiguous one as
// channels_last; float32 on AVX-512 by 16x16 register transposes (engine::transpose_batch), else ATen's
// copy. Weights too: ATen's copy of AlexNet conv4's channels_last weight (3.5 MB) was 10% of its
// forward at batch 1 (perf, 2 threads, Zen 4; time against torch's channels_last 1.22 -> 1.03 with this).
// A channels_last weight that is not also NCHW-contiguous (as 1x1 and one-channel weights are): the NCHW
// route copies it (contiguous_nchw), the NHWC direct kernel reads it in place.
bool weight_is_nhwc(const at::Tensor& w) {
  return !w.is_contiguous() && w.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor contiguous_nchw(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
#if FASTCONV_HAVE_AVX512_KERNELS
  if (t.scalar_type() == at::kFloat && suggests_channels_last(t) && use_engine<float>()) {
    const at::Tensor nhwc = t.contiguous(at::MemoryFormat::ChannelsLast);  // a slice's rows gathered
    at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    cpu::engine::transpose_batch(nhwc.const_data_ptr<float>(), t.size(0), t.size(2) * t.size(3), t.size(1),
                                 out.data_ptr<float>());
    return out;
  }
#endif
  return t.contiguous();
}

at::Tensor to_channels_last(const at::Tensor& t) {  // t NCHW-contiguous
#if FASTCONV_HAVE_AVX512_KERNELS
  if (t.scalar_type() == at::kFloat && t.dim() == 4 && t.is_contiguous() && use_engine<float>()) {
    at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast));
    cpu::engine::transpose_batch(t.const_data_ptr<float>(), t.size(0), t.size(1), t.size(2) * t.size(3),
                                 out.data_ptr<float>());
    return out;
  }
#endif
  return copy_channels_last(t);
}

at::Tensor conv2d_cpu_impl(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu) {
  const Conv2dParams p = check_conv2d(input, weight, bias, stride, padding, dilation, groups);
  // the ATen calls below (views, GEMMs) are implementation details, invisible to autograd
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const bool has_bias = bias.has_value() && bias->defined();
  if (is_reduced_float(input.scalar_type())) {
    // float16/bfloat16 on the CPU: compute in float32, round once at the end.
    const c10::optional<at::Tensor> bias_f = has_bias ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
    return conv2d_cpu_impl(input.to(at::kFloat), weight.to(at::kFloat), bias_f, stride, padding, dilation, groups, relu)
        .to(input.scalar_type());
  }
  // A channels_last output where torch's conv2d gives one (conv2d_channels_last: the input's or the
  // weight's strides suggest it; fastconv/_ops.py's fake kernel says the same). The kernels that read
  // NHWC run on a channels_last input in place, the others on an NCHW copy.
  const bool channels_last = conv2d_channels_last(input, weight);
  const at::Tensor bias_c = has_bias ? bias->contiguous() : at::Tensor();
#if FASTCONV_HAVE_AVX512_KERNELS
  const bool fp32_nhwc = suggests_channels_last(input) && input.scalar_type() == at::kFloat;
  const bool depthwise = fp32_nhwc && channels_last_depthwise(p);
  const bool grouped = fp32_nhwc && !depthwise && channels_last_grouped_forward(p);
  const bool weight_nhwc = weight_is_nhwc(weight);
  if (depthwise || grouped || (fp32_nhwc && channels_last_direct(p, weight_nhwc))) {  // NHWC in, NHWC out
    at::Tensor output = at::empty({p.batch, p.out_channels, p.out_h, p.out_w},
                                  input.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (p.batch == 0) return output;
    const at::Tensor input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);  // itself, unless a slice
    const float* b = has_bias ? bias_c.const_data_ptr<float>() : nullptr;
    if (depthwise) {
      cpu::direct::depthwise_forward_nhwc(input_nhwc.const_data_ptr<float>(),
                                          contiguous_nchw(weight).const_data_ptr<float>(), b, output.data_ptr<float>(),
                                          p, relu);
    } else if (grouped) {
      cpu::engine::grouped_forward(input_nhwc.const_data_ptr<float>(), contiguous_nchw(weight).const_data_ptr<float>(),
                                   b, output.data_ptr<float>(), p, relu, true);
    } else if (weight_nhwc) {
      // channels_last weights as they are (an NCHW copy first had been 9% of AlexNet conv5's batch-1 time)
      cpu::engine::forward_channels_last(input_nhwc.const_data_ptr<float>(), weight.const_data_ptr<float>(), b,
                                         output.data_ptr<float>(), p, relu, cpu::engine::ClWeights::kOTI);
    } else {
      cpu::engine::forward_channels_last(input_nhwc.const_data_ptr<float>(),
                                         contiguous_nchw(weight).const_data_ptr<float>(), b, output.data_ptr<float>(),
                                         p, relu);
    }
    return output;
  }
#endif
  const at::Tensor input_c = contiguous_nchw(input);
  const at::Tensor weight_c = contiguous_nchw(weight);
  at::Tensor output = at::empty({p.batch, p.out_channels, p.out_h, p.out_w}, input.options());
  if (p.batch == 0) return channels_last ? copy_channels_last(output) : output;
  bool relu_done = false;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastconv_conv2d_cpu", [&] {
    relu_done = conv2d_forward_kernel<scalar_t>(input_c.const_data_ptr<scalar_t>(), weight_c.const_data_ptr<scalar_t>(),
                                                has_bias ? bias_c.const_data_ptr<scalar_t>() : nullptr,
                                                output.data_ptr<scalar_t>(), p, relu);
  });
  if (relu && !relu_done) output.relu_();
  return channels_last ? to_channels_last(output) : output;
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_cpu_impl(input, weight, bias, stride, padding, dilation, groups, false);
}

at::Tensor conv2d_relu_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv2d_cpu_impl(input, weight, bias, stride, padding, dilation, groups, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_backward_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, const at::Tensor& weight,
                                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                                   at::IntArrayRef dilation, int64_t groups,
                                                                   std::array<bool, 3> output_mask) {
  const Conv2dParams p =
      check_conv2d(input, weight, c10::nullopt, stride, padding, dilation, groups, "fastconv._conv2d_backward");
  check_conv2d_backward(grad_output, input, p);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (is_reduced_float(input.scalar_type())) {
    auto [gi, gw, gb] = conv2d_backward_cpu(grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
                                            stride, padding, dilation, groups, output_mask);
    const auto t = input.scalar_type();
    return {gi.to(t), gw.to(t), gb.to(t)};
  }
  // masked-out gradients are empty tensors, each its own (outputs must not alias)
  const auto empty = [&] { return at::empty({0}, input.options()); };
  const bool channels_last = conv2d_channels_last(input, weight);
  at::Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), input.options()) : at::Tensor();
  std::array<bool, 3> nchw_mask = output_mask;  // the gradients the NCHW kernels below compute
  at::Tensor grad_weight_nhwc;
#if FASTCONV_HAVE_AVX512_KERNELS
  // grad_output as NHWC for the NHWC kernels below, laid out once however many of them run (a copy only
  // where it comes NCHW)
  at::Tensor go_nhwc_once;
  const auto go_nhwc = [&]() -> const at::Tensor& {
    if (!go_nhwc_once.defined()) go_nhwc_once = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
    return go_nhwc_once;
  };
  if ((output_mask[0] || output_mask[1]) && p.batch > 0 && input.scalar_type() == at::kFloat &&
      suggests_channels_last(input) && channels_last_depthwise(p)) {
    // depthwise: both gradients on the NHWC kernels, from NHWC grad_output and input in place
    const at::Tensor weight_c = contiguous_nchw(weight);
    if (output_mask[0]) {
      grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
      cpu::direct::depthwise_backward_input_channels_last(
          go_nhwc().const_data_ptr<float>(), weight_c.const_data_ptr<float>(), grad_input.data_ptr<float>(), p);
    }
    if (output_mask[1]) {
      const at::Tensor input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);
      grad_weight_nhwc = at::empty(weight.sizes(), weight.options());
      cpu::direct::depthwise_backward_weight_channels_last(
          go_nhwc().const_data_ptr<float>(), input_nhwc.const_data_ptr<float>(), grad_weight_nhwc.data_ptr<float>(), p);
    }
    nchw_mask[0] = nchw_mask[1] = false;
  }
  // backward-weight on a kernel that reads NHWC tensors: the in-place kernel (input: a copy where only the
  // weight is channels_last), the channels-last kernel (its padded copy made from the input's pixels),
  // the grouped kernel's NHWC form (each item's input and grad_output from their pixels)
  if (nchw_mask[1] && p.batch > 0 && input.scalar_type() == at::kFloat) {
    const bool nhwc = suggests_channels_last(input);
    const bool in_place = channels_last && channels_last_weight_grad_in_place(p);
    const bool pointwise = !in_place && nhwc && channels_last_pointwise_weight_grad(p);
    const bool channels_last_kernel = !in_place && !pointwise && nhwc && channels_last_weight_grad_from_nhwc(p);
    const bool grouped =
        !in_place && !pointwise && !channels_last_kernel && nhwc && channels_last_grouped_weight_grad(p);
    if (in_place || pointwise || channels_last_kernel || grouped) {
      const at::Tensor input_nhwc = input.contiguous(at::MemoryFormat::ChannelsLast);  // itself, unless a slice
      grad_weight_nhwc = at::empty(weight.sizes(), weight.options());
      const float *go = go_nhwc().const_data_ptr<float>(), *x = input_nhwc.const_data_ptr<float>();
      float* gw = grad_weight_nhwc.data_ptr<float>();
      if (in_place) {
        cpu::engine::backward_weight_channels_last_in_place(go, x, gw, p);
      } else if (pointwise) {
        cpu::engine::backward_weight_pointwise_channels_last(go, x, gw, p);
      } else if (channels_last_kernel) {
        cpu::engine::backward_weight_channels_last(go, x, gw, p, true);
      } else {
        cpu::engine::grouped_backward_weight(go, x, gw, p, true);
      }
      nchw_mask[1] = false;
    }
  }
  const bool nhwc_input =
      nchw_mask[0] && p.batch > 0 && input.scalar_type() == at::kFloat && suggests_channels_last(input);
  const bool stride1_nhwc = nhwc_input && channels_last_backward_input(p, weight_is_nhwc(weight));
  const bool shortcut_nhwc = nhwc_input && !stride1_nhwc && channels_last_strided_pointwise_backward_input(p);
  if (stride1_nhwc || shortcut_nhwc) {
    // NHWC grad_output in, NHWC grad_input out, on the direct forward kernel with the flipped, transposed
    // weights: at stride 1 straight into grad_input; for a strided 1x1 layer (a ResNet shortcut) the
    // dense 1x1 product, scattered into a zeroed grad_input at the stride's pixels
    // channels_last (or 1x1) weights read as they are, the lanes being consecutive floats of them
    // (ClWeights::kFlippedOTI); others through a flipped, transposed NCHW copy
    const bool weight_cl = weight.is_contiguous(at::MemoryFormat::ChannelsLast);
    const std::vector<float> w_t =
        weight_cl ? std::vector<float>()
                  : cpu::flipped_transposed_weight(contiguous_nchw(weight).const_data_ptr<float>(), p);
    const float* wq = weight_cl ? weight.const_data_ptr<float>() : w_t.data();
    const auto order = weight_cl ? cpu::engine::ClWeights::kFlippedOTI : cpu::engine::ClWeights::kOIT;
    const auto cl = input.options().memory_format(at::MemoryFormat::ChannelsLast);
    grad_input = at::empty(input.sizes(), cl);
    if (stride1_nhwc) {
      cpu::engine::forward_channels_last(go_nhwc().const_data_ptr<float>(), wq, nullptr, grad_input.data_ptr<float>(),
                                         cpu::backward_input_params(p), false, order);
    } else {
      const at::Tensor dense = at::empty({p.batch, p.in_channels, p.out_h, p.out_w}, cl);
      cpu::engine::forward_channels_last(go_nhwc().const_data_ptr<float>(), wq, nullptr, dense.data_ptr<float>(),
                                         strided_pointwise_dense_params(p), false, order);
      scatter_strided_pixels(dense.const_data_ptr<float>(), p, grad_input.data_ptr<float>());
    }
    nchw_mask[0] = false;
  }
  if (nhwc_input && !stride1_nhwc && !shortcut_nhwc && channels_last_phases_backward_input(p)) {
    // one NHWC direct forward a phase, into grad_input's pixels of that phase
    const at::Tensor weight_nhwc = weight.contiguous(at::MemoryFormat::ChannelsLast);
    grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
    cpu::backward_input_by_phases_channels_last(go_nhwc().const_data_ptr<float>(), weight_nhwc.const_data_ptr<float>(),
                                                grad_input.data_ptr<float>(), p);
    nchw_mask[0] = false;
  }
  if (nchw_mask[0] && nhwc_input && !stride1_nhwc && !shortcut_nhwc && channels_last_grouped_backward_input(p)) {
    // the grouped kernel's NHWC form over NHWC grad_output, into NHWC grad_input
    grad_input = at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::ChannelsLast));
    const at::Tensor weight_c = contiguous_nchw(weight);
    const float* w = weight_c.const_data_ptr<float>();
    if (backward_input_route(p) == BackwardInputRoute::kGroupedPhases) {
      cpu::engine::grouped_backward_input_phases(go_nhwc().const_data_ptr<float>(), w, grad_input.data_ptr<float>(), p,
                                                 true);
    } else {
      cpu::engine::grouped_backward_input_stride1(go_nhwc().const_data_ptr<float>(), w, grad_input.data_ptr<float>(), p,
                                                  true);
    }
    nchw_mask[0] = false;
  }
#endif
  const at::Tensor go_c = nchw_mask[0] || nchw_mask[1] ? contiguous_nchw(grad_output) : grad_output;
  // every kernel writes grad_weight whole (tests allocate it NaN-filled to check); zeros only for an
  // empty batch, where no kernel runs
  at::Tensor grad_weight = !output_mask[1]              ? at::Tensor()
                           : grad_weight_nhwc.defined() ? grad_weight_nhwc
                           : p.batch > 0                ? at::empty(weight.sizes(), weight.options())
                                                        : at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_bias = output_mask[2] ? go_c.sum({0, 2, 3}) : empty();
  if (p.batch > 0 && (nchw_mask[0] || nchw_mask[1])) {
    // the input only for grad_weight (no transposed copy of a channels_last input for grad_input alone)
    const at::Tensor input_c = nchw_mask[1] ? contiguous_nchw(input) : input;
    const at::Tensor weight_c = contiguous_nchw(weight);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fastconv_conv2d_backward_cpu", [&] {
      conv2d_backward_kernel<scalar_t>(go_c.const_data_ptr<scalar_t>(), input_c.const_data_ptr<scalar_t>(),
                                       weight_c.const_data_ptr<scalar_t>(),
                                       nchw_mask[0] ? grad_input.data_ptr<scalar_t>() : nullptr,
                                       nchw_mask[1] ? grad_weight.data_ptr<scalar_t>() : nullptr, p);
    });
  }
  // grad_input and grad_weight channels_last where the forward's result is (as torch's)
  if (channels_last) {
    if (nchw_mask[0]) grad_input = to_channels_last(grad_input);
    if (output_mask[1]) grad_weight = to_channels_last(grad_weight);
  }
  return {output_mask[0] ? grad_input : empty(), output_mask[1] ? grad_weight : empty(), grad_bias};
}

}  // namespace

void set_conv_algorithm(std::string name) {
  TORCH_CHECK(name == "auto" || name == "gemm" || name == "winograd" || name == "benchmark",
              "fastconv.set_conv_algorithm: expected 'auto', 'gemm', 'winograd' or 'benchmark', got '", name, "'");
  g_algorithm_setting = name == "gemm"        ? kSettingGemm
                        : name == "winograd"  ? kSettingWinograd
                        : name == "benchmark" ? kSettingBenchmark
                                              : kSettingAuto;
}

std::string get_conv_algorithm() {
  const int s = g_algorithm_setting.load();
  return s == kSettingGemm        ? "gemm"
         : s == kSettingWinograd  ? "winograd"
         : s == kSettingBenchmark ? "benchmark"
                                  : "auto";
}

std::string cpu_conv_algorithm(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Conv2dParams p =
      check_conv2d(input, weight, c10::nullopt, stride, padding, dilation, groups, "fastconv.conv2d_algorithm");
  const auto t = input.scalar_type();
  return algorithm_name(p, t == at::kFloat || t == at::kHalf || t == at::kBFloat16, suggests_channels_last(input),
                        conv2d_channels_last(input, weight), weight_is_nhwc(weight));
}

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  m.def("_set_conv_algorithm(str name) -> ()", &set_conv_algorithm);
  m.def("_get_conv_algorithm() -> str", &get_conv_algorithm);
  // the CPU kernel the arguments would run (shapes and dtype only are read: meta tensors work)
  m.def(
      "_cpu_conv_algorithm(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> str",
      [](const at::Tensor& i, const at::Tensor& w, std::vector<int64_t> s, std::vector<int64_t> pd,
         std::vector<int64_t> d, int64_t g) { return cpu_conv_algorithm(i, w, s, pd, d, g); });
}

TORCH_LIBRARY_IMPL(fastconv, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_relu", &conv2d_relu_cpu);
  m.impl("_conv2d_backward", &conv2d_backward_cpu);
}

}  // namespace fastconv
