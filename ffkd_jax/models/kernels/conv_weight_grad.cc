// The zoo's convolution weight gradient on the CPU, as an XLA FFI custom call (float32, NHWC).
//
//   dW[kh, kw, c, o] = sum_{n, ho, wo} x[n, ho*sh + kh - pt, wo*sw + kw - pl, c] * dy[n, ho, wo, o]
//
// XLA's CPU backend computes this as an Eigen convolution whose input must first be transposed
// to (C, H, W, N); XLA's CPU transpose is slow and Eigen's kernel is at its worst at 32x32 maps.
// Here x and dy are read in place. For each tap (kh, kw) and each block of CB input x OV vectors
// of output channels, CB * OV vector accumulators stay in registers while the block runs along
// output rows: on AVX-512 CB = 8 and OV = 2 (8 x 32 channels; OV = 1 where O % 32 != 0), on
// AVX2 CB = 4, OV = 2 (4 x 16), each pixel one vector load of dy per OV, CB broadcasts of x and
// CB * OV fused multiply-adds.
//
// The images go in chunks whose x and dy take about 256 KB (at least one image; within L2):
// each block's accumulators are loaded and stored once per chunk and tap, not once per output
// row, which at short rows with many channels (256 at 8x8) cost more than the arithmetic
// (52.9 -> 38.4 ms there; a 1 MB chunk was slower on a strided 1x1 convolution, 6.1 against
// 2.5 ms; benchmarks/README.md).
//
// On XLA's intra-op threads (pool.h): 4 fixed groups of images, each summed into its own buffer by
// whichever thread takes it, then added in group order (deterministic). XLA's CPU runtime runs
// one custom call at a time, so a one-thread kernel here would leave a core idle. Needs
// C % CB == 0 and O % 16 == 0. ffkd_jax/models/conv_kernel.py checks both (otherwise XLA's path
// runs) and builds this file with the host's compiler (-O3 -march=native) on first use.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Internal linkage for everything but the handler: the two sources share one library.
namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;  // floats per vector
#else
constexpr int VL = 8;
#endif
constexpr int64_t CHUNK_BYTES = 256 * 1024;

typedef float vec __attribute__((vector_size(VL * 4)));
static inline vec loadv(const float* p) { vec v; std::memcpy(&v, p, sizeof(vec)); return v; }
static inline void storev(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

struct Shape {
  int64_t H, W, C, Ho, Wo, O, KH, KW, sh, sw, pt, pl;
};

// Adds to a = dW[kh, kw] the block of channels [cb, cb + CB) x [ob, ob + OV * VL) summed over
// images [n0, n1), output rows [ho0, ho1) and columns [wo0, wo1), all inside the input.
template <int CB, int OV>
static inline void block(const float* x, const float* dy, float* a, const Shape& s, int64_t n0,
                         int64_t n1, int64_t kh, int64_t kw, int64_t cb, int64_t ob, int64_t ho0,
                         int64_t ho1, int64_t wo0, int64_t wo1) {
  vec r[CB][OV];
  for (int i = 0; i < CB; ++i)
    for (int j = 0; j < OV; ++j) r[i][j] = loadv(a + (cb + i) * s.O + ob + j * VL);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t ho = ho0; ho < ho1; ++ho) {
      const int64_t hi = ho * s.sh + kh - s.pt;
      const float* xrow = x + ((n * s.H + hi) * s.W + kw - s.pl) * s.C + cb;
      const float* dyrow = dy + ((n * s.Ho + ho) * s.Wo) * s.O + ob;
      for (int64_t wo = wo0; wo < wo1; ++wo) {
        const float* xv = xrow + wo * s.sw * s.C;
        vec d[OV];
        for (int j = 0; j < OV; ++j) d[j] = loadv(dyrow + wo * s.O + j * VL);
        for (int i = 0; i < CB; ++i) {
          const float xi = xv[i];
          for (int j = 0; j < OV; ++j) r[i][j] += xi * d[j];
        }
      }
    }
  }
  for (int i = 0; i < CB; ++i)
    for (int j = 0; j < OV; ++j) storev(a + (cb + i) * s.O + ob + j * VL, r[i][j]);
}

