// inferkit.gpu kernels: pre-processing (uint8 HWC images -> normalised float tensors) and
// post-processing (softmax, sigmoid, argmax, top-k, threshold, non-maximum suppression).
//
// Every kernel here has a NumPy twin in inferkit/gpu/twins.py that computes the same function.
// The module is compiled with --fmad=false so that each float operation rounds once, as NumPy's
// float32 arithmetic does: pre-processing, thresholds and the IoU in NMS are bit-identical to
// their twins; softmax and sigmoid differ only by expf's last-place error.
//
// Access patterns: consecutive threads handle consecutive output elements (coalesced writes);
// the unresized image path moves groups of 4 pixels with 32-bit loads and 128-bit stores;
// row reductions give each row to one warp whose lanes stride over it (coalesced reads).

// NVRTC compiles without <math.h>: define what it would.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

#include <cuda_fp16.h>

typedef long long i64;

template <typename T> __device__ __forceinline__ float load(const T* p, i64 i);
template <> __device__ __forceinline__ float load<float>(const float* p, i64 i) { return p[i]; }
template <> __device__ __forceinline__ float load<__half>(const __half* p, i64 i) { return __half2float(p[i]); }

template <typename T> __device__ __forceinline__ void store(T* p, i64 i, float v);
template <> __device__ __forceinline__ void store<float>(float* p, i64 i, float v) { p[i] = v; }
template <> __device__ __forceinline__ void store<__half>(__half* p, i64 i, float v) { p[i] = __float2half_rn(v); }

struct Norm {  // per channel: out = pixel * scale + bias; pad is the normalised padding value
    float s0, s1, s2, b0, b1, b2, p0, p1, p2;
};

// ---------------------------------------------------------------------------------------------
// Pre-processing, general path: bilinear resize (half-pixel centres), optional letterbox, normalise.
// One thread per output pixel; out_h x out_w pixels per image, n images.

