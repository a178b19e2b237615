// The zoo's convolution weight gradient on the CPU, as an XLA FFI custom call (float32, NHWC).
//
//   dW[kh, kw, c, o] = sum_{n, ho, wo} x[n, ho*sh + kh - pt, wo*sw + kw - pl, c] * dy[n, ho, wo, o]
//
// XLA's CPU backend computes this as an Eigen convolution whose input must first be transposed
// to (C, H, W, N); XLA's CPU transpose is slow and Eigen's kernel is at its worst at 32x32 maps.
// Here each output row (n, ho), each tap (kh, kw) and each block of 8 input x 16 output channels
// keeps 8 accumulators of 16 floats in registers across the row, reading x and dy in place.
// The batch is split over `threads` threads, each with its own partial sum. Needs C % 8 == 0 and
// O % 16 == 0 (ffkd_jax/models/conv_kernel.py checks and otherwise uses XLA's path).
// Built by conv_kernel.py with the host's compiler (-O3 -march=native) on first use.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void store16(float* p, v16 v) { std::memcpy(p, &v, 64); }

static void accumulate(const float* x, const float* dy, float* acc, int64_t n0, int64_t n1,
                       int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo, int64_t O,
                       int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t ho = 0; ho < Ho; ++ho) {
      const float* dyrow = dy + ((n * Ho + ho) * Wo) * O;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t hi = ho * sh + kh - pt;
        if (hi < 0 || hi >= H) continue;
        const float* xrow = x + ((n * H + hi) * W) * C;
        for (int64_t kw = 0; kw < KW; ++kw) {
          float* a = acc + (kh * KW + kw) * C * O;
          int64_t wo0 = 0;
          while (wo0 < Wo && wo0 * sw + kw - pl < 0) ++wo0;
          int64_t wo1 = Wo;
          while (wo1 > wo0 && (wo1 - 1) * sw + kw - pl >= W) --wo1;
          for (int64_t cb = 0; cb < C; cb += 8) {
            for (int64_t ob = 0; ob < O; ob += 16) {
              v16 r0 = load16(a + (cb + 0) * O + ob), r1 = load16(a + (cb + 1) * O + ob);
              v16 r2 = load16(a + (cb + 2) * O + ob), r3 = load16(a + (cb + 3) * O + ob);
              v16 r4 = load16(a + (cb + 4) * O + ob), r5 = load16(a + (cb + 5) * O + ob);
              v16 r6 = load16(a + (cb + 6) * O + ob), r7 = load16(a + (cb + 7) * O + ob);
              for (int64_t wo = wo0; wo < wo1; ++wo) {
                const float* xv = xrow + (wo * sw + kw - pl) * C + cb;
                const v16 d = load16(dyrow + wo * O + ob);
                r0 += xv[0] * d; r1 += xv[1] * d; r2 += xv[2] * d; r3 += xv[3] * d;
                r4 += xv[4] * d; r5 += xv[5] * d; r6 += xv[6] * d; r7 += xv[7] * d;
              }
              store16(a + (cb + 0) * O + ob, r0); store16(a + (cb + 1) * O + ob, r1);
              store16(a + (cb + 2) * O + ob, r2); store16(a + (cb + 3) * O + ob, r3);
              store16(a + (cb + 4) * O + ob, r4); store16(a + (cb + 5) * O + ob, r5);
              store16(a + (cb + 6) * O + ob, r6); store16(a + (cb + 7) * O + ob, r7);
            }
          }
        }
      }
    }
  }
}

static ffi::Error ConvWeightGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                             ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                             int64_t pl, int64_t threads) {
  auto xd = x.dimensions();
  auto dd = dy.dimensions();
  auto wd = dw->dimensions();
  const int64_t N = xd[0], H = xd[1], W = xd[2], C = xd[3];
  const int64_t Ho = dd[1], Wo = dd[2], O = dd[3];
  const int64_t KH = wd[0], KW = wd[1];
  const int64_t size = KH * KW * C * O;
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, N));
  float* out = dw->typed_data();
  std::memset(out, 0, size * sizeof(float));
  // Thread t sums the examples [N t / threads, N (t + 1) / threads); thread 0 (this one) into
  // the output, the others into their own buffers, added at the end.
  std::vector<std::vector<float>> parts(threads - 1, std::vector<float>(size, 0.0f));
  auto run = [&](int64_t t, float* acc) {
    accumulate(x.typed_data(), dy.typed_data(), acc, N * t / threads, N * (t + 1) / threads, H, W,
               C, Ho, Wo, O, KH, KW, sh, sw, pt, pl);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, t, parts[t - 1].data());
  run(0, out);
  for (auto& thread : pool) thread.join();
  for (const auto& part : parts)
    for (int64_t i = 0; i < size; ++i) out[i] += part[i];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FfkdConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<int64_t>("threads"));
