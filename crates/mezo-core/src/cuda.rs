//! The fused kernels of [`crate::fused`] on CUDA: compiled at run time by NVRTC (no nvcc needed
//! where mezo is built) and launched through the driver API on the legacy default stream, the
//! stream libtorch's own kernels use here, so they are ordered with them without any sync.
//! libnvrtc and libcuda are opened with dlopen on first use, so a CPU-only machine never needs them.
//!
//! One launch sweeps a whole list of tensors (a model's ~400 parameters, most of them biases and
//! norms of a few thousand elements): a small descriptor buffer, copied to the device once per
//! sweep, says where each tensor is, and the grid strides over all their elements as one index
//! space. Each block loads the shared half table once per sweep, not once per tensor, and the
//! host pays one launch instead of hundreds.
//!
//! Tensors may live on any CUDA device: each launch runs in the primary context of the tensors'
//! device (the one libtorch uses), pushed around the launch, with the module, the multiprocessor
//! count and a copy of the table kept per device.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::fused::SgdUpdate;
use crate::rng::{host_gauss_table, Distribution, StreamKey};

const SOURCE: &str = r#"
typedef unsigned int u32;
typedef unsigned long long u64;
// mix32 after its first xorshift (the rest of rng.rs `mix32`).
__device__ __forceinline__ u32 mix32_rest(u32 x) {
  x *= 0x21f0aaadu; x ^= x >> 15; x *= 0x735a2d97u; x ^= x >> 15; return x;
}
__device__ __forceinline__ u32 mix32(u32 x) { return mix32_rest(x ^ (x >> 16)); }
// The Gaussian table lives in shared memory: its lower half only, T[0..=32768] (131 KB). The upper
// half is its mirror image (t[65536 - j] = -t[j]) and each difference d[j] = t[j+1] - t[j] is one
// correctly rounded f32 subtraction of two knots, which equals the host's d[j] (rounded from the
// exact f64 difference; tested on the host for every j). So z keeps the host's bits while the
// gather stays on chip: reading a 512 KB table from L2 per element bounded these kernels.
#define HALF 32768u
// z from an element's 32 random bits k. The distribution is a template parameter (DIST: 0
// Gaussian, 1 Rademacher) in the sweeps, so no draw tests it; each kernel branches on its `dist`
// argument once.
template <int DIST>
__device__ __forceinline__ float zbits(u32 k, const float* sT) {
  if (DIST) return (k >> 31) ? -1.0f : 1.0f;
  // lo 2^-16 as (128 + lo 2^-16) - 128: the first is lo under the exponent of 128 (k's low two
  // bytes under 0x4300, one byte permute), the subtraction is exact, so these are the bits of
  // (float)lo * 2^-16 without an int-to-float conversion (a quarter-rate instruction).
  float frac = __fsub_rn(__uint_as_float(__byte_perm(k, 0x43000000u, 0x7610)), 128.0f);
  // Lower half (k's top bit clear, hi < HALF): t = T[hi], d = T[hi+1] - T[hi]. Upper half, by the
  // mirror with m = 65536 - hi: t = -T[m], d = T[m] - T[m-1]. Either way two adjacent knots
  // T[j], T[j+1], j = hi or m - 1 = 65535 - hi (hi with its bits flipped, from the sign-extended
  // shifts), d their difference, t the one or the other negated: no branch, two shared loads.
  const float* q = sT + (u32)(((int)k >> 16) ^ ((int)k >> 31));
  float lo = q[0], hi = q[1];
  float t = (k >> 31) ? -hi : lo;
  float d = __fsub_rn(hi, lo);
  return __fadd_rn(t, __fmul_rn(d, frac));
}
// Z[i] of the stream (a, b): zbits(mix32(mix32(i ^ b) ^ a)), as rng.rs `StreamKey::bits`.
template <int DIST>
__device__ __forceinline__ float zval(u32 i, u32 a, u32 b, const float* sT) {
  return zbits<DIST>(mix32(mix32(i ^ b) ^ a), sT);
}
// Z at KN consecutive elements from i. For four, i is a multiple of 4: then i + k = i | k, so
// (i + k) ^ b = (i ^ b) ^ k, whose >> 16 is that of i ^ b, and the inner mix32's first xorshift
// is computed once for the four (the same bits, fewer instructions a draw).
template <int KN, int DIST>
__device__ __forceinline__ void zvals(u32 i, u32 a, u32 b, const float* sT, float* z) {
  if (KN == 4) {
    u32 y = i ^ b, s = y ^ (y >> 16);
#pragma unroll
    for (u32 k = 0; k < 4; k++) z[k] = zbits<DIST>(mix32(mix32_rest(s ^ k) ^ a), sT);
  } else {
#pragma unroll
    for (u32 k = 0; k < KN; k++) z[k] = zval<DIST>(i + k, a, b, sT);
  }
}
__device__ __forceinline__ float zval(u32 i, u32 a, u32 b, const float* sT, int dist) {
  return dist ? zval<1>(i, a, b, sT) : zval<0>(i, a, b, sT);
}
// 16-bit halves (f16 or bf16) to and from f32, round to nearest even.
// (The host emulation in this file's tests defines these three itself: the rest of the source
// compiles unchanged as C++ there.)
#ifndef MEZO_HOST_EMULATION
__device__ __forceinline__ float cvt_h2f(unsigned short s) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s)); return f; }
__device__ __forceinline__ unsigned short cvt_f2h(float v) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
__device__ __forceinline__ unsigned short cvt_f2bf(float v) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
// Two values converted and packed (lo in the low half) by one instruction where the GPU has it.
__device__ __forceinline__ u32 cvt2(float lo, float hi, int dt) {
#if __CUDA_ARCH__ >= 800
  u32 r;
  if (dt == 1) asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return dt == 1 ? (u32)cvt_f2h(lo) | ((u32)cvt_f2h(hi) << 16) : (u32)cvt_f2bf(lo) | ((u32)cvt_f2bf(hi) << 16);
#endif
}
#endif
// The dtype code DT (0 f32, 1 f16, 2 bf16) is a template parameter inside the sweeps: each tensor's
// units run in a loop compiled for its dtype, so no element tests it.
template <int DT> __device__ __forceinline__ float h2f(u32 h) {
  if (DT == 1) return cvt_h2f((unsigned short)h);
  return __uint_as_float(h << 16);
}
template <int DT> __device__ __forceinline__ u32 f2h(float v) {
  return (u32)(DT == 1 ? cvt_f2h(v) : cvt_f2bf(v));
}
template <int DT> __device__ __forceinline__ float ld(const void* p, u64 i) {
  if (DT == 0) return ((const float*)p)[i];
  return h2f<DT>(((const unsigned short*)p)[i]);
}
// What storing v to a DT tensor and loading it back gives.
template <int DT> __device__ __forceinline__ float rnd(float v) {
  return DT == 0 ? v : h2f<DT>(f2h<DT>(v));
}
template <int DT> __device__ __forceinline__ void st(void* p, u64 i, float v) {
  if (DT == 0) { ((float*)p)[i] = v; return; }
  ((unsigned short*)p)[i] = (unsigned short)f2h<DT>(v);
}
// Four consecutive elements with one vector load and one store (16 bytes of f32, 8 of f16/bf16):
// fewer, wider memory operations, and four independent table reads per thread in flight. The
// conversions round like the scalar ones, so the bits are the same. Used where the pointer is
// aligned for it.
template <int DT> __device__ __forceinline__ void ld4(const void* p, float* v) {
  if (DT == 0) { float4 x = *(const float4*)p; v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w; return; }
  uint2 w = *(const uint2*)p;
  v[0] = h2f<DT>(w.x & 0xffffu); v[1] = h2f<DT>(w.x >> 16); v[2] = h2f<DT>(w.y & 0xffffu); v[3] = h2f<DT>(w.y >> 16);
}
template <int DT> __device__ __forceinline__ void st4(void* p, const float* v) {
  if (DT == 0) { *(float4*)p = make_float4(v[0], v[1], v[2], v[3]); return; }
  uint2 w;
  w.x = cvt2(v[0], v[1], DT);
  w.y = cvt2(v[2], v[3], DT);
  *(uint2*)p = w;
}
// The same with the dtype read at run time (the layer norm kernel).
__device__ __forceinline__ float h2f(u32 h, int dt) { return dt == 1 ? h2f<1>(h) : h2f<2>(h); }
__device__ __forceinline__ float ld(const void* p, u64 i, int dt) {
  return dt == 0 ? ld<0>(p, i) : dt == 1 ? ld<1>(p, i) : ld<2>(p, i);
}
__device__ __forceinline__ float rnd(float v, int dt) { return dt == 0 ? v : dt == 1 ? rnd<1>(v) : rnd<2>(v); }
__device__ __forceinline__ void st(void* p, u64 i, int dt, float v) {
  if (dt == 0) st<0>(p, i, v); else if (dt == 1) st<1>(p, i, v); else st<2>(p, i, v);
}
__device__ __forceinline__ void ld4(const void* p, int dt, float* v) {
  if (dt == 0) ld4<0>(p, v); else if (dt == 1) ld4<1>(p, v); else ld4<2>(p, v);
}
__device__ __forceinline__ void st4(void* p, int dt, const float* v) {
  if (dt == 0) st4<0>(p, v); else if (dt == 1) st4<1>(p, v); else st4<2>(p, v);
}
// One tensor of a multi-tensor sweep (64 bytes; the host writes the same layout, cuda.rs `Desc`).
// Everything a step changes (keys, scales, gradients, the learning rate) is read from here, device
// memory, not from kernel arguments, so a captured launch can be replayed with new values.
struct Desc {
  u64 ptr;                // the tensor's first element
  u64 n;                  // its elements
  u32 dt, vec, flags, m;  // dtype code, vector path allowed, F_* flags, directions (update)
  u32 a, b;               // perturb: the stream key; update: the restore's key
  float scale, inv_n, wd, lr;  // perturb: scale; update: restore scale, 1/n, weight decay, lr
  u32 kofs, pad;          // update: this tensor's first Dir (m of them; with F_THEN one more)
};
// One direction of one tensor's update: its key and gradient. With F_THEN the Dir after the m
// directions is the trailing perturbation: its key, and its scale in g.
struct Dir { u32 a, b; float g; };
#define F_INV 1u
#define F_WD 2u
#define F_RESTORE 4u
#define F_THEN 8u
extern __shared__ float sT[];
// The table's lower half, then (8-byte aligned after it) the tensors' first units: S[j] is the
// first unit of tensor j, S[nt] the total. A unit is four consecutive elements of one tensor.
__device__ __forceinline__ const u64* load_shared(const float* __restrict__ T, const u64* __restrict__ S, int nt) {
  u64* sS = (u64*)(sT + HALF + 2);
  for (u32 j = threadIdx.x; j <= HALF; j += blockDim.x) sT[j] = T[j];
  for (int j = threadIdx.x; j <= nt; j += blockDim.x) sS[j] = S[j];
  __syncthreads();
  return sS;
}
// One tensor's share of a sweep for one thread: its units q, q + stride, ... below qe, the first
// `full` of them by the vector path (every complete unit, none if unaligned), the rest (the 1-3
// elements at the end, or an unaligned tensor) element by element. Returns the first q past the
// tensor. Compiled per dtype and distribution, so the loop holds only the element arithmetic.
template <int DT, int DIST, class Op>
__device__ __forceinline__ u32 tensor_units(void* p, u64 n, u32 q, u32 qe, u32 full, u32 stride, const Op& op) {
  for (; q < full; q += stride) {
    float v[4];
    void* pq = (char*)p + (u64)q * (DT == 0 ? 16 : 8);
    ld4<DT>(pq, v);
    op.template apply4<DT, DIST>(v, q << 2);
    st4<DT>(pq, v);
  }
  for (; q < qe; q += stride) {
    u64 i = (u64)q << 2, e = i + 4 < n ? i + 4 : n;
    for (; i < e; i++) st<DT>(p, i, op.template apply<DT, DIST>(ld<DT>(p, i), (u32)i));
  }
  return q;
}
// One sweep over the concatenated units of nt tensors, grid-stride: th <- op(th, i) for every
// element. A thread's units only grow, so after one binary search for its first unit it finds
// each next unit's tensor by stepping forward (at most nt steps in all). Which thread does which
// element never changes an element's bits. The grid (blocks x threads) is below 2^31 and a tensor
// has at most 2^32 elements (2^30 units), so a unit index within a tensor stays 32-bit.
template <int DIST, class Op>
__device__ __forceinline__ void sweep_many(const Desc* __restrict__ D, const u64* sS, int nt, u64 U, Op& op) {
  u32 stride = gridDim.x * blockDim.x;
  u64 u = blockIdx.x * (u64)blockDim.x + threadIdx.x;
  if (u >= U) return;
  int lo = 0, hi = nt;  // sS[lo] <= u < sS[hi]
  while (hi - lo > 1) { int mid = (lo + hi) >> 1; if (sS[mid] <= u) lo = mid; else hi = mid; }
  for (int j = lo;;) {
    u64 start = sS[j];
    void* p = (void*)D[j].ptr;
    u64 n = D[j].n;
    u32 full = D[j].vec ? (u32)(n >> 2) : 0u;
    u32 q = (u32)(u - start), qe = (u32)(sS[j + 1] - start);
    op.load(D[j]);
    switch (D[j].dt) {
      case 0: q = tensor_units<0, DIST>(p, n, q, qe, full, stride, op); break;
      case 1: q = tensor_units<1, DIST>(p, n, q, qe, full, stride, op); break;
      default: q = tensor_units<2, DIST>(p, n, q, qe, full, stride, op); break;
    }
    u = start + q;
    if (u >= U) break;
    do { j++; } while (u >= sS[j + 1]);
  }
}
struct PerturbOp {
  const float* sT; u32 a, b; float s;
  __device__ __forceinline__ void load(const Desc& d) { a = d.a; b = d.b; s = d.scale; }
  template <int DT, int DIST> __device__ __forceinline__ float apply(float th, u32 i) const {
    return __fadd_rn(th, __fmul_rn(zval<DIST>(i, a, b, sT), s));
  }
  template <int DT, int DIST> __device__ __forceinline__ void apply4(float* v, u32 i) const {
    float z[4];
    zvals<4, DIST>(i, a, b, sT, z);
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = __fadd_rn(v[k], __fmul_rn(z[k], s));
  }
};
// The first direction's key and gradient sit in registers (one direction is the common case);
// further ones are read once per four elements. The optional parts (a restore, weight decay, a
// trailing perturbation) are tested once per unit of K elements, not per element.
struct UpdateOp {
  const float* sT; const Dir* __restrict__ K;
  const Dir* dir; u32 m, flags, a0, b0, ra, rb, pa, pb; float g0, rs, inv, wd, lr, ps; bool reuse;
  __device__ __forceinline__ void load(const Desc& d) {
    dir = K + d.kofs; m = d.m; flags = d.flags; ra = d.a; rb = d.b;
    rs = d.scale; inv = d.inv_n; wd = d.wd; lr = d.lr;
    a0 = dir[0].a; b0 = dir[0].b; g0 = dir[0].g;
    // The restore undoes the last direction's perturbation: its z is the one the estimate has
    // just drawn for that direction, so it is reused rather than drawn again (z is a pure
    // function of key and index: the same bits, a quarter fewer draws a step).
    reuse = (flags & F_RESTORE) && ra == dir[m - 1].a && rb == dir[m - 1].b;
    if (flags & F_THEN) { pa = dir[m].a; pb = dir[m].b; ps = dir[m].g; }
  }
  // th from the estimate acc = sum_j g_j z_j (direction order), as the per-tensor update does,
  // for KN consecutive elements from i; zl: the last direction's z at each.
  template <int KN, int DT, int DIST>
  __device__ __forceinline__ void finish(float* th, float* acc, u32 i, const float* zl) const {
    if (flags & F_INV) {
#pragma unroll
      for (int k = 0; k < KN; k++) acc[k] = __fmul_rn(acc[k], inv);
    }
    // A pending restore (the last direction's -eps z undone) fused into this sweep, rounded as
    // the separate perturb kernel's store would round it: the same bits, one sweep fewer.
    if (flags & F_RESTORE) {
      if (reuse) {
#pragma unroll
        for (int k = 0; k < KN; k++) th[k] = rnd<DT>(__fadd_rn(th[k], __fmul_rn(zl[k], rs)));
      } else {
#pragma unroll
        {
          float zr[KN];
          zvals<KN, DIST>(i, ra, rb, sT, zr);
#pragma unroll
          for (int k = 0; k < KN; k++) th[k] = rnd<DT>(__fadd_rn(th[k], __fmul_rn(zr[k], rs)));
        }
      }
    }
    if (flags & F_WD) {
#pragma unroll
      for (int k = 0; k < KN; k++) acc[k] = __fadd_rn(acc[k], __fmul_rn(th[k], wd));
    }
#pragma unroll
    for (int k = 0; k < KN; k++) th[k] = __fsub_rn(th[k], __fmul_rn(acc[k], lr));
    // The next step's first perturbation fused behind the update: the updated value rounded as
    // the update kernel's store rounds it, then the perturb kernel's arithmetic on it.
    if (flags & F_THEN) {
      float zp[KN];
      zvals<KN, DIST>(i, pa, pb, sT, zp);
#pragma unroll
      for (int k = 0; k < KN; k++) th[k] = __fadd_rn(rnd<DT>(th[k]), __fmul_rn(zp[k], ps));
    }
  }
  template <int KN, int DT, int DIST> __device__ __forceinline__ void update(float* v, u32 i) const {
    float acc[KN], zl[KN];
    zvals<KN, DIST>(i, a0, b0, sT, zl);
#pragma unroll
    for (int k = 0; k < KN; k++) acc[k] = __fmul_rn(zl[k], g0);
    for (u32 j = 1; j < m; j++) {
      Dir e = dir[j];
      zvals<KN, DIST>(i, e.a, e.b, sT, zl);
#pragma unroll
      for (int k = 0; k < KN; k++) acc[k] = __fadd_rn(acc[k], __fmul_rn(zl[k], e.g));
    }
    finish<KN, DT, DIST>(v, acc, i, zl);
  }
  template <int DT, int DIST> __device__ __forceinline__ float apply(float th, u32 i) const {
    update<1, DT, DIST>(&th, i);
    return th;
  }
  template <int DT, int DIST> __device__ __forceinline__ void apply4(float* v, u32 i) const { update<4, DT, DIST>(v, i); }
};
// th += scale z for every element of nt tensors.
extern "C" __global__ void __launch_bounds__(1024, 1)
mezo_perturb_many(const Desc* __restrict__ D, const u64* __restrict__ S, int nt, u64 U,
                  const float* __restrict__ T, int dist) {
  const u64* sS = load_shared(T, S, nt);
  PerturbOp op{sT, 0, 0, 0.0f};
  if (dist) sweep_many<1>(D, sS, nt, U, op); else sweep_many<0>(D, sS, nt, U, op);
}
// The ZO-SGD update (with the optional fused restore before it and perturbation after it) of
// every element of nt tensors.
extern "C" __global__ void __launch_bounds__(1024, 1)
mezo_sgd_update_many(const Desc* __restrict__ D, const u64* __restrict__ S, const Dir* __restrict__ K,
                     int nt, u64 U, const float* __restrict__ T, int dist) {
  const u64* sS = load_shared(T, S, nt);
  UpdateOp op{sT, K, K, 0, 0, 0, 0, 0, 0, 0, 0, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, false};
  if (dist) sweep_many<1>(D, sS, nt, U, op); else sweep_many<0>(D, sS, nt, U, op);
}
// A flat state's perturbed variants for n directions (the adapter forward's input): with
// z_r[j] = z(local[j]; key a[r, owner[j]], b[r, owner[j]]), out[2r] = th + eps z_r and
// out[2r+1] = th - eps z_r, float32, the same operations as the tensor code. The table is read
// from global memory (L2): a few hundred thousand elements do not repay loading it on chip.
extern "C" __global__ void mezo_flat_variants(float* __restrict__ out, const float* __restrict__ th,
    const long long* __restrict__ a, const long long* __restrict__ b, const long long* __restrict__ owner,
    const long long* __restrict__ local, int segs, u64 P, int n, float eps, const float* __restrict__ T,
    int dist) {
  u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < (u64)n * P; e += stride) {
    u64 r = e / P, j = e - r * P;
    long long s = owner[j];
    float ze = __fmul_rn(zval((u32)local[j], (u32)a[r * segs + s], (u32)b[r * segs + s], T, dist), eps);
    float t = th[j];
    out[2 * r * P + j] = __fadd_rn(t, ze);
    out[(2 * r + 1) * P + j] = __fsub_rn(t, ze);
  }
}
// s = x + y rounded to the dtype (libtorch's add), then layer_norm(s) * w + b, over rows of n
// elements: one block a row, each thread holding at most LN_MAX of the row's sums in registers
// (the host picks the block size). The statistics are f32 over the rounded s, as libtorch's
// layer norm reads its input: the mean, then the centred sum of squares (no cancellation). One
// kernel where the residual add and the norm were two. (Warp shuffles: not in the host emulation.)
#ifndef MEZO_HOST_EMULATION
#define LN_MAX 16
__device__ __forceinline__ void* elt(const void* p, u64 i, int dt) { return (char*)p + i * (dt == 0 ? 4 : 2); }
// The sum of v over the block, on every thread; `red` holds a value per warp.
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? red[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) red[32] = v;
  }
  __syncthreads();
  v = red[32];
  __syncthreads();  // `red` is free again for the next sum
  return v;
}
extern "C" __global__ void mezo_add_layer_norm(void* __restrict__ sum, void* __restrict__ out,
    const void* __restrict__ x, const void* __restrict__ y, const void* __restrict__ w,
    const void* __restrict__ b, u32 n, float eps, int dt, int vec) {
  __shared__ float red[33];
  u64 base = (u64)blockIdx.x * n;
  u32 t = threadIdx.x, T = blockDim.x;
  float v[LN_MAX];
  // A 16-bit weight and bias, loaded (packed, as they lie) before the reductions: they do not
  // depend on the row, so their latency overlaps the row's loads and the two block sums instead
  // of following them.
  uint2 gw[LN_MAX / 4], hb[LN_MAX / 4];
  bool early = vec && dt != 0;
  if (early) {
#pragma unroll
    for (int c = 0; c < LN_MAX / 4; c++) {
      u32 i = (t + c * T) * 4;
      if (i < n) { gw[c] = *(const uint2*)elt(w, i, dt); hb[c] = *(const uint2*)elt(b, i, dt); }
    }
  }
  float acc = 0.0f;
  // Element j of this thread: index (t + c T) 4 + k on the vector path (chunk c, lane k of
  // four), t + j T on the scalar one.
#pragma unroll
  for (int c = 0; c < LN_MAX / 4; c++) {
    if (vec) {
      u32 i = (t + c * T) * 4;
      if (i < n) {
        float a[4], d[4];
        ld4(elt(x, base + i, dt), dt, a);
        ld4(elt(y, base + i, dt), dt, d);
#pragma unroll
        for (int k = 0; k < 4; k++) { v[c * 4 + k] = rnd(__fadd_rn(a[k], d[k]), dt); acc = __fadd_rn(acc, v[c * 4 + k]); }
        st4(elt(sum, base + i, dt), dt, &v[c * 4]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; k++) {
        u32 i = t + (c * 4 + k) * T;
        if (i < n) {
          v[c * 4 + k] = rnd(__fadd_rn(ld(x, base + i, dt), ld(y, base + i, dt)), dt);
          st(sum, base + i, dt, v[c * 4 + k]);
          acc = __fadd_rn(acc, v[c * 4 + k]);
        }
      }
    }
  }
  float inv_n = __fdiv_rn(1.0f, (float)n);
  float mean = __fmul_rn(block_sum(acc, red), inv_n);
  float sq = 0.0f;
#pragma unroll
  for (int c = 0; c < LN_MAX / 4; c++) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
      u32 i = vec ? (t + c * T) * 4 + k : t + (c * 4 + k) * T;
      if (i < n) { float d = __fsub_rn(v[c * 4 + k], mean); sq = __fadd_rn(sq, __fmul_rn(d, d)); }
    }
  }
  float rstd = rsqrtf(__fadd_rn(__fmul_rn(block_sum(sq, red), inv_n), eps));
