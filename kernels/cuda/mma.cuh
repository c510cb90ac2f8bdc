// Warp-level matrix helpers shared by the kernels: the two operand precisions behind one
// interface. kBf16: mma.sync m16n8k16 on bf16 operands. kFp32: 3xTF32 (a = hi + lo, the product
// as lo*hi + hi*lo + hi*hi on m16n8k8 tf32 with fp32 accumulation), which keeps about 21 bits of
// the operands, enough for 1e-5 over 12 layers, at a third of the tf32 rate.
//
// Both share the accumulator layout of m16n8: lane (g = lane / 4, t = lane % 4) holds rows g and
// g + 8, columns 2t and 2t + 1. For tf32, the k index of the fragment is permuted (logical k = t
// is physical 2t, logical t + 4 is physical 2t + 1): a sum over k does not care, every operand is
// read as a float2, and a score accumulator feeds the P·V product without shuffles.
#pragma once

#include <cuda_bf16.h>
#include <cstdint>

#include "kernels/cuda/forward_kernels.h"

namespace mmdit {
namespace cuda {

template <Precision P>
struct Prec;

template <>
struct Prec<Precision::kBf16> {
  using T = __nv_bfloat16;  // activations stored between steps and in shared memory
  using W = uint2;          // one lane's B fragment for (n8 tile, k16 step)
  static constexpr int kWPerK16 = 1;
};

template <>
struct Prec<Precision::kFp32> {
  using T = float;
  using W = float4;         // {hi0, hi1, lo0, lo1} for (n8 tile, k16 step, k8 half)
  static constexpr int kWPerK16 = 2;
};

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void MmaBf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void MmaTf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ToTf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// x = hi + lo, each representable in tf32.
__device__ __forceinline__ void SplitTf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = ToTf32(x);
  lo = ToTf32(x - __uint_as_float(hi));
}

// c += a * b with a, b given as fp32 values, 3xTF32.
__device__ __forceinline__ void Mma3xTf32(float (&c)[4], const uint32_t (&ahi)[4],
                                          const uint32_t (&alo)[4], uint32_t bhi0, uint32_t bhi1,
                                          uint32_t blo0, uint32_t blo1) {
  MmaTf32(c, alo, bhi0, bhi1);
  MmaTf32(c, ahi, blo0, blo1);
  MmaTf32(c, ahi, bhi0, bhi1);
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Stores two adjacent values (columns c, c + 1).
__device__ __forceinline__ void Store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
__device__ __forceinline__ void Store2(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<uint32_t*>(p) = PackBf16(a, b);
}

}  // namespace cuda
}  // namespace mmdit
