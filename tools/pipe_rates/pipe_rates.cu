// mmdit-pipe-rates: the throughput of the instructions the kernels are made of, on every SM of
// the GPU at once, to tell which pipe bounds a kernel (docs/BENCHMARKS.md, "Pipe rates").
// - The attention's key-block loop: mma.sync m16n8k16 bf16, ex2, the bf16x2 pack, alone and
//   mixed in the loop's proportions (20 : 32 : 16 per 64-key block), and ex2.f16x2. Each thread
//   runs independent chains, so the pipe's rate is measured, not its latency. Figures are warp
//   instructions per clock per SM, from clock64 around each CTA's loop.
// - The wgmma row kernel's GEMM steps: groups of eight k16 steps of m64n128 or m64n64 (A from
//   registers, B from shared memory laid out as the kernel's weight images), one warpgroup alone
//   or three per SM, waited for one at a time or two in flight.
// - Kernel boundaries: the time per kernel of a chain of small kernels replayed as a CUDA graph,
//   each waiting for the one before (one word stored by one and read by the next), launched
//   with and without programmatic dependent launch: the floor under a forward of 25 kernels at
//   small batches, where each kernel's own work is a few microseconds.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "kernels/cuda/mma.cuh"

namespace {

using mmdit::cuda::FenceRegs;
using mmdit::cuda::LaunchDependents;
using mmdit::cuda::WaitForPredecessor;
using mmdit::cuda::SmemDesc;
using mmdit::cuda::WgmmaCommit;
using mmdit::cuda::WgmmaFence;
using mmdit::cuda::WgmmaM64N128K16;
using mmdit::cuda::WgmmaM64N64K16;

constexpr int kThreads = 256;
constexpr int kIters = 4096;

#define CHECK(call)                                                   \
  do {                                                                \
    cudaError_t e = (call);                                           \
    if (e != cudaSuccess) {                                           \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e)); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%4,%5}, "
      "{%6,%6}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
}
__device__ __forceinline__ float Ex2Neg(float x) {
  float y;
  asm volatile("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(-x));
  return y;
}
__device__ __forceinline__ uint32_t Pack(float a, float b) {
  uint32_t u;
  asm volatile("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(u) : "f"(b), "f"(a));
  return u;
}
__device__ __forceinline__ uint32_t Ex2H2(uint32_t x) {
  uint32_t y;
  asm volatile("ex2.approx.f16x2 %0, %1;\n" : "=r"(y) : "r"(x ^ 0x80008000u));
  return y;
}

// What one iteration holds, per warp: kMma mma.sync, kEx2 ex2.f32, kPack packs, kEx2H2 ex2.f16x2.
template <int kMma, int kEx2, int kPack, int kEx2H2>
__global__ void __launch_bounds__(kThreads, 4) Pipes(float* sink, long long* cycles) {
  float c[kMma > 0 ? kMma : 1][4] = {};
  float x[kEx2 > 0 ? kEx2 : 1];
  uint32_t u[kPack > 0 ? kPack : 1], h[kEx2H2 > 0 ? kEx2H2 : 1];
  const float seed = 0.25f + 1e-3f * threadIdx.x;
  for (int i = 0; i < (kEx2 > 0 ? kEx2 : 1); ++i) x[i] = seed + 0.01f * i;
  for (int i = 0; i < (kPack > 0 ? kPack : 1); ++i) u[i] = __float_as_uint(seed + i);
  for (int i = 0; i < (kEx2H2 > 0 ? kEx2H2 : 1); ++i) h[i] = 0x38003800u + threadIdx.x + i;
  const uint32_t a0 = 0x3f803f80u ^ threadIdx.x, a1 = 0x3f003f00u, b0 = 0x3e803e80u;
  __syncthreads();
  const long long start = clock64();
#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int i = 0; i < kMma; ++i) Mma(c[i], a0, a1, b0);
#pragma unroll
    for (int i = 0; i < kEx2; ++i) x[i] = Ex2Neg(x[i]);
    if constexpr (kPack > 0) {
#pragma unroll
      for (int i = 0; i < kPack; ++i) {
        u[i] = Pack(__uint_as_float(u[i]), __uint_as_float(u[(i + 1) % kPack]));
      }
    }
#pragma unroll
    for (int i = 0; i < kEx2H2; ++i) h[i] = Ex2H2(h[i]);
  }
  __syncthreads();
  const long long stop = clock64();
  float s = 0.0f;
  for (int i = 0; i < kMma; ++i) s += c[i][0] + c[i][1] + c[i][2] + c[i][3];
  for (int i = 0; i < kEx2; ++i) s += x[i];
  for (int i = 0; i < kPack; ++i) s += __uint_as_float(u[i] & 0x3fff3fffu);
  for (int i = 0; i < kEx2H2; ++i) s += __uint_as_float(h[i] & 0x3fff3fffu);
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = stop - start;
}

// The wgmma row kernel's GEMM pattern: each warpgroup issues kSteps k16 steps of m64nN (A from
// registers, B from shared memory without swizzle, as the row kernel lays its weights out) into
// one accumulator, commits, and waits for all (kPipelined = false) or for all but the group just
// issued, alternating two accumulators (kPipelined = true). The B contents do not matter.
constexpr int kWgIters = 512;
template <int kN, int kWarpgroups, bool kPipelined>
__global__ void __launch_bounds__(128 * kWarpgroups, 1) Wgmma(float* sink, long long* cycles) {
#ifndef MMDIT_HAVE_WGMMA
  __trap();  // sm_90a only; main() runs this part on compute capability 9.0 alone
#else
  extern __shared__ __align__(1024) unsigned char smem[];
  constexpr int kSteps = 8, kStepBytes = kN * 16 * 2;
  for (int i = threadIdx.x; i < kSteps * kStepBytes / 4; i += blockDim.x) {
    reinterpret_cast<uint32_t*>(smem)[i] = 0x3c003c00u;
  }
  float d0[kN / 2] = {}, d1[kN / 2] = {};
  uint32_t a[kSteps][4];
  for (int k = 0; k < kSteps; ++k)
    for (int e = 0; e < 4; ++e) a[k][e] = 0x3c003c00u ^ (threadIdx.x & 7);
  __syncthreads();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  auto issue = [&](float (&d)[kN / 2]) {
    WgmmaFence();
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      const uint64_t desc = SmemDesc(smem + k * kStepBytes, 128, 256);
      if constexpr (kN == 128) {
        WgmmaM64N128K16(d, a[k], desc, 1);
      } else {
        WgmmaM64N64K16(d, a[k], desc, 1);
      }
    }
    WgmmaCommit();
  };
  const long long start = clock64();
#pragma unroll 1
  for (int it = 0; it < kWgIters; ++it) {
    if constexpr (kPipelined) {
      // Two groups per iteration: each wait leaves the group just issued in flight.
      issue(d0);
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      FenceRegs(d1);
      issue(d1);
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      FenceRegs(d0);
      ++it;
    } else {
      issue(d0);
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      FenceRegs(d0);
    }
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  FenceRegs(d0);
  FenceRegs(d1);
  __syncthreads();
  const long long stop = clock64();
  float s = 0.0f;
  for (int i = 0; i < kN / 2; ++i) s += d0[i] + d1[i];
  sink[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = stop - start;
#endif
}

// Runs `kernel` twice (the first run warms up) on `blocks` CTAs of `threads`, and returns the
// slowest CTA's cycles from the second run.
template <typename Kernel>
long long SlowestCtaCycles(Kernel kernel, int blocks, int threads, int smem) {
  float* sink;
  long long* cycles;
  CHECK(cudaMalloc(&sink, sizeof(float) * blocks * threads));
  CHECK(cudaMalloc(&cycles, sizeof(long long) * blocks));
  if (smem > 0) {
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  for (int run = 0; run < 2; ++run) kernel<<<blocks, threads, smem>>>(sink, cycles);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<long long> host(blocks);
  CHECK(cudaMemcpy(host.data(), cycles, sizeof(long long) * blocks, cudaMemcpyDeviceToHost));
  long long worst = 0;
  for (long long v : host) worst = v > worst ? v : worst;
  CHECK(cudaFree(sink));
  CHECK(cudaFree(cycles));
  return worst;
}

template <int kN, int kWarpgroups, bool kPipelined>
void RunWgmma(const char* name, int sms) {
  const long long worst = SlowestCtaCycles(Wgmma<kN, kWarpgroups, kPipelined>, sms,
                                           128 * kWarpgroups, 8 * kN * 16 * 2);
  const double flop = 2.0 * 64 * kN * 16 * 8 * kWgIters * kWarpgroups;
  std::printf("%-44s %10.1f %10.0f\n", name, double(worst) / (kWgIters * kWarpgroups),
              flop / worst);
}

template <int kMma, int kEx2, int kPack, int kEx2H2>
void Run(const char* name, int sms, int blocks_per_sm) {
  const long long worst =
      SlowestCtaCycles(Pipes<kMma, kEx2, kPack, kEx2H2>, sms * blocks_per_sm, kThreads, 0);
  // Every CTA of an SM runs at once (the grid is exactly blocks_per_sm per SM), so the SM
  // executed blocks_per_sm * warps * kIters iterations in about `worst` cycles.
  const double warp_iters = double(blocks_per_sm) * (kThreads / 32) * kIters;
  const double per_iter = worst / warp_iters;
  auto rate = [&](int n) { return n > 0 ? n / per_iter : 0.0; };
  std::printf("%-34s %10.2f %10.3f %10.3f %10.3f %10.3f\n", name, per_iter, rate(kMma),
              rate(kEx2), rate(kPack), rate(kEx2H2));
}

// One link of the chain: waits for the kernel before (with programmatic dependent launch, for
// its completion; without, the launch itself comes after it), optionally stores 16 bytes per
// thread (a completion then has stores to make visible), and passes the count on.
struct ChainParams {
  unsigned* words;  // words[step] = words[step - 1] + 1
  float4* sink;     // stores: one float4 per thread, or null
  int step;
};
__global__ void ChainStep(ChainParams p) {
  LaunchDependents();
  WaitForPredecessor();
  if (p.sink != nullptr) {
    p.sink[blockIdx.x * blockDim.x + threadIdx.x] = make_float4(p.step, 0.0f, 0.0f, 0.0f);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) p.words[p.step] = p.words[p.step - 1] + 1;
}

// Median microseconds per kernel over `replays` replays of a graph of kChain links of `ctas`
// CTAs; checks that every link saw the one before.
double ChainMicrosPerKernel(int ctas, bool pdl, bool stores) {
  constexpr int kChain = 25, kReplays = 200;
  unsigned* words;
  float4* sink;
  CHECK(cudaMalloc(&words, sizeof(unsigned) * (kChain + 1)));
  CHECK(cudaMalloc(&sink, sizeof(float4) * ctas * kThreads));
  CHECK(cudaMemset(words, 0, sizeof(unsigned) * (kChain + 1)));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int step = 1; step <= kChain; ++step) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(ctas);
    config.blockDim = dim3(kThreads);
    config.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    config.attrs = &attr;
    config.numAttrs = pdl ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&config, ChainStep, ChainParams{words, stores ? sink : nullptr, step}));
  }
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < 20; ++i) CHECK(cudaGraphLaunch(exec, stream));
  std::vector<float> ms;
  for (int i = 0; i < kReplays; ++i) {
    CHECK(cudaEventRecord(start, stream));
    CHECK(cudaGraphLaunch(exec, stream));
    CHECK(cudaEventRecord(stop, stream));
    CHECK(cudaEventSynchronize(stop));
    float t = 0;
    CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  unsigned last = 0;
  CHECK(cudaMemcpy(&last, words + kChain, sizeof(unsigned), cudaMemcpyDeviceToHost));
  if (last != kChain) {
    std::fprintf(stderr, "kernel chain: the last link counted %u, not %d\n", last, kChain);
    std::exit(1);
  }
  CHECK(cudaEventDestroy(start));
  CHECK(cudaEventDestroy(stop));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(stream));
  CHECK(cudaFree(words));
  CHECK(cudaFree(sink));
  std::sort(ms.begin(), ms.end());
  return 1e3 * ms[ms.size() / 2] / kChain;
}

}  // namespace