template <typename T, bool NCHW>
__device__ __forceinline__ void image_resize_impl(
    const unsigned char* __restrict__ src, T* __restrict__ dst, int n, int in_h, int in_w, int out_h, int out_w,
    int top, int left, int inner_h, int inner_w, float scale_y, float scale_x, Norm k) {
    const i64 plane = (i64)out_h * out_w;
    const i64 total = plane * n;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += (i64)gridDim.x * blockDim.x) {
        const i64 img = idx / plane;
        const i64 pix = idx - img * plane;
        const int oy = (int)(pix / out_w);
        const int ox = (int)(pix - (i64)oy * out_w);
        float v0, v1, v2;
        const int ry = oy - top, rx = ox - left;
        if (ry < 0 || ry >= inner_h || rx < 0 || rx >= inner_w) {
            v0 = k.p0; v1 = k.p1; v2 = k.p2;
        } else {
            float fy = ((float)ry + 0.5f) * scale_y - 0.5f;
            float fx = ((float)rx + 0.5f) * scale_x - 0.5f;
            fy = fy < 0.0f ? 0.0f : fy;
            fx = fx < 0.0f ? 0.0f : fx;
            int y0 = (int)fy, x0 = (int)fx;
            y0 = y0 < in_h - 1 ? y0 : in_h - 1;
            x0 = x0 < in_w - 1 ? x0 : in_w - 1;
            const int y1 = y0 + 1 < in_h ? y0 + 1 : in_h - 1;
            const int x1 = x0 + 1 < in_w ? x0 + 1 : in_w - 1;
            const float ly = fy - (float)y0, lx = fx - (float)x0;
            const float hy = 1.0f - ly, hx = 1.0f - lx;
            const unsigned char* base = src + img * (i64)in_h * in_w * 3;
            const unsigned char* a = base + ((i64)y0 * in_w + x0) * 3;
            const unsigned char* b = base + ((i64)y0 * in_w + x1) * 3;
            const unsigned char* c = base + ((i64)y1 * in_w + x0) * 3;
            const unsigned char* d = base + ((i64)y1 * in_w + x1) * 3;
            float r[3];
#pragma unroll
            for (int ch = 0; ch < 3; ++ch) {
                const float top_row = hx * (float)a[ch] + lx * (float)b[ch];
                const float bottom_row = hx * (float)c[ch] + lx * (float)d[ch];
                r[ch] = hy * top_row + ly * bottom_row;
            }
            v0 = r[0] * k.s0 + k.b0; v1 = r[1] * k.s1 + k.b1; v2 = r[2] * k.s2 + k.b2;
        }
        if (NCHW) {
            const i64 o = img * 3 * plane + pix;
            store<T>(dst, o, v0); store<T>(dst, o + plane, v1); store<T>(dst, o + 2 * plane, v2);
        } else {
            const i64 o = idx * 3;
            store<T>(dst, o, v0); store<T>(dst, o + 1, v1); store<T>(dst, o + 2, v2);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-processing, unresized path: groups of 4 pixels, three 32-bit loads, 128-bit (or 64-bit for
// half) stores. Needs plane % 4 == 0, src 4-byte and dst 16-byte aligned (the caller checks).

__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__half* p, float a, float b, float c, float d) {
    __half2 lo = __floats2half2_rn(a, b), hi = __floats2half2_rn(c, d);
    uint2 u;
    u.x = *reinterpret_cast<unsigned int*>(&lo);
    u.y = *reinterpret_cast<unsigned int*>(&hi);
    *reinterpret_cast<uint2*>(p) = u;
}

template <typename T, bool NCHW>
__device__ __forceinline__ void image_direct_impl(
    const unsigned char* __restrict__ src, T* __restrict__ dst, i64 groups, i64 plane, Norm k) {
    // Each lane takes U groups 32 apart: U loads in flight at once, and each NCHW store instruction
    // of the warp still writes consecutive 16-byte (8-byte) chunks.
    constexpr int U = 4;
    const int lane = threadIdx.x & 31;
    // NHWC: a lane's 12 values sit 12 apart from its neighbours'; a warp's 32 groups go through shared
    // memory so that each store instruction writes 512 consecutive bytes. 256 threads a block.
    __shared__ __align__(16) T stage[8][32 * 12];
    T* slab = stage[threadIdx.x >> 5];
    const i64 step = (i64)gridDim.x * (blockDim.x >> 5) * 32 * U;
    for (i64 base = ((i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 32 * U; base < groups; base += step) {
        unsigned int w[U][3];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const i64 g = base + lane + 32 * u;
            if (g < groups) {
                const unsigned int* s = reinterpret_cast<const unsigned int*>(src + g * 12);
                w[u][0] = __ldg(s); w[u][1] = __ldg(s + 1); w[u][2] = __ldg(s + 2);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const i64 g = base + lane + 32 * u;
            const bool full = base + 32 * (u + 1) <= groups;  // the same on every lane: all 32 groups exist
            if (g >= groups) break;  // later groups of this lane are further on
            const i64 p = g * 4;
            float v[12];
#pragma unroll
            for (int j = 0; j < 12; ++j) {
                const float byte = (float)((w[u][j >> 2] >> (8 * (j & 3))) & 0xffu);
                const int ch = j % 3;
                v[j] = ch == 0 ? byte * k.s0 + k.b0 : (ch == 1 ? byte * k.s1 + k.b1 : byte * k.s2 + k.b2);
            }
            if (NCHW) {
                const i64 img = p / plane;
                const i64 o = img * 3 * plane + (p - img * plane);
                store4(dst + o, v[0], v[3], v[6], v[9]);
                store4(dst + o + plane, v[1], v[4], v[7], v[10]);
                store4(dst + o + 2 * plane, v[2], v[5], v[8], v[11]);
            } else if (full) {
#pragma unroll
                for (int j = 0; j < 12; ++j) store<T>(slab, lane * 12 + j, v[j]);
                __syncwarp();
                const uint4* from = reinterpret_cast<const uint4*>(slab);
                uint4* to = reinterpret_cast<uint4*>(dst + (base + 32 * u) * 12);
                constexpr int chunks = 32 * 12 * (int)sizeof(T) / 16;
#pragma unroll
                for (int c = lane; c < chunks; c += 32) to[c] = from[c];
                __syncwarp();  // read before the next slab overwrites it
            } else {
                T* o = dst + p * 3;
                store4(o, v[0], v[1], v[2], v[3]);
                store4(o + 4, v[4], v[5], v[6], v[7]);
                store4(o + 8, v[8], v[9], v[10], v[11]);
            }
        }
    }
}

// Pre-processing, unresized, one pixel a thread: what the 4-pixel path cannot take (plane % 4 != 0 or
// unaligned pointers). Integer indices only: the resize path's float coordinates are inexact past 2^23
// pixels a row and read a neighbouring pixel there, where the twin copies each pixel.

template <typename T, bool NCHW>
__device__ __forceinline__ void image_pixels_impl(
    const unsigned char* __restrict__ src, T* __restrict__ dst, i64 pixels, i64 plane, Norm k) {
    for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < pixels; p += (i64)gridDim.x * blockDim.x) {
        const unsigned char* s = src + p * 3;
        const float v0 = (float)s[0] * k.s0 + k.b0, v1 = (float)s[1] * k.s1 + k.b1, v2 = (float)s[2] * k.s2 + k.b2;
        if (NCHW) {
            const i64 img = p / plane;
            const i64 o = img * 3 * plane + (p - img * plane);
            store<T>(dst, o, v0); store<T>(dst, o + plane, v1); store<T>(dst, o + 2 * plane, v2);
        } else {
            store<T>(dst, p * 3, v0); store<T>(dst, p * 3 + 1, v1); store<T>(dst, p * 3 + 2, v2);
        }
    }
}

// The nine constants travel as plain float arguments (portable across kernel launchers).
#define NORM_PARAMS float s0, float s1, float s2, float b0, float b1, float b2, float p0, float p1, float p2
#define NORM (Norm{s0, s1, s2, b0, b1, b2, p0, p1, p2})

#define IMAGE_KERNELS(SUFFIX, T, NCHW)                                                                          \
    extern "C" __global__ void image_resize_##SUFFIX(                                                          \
        const unsigned char* src, T* dst, int n, int in_h, int in_w, int out_h, int out_w, int top, int left,  \
        int inner_h, int inner_w, float scale_y, float scale_x, NORM_PARAMS) {                                 \
        image_resize_impl<T, NCHW>(src, dst, n, in_h, in_w, out_h, out_w, top, left, inner_h, inner_w,        \
                                   scale_y, scale_x, NORM);                                                    \
    }                                                                                                          \
    extern "C" __global__ void image_direct_##SUFFIX(const unsigned char* src, T* dst, i64 groups, i64 plane,  \
                                                     NORM_PARAMS) {                                            \
        image_direct_impl<T, NCHW>(src, dst, groups, plane, NORM);                                             \
    }                                                                                                          \
    extern "C" __global__ void image_pixels_##SUFFIX(const unsigned char* src, T* dst, i64 pixels, i64 plane,  \
                                                     NORM_PARAMS) {                                            \
        image_pixels_impl<T, NCHW>(src, dst, pixels, plane, NORM);                                             \
    }