#pragma unroll
  for (int c = 0; c < LN_MAX / 4; c++) {
    if (vec) {
      u32 i = (t + c * T) * 4;
      if (i < n) {
        float g[4], h[4], o[4];
        if (early) {
          g[0] = h2f(gw[c].x & 0xffffu, dt); g[1] = h2f(gw[c].x >> 16, dt); g[2] = h2f(gw[c].y & 0xffffu, dt); g[3] = h2f(gw[c].y >> 16, dt);
          h[0] = h2f(hb[c].x & 0xffffu, dt); h[1] = h2f(hb[c].x >> 16, dt); h[2] = h2f(hb[c].y & 0xffffu, dt); h[3] = h2f(hb[c].y >> 16, dt);
        } else {
          ld4(elt(w, i, dt), dt, g);
          ld4(elt(b, i, dt), dt, h);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) o[k] = __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(v[c * 4 + k], mean), rstd), g[k]), h[k]);
        st4(elt(out, base + i, dt), dt, o);
      }
    } else {
#pragma unroll
      for (int k = 0; k < 4; k++) {
        u32 i = t + (c * 4 + k) * T;
        if (i < n) st(out, base + i, dt, __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(v[c * 4 + k], mean), rstd), ld(w, i, dt)), ld(b, i, dt)));
      }
    }
  }
}
#endif
"#;

