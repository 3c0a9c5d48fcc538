// im2col / col2im on the CPU, for a band of output rows of one image.
//
// The column matrix of an image has one row per (channel, kh, kw) and one column per output
// position (oh, ow): col[(c*KH + kh)*KW + kw][oh*OW + ow] = im[c][oh*sH - pH + kh*dH][ow*sW - pW + kw*dW]
// (zero where that falls in the padding). Working on a band [oh0, oh1) of output rows keeps the
// column tile small enough to stay in cache between im2col and the GEMM that consumes it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_params.h"

namespace fastconv {
namespace cpu {

// First and one-past-last output position o in [0, out) whose input position o*stride + offset
// lies in [0, in).
inline void valid_range(int64_t offset, int64_t stride, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = in - offset <= 0 ? 0 : (in - offset + stride - 1) / stride;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

// Short rows (LeNet's are 8 elements) make per-row costs dominate: the valid column range of each
// kw is computed once per band, not per (channel, kh, kw) (it costs two divisions), and the row
// copies are plain loops kept inline (no memcpy/memset call per 8-element row).
#define FASTCONV_INLINE_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))

struct ColumnRanges {
  static constexpr int kMaxInline = 16;
  int64_t lo_buf[kMaxInline], hi_buf[kMaxInline];
  std::vector<int64_t> heap;
  int64_t* lo;
  int64_t* hi;
  explicit ColumnRanges(const Conv2dParams& p) {
    const int64_t KW = p.kernel_w;
    if (KW <= kMaxInline) {
      lo = lo_buf;
      hi = hi_buf;
    } else {
      heap.resize(2 * KW);
      lo = heap.data();
      hi = heap.data() + KW;
    }
    for (int64_t kw = 0; kw < KW; ++kw) {
      valid_range(kw * p.dilation_w - p.pad_w, p.stride_w, p.in_w, p.out_w, lo[kw], hi[kw]);
    }
  }
};

// im: C x H x W (contiguous), col: (C*KH*KW) x ((oh1-oh0)*OW), row-major, rows `ld` apart.
template <typename T>
FASTCONV_INLINE_LOOPS void im2col_band(const T* im, int64_t channels, const Conv2dParams& p, int64_t oh0, int64_t oh1,
                                       T* col, int64_t ld) {
  const int64_t OW = p.out_w, W = p.in_w, H = p.in_h, SW = p.stride_w;
  const int64_t band = oh1 - oh0;
  const ColumnRanges ranges(p);
  for (int64_t c = 0; c < channels; ++c) {
    const T* im_c = im + c * H * W;
    for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
        T* dst = col + ((c * p.kernel_h + kh) * p.kernel_w + kw) * ld;
        const int64_t off_w = kw * p.dilation_w - p.pad_w;
        const int64_t lo = ranges.lo[kw], hi = ranges.hi[kw];
        for (int64_t r = 0; r < band; ++r) {
          T* d = dst + r * OW;
          const int64_t ih = (oh0 + r) * p.stride_h - p.pad_h + kh * p.dilation_h;
          if (ih < 0 || ih >= H) {
            for (int64_t ow = 0; ow < OW; ++ow) d[ow] = T(0);
            continue;
          }
          const T* src = im_c + ih * W + off_w;
          for (int64_t ow = 0; ow < lo; ++ow) d[ow] = T(0);
          if (SW == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow] = src[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow] = src[ow * SW];
          }
          for (int64_t ow = hi; ow < OW; ++ow) d[ow] = T(0);
        }
      }
    }
  }
}

// The transpose of im2col_band: colT[(oh - oh0)*OW + ow][(c*KH + kh)*KW + kw], rows `ld` apart. The
// grad_weight GEMM (grad_output tile @ colT) reads its column tile this way, as a row-major right-hand side.
template <typename T>
void im2row_band(const T* im, int64_t channels, const Conv2dParams& p, int64_t oh0, int64_t oh1, T* colT, int64_t ld) {
  const int64_t W = p.in_w, H = p.in_h, KH = p.kernel_h, KW = p.kernel_w;
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    for (int64_t ow = 0; ow < p.out_w; ++ow) {
      T* dst = colT + ((oh - oh0) * p.out_w + ow) * ld;
      const int64_t ih0 = oh * p.stride_h - p.pad_h, iw0 = ow * p.stride_w - p.pad_w;
      const bool inside_w = iw0 >= 0 && iw0 + (KW - 1) * p.dilation_w < W;
      for (int64_t c = 0; c < channels; ++c) {
        const T* im_c = im + c * H * W;
        for (int64_t kh = 0; kh < KH; ++kh) {
          const int64_t ih = ih0 + kh * p.dilation_h;
          T* d = dst + (c * KH + kh) * KW;
          if (ih < 0 || ih >= H) {
            std::fill(d, d + KW, T(0));
            continue;
          }
          const T* row = im_c + ih * W;
          if (inside_w) {  // the common case: no bounds checks
            for (int64_t kw = 0; kw < KW; ++kw) d[kw] = row[iw0 + kw * p.dilation_w];
          } else {
            for (int64_t kw = 0; kw < KW; ++kw) {
              const int64_t iw = iw0 + kw * p.dilation_w;
              d[kw] = (iw >= 0 && iw < W) ? row[iw] : T(0);
            }
          }
        }
      }
    }
  }
}

// Adds the column tile of output rows [oh0, oh1) back into the image it came from (the adjoint of
// im2col_band). im must be zeroed by the caller before the first band.
template <typename T>
FASTCONV_INLINE_LOOPS void col2im_band_add(const T* col, int64_t ld, int64_t channels, const Conv2dParams& p,
                                           int64_t oh0, int64_t oh1, T* im) {
  const int64_t OW = p.out_w, W = p.in_w, H = p.in_h, SW = p.stride_w;
  const int64_t band = oh1 - oh0;
  const ColumnRanges ranges(p);
  for (int64_t c = 0; c < channels; ++c) {
    T* im_c = im + c * H * W;
    for (int64_t kh = 0; kh < p.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < p.kernel_w; ++kw) {
        const T* src = col + ((c * p.kernel_h + kh) * p.kernel_w + kw) * ld;
        const int64_t off_w = kw * p.dilation_w - p.pad_w;
        const int64_t lo = ranges.lo[kw], hi = ranges.hi[kw];
        for (int64_t r = 0; r < band; ++r) {
          const int64_t ih = (oh0 + r) * p.stride_h - p.pad_h + kh * p.dilation_h;
          if (ih < 0 || ih >= H) continue;
          const T* s = src + r * OW;
          T* d = im_c + ih * W + off_w;
          if (SW == 1) {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow] += s[ow];
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow * SW] += s[ow];
          }
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace fastconv