// acc += dW summed over the images [n0, n1).
template <int CB, int OV>
static void accumulate(const float* x, const float* dy, float* acc, int64_t n0, int64_t n1,
                       const Shape& s) {
  const int64_t per_image = (s.H * s.W * s.C + s.Ho * s.Wo * s.O) * 4;
  const int64_t images = std::max<int64_t>(1, CHUNK_BYTES / per_image);
  for (int64_t c0 = n0; c0 < n1; c0 += images) {
    const int64_t c1 = std::min(n1, c0 + images);
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      int64_t ho0 = 0, ho1 = s.Ho;
      while (ho0 < ho1 && ho0 * s.sh + kh - s.pt < 0) ++ho0;
      while (ho1 > ho0 && (ho1 - 1) * s.sh + kh - s.pt >= s.H) --ho1;
      if (ho0 == ho1) continue;
      for (int64_t kw = 0; kw < s.KW; ++kw) {
        int64_t wo0 = 0, wo1 = s.Wo;
        while (wo0 < wo1 && wo0 * s.sw + kw - s.pl < 0) ++wo0;
        while (wo1 > wo0 && (wo1 - 1) * s.sw + kw - s.pl >= s.W) --wo1;
        if (wo0 == wo1) continue;
        float* a = acc + (kh * s.KW + kw) * s.C * s.O;
        for (int64_t cb = 0; cb < s.C; cb += CB)
          for (int64_t ob = 0; ob < s.O; ob += OV * VL)
            block<CB, OV>(x, dy, a, s, c0, c1, kh, kw, cb, ob, ho0, ho1, wo0, wo1);
      }
    }
  }
}

// The images are split into PARTS fixed groups, each summed into its own buffer, and the
// buffers are added in group order: the result does not depend on which thread took which group.
constexpr int64_t PARTS = 4;

struct Work {
  const float* x;
  const float* dy;
  float* out;
  Shape s;
  int64_t N = 0, size = 0;
  void (*run)(const float*, const float*, float*, int64_t, int64_t, const Shape&);
  std::unique_ptr<float[]> partial;  // groups 1 .. PARTS - 1 (group 0 goes straight to `out`)
  ffkd_pool::Items items{PARTS};
};

// Takes groups until none is left.
static void take(Work* work) {
  work->items.take([work](int64_t part) {
    float* acc = part == 0 ? work->out : work->partial.get() + (part - 1) * work->size;
    std::memset(acc, 0, work->size * sizeof(float));
    work->run(work->x, work->dy, acc, work->N * part / PARTS, work->N * (part + 1) / PARTS,
              work->s);
  });
}

static ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                     ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                                     int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  auto work = std::make_shared<Work>();
  work->s = Shape{xd[1], xd[2], xd[3], dd[1], dd[2], dd[3], wd[0], wd[1], sh, sw, pt, pl};
  work->x = x.typed_data();
  work->dy = dy.typed_data();
  work->out = dw->typed_data();
  work->N = xd[0];
  work->size = wd[0] * wd[1] * wd[2] * wd[3];
  work->partial.reset(new float[(PARTS - 1) * work->size]);  // each group zeroes its own
#if defined(__AVX512F__)
  work->run = (work->s.O % 32 == 0) ? accumulate<8, 2> : accumulate<8, 1>;
#else
  work->run = accumulate<4, 2>;
#endif
  ffkd_pool::share(pool, work, take);  // 3 threads: groups of 2 + 1 + 1
  float* out = work->out;
  for (int64_t part = 1; part < PARTS; ++part) {
    const float* p = work->partial.get() + (part - 1) * work->size;
    for (int64_t i = 0; i < work->size; ++i) out[i] += p[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfkdConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));