type CuResult = c_int;

/// NVRTC, opened on its own: compiling needs no driver (a CPU machine's tests compile the source).
struct Nvrtc {
    _lib: libloading::Library,
    /// NVRTC's builtins library, opened beside it (see [`Nvrtc::load`]).
    _builtins: Option<libloading::os::unix::Library>,
    create_program: unsafe extern "C" fn(
        *mut *mut c_void,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile_program: unsafe extern "C" fn(*mut c_void, c_int, *const *const c_char) -> c_int,
    destroy_program: unsafe extern "C" fn(*mut *mut c_void) -> c_int,
    get_ptx_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    get_ptx: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    get_cubin_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    get_cubin: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
    get_program_log_size: unsafe extern "C" fn(*mut c_void, *mut usize) -> c_int,
    get_program_log: unsafe extern "C" fn(*mut c_void, *mut c_char) -> c_int,
}

/// The driver API (libcuda), for loading modules and launching into a device's primary context.
struct Driver {
    _lib: libloading::Library,
    get_error_string: unsafe extern "C" fn(CuResult, *mut *const c_char) -> CuResult,
    init: unsafe extern "C" fn(c_uint) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    primary_ctx_retain: unsafe extern "C" fn(*mut *mut c_void, c_int) -> CuResult,
    ctx_push: unsafe extern "C" fn(*mut c_void) -> CuResult,
    ctx_pop: unsafe extern "C" fn(*mut *mut c_void) -> CuResult,
    module_load_data: unsafe extern "C" fn(*mut *mut c_void, *const c_void) -> CuResult,
    module_get_function: unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *const c_char) -> CuResult,
    #[allow(clippy::type_complexity)]
    launch_kernel: unsafe extern "C" fn(
        *mut c_void,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        *mut c_void,
        *mut *mut c_void,
        *mut *mut c_void,
    ) -> CuResult,
    device_get_attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> CuResult,
    mem_alloc: unsafe extern "C" fn(*mut u64, usize) -> CuResult,
    memcpy_htod: unsafe extern "C" fn(u64, *const c_void, usize) -> CuResult,
    memcpy_htod_async: unsafe extern "C" fn(u64, *const c_void, usize, *mut c_void) -> CuResult,
    mem_host_alloc: unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> CuResult,
    mem_free_host: unsafe extern "C" fn(*mut c_void) -> CuResult,
    event_create: unsafe extern "C" fn(*mut *mut c_void, c_uint) -> CuResult,
    event_record: unsafe extern "C" fn(*mut c_void, *mut c_void) -> CuResult,
    event_synchronize: unsafe extern "C" fn(*mut c_void) -> CuResult,
    func_set_attribute: unsafe extern "C" fn(*mut c_void, c_int, c_int) -> CuResult,
}

/// The first of `names` that loads, and the name it loaded under.
fn open_first(names: &[String]) -> Result<(libloading::Library, String)> {
    let mut errs = Vec::new();
    for n in names {
        // SAFETY: loading a vendor library whose initialisers are trusted (NVIDIA's).
        match unsafe { libloading::Library::new(n) } {
            Ok(l) => return Ok((l, n.clone())),
            Err(e) => errs.push(format!("{n}: {e}")),
        }
    }
    Err(CoreError::Cuda(format!("cannot load any of: {}", errs.join("; "))))
}

fn nvrtc_names() -> Vec<String> {
    let mut names: Vec<String> = std::env::var("MEZO_NVRTC").into_iter().collect();
    names.extend(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"].map(String::from));
    // pip's torch keeps NVRTC in site-packages/nvidia/cu*/lib beside torch/lib.
    if let Ok(paths) = std::env::var("LD_LIBRARY_PATH") {
        for p in paths.split(':').filter(|p| p.ends_with("torch/lib")) {
            for cu in ["cu13", "cuda_nvrtc"] {
                for f in ["libnvrtc.so.13", "libnvrtc.so.12"] {
                    names.push(format!("{p}/../../nvidia/{cu}/lib/{f}"));
                }
            }
        }
    }
    names
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: the signature matches the documented C API of this symbol.
        *unsafe { $lib.get($name) }
            .map_err(|e| CoreError::Cuda(format!("{}: {e}", String::from_utf8_lossy($name))))?
    };
}