int main() {
  int dev = 0, sms = 0;
  CHECK(cudaSetDevice(dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("%s, %d SMs; 4 CTAs of %d threads per SM, %d iterations per warp\n", prop.name,
              sms, kThreads, kIters);
  std::printf("%-34s %10s %10s %10s %10s %10s\n", "per warp iteration",
              "clk/iter", "mma/clk", "ex2/clk", "pack/clk", "ex2h2/clk");
  std::printf("(rates: warp instructions per clock per SM)\n");
  Run<8, 0, 0, 0>("mma x8", sms, 4);
  Run<0, 8, 0, 0>("ex2 x8", sms, 4);
  Run<0, 0, 8, 0>("pack x8", sms, 4);
  Run<0, 0, 0, 8>("ex2.f16x2 x8", sms, 4);
  Run<0, 8, 4, 0>("ex2 x8 + pack x4", sms, 4);
  Run<5, 8, 0, 0>("mma x5 + ex2 x8", sms, 4);
  Run<5, 8, 4, 0>("mma x5 + ex2 x8 + pack x4 (loop)", sms, 4);
  Run<5, 0, 4, 4>("mma x5 + pack x4 + ex2.f16x2 x4", sms, 4);
  std::printf("\nkernel boundaries: a graph of 25 kernels of %d threads per CTA, each waiting for "
              "the one before; median of 200 replays\n", kThreads);
  std::printf("%-52s %10s\n", "chain", "us/kernel");
  for (int ctas : {64, 132, 264}) {
    for (bool stores : {false, true}) {
      for (bool pdl : {false, true}) {
        char name[96];
        std::snprintf(name, sizeof(name), "%d CTAs, %s, %s", ctas,
                      stores ? "16 B stored per thread" : "no stores",
                      pdl ? "programmatic launch" : "plain launch");
        std::printf("%-52s %10.2f\n", name, ChainMicrosPerKernel(ctas, pdl, stores));
      }
    }
  }
  if (prop.major != 9 || prop.minor != 0) return 0;  // wgmma: the sm_90a build only
  std::printf("\nwgmma, 8 k16 steps per group, one CTA per SM\n");
  std::printf("%-44s %10s %10s\n", "pattern", "clk/group", "FLOP/clk");
  RunWgmma<128, 1, false>("m64n128, 1 warpgroup, wait 0", sms);
  RunWgmma<128, 3, false>("m64n128, 3 warpgroups, wait 0", sms);
  RunWgmma<128, 2, false>("m64n128, 2 warpgroups, wait 0", sms);
  RunWgmma<128, 2, true>("m64n128, 2 warpgroups, two groups in flight", sms);
  RunWgmma<64, 1, false>("m64n64, 1 warpgroup, wait 0", sms);
  RunWgmma<64, 3, false>("m64n64, 3 warpgroups, wait 0", sms);
  RunWgmma<64, 3, true>("m64n64, 3 warpgroups, two groups in flight", sms);
  return 0;
}
