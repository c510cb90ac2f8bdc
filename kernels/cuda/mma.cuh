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
};

template <>
struct Prec<Precision::kFp32> {
  using T = float;
  using W = float4;  // {hi0, hi1, lo0, lo1} for (n8 tile, k16 step, k8 half)
};

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// The two bf16 of PackBf16's word, widened (exact).
__device__ __forceinline__ float2 UnpackBf16(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}

__device__ __forceinline__ void MmaBf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c = a * b (no accumulator input: the zero comes from the register file's zero register).
__device__ __forceinline__ void MmaBf16Zero(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%10,%10,%10};\n"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.0f));
}

__device__ __forceinline__ void MmaTf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x = hi + lo for 3xTF32. The tensor cores read a tf32 operand's top 19 bits and ignore the low
// 13, so x itself is its hi part (x truncated to tf32), and lo = x - trunc(x) is exact in fp32
// and truncated in turn (by less than 2^-20 |x|). cvt.rna.tf32.f32 would round both, but sm_90
// has no instruction for it: each conversion was four (test, add, select, mask), and with the
// register moves that gathered the parts into fragments the splits were more than half of the
// fp32 row kernel's instructions.
__device__ __forceinline__ uint32_t Tf32Low(uint32_t x) {
  return __float_as_uint(__uint_as_float(x) - __uint_as_float(x & 0xffffe000u));
}
__device__ __forceinline__ void SplitTf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = __float_as_uint(x);
  lo = Tf32Low(hi);
}

// x = hi + lo as two bf16 (about 16 bits of x), for products split into three bf16 MMAs
// (a_lo b_hi + a_hi b_lo + a_hi b_hi: the adaLN kernels).
__device__ __forceinline__ void SplitBf16(float x, __nv_bfloat16& hi, __nv_bfloat16& lo) {
  hi = __float2bfloat16_rn(x);
  lo = __float2bfloat16_rn(x - __bfloat162float(hi));
}

// silu(x) = x / (1 + e^-x) with the MUFU's exp2 and reciprocal: relative error ~1e-6, below the
// ~16 bits that SplitBf16 keeps. With expf and an IEEE division the adaLN's SiLU was, by an
// estimate from the source, about half of the mma.sync kernel's instructions (Nsight at
// B = 256: 34 us, a third of the stalls on fixed-latency chains). Very negative finite x gives -0.
__device__ __forceinline__ float SiluFast(float x) { return __fdividef(x, 1.0f + __expf(-x)); }

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

// wgmma exists only in the sm_90a target; the portable PTX (compute_90) gets a trap, and the
// host enables the wgmma kernel only on compute capability 9.0 (which runs the sm_90a code).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MMDIT_HAVE_WGMMA 1
#endif

// wgmma m64nNk16 (N = 64 or 128), A (this warp's 16 x 16 slice) from registers, B from shared
// memory through `desc`, fp32 accumulators d[N / 2] in the m16n8 accumulator layout tiled over
// N / 8 n8 tiles: d[4j + e] is row 16 * warp + g (+8 for e >= 2), column 8j + 2t + (e & 1).
// `accumulate` = 0 overwrites d (the first k-step of a GEMM), 1 adds to it.
__device__ __forceinline__ void WgmmaM64N64K16(float (&d)[32], const uint32_t (&a)[4],
                                               uint64_t desc, int accumulate) {
#ifdef MMDIT_HAVE_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate)
      : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void WgmmaM64N128K16(float (&d)[64], const uint32_t (&a)[4],
                                                uint64_t desc, int accumulate) {
#ifdef MMDIT_HAVE_WGMMA
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "
      "%56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate)
      : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void WgmmaFence() {
#ifdef MMDIT_HAVE_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#ifdef MMDIT_HAVE_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaWaitAll() {
#ifdef MMDIT_HAVE_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accesses to registers that an asynchronous wgmma reads (A) or
// writes (accumulators) across its issue and its wait, or from reusing them in between.
template <int kN>
__device__ __forceinline__ void FenceRegs(float (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int kN>
__device__ __forceinline__ void FenceRegs(uint32_t (&r)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e])::"memory");
}

// A shared-memory matrix descriptor without swizzle: 8 x 16-byte core matrices, `lbo` bytes
// between core matrices along K, `sbo` bytes between 8-row groups along M/N.
__device__ __forceinline__ uint64_t SmemDesc(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3ffff) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3ffff) >> 4) << 32);
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (nothing is read then).
__device__ __forceinline__ void CpAsync16OrZero(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
// 8 bytes global -> shared, or 8 zero bytes when !valid.
__device__ __forceinline__ void CpAsync8OrZero(void* smem, const void* gmem, bool valid) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(addr), "l"(gmem),
               "r"(valid ? 8 : 0)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// mbarriers and bulk copies (the wgmma kernels' weight rings).
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void MbarrierInit(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddr(bar)), "r"(count)
               : "memory");
}