impl Nvrtc {
    fn load() -> Result<Self> {
        let (lib, name) = open_first(&nvrtc_names())?;
        // NVRTC dlopens libnvrtc-builtins by bare name when it compiles, which fails where its
        // folder (pip's site-packages/nvidia/cu13/lib) is on no search path. Loaded here first,
        // from the folder libnvrtc came from, that lookup finds the library already loaded.
        let builtins =
            std::path::Path::new(&name).parent().filter(|d| !d.as_os_str().is_empty()).and_then(|dir| {
                let mut found: Vec<_> = std::fs::read_dir(dir)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|f| f.to_str())
                            .is_some_and(|f| f.starts_with("libnvrtc-builtins.so.") && !f.contains(".alt"))
                    })
                    .collect();
                found.sort();
                found.into_iter().find_map(|p| {
                    // SAFETY: NVIDIA's library, as above; global so NVRTC's own dlopen sees it.
                    unsafe {
                        libloading::os::unix::Library::open(
                            Some(&p),
                            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                        )
                    }
                    .ok()
                })
            });
        Ok(Nvrtc {
            _builtins: builtins,
            create_program: sym!(lib, b"nvrtcCreateProgram"),
            compile_program: sym!(lib, b"nvrtcCompileProgram"),
            destroy_program: sym!(lib, b"nvrtcDestroyProgram"),
            get_ptx_size: sym!(lib, b"nvrtcGetPTXSize"),
            get_ptx: sym!(lib, b"nvrtcGetPTX"),
            get_cubin_size: sym!(lib, b"nvrtcGetCUBINSize"),
            get_cubin: sym!(lib, b"nvrtcGetCUBIN"),
            get_program_log_size: sym!(lib, b"nvrtcGetProgramLogSize"),
            get_program_log: sym!(lib, b"nvrtcGetProgramLog"),
            _lib: lib,
        })
    }

    /// Compiles [`SOURCE`]: PTX for a virtual architecture (`compute_90`), a CUBIN for a real one
    /// (`sm_90`, which also runs ptxas). Returns the image and the compiler's log.
    fn compile(&self, arch: &str, extra: &[&str]) -> Result<(Vec<u8>, String)> {
        let src = CString::new(SOURCE).expect("no NUL");
        let name = CString::new("mezo_fused.cu").expect("no NUL");
        let mut prog = std::ptr::null_mut();
        // SAFETY: valid C strings; no headers.
        let r = unsafe {
            (self.create_program)(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(CoreError::Cuda(format!("nvrtcCreateProgram failed ({r})")));
        }
        // --fmad=false: the arithmetic must round exactly like the CPU's (the intrinsics already
        // say so; this keeps any future edit honest).
        let mut opts = vec![format!("--gpu-architecture={arch}"), "--fmad=false".to_string()];
        opts.extend(extra.iter().map(|s| s.to_string()));
        let opts: Vec<CString> = opts.into_iter().map(|o| CString::new(o).expect("no NUL")).collect();
        let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: `prog` was created above; the options outlive the call.
        let r = unsafe { (self.compile_program)(prog, ptrs.len() as c_int, ptrs.as_ptr()) };
        let mut n = 0usize;
        unsafe { (self.get_program_log_size)(prog, &mut n) };
        let mut log = vec![0u8; n.max(1)];
        unsafe { (self.get_program_log)(prog, log.as_mut_ptr() as *mut c_char) };
        let log = String::from_utf8_lossy(&log).trim_end_matches('\0').trim().to_string();
        let out = if r != 0 {
            Err(CoreError::Cuda(format!("NVRTC ({arch}): {log}")))
        } else {
            let (size, get) = if arch.starts_with("sm_") {
                (self.get_cubin_size, self.get_cubin)
            } else {
                (self.get_ptx_size, self.get_ptx)
            };
            let mut n = 0usize;
            unsafe { size(prog, &mut n) };
            let mut image = vec![0u8; n];
            unsafe { get(prog, image.as_mut_ptr() as *mut c_char) };
            Ok((image, log))
        };
        unsafe { (self.destroy_program)(&mut prog) };
        out
    }
}

fn nvrtc() -> Result<&'static Nvrtc> {
    static N: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    N.get_or_init(|| Nvrtc::load().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| CoreError::Cuda(e.clone()))
}

impl Driver {
    fn load() -> Result<Self> {
        let (lib, _) = open_first(&["libcuda.so.1".to_string(), "libcuda.so".to_string()])?;
        let d = Driver {
            get_error_string: sym!(lib, b"cuGetErrorString"),
            init: sym!(lib, b"cuInit"),
            device_get: sym!(lib, b"cuDeviceGet"),
            primary_ctx_retain: sym!(lib, b"cuDevicePrimaryCtxRetain"),
            ctx_push: sym!(lib, b"cuCtxPushCurrent_v2"),
            ctx_pop: sym!(lib, b"cuCtxPopCurrent_v2"),
            module_load_data: sym!(lib, b"cuModuleLoadData"),
            module_get_function: sym!(lib, b"cuModuleGetFunction"),
            launch_kernel: sym!(lib, b"cuLaunchKernel"),
            device_get_attribute: sym!(lib, b"cuDeviceGetAttribute"),
            mem_get_info: sym!(lib, b"cuMemGetInfo_v2"),
            mem_alloc: sym!(lib, b"cuMemAlloc_v2"),
            memcpy_htod: sym!(lib, b"cuMemcpyHtoD_v2"),
            memcpy_htod_async: sym!(lib, b"cuMemcpyHtoDAsync_v2"),
            mem_host_alloc: sym!(lib, b"cuMemHostAlloc"),
            mem_free_host: sym!(lib, b"cuMemFreeHost"),
            event_create: sym!(lib, b"cuEventCreate"),
            event_record: sym!(lib, b"cuEventRecord"),
            event_synchronize: sym!(lib, b"cuEventSynchronize"),
            func_set_attribute: sym!(lib, b"cuFuncSetAttribute"),
            _lib: lib,
        };
        // Idempotent; libtorch has normally called it already.
        d.check(unsafe { (d.init)(0) }, "cuInit")?;
        Ok(d)
    }

    fn check(&self, r: CuResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: cuGetErrorString writes a pointer to a static string.
        unsafe { (self.get_error_string)(r, &mut s) };
        let msg = if s.is_null() {
            format!("error {r}")
        } else {
            unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
        };
        Err(CoreError::Cuda(format!("{what}: {msg}")))
    }

    /// Launches `f` on a 1-D grid, `(blocks, threads, shared bytes)`, on `stream` (null: the
    /// legacy default stream) in the thread's current context.
    ///
    /// # Safety
    /// `args` point at live values of the kernel's parameter types, in order, and everything
    /// the kernel reads or writes stays allocated until the stream has run it.
    unsafe fn launch(
        &self,
        f: usize,
        (blocks, threads, shared): (u32, u32, u32),
        stream: *mut c_void,
        args: &mut [*mut c_void],
        what: &str,
    ) -> Result<()> {
        // SAFETY: the caller's promise (above); the grid's other dimensions are 1.
        let r = unsafe {
            (self.launch_kernel)(
                f as *mut c_void,
                blocks,
                1,
                1,
                threads,
                1,
                1,
                shared,
                stream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        self.check(r, what)
    }

    /// Makes `ctx` current on this thread until the guard drops (then the previous context is
    /// current again, so libtorch's view of the thread is untouched).
    fn enter(&self, ctx: usize) -> Result<CtxGuard<'_>> {
        self.check(unsafe { (self.ctx_push)(ctx as *mut c_void) }, "cuCtxPushCurrent")?;
        Ok(CtxGuard { driver: self })
    }
}

struct CtxGuard<'a> {
    driver: &'a Driver,
}

impl Drop for CtxGuard<'_> {
    fn drop(&mut self) {
        let mut popped = std::ptr::null_mut();
        // A failure here leaves our context current; nothing better to do in a destructor.
        let _ = unsafe { (self.driver.ctx_pop)(&mut popped) };
    }
}

/// What one device needs to run the kernels: its primary context (libtorch's), the module loaded
/// there, its multiprocessor count and its own copy of the half table. Made on first use, kept for
/// the process (a few hundred KB per device).
struct DeviceKernels {
    ctx: usize,
    perturb: usize,
    update: usize,
    variants: usize,
    add_layer_norm: usize,
    /// One block each (the shared table takes most of an SM's shared memory, and fewer blocks
    /// load it fewer times).
    sms: u32,
    table: u64,
    staging: Mutex<Staging>,
}

/// Page-locked host buffers the descriptor uploads go through, used in turn. A copy from pinned
/// memory is truly asynchronous, where one from pageable memory may wait for the stream to drain
/// (libtorch's blocking copy always does): a sweep must not stall the host behind the forward
/// queued before it. A slot is written again only after the event recorded behind its last copy
/// has passed (normally long before: the other slots were used in between).
struct Staging {
    slots: [StagingSlot; STAGING_SLOTS],
    next: usize,
}

#[derive(Default, Clone, Copy)]
struct StagingSlot {
    host: usize,
    capacity: usize,
    event: usize,
    in_flight: bool,
}

const STAGING_SLOTS: usize = 4;

/// Shared memory for the table: knots 0..=32768 and one float of padding, so the tensors' first
/// units that follow it are 8-byte aligned.
const TABLE_SHARED_BYTES: u32 = (32_770 * 4) as u32;
/// Tensors one launch sweeps at most (each takes 8 bytes of shared memory); longer lists take
/// several launches.
const MAX_TENSORS_PER_LAUNCH: usize = 2048;
const MAX_SHARED_BYTES: u32 = TABLE_SHARED_BYTES + 8 * (MAX_TENSORS_PER_LAUNCH as u32 + 1);
const THREADS: u32 = 1024;