IMAGE_KERNELS(float32_nchw, float, true)
IMAGE_KERNELS(float32_nhwc, float, false)
IMAGE_KERNELS(float16_nchw, __half, true)
IMAGE_KERNELS(float16_nhwc, __half, false)

// ---------------------------------------------------------------------------------------------
// Row kernels: one warp per row of `cols` values; blockDim.x == 256 (8 rows per block).

__device__ __forceinline__ float order_key(float v) { return isnan(v) ? INFINITY : v; }

// True when (a, ia) comes before (b, ib): larger value first (NaN as +inf, so the two tie), then lower index.
__device__ __forceinline__ bool before(float a, i64 ia, float b, i64 ib) {
    const float ka = order_key(a), kb = order_key(b);
    return ka > kb || (ka == kb && ia < ib);
}

// The first (in `before` order) of the warp's candidates; every lane gets the same answer.
__device__ __forceinline__ void warp_first(float& best, i64& at, i64 none) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float b2 = __shfl_xor_sync(0xffffffffu, best, off);
        const i64 a2 = __shfl_xor_sync(0xffffffffu, at, off);
        if (a2 != none && (at == none || before(b2, a2, best, at))) { best = b2; at = a2; }
    }
}

template <typename T>
__device__ __forceinline__ void softmax_impl(const T* __restrict__ x, T* __restrict__ y, i64 rows, int cols) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* in = x + row * cols;
    T* out = y + row * cols;
    float m = -INFINITY, s = 0.0f;  // online maximum and sum of exp(v - m)
    for (int j = lane; j < cols; j += 32) {
        const float v = load<T>(in, j);
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
        else if (v != v) { m = v; }  // NaN: the row's result is NaN, as in the twin
        else if (v != -INFINITY) { s += expf(v - m); }  // -inf adds 0 (exp(-inf - -inf) would be NaN)
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        const float mm = fmaxf(m, m2);
        if (isnan(m) || isnan(m2)) { m = NAN; s = NAN; continue; }
        if (mm == -INFINITY) continue;
        s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
        m = mm;
    }
    const float inv = 1.0f / s;
    for (int j = lane; j < cols; j += 32) store<T>(out, j, expf(load<T>(in, j) - m) * inv);
}

