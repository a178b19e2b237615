// The zoo's small-channel convolutions on the CPU, as an XLA FFI custom call (float32, NHWC,
// HWIO kernel, no groups):
//
//   y[n, ho, wo, o] = sum_{kh, kw, c} x[n, ho*sh + kh - pt, wo*sw + kw - pl, c] * w[kh, kw, c, o]
//
// A direct convolution: XLA's CPU backend runs this as an Eigen contraction over image patches,
// which packs each patch block before its matrix product (a third of the convolutions' time in a
// resnet56 step, `perf`) and is at its slowest with 16 channels. Here P output pixels of a row
// times OV vectors of output channels stay in registers while the taps and input channels run:
// per input channel and tap, OV vector loads of w, P broadcasts of x and P * OV fused
// multiply-adds. The input rows a block reads are copied, zero-padded at both ends, into a
// per-thread ring of KH rows (a row already in the ring is not copied again), so the inner loop
// has no bounds checks.
//
// The input gradient of a stride-1 convolution is the same operation on dy, with the kernel
// flipped and its channel axes swapped and padding K - 1 - p (ffkd_jax/models/conv_kernel.py
// does that transformation in JAX, on the small kernel tensor).
//
// Work is split over (output-channel block, image) pairs, shared by the calling thread and tasks
// on XLA's intra-op thread pool (pool.h).
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Internal linkage for everything but the handler: the two sources share one library.
namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;  // floats per vector
constexpr int REGS = 32;
#else
constexpr int VL = 8;
constexpr int REGS = 16;
#endif