struct Kernels {
    driver: Driver,
    devices: Mutex<Vec<(usize, &'static DeviceKernels)>>,
}

fn kernels() -> Result<&'static Kernels> {
    static K: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();
    K.get_or_init(|| {
        Driver::load()
            .map(|driver| Kernels { driver, devices: Mutex::new(Vec::new()) })
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| CoreError::Cuda(e.clone()))
}

impl Kernels {
    /// The kernels on CUDA device `index`, compiled and loaded there on first use.
    fn device(&self, index: usize) -> Result<&'static DeviceKernels> {
        let mut devices = self.devices.lock().expect("kernel cache lock");
        if let Some((_, k)) = devices.iter().find(|(i, _)| *i == index) {
            return Ok(k);
        }
        let d = &self.driver;
        let mut dev = 0;
        d.check(unsafe { (d.device_get)(&mut dev, index as c_int) }, &format!("cuDeviceGet({index})"))?;
        let mut ctx = std::ptr::null_mut();
        // The primary context is the one the CUDA runtime, so libtorch, uses on this device.
        d.check(unsafe { (d.primary_ctx_retain)(&mut ctx, dev) }, "cuDevicePrimaryCtxRetain")?;
        let _g = d.enter(ctx as usize)?;
        let attr = |a: c_int, what: &str| -> Result<c_int> {
            let mut v = 0;
            d.check(unsafe { (d.device_get_attribute)(&mut v, a, dev) }, what)?;
            Ok(v)
        };
        // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76, MULTIPROCESSOR_COUNT = 16.
        let (major, minor) = (attr(75, "compute capability")?, attr(76, "compute capability")?);
        let sms = attr(16, "multiprocessor count")?;
        let (ptx, _) = nvrtc()?.compile(&format!("compute_{major}{minor}"), &[])?;
        let mut module = std::ptr::null_mut();
        d.check(
            unsafe { (d.module_load_data)(&mut module, ptx.as_ptr() as *const c_void) },
            "cuModuleLoadData",
        )?;
        let get = |name: &str| -> Result<usize> {
            let mut f = std::ptr::null_mut();
            let c = CString::new(name).expect("no NUL");
            d.check(unsafe { (d.module_get_function)(&mut f, module, c.as_ptr()) }, name)?;
            // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8: above the default 48 KB.
            d.check(
                unsafe { (d.func_set_attribute)(f, 8, MAX_SHARED_BYTES as c_int) },
                "allowing the kernel 147 KB of shared memory",
            )?;
            Ok(f as usize)
        };
        // This device's copy of the half table (knots 0..=32768), in memory of its own outside
        // libtorch's allocator: callers need not hand the kernels a table on the right device.
        let half = &host_gauss_table().t[..=32_768];
        let bytes = std::mem::size_of_val(half);
        let mut table = 0u64;
        d.check(unsafe { (d.mem_alloc)(&mut table, bytes) }, "cuMemAlloc (Gaussian table)")?;
        d.check(
            unsafe { (d.memcpy_htod)(table, half.as_ptr() as *const c_void, bytes) },
            "cuMemcpyHtoD (Gaussian table)",
        )?;
        let k = DeviceKernels {
            ctx: ctx as usize,
            perturb: get("mezo_perturb_many")?,
            update: get("mezo_sgd_update_many")?,
            variants: get("mezo_flat_variants")?,
            add_layer_norm: get("mezo_add_layer_norm")?,
            sms: sms.max(1) as u32,
            table,
            staging: Mutex::new(Staging { slots: [StagingSlot::default(); STAGING_SLOTS], next: 0 }),
        };
        let k: &'static DeviceKernels = Box::leak(Box::new(k));
        devices.push((index, k));
        Ok(k)
    }
}

impl Kernels {
    /// Copies `buf` into `dev` (device memory of at least its size) on the legacy default stream
    /// without blocking the host (see [`Staging`]). Call with `k`'s context current.
    fn upload(&self, k: &DeviceKernels, buf: &[u8], dev: u64) -> Result<()> {
        let d = &self.driver;
        let mut st = k.staging.lock().expect("staging lock");
        let at = st.next;
        st.next = (at + 1) % STAGING_SLOTS;
        let slot = &mut st.slots[at];
        if slot.event == 0 {
            let mut e = std::ptr::null_mut();
            // CU_EVENT_DISABLE_TIMING = 2: the cheapest kind, only ever waited on.
            d.check(unsafe { (d.event_create)(&mut e, 2) }, "cuEventCreate")?;
            slot.event = e as usize;
        }
        if slot.in_flight {
            d.check(unsafe { (d.event_synchronize)(slot.event as *mut c_void) }, "cuEventSynchronize")?;
            slot.in_flight = false;
        }
        if slot.capacity < buf.len() {
            if slot.host != 0 {
                d.check(unsafe { (d.mem_free_host)(slot.host as *mut c_void) }, "cuMemFreeHost")?;
                slot.host = 0;
                slot.capacity = 0;
            }
            let capacity = buf.len().next_power_of_two().max(4096);
            let mut h = std::ptr::null_mut();
            d.check(
                unsafe { (d.mem_host_alloc)(&mut h, capacity, 0) },
                "cuMemHostAlloc (descriptor staging)",
            )?;
            slot.host = h as usize;
            slot.capacity = capacity;
        }
        // SAFETY: the slot holds `capacity` >= buf.len() bytes and no copy reads it any more.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), slot.host as *mut u8, buf.len()) };
        let r = unsafe {
            (d.memcpy_htod_async)(dev, slot.host as *const c_void, buf.len(), std::ptr::null_mut())
        };
        d.check(r, "cuMemcpyHtoDAsync (descriptors)")?;
        d.check(
            unsafe { (d.event_record)(slot.event as *mut c_void, std::ptr::null_mut()) },
            "cuEventRecord",
        )?;
        slot.in_flight = true;
        Ok(())
    }
}

/// One tensor of a launch, as the kernels' `struct Desc` lays it out (64 bytes, little endian).
#[derive(Debug, Clone, Copy, Default)]
struct Desc {
    ptr: u64,
    n: u64,
    dt: u32,
    vec: u32,
    flags: u32,
    m: u32,
    a: u32,
    b: u32,
    scale: f32,
    inv_n: f32,
    wd: f32,
    lr: f32,
    kofs: u32,
}

const DESC_BYTES: usize = 64;
const DIR_BYTES: usize = 12;
const F_INV: u32 = 1;
const F_WD: u32 = 2;
const F_RESTORE: u32 = 4;
const F_THEN: u32 = 8;

impl Desc {
    fn of(p: &Tensor) -> Self {
        let ptr = p.data_ptr();
        let dt = dtype_code(p);
        Desc { ptr: ptr as u64, n: p.numel() as u64, dt, vec: vector_aligned(ptr, dt), ..Desc::default() }
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend(self.ptr.to_le_bytes());
        out.extend(self.n.to_le_bytes());
        for w in [self.dt, self.vec, self.flags, self.m, self.a, self.b] {
            out.extend(w.to_le_bytes());
        }
        for f in [self.scale, self.inv_n, self.wd, self.lr] {
            out.extend(f.to_le_bytes());
        }
        out.extend(self.kofs.to_le_bytes());
        out.extend(0u32.to_le_bytes());
    }
}

/// Which kernel a launch runs.
#[derive(Clone, Copy)]
enum Sweep {
    Perturb,
    Update,
}

/// One launch's input: the buffer the kernel reads (descriptors, the tensors' first units, the
/// update's directions) and where its parts start.
struct Plan {
    buf: Vec<u8>,
    tensors: usize,
    units: u64,
    starts_at: usize,
    dirs_at: usize,
}

/// The launches that sweep `descs`: one per [`MAX_TENSORS_PER_LAUNCH`] tensors, none for tensors
/// without elements. `dirs`: the update's (key, gradient) pairs that the descriptors' `kofs`
/// point into (empty for a perturb).
fn plan(descs: &[Desc], dirs: &[(StreamKey, f32)]) -> Vec<Plan> {
    let mut plans = Vec::new();
    for chunk in descs.chunks(MAX_TENSORS_PER_LAUNCH) {
        let mut starts = Vec::with_capacity(chunk.len() + 1);
        let mut total = 0u64;
        for d in chunk {
            starts.push(total);
            total += d.n.div_ceil(4);
        }
        starts.push(total);
        if total == 0 {
            continue;
        }
        let nt = chunk.len();
        let mut buf = Vec::with_capacity(nt * DESC_BYTES + 8 * (nt + 1) + dirs.len() * DIR_BYTES);
        chunk.iter().for_each(|d| d.write(&mut buf));
        let starts_at = buf.len();
        starts.iter().for_each(|s| buf.extend(s.to_le_bytes()));
        let dirs_at = buf.len();
        for (key, g) in dirs {
            buf.extend(key.a.to_le_bytes());
            buf.extend(key.b.to_le_bytes());
            buf.extend(g.to_le_bytes());
        }
        plans.push(Plan { buf, tensors: nt, units: total, starts_at, dirs_at });
    }
    plans
}

/// Sweeps the tensors of `descs` (all on CUDA device `index`): per launch, one asynchronous
/// host-to-device copy of one small buffer, then the kernel, both on the legacy default stream.
fn launch_many(
    index: usize,
    sweep: Sweep,
    descs: &[Desc],
    dirs: &[(StreamKey, f32)],
    dist: Distribution,
) -> Result<()> {
    let ks = kernels()?;
    let k = ks.device(index)?;
    let mut di: c_int = matches!(dist, Distribution::Rademacher).into();
    let drv = &ks.driver;
    for plan in plan(descs, dirs) {
        // libtorch's allocator, stream-ordered: the memory is reused only by work queued after
        // this sweep's kernel, so dropping the tensor after the launch is safe. Allocated before
        // our context is pushed: libtorch may switch the thread's current device on the way,
        // which would replace whatever context is current.
        let dev_buf = Tensor::empty([plan.buf.len() as i64], (Kind::Uint8, Device::Cuda(index)));
        let base = dev_buf.data_ptr() as u64;
        let mut d_ptr = base;
        let mut s_ptr = base + plan.starts_at as u64;
        let mut k_ptr = base + plan.dirs_at as u64;
        let mut nt = plan.tensors as c_int;
        let mut units = plan.units;
        let mut table = k.table;
        let mut args: Vec<*mut c_void> =
            vec![&mut d_ptr as *mut _ as *mut c_void, &mut s_ptr as *mut _ as *mut c_void];
        let f = match sweep {
            Sweep::Perturb => k.perturb,
            Sweep::Update => {
                args.push(&mut k_ptr as *mut _ as *mut c_void);
                k.update
            }
        };
        args.extend([
            &mut nt as *mut _ as *mut c_void,
            &mut units as *mut _ as *mut c_void,
            &mut table as *mut _ as *mut c_void,
            &mut di as *mut _ as *mut c_void,
        ]);
        let blocks = plan.units.div_ceil(u64::from(THREADS)).clamp(1, u64::from(k.sms)) as u32;
        let shared = TABLE_SHARED_BYTES + 8 * (plan.tensors as u32 + 1);
        let guard = drv.enter(k.ctx)?;
        ks.upload(k, &plan.buf, base)?;
        // SAFETY: `args` point at live locals of the kernel's parameter types, in order; the
        // buffer and every tensor stay allocated until the work queued on this stream has run.
        unsafe {
            drv.launch(f, (blocks, THREADS, shared), std::ptr::null_mut(), &mut args, "cuLaunchKernel")?
        };
        // The thread's own context again before libtorch frees the buffer.
        drop(guard);
        drop(dev_buf);
    }
    Ok(())
}