template <typename T>
__device__ __forceinline__ void argmax_impl(const T* __restrict__ x, i64* __restrict__ y, i64 rows, int cols) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* in = x + row * cols;
    float best = -INFINITY;
    i64 at = cols;  // past the end: "none yet"
    for (int j = lane; j < cols; j += 32) {
        const float v = load<T>(in, j);
        if (at == cols || before(v, j, best, at)) { best = v; at = j; }
    }
    warp_first(best, at, cols);
    if (lane == 0) y[row] = at;
}

// k passes over the row, each finding the first element (in `before` order) after the last one
// found; the row stays in L1/L2 between passes.
template <typename T>
__device__ __forceinline__ void topk_impl(const T* __restrict__ x, T* __restrict__ values, i64* __restrict__ indices,
                                          i64 rows, int cols, int k) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* in = x + row * cols;
    float prev = 0.0f;
    i64 prev_at = -1;
    for (int t = 0; t < k; ++t) {
        float best = 0.0f;
        i64 at = cols;
        for (int j = lane; j < cols; j += 32) {
            const float v = load<T>(in, j);
            if (prev_at >= 0 && !before(prev, prev_at, v, j)) continue;
            if (at == cols || before(v, j, best, at)) { best = v; at = j; }
        }
        warp_first(best, at, cols);
        if (lane == 0) {
            store<T>(values, row * k + t, best);
            indices[row * k + t] = at;
        }
        prev = best;
        prev_at = at;
    }
}

// ---------------------------------------------------------------------------------------------
// Row kernels, vector path (softmax, argmax): each lane loads its share of the row into registers
// up front, in 16-byte vectors (32 values a lane: rows of up to 1024), so that all of a row's loads
// are in flight at once; one scalar load at a time per lane leaves too few bytes in flight to keep
// HBM busy. The caller checks cols % V == 0, cols <= VEC_COLS and 16-byte aligned rows. Top-k keeps
// the scalar kernel: its k passes are compute-bound (two variants holding the row in registers
// measured no faster, or slower, on an H200).

template <typename T> struct Vec16;  // V: values in one 16-byte vector of T
template <> struct Vec16<float> { static constexpr int V = 4; };
template <> struct Vec16<__half> { static constexpr int V = 8; };