// Makes the initialised mbarriers visible to the bulk copy engine.
__device__ __forceinline__ void FenceMbarrierInit() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Waits until phase `parity` of `bar` is complete. kCluster: with acquire at cluster scope, for
// phases that other CTAs' stores complete (st.async); otherwise at CTA scope (bulk copies, this
// CTA's arrivals).
#define MMDIT_MBARRIER_TRY_WAIT(sem)                                               \
  "{\n.reg .pred p;\nmbarrier.try_wait.parity" sem ".shared::cta.b64 p, [%1], %2;\n" \
  "selp.u32 %0, 1, 0, p;\n}\n"
template <bool kCluster = false>
__device__ __forceinline__ void MbarrierWait(uint64_t* bar, unsigned parity) {
  uint32_t done = 0;
  while (!done) {
    if constexpr (kCluster) {
      asm volatile(MMDIT_MBARRIER_TRY_WAIT(".acquire.cluster")
                   : "=r"(done)
                   : "r"(SmemAddr(bar)), "r"(parity)
                   : "memory");
    } else {
      asm volatile(MMDIT_MBARRIER_TRY_WAIT("")
                   : "=r"(done)
                   : "r"(SmemAddr(bar)), "r"(parity)
                   : "memory");
    }
  }
}
#undef MMDIT_MBARRIER_TRY_WAIT

// An arrival on `bar` that also expects `bytes` more of asynchronous writes in its phase.
__device__ __forceinline__ void MbarrierArriveExpectTx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}

// One bulk copy global -> shared that completes the current phase of `bar`.
__device__ __forceinline__ void BulkLoad(void* dst, const void* src, unsigned bytes,
                                         uint64_t* bar) {
  MbarrierArriveExpectTx(bar, bytes);
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(SmemAddr(dst)),
      "l"(src), "r"(bytes), "r"(SmemAddr(bar))
      : "memory");
}

__device__ __forceinline__ void MbarrierArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SmemAddr(bar)) : "memory");
}

// A warp's release of a shared-memory stage that bulk copies refill: lane 0 calls it after a
// __syncwarp, once the warp's reads of the stage are complete, with the count that the stage's
// last release of this use reaches (uses so far x warps). True for the last warp to release,
// which may then issue the refill: the acq_rel count orders every warp's reads before it, the
// proxy fence before the copy's asynchronous writes.
__device__ __forceinline__ bool LastToReleaseStage(unsigned* released, unsigned target) {
  unsigned before;
  asm volatile("atom.acq_rel.cta.shared::cta.add.u32 %0, [%1], 1;\n"
               : "=r"(before)
               : "r"(SmemAddr(released))
               : "memory");
  if (before + 1 != target) return false;
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  return true;
}

// Programmatic dependent launch: kernels are launched so that they may start while the previous
// kernel of the stream finishes. Each kernel lets its successor launch at once, does its
// prologue on read-only data (tiles, sample table, weights), then waits for its predecessor to
// complete before it touches any activation buffer (read or write).
__device__ __forceinline__ void LaunchDependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}
__device__ __forceinline__ void WaitForPredecessor() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}

// Per-sample progress counters between kernels that overlap (RowParams::sample_sync): the
// producer's threads order their stores before one thread's release-add (a barrier between), and
// the consumer's loads come after an acquire (one thread's and then a barrier, or each thread's
// own).
__device__ __forceinline__ void AddRelease(unsigned* counter, unsigned n = 1) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;\n" ::"l"(counter), "r"(n) : "memory");
}
__device__ __forceinline__ void WaitUntilAtLeast(const unsigned* counter, unsigned target) {
  while (true) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(counter) : "memory");
    if (v >= target) return;
    __nanosleep(64);  // spares the L2 while the producer is far behind
  }
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
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