/// A flat state's `2n` perturbed variants into `out` (`[2n, P]` float32, contiguous), one
/// launch on libtorch's current stream, so a CUDA graph captures it: `theta` `[P]` float32, `a`
/// and `b` the direction keys `[n, segments]` int64, `owner` and `local` each element's segment
/// and index in it, int64 `[P]`; all contiguous on one CUDA device. Reads only device memory.
#[allow(clippy::too_many_arguments)]
pub fn flat_variants(
    out: &Tensor,
    theta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    owner: &Tensor,
    local: &Tensor,
    eps: f32,
    dist: Distribution,
) -> Result<()> {
    let index = cuda_index(theta.device())?;
    let p = theta.numel() as u64;
    let (n, segs) = a.size2().map_err(|e| CoreError::Cuda(format!("direction keys: {e}")))?;
    let ok = theta.kind() == Kind::Float
        && out.kind() == Kind::Float
        && out.size() == [2 * n, p as i64]
        && b.size() == a.size()
        && [a, b, owner, local].iter().all(|t| t.kind() == Kind::Int64)
        && owner.numel() as u64 == p
        && local.numel() as u64 == p
        && [out, theta, a, b, owner, local].iter().all(|t| t.is_contiguous() && t.device() == theta.device());
    if !ok {
        return Err(CoreError::InvalidArgument {
            what: "flat variants",
            value: format!("out {:?}, theta {:?}, keys {:?}", out.size(), theta.size(), a.size()),
            expected: "contiguous f32 out [2n, P] and theta [P], int64 keys [n, segments] and indices [P], one CUDA device",
        });
    }
    if n == 0 || p == 0 {
        return Ok(());
    }
    let stream = crate::graph::current_stream(theta.device())?;
    let ks = kernels()?;
    let k = ks.device(index)?;
    let ptr = |t: &Tensor| t.data_ptr() as u64;
    let (mut o, mut t, mut pa, mut pb, mut po, mut pl) =
        (ptr(out), ptr(theta), ptr(a), ptr(b), ptr(owner), ptr(local));
    let (mut segs, mut pp, mut nn, mut e) = (segs as c_int, p, n as c_int, eps);
    let (mut table, mut di): (u64, c_int) = (k.table, matches!(dist, Distribution::Rademacher).into());
    let mut args: Vec<*mut c_void> = vec![
        &mut o as *mut _ as *mut c_void,
        &mut t as *mut _ as *mut c_void,
        &mut pa as *mut _ as *mut c_void,
        &mut pb as *mut _ as *mut c_void,
        &mut po as *mut _ as *mut c_void,
        &mut pl as *mut _ as *mut c_void,
        &mut segs as *mut _ as *mut c_void,
        &mut pp as *mut _ as *mut c_void,
        &mut nn as *mut _ as *mut c_void,
        &mut e as *mut _ as *mut c_void,
        &mut table as *mut _ as *mut c_void,
        &mut di as *mut _ as *mut c_void,
    ];
    let threads = 256u32;
    let blocks = (n as u64 * p).div_ceil(u64::from(threads)).clamp(1, u64::from(k.sms) * 8) as u32;
    let drv = &ks.driver;
    let _guard = drv.enter(k.ctx)?;
    // SAFETY: `args` point at live locals of the kernel's parameter types, in order; the tensors
    // outlive the launch (the caller holds them until the stream has run it).
    unsafe {
        drv.launch(k.variants, (blocks, threads, 0), stream, &mut args, "cuLaunchKernel (flat variants)")
    }
}

/// The residual add and layer norm of a transformer block as one launch on libtorch's current
/// stream (so a CUDA graph captures it): `s = x + y` and `layer_norm(s) * w + b` over the last
/// dimension, both in x's dtype. `x`, `y` contiguous of one shape; `w`, `b` the norm's `[n]`
/// weight and bias; all f32, f16 or bf16 of one dtype on one CUDA device. The sum rounds as
/// libtorch's add; the norm's statistics are f32, as libtorch's (its rounding may differ in the
/// last place). Returns `(s, norm)`.
pub fn add_layer_norm(x: &Tensor, y: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let index = cuda_index(x.device())?;
    let size = x.size();
    let n = size.last().copied().unwrap_or(0);
    let ok = matches!(x.kind(), Kind::Float | Kind::Half | Kind::BFloat16)
        && y.size() == size
        && w.size() == [n]
        && b.size() == [n]
        && n > 0
        && n < 1 << 31
        && [x, y, w, b].iter().all(|t| t.kind() == x.kind() && t.device() == x.device() && t.is_contiguous());
    if !ok {
        return Err(CoreError::InvalidArgument {
            what: "add + layer norm",
            value: format!(
                "x {:?} {:?}, y {:?}, w {:?}, b {:?}",
                x.kind(),
                size,
                y.size(),
                w.size(),
                b.size()
            ),
            expected: "contiguous x, y of one shape and [n] w, b, one float dtype, one CUDA device",
        });
    }
    // A block a row: a multiple of 32 threads, each holding at most 16 of the row's values.
    let threads = (n as u64).div_ceil(16).div_ceil(32).max(1) * 32;
    if threads > 1024 {
        return Err(CoreError::InvalidArgument {
            what: "add + layer norm",
            value: format!("rows of {n}"),
            expected: "at most 16384 elements a row",
        });
    }
    let sum = x.empty_like();
    let out = x.empty_like();
    let rows = (x.numel() as u64) / n as u64;
    if rows == 0 {
        return Ok((sum, out));
    }
    let blocks = u32::try_from(rows).map_err(|_| CoreError::Cuda(format!("{rows} rows")))?;
    let dt = dtype_code(x);
    let ptrs = [&sum, &out, x, y, w, b].map(|t| t.data_ptr());
    let vec = (n % 4 == 0 && ptrs.iter().all(|&p| vector_aligned(p, dt) == 1)) as c_int;
    let stream = crate::graph::current_stream(x.device())?;
    let ks = kernels()?;
    let k = ks.device(index)?;
    let [mut ps, mut po, mut px, mut py, mut pw, mut pb] = ptrs.map(|p| p as u64);
    let (mut nn, mut e, mut d) = (n as u32, eps as f32, dt as c_int);
    let mut v = vec;
    let mut args: Vec<*mut c_void> = vec![
        &mut ps as *mut _ as *mut c_void,
        &mut po as *mut _ as *mut c_void,
        &mut px as *mut _ as *mut c_void,
        &mut py as *mut _ as *mut c_void,
        &mut pw as *mut _ as *mut c_void,
        &mut pb as *mut _ as *mut c_void,
        &mut nn as *mut _ as *mut c_void,
        &mut e as *mut _ as *mut c_void,
        &mut d as *mut _ as *mut c_void,
        &mut v as *mut _ as *mut c_void,
    ];
    let drv = &ks.driver;
    let _guard = drv.enter(k.ctx)?;
    // SAFETY: `args` point at live locals of the kernel's parameter types, in order; the tensors
    // outlive the launch (the caller holds them until the stream has run it).
    let what = "cuLaunchKernel (add + layer norm)";
    unsafe { drv.launch(k.add_layer_norm, (blocks, threads as u32, 0), stream, &mut args, what)? };
    Ok((sum, out))
}

/// Whether the kernels may move four elements at a time: 16 bytes (f32) or 8 (f16/bf16) aligned.
fn vector_aligned(ptr: *mut c_void, dt: u32) -> u32 {
    let align = if dt == 0 { 16 } else { 8 };
    (ptr as usize).is_multiple_of(align).into()
}

fn dtype_code(p: &Tensor) -> u32 {
    match p.kind() {
        Kind::Float => 0,
        Kind::Half => 1,
        _ => 2,
    }
}

/// `p += scale * z(key)` for every tensor, all on CUDA device `index`, in one launch.
pub(crate) fn perturb_many(
    index: usize,
    ps: &[&Tensor],
    keys: &[StreamKey],
    scale: f32,
    dist: Distribution,
) -> Result<()> {
    launch_many(index, Sweep::Perturb, &perturb_descs(ps, keys, scale), &[], dist)
}

fn perturb_descs(ps: &[&Tensor], keys: &[StreamKey], scale: f32) -> Vec<Desc> {
    ps.iter().zip(keys).map(|(p, k)| Desc { a: k.a, b: k.b, scale, ..Desc::of(p) }).collect()
}

/// The update of every tensor (all on CUDA device `index`) in one launch; with `then`, each
/// tensor `j` then perturbed by `scale * z(keys[j])` in the same sweep.
pub(crate) fn sgd_update_many(
    index: usize,
    ps: &[&Tensor],
    us: &[&SgdUpdate],
    then: Option<(&[StreamKey], f32)>,
    dist: Distribution,
) -> Result<()> {
    let (descs, dirs) = update_descs(ps, us, then);
    launch_many(index, Sweep::Update, &descs, &dirs, dist)
}

/// The update of a contiguous f32 vector made of segments laid end to end (a flat LoRA or prefix
/// state on CUDA device `index`), one launch: each segment is described by its address in the
/// vector, so no tensor view is made per segment (libtorch's dispatcher costs about a
/// microsecond a view, and the update runs between two forwards with the GPU waiting).
pub(crate) fn sgd_update_segments(
    index: usize,
    flat: &Tensor,
    segs: &[crate::fused::Segment],
    grads: &[f32],
    lr: f32,
    weight_decay: Option<f32>,
    dist: Distribution,
) -> Result<()> {
    let (descs, dirs) = segment_descs(flat, segs, grads, lr, weight_decay);
    launch_many(index, Sweep::Update, &descs, &dirs, dist)
}

/// [`sgd_update_segments`]' descriptors: those that views of the segments would give.
fn segment_descs(
    flat: &Tensor,
    segs: &[crate::fused::Segment],
    grads: &[f32],
    lr: f32,
    weight_decay: Option<f32>,
) -> (Vec<Desc>, Vec<(StreamKey, f32)>) {
    let base = flat.data_ptr() as u64;
    let dt = dtype_code(flat);
    // Every segment shares the gradients and settings; only its keys are its own.
    let u = SgdUpdate { keys: Vec::new(), grads: grads.to_vec(), lr, weight_decay, restore: None };
    let mut dirs = Vec::with_capacity(segs.len() * grads.len());
    let descs = segs
        .iter()
        .map(|s| {
            let ptr = base + 4 * s.offset as u64;
            let of = Desc {
                ptr,
                n: s.len as u64,
                dt,
                vec: vector_aligned(ptr as *mut c_void, dt),
                ..Desc::default()
            };
            update_desc(of, &s.keys, &u, None, &mut dirs)
        })
        .collect();
    (descs, dirs)
}