__device__ __forceinline__ void load16(const float* p, i64 c, float* v) {
    const float4 f = reinterpret_cast<const float4*>(p)[c];
    v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
__device__ __forceinline__ void load16(const __half* p, i64 c, float* v) {
    const uint4 u = reinterpret_cast<const uint4*>(p)[c];
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[q]));
        v[2 * q] = f.x; v[2 * q + 1] = f.y;
    }
}
__device__ __forceinline__ void store16(float* p, i64 c, const float* v) {
    reinterpret_cast<float4*>(p)[c] = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store16(__half* p, i64 c, const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const __half2 h = __floats2half2_rn(v[2 * q], v[2 * q + 1]);
        w[q] = *reinterpret_cast<const unsigned int*>(&h);
    }
    reinterpret_cast<uint4*>(p)[c] = make_uint4(w[0], w[1], w[2], w[3]);
}

// The lane's vectors of its row: vector lane + 32 * i for i < N; `ok(i)` says which exist.
template <typename T> struct RowRegs {
    static constexpr int V = Vec16<T>::V, N = 32 / V;
    float v[N][V];
    int lane, nvec;
    __device__ __forceinline__ RowRegs(const T* in, int cols, int lane_) : lane(lane_), nvec(cols / V) {
#pragma unroll
        for (int i = 0; i < N; ++i)
            if (ok(i)) load16(in, lane + 32 * i, v[i]);
    }
    __device__ __forceinline__ bool ok(int i) const { return lane + 32 * i < nvec; }
    __device__ __forceinline__ i64 at(int i, int e) const { return (i64)(lane + 32 * i) * V + e; }
};

template <typename T>
__device__ __forceinline__ void softmax_vec_impl(const T* __restrict__ x, T* __restrict__ y, i64 rows, int cols) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    RowRegs<T> r(x + row * cols, cols, lane);
    float m = -INFINITY;  // NaN wins, as in the twin's max
#pragma unroll
    for (int i = 0; i < r.N; ++i)
        if (r.ok(i))
#pragma unroll
            for (int e = 0; e < r.V; ++e) m = (r.v[i][e] > m || isnan(r.v[i][e])) ? r.v[i][e] : m;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        m = (m2 > m || isnan(m2)) ? m2 : m;
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < r.N; ++i)
        if (r.ok(i))
#pragma unroll
            for (int e = 0; e < r.V; ++e) { r.v[i][e] = expf(r.v[i][e] - m); s += r.v[i][e]; }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);  // the same sum on every lane
    const float inv = 1.0f / s;
    T* out = y + row * cols;
#pragma unroll
    for (int i = 0; i < r.N; ++i)
        if (r.ok(i)) {
#pragma unroll
            for (int e = 0; e < r.V; ++e) r.v[i][e] *= inv;
            store16(out, lane + 32 * i, r.v[i]);
        }
}

template <typename T>
__device__ __forceinline__ void argmax_vec_impl(const T* __restrict__ x, i64* __restrict__ y, i64 rows, int cols) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    RowRegs<T> r(x + row * cols, cols, lane);
    float best = 0.0f;
    i64 at = cols;
#pragma unroll
    for (int i = 0; i < r.N; ++i)
        if (r.ok(i))
#pragma unroll
            for (int e = 0; e < r.V; ++e)
                if (at == cols || before(r.v[i][e], r.at(i, e), best, at)) { best = r.v[i][e]; at = r.at(i, e); }
    warp_first(best, at, cols);
    if (lane == 0) y[row] = at;
}