typedef float vec __attribute__((vector_size(VL * 4)));
static inline vec loadv(const float* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
static inline void storev(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

struct Shape {
  int64_t N, H, W, C, Ho, Wo, O, KH, KW, sh, sw, pt, pl, Wp;  // Wp: padded row width
  int64_t WS = 0;  // floats between one input channel's weight rows: O, or a block if repacked
};

// y[wo .. wo + P) x [ob, ob + OV * VL) of one output row, from the KH padded rows (nullptr: a
// row of zeros, skipped) and w, the weights of this block of output channels.
template <int P, int OV>
static inline void block(const float* const* rows, const float* w, float* yrow, const Shape& s,
                         int64_t wo, int64_t ob) {
  vec acc[P][OV];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < OV; ++j) acc[p][j] = vec{};
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    const float* row = rows[kh];
    if (row == nullptr) continue;
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      const float* xp = row + (wo * s.sw + kw) * s.C;
      const float* wp = w + (kh * s.KW + kw) * s.C * s.WS;
      for (int64_t c = 0; c < s.C; ++c) {
        vec wv[OV];
        for (int j = 0; j < OV; ++j) wv[j] = loadv(wp + c * s.WS + j * VL);
        for (int p = 0; p < P; ++p) {
          const float xi = xp[p * s.sw * s.C + c];
          for (int j = 0; j < OV; ++j) acc[p][j] += xi * wv[j];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < OV; ++j) storev(yrow + (wo + p) * s.O + ob + j * VL, acc[p][j]);
}

// One output row's channels [ob, ob + OV * VL): blocks of P pixels, then the rest in blocks of
// 8, 4, 2 and 1 (no more than P).
template <int P, int OV>
static void output_row(const float* const* rows, const float* w, float* yrow, const Shape& s,
                       int64_t ob) {
  int64_t wo = 0;
  for (; wo + P <= s.Wo; wo += P) block<P, OV>(rows, w, yrow, s, wo, ob);
  if constexpr (P > 8)
    for (; wo + 8 <= s.Wo; wo += 8) block<8, OV>(rows, w, yrow, s, wo, ob);
  if constexpr (P > 4)
    for (; wo + 4 <= s.Wo; wo += 4) block<4, OV>(rows, w, yrow, s, wo, ob);
  if constexpr (P > 2)
    for (; wo + 2 <= s.Wo; wo += 2) block<2, OV>(rows, w, yrow, s, wo, ob);
  for (; wo < s.Wo; ++wo) block<1, OV>(rows, w, yrow, s, wo, ob);
}

using RowFn = void (*)(const float* const*, const float*, float*, const Shape&, int64_t);

struct Work {
  const float* x;
  const float* w;
  float* y;
  Shape s;
  std::vector<float> packed;  // w by output-channel block, where there is more than one
  RowFn row_fn;
  int64_t channels = 0;  // output channels a row_fn call computes (OV * VL)
  ffkd_pool::Items items;
  explicit Work(int64_t total) : items(total) {}
};

// Takes (output-channel block, image) items until none is left. The block is outermost, so a
// thread runs through the images with one block's weights (9 x 256 x 64 floats at most: in L2);
// a whole image per item, so that each input row is copied into the ring once per item.
static void run(Work* work) {
  const Shape& s = work->s;
  const bool copy = s.pl > 0 || s.Wp > s.W;
  std::vector<float> ring(copy ? s.KH * s.Wp * s.C : 0, 0.0f);
  std::vector<int64_t> held(s.KH, -1);  // which (n * H + hi) each ring slot holds
  const float* rows[16];
  work->items.take([&](int64_t item) {
    const int64_t ob = item / s.N * work->channels, n = item % s.N;
    const float* w = work->packed.empty() ? work->w : work->packed.data() + ob * s.KH * s.KW * s.C;
    for (int64_t ho = 0; ho < s.Ho; ++ho) {
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t hi = ho * s.sh + kh - s.pt;
        if (hi < 0 || hi >= s.H) {
          rows[kh] = nullptr;
          continue;
        }
        const float* src = work->x + (n * s.H + hi) * s.W * s.C;
        if (!copy) {
          rows[kh] = src;
          continue;
        }
        const int64_t slot = hi % s.KH;
        float* dst = ring.data() + slot * s.Wp * s.C;
        if (held[slot] != n * s.H + hi) {  // the edges stay zero: only the middle is written
          std::memcpy(dst + s.pl * s.C, src, s.W * s.C * sizeof(float));
          held[slot] = n * s.H + hi;
        }
        rows[kh] = dst;
      }
      work->row_fn(rows, w, work->y + (n * s.Ho + ho) * s.Wo * s.O, s, ob);
    }
  });
}

static ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                  ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                                  int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pr) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  // conv_kernel.supports_forward keeps to these (else XLA's convolution runs)
  if (wd[0] > 16) return ffi::Error::InvalidArgument("kernel taller than 16 rows");
  if (pt < 0 || pl < 0 || pr < 0) return ffi::Error::InvalidArgument("negative padding");
  if (yd[3] % 16 != 0) return ffi::Error::InvalidArgument("output channels not a multiple of 16");
  const int64_t O = yd[3];
  // P x OV accumulators, chosen so that they and the OV weight vectors fit the registers
  RowFn row_fn;
  int64_t channels;
#if defined(__AVX512F__)
  if (O % (4 * VL) == 0)
    row_fn = output_row<6, 4>, channels = 4 * VL;
  else if (O % (2 * VL) == 0)
    row_fn = output_row<8, 2>, channels = 2 * VL;
  else
    row_fn = output_row<16, 1>, channels = VL;
#else
  row_fn = output_row<6, 2>, channels = 2 * VL;  // O % 16 == 0
#endif
  const int64_t blocks = O / channels, taps = wd[0] * wd[1] * wd[2];
  auto work = std::make_shared<Work>(xd[0] * blocks);
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->y = y->typed_data();
  work->s = Shape{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], wd[0], wd[1],
                  sh, sw, pt, pl, xd[2] + pl + pr};
  work->row_fn = row_fn;
  work->channels = channels;
  // With several blocks, the weights are repacked so that each block's are contiguous: in HWIO
  // one input channel's row of a block is 64 floats out of O, and rows O floats apart (1 KB at
  // 256 channels) fall into a few cache sets.
  work->s.WS = blocks > 1 ? channels : O;
  if (blocks > 1) {
    work->packed.resize(taps * O);
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t t = 0; t < taps; ++t)
        std::memcpy(work->packed.data() + (b * taps + t) * channels,
                    work->w + t * O + b * channels, channels * sizeof(float));
  }
  ffkd_pool::share(pool, work, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfkdConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("pr"));