/// One tensor's update descriptor (`of`: where it is, as [`Desc::of`] says) under the directions
/// `keys` with `u`'s gradients and settings, its directions appended to `dirs`; `then`: the
/// trailing perturbation's key and scale (flag `F_THEN`), one more direction entry after them.
fn update_desc(
    of: Desc,
    keys: &[StreamKey],
    u: &SgdUpdate,
    then: Option<(StreamKey, f32)>,
    dirs: &mut Vec<(StreamKey, f32)>,
) -> Desc {
    let inv_n = crate::fused::mean_factor(keys.len());
    let (ra, rb, rs) = u.restore.map_or((0, 0, 0.0), |(k, s)| (k.a, k.b, s));
    let flags = if inv_n.is_some() { F_INV } else { 0 }
        | if u.weight_decay.is_some() { F_WD } else { 0 }
        | if u.restore.is_some() { F_RESTORE } else { 0 }
        | if then.is_some() { F_THEN } else { 0 };
    let d = Desc {
        flags,
        m: keys.len() as u32,
        a: ra,
        b: rb,
        scale: rs,
        inv_n: inv_n.unwrap_or(1.0),
        wd: u.weight_decay.unwrap_or(0.0),
        lr: u.lr,
        kofs: dirs.len() as u32,
        ..of
    };
    dirs.extend(keys.iter().copied().zip(u.grads.iter().copied()));
    dirs.extend(then);
    d
}

/// The update's descriptors and its directions; a trailing perturbation (`then`: one key per
/// tensor, one scale) is one more direction entry after each tensor's own (flag `F_THEN`).
#[allow(clippy::type_complexity)]
fn update_descs(
    ps: &[&Tensor],
    us: &[&SgdUpdate],
    then: Option<(&[StreamKey], f32)>,
) -> (Vec<Desc>, Vec<(StreamKey, f32)>) {
    let mut dirs = Vec::new();
    let descs = ps
        .iter()
        .zip(us)
        .enumerate()
        .map(|(j, (p, u))| {
            update_desc(Desc::of(p), &u.keys, u, then.map(|(keys, s)| (keys[j], s)), &mut dirs)
        })
        .collect();
    (descs, dirs)
}

/// Bytes in use on `device` (all processes: total minus free, as the driver reports it). tch
/// exposes no allocator statistics; the benchmark takes the difference before and after its
/// work, which counts what libtorch's caching allocator reserved (at least its peak allocation).
pub fn memory_in_use(device: Device) -> Result<u64> {
    let index = cuda_index(device)?;
    let _ = Tensor::zeros([1], (Kind::Float, device)); // the context exists
    let ks = kernels()?;
    let k = ks.device(index)?;
    let d = &ks.driver;
    let _g = d.enter(k.ctx)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two out-pointers to usize, as the driver API documents.
    d.check(unsafe { (d.mem_get_info)(&mut free, &mut total) }, "cuMemGetInfo")?;
    Ok((total - free) as u64)
}

fn cuda_index(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(i) => Ok(i),
        d => Err(CoreError::InvalidArgument {
            what: "device",
            value: format!("{d:?}"),
            expected: "a CUDA device",
        }),
    }
}