#define ROW_KERNELS(SUFFIX, T)                                                                                 \
    extern "C" __global__ void softmax_##SUFFIX(const T* x, T* y, i64 rows, int cols) {                        \
        softmax_impl<T>(x, y, rows, cols);                                                                     \
    }                                                                                                          \
    extern "C" __global__ void argmax_##SUFFIX(const T* x, i64* y, i64 rows, int cols) {                       \
        argmax_impl<T>(x, y, rows, cols);                                                                      \
    }                                                                                                          \
    extern "C" __global__ void topk_##SUFFIX(const T* x, T* values, i64* indices, i64 rows, int cols, int k) { \
        topk_impl<T>(x, values, indices, rows, cols, k);                                                       \
    }                                                                                                          \
    extern "C" __global__ void softmax_vec_##SUFFIX(const T* x, T* y, i64 rows, int cols) {                    \
        softmax_vec_impl<T>(x, y, rows, cols);                                                                 \
    }                                                                                                          \
    extern "C" __global__ void argmax_vec_##SUFFIX(const T* x, i64* y, i64 rows, int cols) {                   \
        argmax_vec_impl<T>(x, y, rows, cols);                                                                  \
    }

ROW_KERNELS(float32, float)
ROW_KERNELS(float16, __half)

// ---------------------------------------------------------------------------------------------
// Elementwise: sigmoid and threshold, grid-stride; the _vec kernels move 16 bytes of input per
// step (the caller checks 16-byte aligned input and output) and do the last size % V one by one.

__device__ __forceinline__ float sigmoid1(float v) { return 1.0f / (1.0f + expf(-v)); }

template <typename T>
__device__ __forceinline__ void sigmoid_vec_impl(const T* __restrict__ x, T* __restrict__ y, i64 size) {
    constexpr int V = Vec16<T>::V;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x, step = (i64)gridDim.x * blockDim.x;
    const i64 nvec = size / V;
    for (i64 c = first; c < nvec; c += step) {
        float v[V];
        load16(x, c, v);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = sigmoid1(v[e]);
        store16(y, c, v);
    }
    for (i64 i = nvec * V + first; i < size; i += step) store<T>(y, i, sigmoid1(load<T>(x, i)));
}

template <typename T>
__device__ __forceinline__ void threshold_vec_impl(const T* __restrict__ x, bool* __restrict__ y, i64 size, float t) {
    constexpr int V = Vec16<T>::V;  // V bools out: one 4- or 8-byte store
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x, step = (i64)gridDim.x * blockDim.x;
    const i64 nvec = size / V;
    for (i64 c = first; c < nvec; c += step) {
        float v[V];
        load16(x, c, v);
        unsigned long long bytes = 0;
#pragma unroll
        for (int e = 0; e < V; ++e) bytes |= (unsigned long long)(v[e] > t) << (8 * e);  // little-endian: byte e
        if (V == 4) reinterpret_cast<unsigned int*>(y)[c] = (unsigned int)bytes;
        else reinterpret_cast<unsigned long long*>(y)[c] = bytes;
    }
    for (i64 i = nvec * V + first; i < size; i += step) y[i] = load<T>(x, i) > t;
}

#define ELEMENTWISE_KERNELS(SUFFIX, T)                                                                         \
    extern "C" __global__ void sigmoid_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, i64 size) {        \
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < size; i += (i64)gridDim.x * blockDim.x)    \
            store<T>(y, i, sigmoid1(load<T>(x, i)));                                                           \
    }                                                                                                          \
    extern "C" __global__ void threshold_##SUFFIX(const T* __restrict__ x, bool* __restrict__ y, i64 size,      \
                                                  float t) {                                                   \
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < size; i += (i64)gridDim.x * blockDim.x)    \
            y[i] = load<T>(x, i) > t;                                                                          \
    }                                                                                                          \
    extern "C" __global__ void sigmoid_vec_##SUFFIX(const T* x, T* y, i64 size) {                              \
        sigmoid_vec_impl<T>(x, y, size);                                                                       \
    }                                                                                                          \
    extern "C" __global__ void threshold_vec_##SUFFIX(const T* x, bool* y, i64 size, float t) {                \
        threshold_vec_impl<T>(x, y, size, t);                                                                  \
    }