/// For tests and diagnostics: whether the kernels load and compile on this device.
pub fn available(device: Device) -> Result<()> {
    let index = cuda_index(device)?;
    let _ = Tensor::zeros([1], (Kind::Float, device)); // make libtorch create the context
    kernels()?.device(index).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused residual add and layer norm against libtorch's two operators: the sums equal
    /// bit for bit, the norms within a rounding of the dtype; vector (n % 4 == 0) and scalar rows.
    /// `cargo test --release -p mezo-core add_layer_norm -- --ignored`.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn add_layer_norm_matches_libtorch() {
        assert!(tch::Cuda::is_available(), "this test needs a CUDA GPU");
        let dev = Device::Cuda(0);
        tch::manual_seed(5);
        // Relative to max(1, |value|): two roundings of the dtype.
        for (kind, tol) in [(Kind::Float, 1e-5), (Kind::Half, 2e-3), (Kind::BFloat16, 1.6e-2)] {
            for shape in [vec![4i64, 7, 768], vec![3, 30], vec![2, 5, 2048]] {
                let n = *shape.last().unwrap();
                let x = Tensor::randn(shape.as_slice(), (Kind::Float, dev)).to_kind(kind);
                let y = (Tensor::randn(shape.as_slice(), (Kind::Float, dev)) * 3.0 + 1.0).to_kind(kind);
                let w = (Tensor::randn([n], (Kind::Float, dev)) * 0.5 + 1.0).to_kind(kind);
                let b = (Tensor::randn([n], (Kind::Float, dev)) * 0.5).to_kind(kind);
                let (sum, norm) = add_layer_norm(&x, &y, &w, &b, 1e-5).unwrap();
                let want_sum = &x + &y;
                assert!(sum.equal(&want_sum), "{kind:?} {shape:?}: sums differ");
                let want = want_sum.layer_norm([n], Some(&w), Some(&b), 1e-5, false);
                let want = want.to_kind(Kind::Float);
                let diff = ((norm.to_kind(Kind::Float) - &want).abs() / want.abs().clamp_min(1.0))
                    .max()
                    .double_value(&[]);
                assert!(diff <= tol, "{kind:?} {shape:?}: norms differ by {diff}");
            }
        }
        // Refused: mixed dtypes, a weight of the wrong length.
        let x = Tensor::randn([2, 8], (Kind::Float, dev));
        let w = Tensor::ones([8], (Kind::Float, dev));
        assert!(add_layer_norm(&x, &x.to_kind(Kind::Half), &w, &w, 1e-5).is_err());
        assert!(add_layer_norm(&x, &x, &w.narrow(0, 0, 4), &w, 1e-5).is_err());
    }

    /// A flat state's update descriptors, made from segment addresses, are byte for byte those
    /// of tensor views of the segments (what the GPU-tested multi-tensor update launches): odd
    /// lengths and offsets (the scalar path), one and three directions, weight decay or not.
    #[test]
    fn segment_descriptors_equal_those_of_views() {
        let lens = [300usize, 1, 4097, 77];
        let flat = Tensor::zeros([lens.iter().sum::<usize>() as i64], (Kind::Float, Device::Cpu));
        for n in [1u64, 3] {
            for wd in [None, Some(0.01f32)] {
                let mut offset = 0;
                let segs: Vec<crate::fused::Segment> = lens
                    .iter()
                    .enumerate()
                    .map(|(j, &len)| {
                        let keys = (0..n).map(|s| StreamKey::new(s, &format!("s{j}"))).collect();
                        offset += len;
                        crate::fused::Segment { offset: offset - len, len, keys }
                    })
                    .collect();
                let grads: Vec<f32> = (0..n).map(|i| 0.5 - i as f32).collect();
                let (descs, dirs) = segment_descs(&flat, &segs, &grads, 1e-2, wd);
                let views: Vec<Tensor> =
                    segs.iter().map(|s| flat.narrow(0, s.offset as i64, s.len as i64)).collect();
                let us: Vec<SgdUpdate> = segs
                    .iter()
                    .map(|s| SgdUpdate {
                        keys: s.keys.clone(),
                        grads: grads.clone(),
                        lr: 1e-2,
                        weight_decay: wd,
                        restore: None,
                    })
                    .collect();
                let (vd, vdirs) =
                    update_descs(&views.iter().collect::<Vec<_>>(), &us.iter().collect::<Vec<_>>(), None);
                let bytes = |ds: &[Desc]| {
                    let mut out = Vec::new();
                    ds.iter().for_each(|d| d.write(&mut out));
                    out
                };
                assert_eq!(bytes(&descs), bytes(&vd), "{n} directions, {wd:?}");
                assert_eq!(dirs, vdirs);
            }
        }
    }

    /// The kernels compile with NVRTC, for the H100 (sm_90: NVRTC runs ptxas too, so register
    /// or shared-memory limits would fail here) and as PTX as at run time. Needs only libnvrtc
    /// (the venv's torch ships it), no GPU.
    #[test]
    fn kernels_compile_with_nvrtc() {
        let nv = nvrtc().expect("libnvrtc loads (from the venv's torch: nvidia/cu13/lib)");
        let (ptx, _) = nv.compile("compute_90", &[]).expect("PTX for compute_90");
        let ptx = String::from_utf8_lossy(&ptx);
        for f in ["mezo_perturb_many", "mezo_sgd_update_many", "mezo_flat_variants", "mezo_add_layer_norm"] {
            assert!(ptx.contains(&format!(".entry {f}")), "{f} missing from the PTX");
        }
        // --fmad=false must hold: no fused multiply-add anywhere in the arithmetic.
        assert!(!ptx.contains("fma."), "the PTX contains an FMA");
        let (cubin, log) = nv.compile("sm_90", &["--ptxas-options=-v"]).expect("CUBIN for sm_90");
        println!("ptxas (sm_90): {log}");
        assert!(cubin.len() > 1000, "a CUBIN of {} bytes", cubin.len());
        // For reading the SASS (`nvdisasm` or `cuobjdump -sass`, e.g. from the venv's Triton).
        if let Ok(path) = std::env::var("MEZO_WRITE_CUBIN") {
            std::fs::write(&path, &cubin).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        }
        // Every kernel (perturb, update, flat variants, add + layer norm) compiles without
        // spilling; the two sweeps fit the 64 registers a 1024-thread block allows.
        let spills: Vec<&str> = log.lines().filter(|l| l.contains("spill stores")).collect();
        assert_eq!(spills.len(), 4, "{log}");
        assert!(spills.iter().all(|l| l.contains(" 0 bytes spill stores, 0 bytes spill loads")), "{log}");
        // Before sm_80 the packed half conversions take the scalar path.
        nv.compile("compute_75", &[]).expect("PTX for compute_75");
    }

    /// What the host emulation needs of CUDA C++: qualifiers as nothing, thread and block indices
    /// per host thread, `__syncthreads` as a barrier of the block's threads, the exact f32
    /// intrinsics as plain C++ arithmetic (IEEE, round to nearest even, no contraction), and the
    /// three half conversions (those of `crate::fused`, ported).
    const EMU_PRELUDE: &str = r#"
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
#define MEZO_HOST_EMULATION 1
#define __device__
#define __global__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(a, b)
struct Dim { unsigned x, y, z; };
static thread_local Dim threadIdx, blockIdx;
static Dim blockDim, gridDim;
static thread_local std::barrier<>* block_barrier;
static void __syncthreads() { block_barrier->arrive_and_wait(); }
static float __fadd_rn(float a, float b) { return a + b; }
static float __fsub_rn(float a, float b) { return a - b; }
static float __fmul_rn(float a, float b) { return a * b; }
static float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// Byte n of the result is byte (s >> 4n) & 7 of the eight bytes y:x.
static unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; n++) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return r;
}
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
static float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static float cvt_h2f(unsigned short h) { return (float)(*(const _Float16*)&h); }
static unsigned short cvt_f2h(float v) { _Float16 h = (_Float16)v; unsigned short s; std::memcpy(&s, &h, 2); return s; }
static unsigned short cvt_f2bf(float v) {
  unsigned b = __float_as_uint(v);
  if (v != v) return (unsigned short)((b >> 16) | 0x40);
  return (unsigned short)((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}
static unsigned cvt2(float lo, float hi, int dt) {
  return dt == 1 ? (unsigned)cvt_f2h(lo) | ((unsigned)cvt_f2h(hi) << 16) : (unsigned)cvt_f2bf(lo) | ((unsigned)cvt_f2bf(hi) << 16);
}
// One block runs at a time, so one array serves as every block's shared memory.
float sT[32770 + 2 * 2049];
"#;

    const EMU_LAUNCH: &str = r#"
// Runs a kernel on grid x block host threads: block after block, each block's threads at once.
static void run(int grid, int block, const std::function<void()>& kernel) {
  gridDim = Dim{(unsigned)grid, 1, 1};
  blockDim = Dim{(unsigned)block, 1, 1};
  for (int b = 0; b < grid; b++) {
    std::barrier<> bar(block);
    std::vector<std::thread> ts;
    for (int t = 0; t < block; t++)
      ts.emplace_back([&, b, t] { blockIdx = Dim{(unsigned)b, 0, 0}; threadIdx = Dim{(unsigned)t, 0, 0}; block_barrier = &bar; kernel(); });
    for (auto& t : ts) t.join();
  }
}
extern "C" void emu_perturb(int grid, int block, const Desc* D, const u64* S, int nt, u64 U, const float* T, int dist) {
  run(grid, block, [&] { mezo_perturb_many(D, S, nt, U, T, dist); });
}
extern "C" void emu_update(int grid, int block, const Desc* D, const u64* S, const Dir* K, int nt, u64 U, const float* T, int dist) {
  run(grid, block, [&] { mezo_sgd_update_many(D, S, K, nt, U, T, dist); });
}
"#;

    type EmuPerturb = unsafe extern "C" fn(c_int, c_int, *const u8, *const u8, c_int, u64, *const f32, c_int);
    type EmuUpdate =
        unsafe extern "C" fn(c_int, c_int, *const u8, *const u8, *const u8, c_int, u64, *const f32, c_int);

    /// [`SOURCE`] built as host C++ with the emulation around it (the C++ compiler that builds
    /// tch's own C++ is there wherever mezo builds).
    fn emulator() -> libloading::Library {
        let dir = std::env::temp_dir().join(format!("mezo-kernel-emu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("emu.cpp");
        let lib = dir.join("libemu.so");
        std::fs::write(&src, format!("{EMU_PRELUDE}{SOURCE}{EMU_LAUNCH}")).unwrap();
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = std::process::Command::new(&cxx)
            .args(["-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-Wno-unknown-pragmas"])
            .args(["-fPIC", "-shared", "-pthread", "-o"])
            .arg(&lib)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("running the C++ compiler `{cxx}`: {e}"));
        assert!(
            out.status.success(),
            "the kernel source does not build as host C++:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // SAFETY: the library just built from this file's source.
        let l = unsafe { libloading::Library::new(&lib) }.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        l
    }

    /// Runs the launches [`launch_many`] would make, on the host emulation with `grid` blocks of
    /// `block` threads, against CPU tensors (the descriptors hold their host addresses).
    fn emulate(
        emu: &libloading::Library,
        grid: i32,
        block: i32,
        sweep: Sweep,
        descs: &[Desc],
        dirs: &[(StreamKey, f32)],
        dist: Distribution,
    ) {
        let table = &host_gauss_table().t;
        let di = matches!(dist, Distribution::Rademacher) as c_int;
        for p in plan(descs, dirs) {
            let b = p.buf.as_ptr();
            // SAFETY: the emulated kernels' signatures; the buffer and the tensors outlive the call.
            unsafe {
                match sweep {
                    Sweep::Perturb => {
                        let f: libloading::Symbol<EmuPerturb> = emu.get(b"emu_perturb").unwrap();
                        f(grid, block, b, b.add(p.starts_at), p.tensors as c_int, p.units, table.as_ptr(), di)
                    }
                    Sweep::Update => {
                        let f: libloading::Symbol<EmuUpdate> = emu.get(b"emu_update").unwrap();
                        f(
                            grid,
                            block,
                            b,
                            b.add(p.starts_at),
                            b.add(p.dirs_at),
                            p.tensors as c_int,
                            p.units,
                            table.as_ptr(),
                            di,
                        )
                    }
                }
            }
        }
    }

    /// The kernels' own source, run on the host (C++ with emulated threads and blocks), gives the
    /// CPU implementation's bits for multi-tensor perturbs and updates: every dtype, lengths from
    /// 0 up, unaligned views, restore or not, a trailing perturbation or not, with grids far
    /// smaller than the work (so threads stride across many tensors) and larger than it, and
    /// lists longer than one launch takes.
    /// What it cannot check is the GPU's own arithmetic; the `--ignored` CUDA tests do.
    #[test]
    fn kernel_source_emulated_on_host_equals_cpu() {
        use crate::fused::{perturb_many_, sgd_update_many_, sgd_update_then_perturb_many_, SgdUpdate};
        let emu = emulator();
        let kinds = [Kind::Float, Kind::Half, Kind::BFloat16];
        let make =
            |n: i64, j: usize| (Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.05).to_kind(kinds[j % 3]);
        let lens = [0i64, 1, 3, 4, 5, 8, 2048, 4097, 70_001];
        let mut lists: Vec<Vec<Tensor>> = vec![lens.iter().enumerate().map(|(j, &n)| make(n, j)).collect()];
        let backing = make(50_000, 1);
        lists[0].extend([
            backing.narrow(0, 1, 20_001),
            backing.narrow(0, 20_003, 29_990),
            make(1234, 0).narrow(0, 3, 999),
        ]);
        // Longer than one launch takes: 2100 tiny tensors.
        lists.push((0..MAX_TENSORS_PER_LAUNCH + 52).map(|j| make([1, 6, 9][j % 3], j)).collect());
        for (li, list) in lists.iter().enumerate() {
            for (grid, block) in [(1, 1), (3, 32), (2, 100), (40, 64)] {
                if li == 1 && (grid, block) != (2, 100) {
                    continue; // one grid is enough for the split; each emulated thread costs time
                }
                for dist in [Distribution::Gaussian, Distribution::Rademacher] {
                    let ps: Vec<&Tensor> = list.iter().collect();
                    let cpu_t: Vec<Tensor> = list.iter().map(|t| t.copy()).collect();
                    let cpu: Vec<&Tensor> = cpu_t.iter().collect();
                    let keys: Vec<StreamKey> =
                        (0..ps.len()).map(|j| StreamKey::new(41, &format!("p{j}"))).collect();
                    emulate(&emu, grid, block, Sweep::Perturb, &perturb_descs(&ps, &keys, 1e-3), &[], dist);
                    perturb_many_(&cpu, &keys, 1e-3, dist).unwrap();
                    let what = format!("list {li}, grid {grid}x{block}, {dist}");
                    for (j, (e, c)) in ps.iter().zip(&cpu).enumerate() {
                        assert!(
                            e.equal(c),
                            "{what}: perturb of tensor {j} ({:?} {:?}) differs",
                            e.kind(),
                            e.size()
                        );
                    }
                    // Restore or not, then (the next step's first perturbation fused behind the
                    // update) or not.
                    // The restore's key: none, another stream's, or the last direction's (whose z
                    // the kernel reuses instead of drawing it again).
                    for (restore, then) in [
                        (None, false),
                        (Some(false), false),
                        (Some(false), true),
                        (None, true),
                        (Some(true), true),
                        (Some(true), false),
                    ] {
                        let us: Vec<SgdUpdate> = (0..ps.len())
                            .map(|j| SgdUpdate {
                                keys: (0..1 + j as u64 % 3)
                                    .map(|s| StreamKey::new(s, &format!("p{j}")))
                                    .collect(),
                                grads: (0..1 + j % 3).map(|s| 1.25 - s as f32).collect(),
                                lr: 1e-2,
                                weight_decay: (j % 2 == 1).then_some(0.1),
                                restore: restore.map(|last| {
                                    let seed = if last { j as u64 % 3 } else { 41 };
                                    (StreamKey::new(seed, &format!("p{j}")), -1e-3)
                                }),
                            })
                            .collect();
                        let refs: Vec<&SgdUpdate> = us.iter().collect();
                        let next: Vec<StreamKey> =
                            (0..ps.len()).map(|j| StreamKey::new(42, &format!("p{j}"))).collect();
                        let (descs, dirs) = update_descs(&ps, &refs, then.then_some((&next[..], 1e-3)));
                        emulate(&emu, grid, block, Sweep::Update, &descs, &dirs, dist);
                        if then {
                            sgd_update_then_perturb_many_(&cpu, &us, &next, 1e-3, dist).unwrap();
                        } else {
                            sgd_update_many_(&cpu, &us, dist).unwrap();
                        }
                        for (j, (e, c)) in ps.iter().zip(&cpu).enumerate() {
                            assert!(
                                e.equal(c),
                                "{what}, restore {restore:?}, then {then}: update of tensor {j} ({:?} {:?}) differs",
                                e.kind(),
                                e.size()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn descriptors_have_the_kernels_layout() {
        let mut buf = Vec::new();
        let d = Desc {
            ptr: 1,
            n: 2,
            dt: 3,
            vec: 4,
            flags: 5,
            m: 6,
            a: 7,
            b: 8,
            kofs: 9,
            lr: 0.5,
            ..Desc::default()
        };
        d.write(&mut buf);
        assert_eq!(buf.len(), DESC_BYTES);
        assert_eq!(&buf[16..20], &3u32.to_le_bytes());
        assert_eq!(&buf[52..56], &0.5f32.to_le_bytes());
        assert_eq!(&buf[56..60], &9u32.to_le_bytes());
    }
}