ELEMENTWISE_KERNELS(float32, float)
ELEMENTWISE_KERNELS(float16, __half)

// ---------------------------------------------------------------------------------------------
// Non-maximum suppression over boxes already sorted by score (xyxy, float32), per image.
// nms_mask: bit j of mask[img][i][j / 64] is set when j > i and IoU(i, j) > threshold.
// grid (ceil(b / 64), ceil(b / 64), n), block 64.

__device__ __forceinline__ float iou(const float* a, const float* b) {
    const float ix1 = a[0] > b[0] ? a[0] : b[0];
    const float iy1 = a[1] > b[1] ? a[1] : b[1];
    const float ix2 = a[2] < b[2] ? a[2] : b[2];
    const float iy2 = a[3] < b[3] ? a[3] : b[3];
    const float dw = ix2 - ix1, dh = iy2 - iy1;
    const float w = dw > 0.0f ? dw : 0.0f, h = dh > 0.0f ? dh : 0.0f;
    const float inter = w * h;
    const float area_a = (a[2] - a[0]) * (a[3] - a[1]);
    const float area_b = (b[2] - b[0]) * (b[3] - b[1]);
    return inter / (area_a + area_b - inter);
}

extern "C" __global__ void nms_mask(const float* __restrict__ boxes, int b, float threshold,
                                    unsigned long long* __restrict__ mask) {
    const int words = (b + 63) / 64;
    const int row_start = blockIdx.y * 64, col_start = blockIdx.x * 64;
    const i64 img = blockIdx.z;
    // Entirely below the diagonal (every j < i): never written; nms_reduce ORs these words only
    // into bits of boxes it has already passed, so what they hold does not matter.
    if (col_start + 63 < row_start) return;
    __shared__ float cols[64 * 4];
    const float* base = boxes + img * (i64)b * 4;
    const int col_n = min(b - col_start, 64);
    if ((int)threadIdx.x < col_n) {
#pragma unroll
        for (int q = 0; q < 4; ++q) cols[threadIdx.x * 4 + q] = base[(i64)(col_start + threadIdx.x) * 4 + q];
    }
    __syncthreads();
    const int i = row_start + threadIdx.x;
    if (i >= b) return;
    const float* me = base + (i64)i * 4;
    unsigned long long bits = 0;
    for (int c = 0; c < col_n; ++c) {
        const int j = col_start + c;
        if (j > i && iou(me, cols + c * 4) > threshold) bits |= 1ull << c;
    }
    mask[(img * b + i) * words + blockIdx.x] = bits;
}

// nms_reduce: one block per image walks the sorted boxes; keep[img][:count] gets the original
// indices (order[img][i]) of the kept boxes, the rest -1. `valid[img]` is how many sorted boxes
// pass the score threshold. Dynamic shared memory: words * 8 bytes.
extern "C" __global__ void nms_reduce(const unsigned long long* __restrict__ mask, const i64* __restrict__ order,
                                      const i64* __restrict__ valid, int b, int max_det, i64* __restrict__ keep) {
    extern __shared__ unsigned long long removed[];
    const int words = (b + 63) / 64;
    const i64 img = blockIdx.x;
    for (int w = threadIdx.x; w < words; w += blockDim.x) removed[w] = 0;
    __syncthreads();
    const i64 n_valid = valid[img];
    int count = 0;
    for (int i = 0; i < n_valid && count < max_det; ++i) {
        const bool gone = (removed[i >> 6] >> (i & 63)) & 1ull;
        __syncthreads();
        if (gone) continue;
        if (threadIdx.x == 0) keep[img * max_det + count] = order[img * b + i];
        ++count;
        const unsigned long long* row = mask + (img * b + i) * words;
        for (int w = threadIdx.x; w < words; w += blockDim.x) removed[w] |= row[w];
        __syncthreads();
    }
    for (int c = count + threadIdx.x; c < max_det; c += blockDim.x) keep[img * max_det + c] = -1;
}
