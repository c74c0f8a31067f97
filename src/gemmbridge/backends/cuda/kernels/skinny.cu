// gemmbridge's skinny GEMM: D = alpha * A @ B + beta * C + bias, D row-major M x N, on tensor cores.
//
// Compiled at run time by NVRTC (kernels/compiler.py) with these macros from kernels/config.py:
//   HALF_BF16   1: bf16 inputs, 0: fp16 inputs              OUT_F32   1: D, C and bias are float32
//   A_KCONTIG   1: A(m, k) at a[m * lda + k], 0: at a[k * lda + m]
//   B_KCONTIG   1: B(k, n) at b[n * ldb + k], 0: at b[k * ldb + n]
//   BM BN BK    block tile             WM WN   warps along M and N      STAGES   cp.async pipeline depth
//   SPLITS      blocks of one cluster splitting K; the cluster sums their tiles in distributed shared memory
//   MASK        dropout (philox.cuh; the seed read from device memory at p.seed, p.threshold = ceil(keep * 65536)):
//               0 none; 1 on A as it is loaded (x = A, M x K, K-contiguous); 2 on B as it is loaded (x = B, K x N,
//               N-contiguous); 3 on the product: D = alpha * (A @ B) (.) m + beta * C + bias, m the mask of M x N
// Programmatic dependent launch (pdl.cuh): the block waits for its predecessor before its first access to memory and
// lets its dependents be scheduled once its last loads are issued.
// No system header is included (pipeline.cuh and philox.cuh are the project's): half types are 16-bit integers, and
// every tensor-core, copy and cluster operation is written in PTX (mma.sync m16n8k16, ldmatrix, cp.async, mapa /
// ld.shared::cluster, barrier.cluster).
// Requirements checked by the dispatcher: 16-byte aligned pointers, leading dimensions and batch strides multiples
// of 8 elements, the contiguous extent of each operand (and N) a multiple of 8.

#define THREADS (WM * WN * 32)
#define WTM (BM / WM)
#define WTN (BN / WN)
#define MT (WTM / 16)
#define NT (WTN / 8)
#if A_KCONTIG
#define A_STAGE (BM * (BK + 8))
#else
#define A_STAGE (BK * (BM + 8))
#endif
#if B_KCONTIG
#define B_STAGE (BN * (BK + 8))
#else
#define B_STAGE (BK * (BN + 8))
#endif
#define CS_LD (BN + 4)  // floats per row of the fp32 tile the cluster reduces (or the mask of the product drops)
#define TS_LD (BN + 8)  // elements per row of the staged output tile

#include "pipeline.cuh"

struct Params {
  u64 a, b, c, d, bias;
  long long lda, ldb, ldc, ldd;
  long long batch_a, batch_b, batch_c, batch_d;
  long long m, n, k, k_per_split;
  double alpha, beta;
  u64 seed;             // MASK: address of the 64-bit seed
  long long threshold;  // MASK: ceil(keep * 65536)
};

// the warp's MT x NT tiles of 16 x 8 for one BK slice held in shared memory (byte addresses a_stage, b_stage)
__device__ __forceinline__ void compute_stage(float (*acc)[NT][4], unsigned a_stage, unsigned b_stage, int wm, int wn) {
  const int lane = threadIdx.x & 31, j = lane >> 3;
#if A_KCONTIG
  const unsigned a_lane = (unsigned)(((wm + (lane & 15)) * (BK + 8) + (lane >> 4) * 8) * 2);
#else
  const unsigned a_lane = (unsigned)((((lane & 7) + (j >> 1) * 8) * (BM + 8) + wm + (j & 1) * 8) * 2);
#endif
#if B_KCONTIG
  const unsigned b_lane = (unsigned)(((wn + (lane & 7) + (j >> 1) * 8) * (BK + 8) + (j & 1) * 8) * 2);
#else
  const unsigned b_lane = (unsigned)((((lane & 7) + (j & 1) * 8) * (BN + 8) + wn + (j >> 1) * 8) * 2);
#endif
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    unsigned af[MT][4], bf[NT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#if A_KCONTIG
      ldmatrix4<false>(af[i], a_stage + a_lane + (unsigned)((i * 16 * (BK + 8) + kk) * 2));
#else
      ldmatrix4<true>(af[i], a_stage + a_lane + (unsigned)((kk * (BM + 8) + i * 16) * 2));
#endif
    }
#pragma unroll
    for (int t = 0; t < NT; t += 2) {
      unsigned r[4];
#if B_KCONTIG
      ldmatrix4<false>(r, b_stage + b_lane + (unsigned)((t * 8 * (BK + 8) + kk) * 2));
#else
      ldmatrix4<true>(r, b_stage + b_lane + (unsigned)((kk * (BN + 8) + t * 8) * 2));
#endif
      bf[t][0] = r[0]; bf[t][1] = r[1]; bf[t + 1][0] = r[2]; bf[t + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int t = 0; t < NT; ++t) mma(acc[i][t], af[i], bf[t]);
  }
}

// alpha * acc + beta * C + bias for columns gn, gn + 1 of row gm (inside D), into the staged tile at ts
__device__ __forceinline__ void finish2(const Params& p, const out_t* c, const out_t* bias, long long gm, long long gn,
                                        float v0, float v1, float alpha, float beta, out_t* ts) {
  v0 *= alpha;
  v1 *= alpha;
#if OUT_F32
  if (beta != 0.0f) {
    const float2 x = *reinterpret_cast<const float2*>(c + gm * p.ldc + gn);
    v0 += beta * x.x; v1 += beta * x.y;
  }
  if (bias) { v0 += bias[gn]; v1 += bias[gn + 1]; }
  *reinterpret_cast<float2*>(ts) = make_float2(v0, v1);
#else
  if (beta != 0.0f) {
    const unsigned x = *reinterpret_cast<const unsigned*>(c + gm * p.ldc + gn);
    v0 += beta * half_to_float((half_t)(x & 0xffff)); v1 += beta * half_to_float((half_t)(x >> 16));
  }
  if (bias) { v0 += half_to_float(bias[gn]); v1 += half_to_float(bias[gn + 1]); }
  *reinterpret_cast<unsigned*>(ts) = (unsigned)float_to_half(v0) | ((unsigned)float_to_half(v1) << 16);
#endif
}

// alpha * acc + beta * C + bias for 8 consecutive columns of row gm, stored to D
__device__ __forceinline__ void finish8(const Params& p, const out_t* c, out_t* d, const out_t* bias, long long gm,
                                        long long gn, float* v, float alpha, float beta) {
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] *= alpha;
  if (beta != 0.0f) {
    float x[8];
    load8(x, c + gm * p.ldc + gn);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += beta * x[i];
  }
  if (bias) {
    float x[8];
    load8(x, bias + gn);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += x[i];
  }
  store8(d + gm * p.ldd + gn, v);
}

extern "C" __global__ void __launch_bounds__(THREADS)
#if SPLITS > 1
__cluster_dims__(1, 1, SPLITS)
#endif
gemmbridge_skinny(const Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const unsigned a_smem = smem_addr(smem), b_smem = a_smem + STAGES * A_STAGE * 2;

  const int split = blockIdx.z % SPLITS;
  const long long batch = blockIdx.z / SPLITS;
  const long long m0 = (long long)blockIdx.y * BM, n0 = (long long)blockIdx.x * BN;
  const half_t* a = reinterpret_cast<const half_t*>(p.a) + batch * p.batch_a;
  const half_t* b = reinterpret_cast<const half_t*>(p.b) + batch * p.batch_b;
  const long long k_begin = split * p.k_per_split;
  const long long k_len = (k_begin + p.k_per_split < p.k ? k_begin + p.k_per_split : p.k) - k_begin;
  const int tiles = k_len > 0 ? (int)((k_len + BK - 1) / BK) : 0;
#if A_KCONTIG
  const Loader<BM, BK, true> load_a(a, p.lda, m0, p.m, k_begin, p.k, a_smem);
#else
  const Loader<BK, BM, false> load_a(a, p.lda, m0, p.m, k_begin, p.m, a_smem);
#endif
#if B_KCONTIG
  const Loader<BN, BK, true> load_b(b, p.ldb, n0, p.n, k_begin, p.k, b_smem);
#else
  const Loader<BK, BN, false> load_b(b, p.ldb, n0, p.n, k_begin, p.n, b_smem);
#endif
  // everything above is arithmetic on the parameters; from here on the kernel reads (A, B, C, the seed) and writes
  // memory a predecessor on the stream may write or read, so a programmatic dependent launch waits for it here
  wait_for_predecessor();
#if MASK
  const u64 seed = *reinterpret_cast<const u64*>(p.seed);
  const unsigned threshold = (unsigned)p.threshold;
#endif

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp / WN) * WTM, wn = (warp % WN) * WTN;
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][t][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles) {
      load_a.load(s * A_STAGE * 2, s, k_len);
      load_b.load(s * B_STAGE * 2, s, k_len);
    }
    commit();
  }
  for (int t = 0; t < tiles; ++t) {
    wait_groups<STAGES - 2>();
#if MASK == 1
    load_a.drop((t % STAGES) * A_STAGE * 2, t, k_len, p.k, seed, threshold);
#elif MASK == 2
    load_b.drop((t % STAGES) * B_STAGE * 2, t, k_len, p.n, seed, threshold);
#endif
    __syncthreads();
    const int next = t + STAGES - 1;
    if (next < tiles) {
      const int s = next % STAGES;
      load_a.load(s * A_STAGE * 2, next, k_len);
      load_b.load(s * B_STAGE * 2, next, k_len);
    }
    commit();
    if (next >= tiles - 1) allow_dependents();  // the block's last loads are issued (repeats are no-ops)
    const int s = t % STAGES;
    compute_stage(acc, a_smem + s * A_STAGE * 2, b_smem + s * B_STAGE * 2, wm, wn);
  }
  wait_groups<0>();
  __syncthreads();  // the pipeline's shared memory becomes the epilogue's

  const out_t* c = reinterpret_cast<const out_t*>(p.c) + batch * p.batch_c;
  out_t* d = reinterpret_cast<out_t*>(p.d) + batch * p.batch_d;
  const out_t* bias = reinterpret_cast<const out_t*>(p.bias);
  const float alpha = (float)p.alpha, beta = (float)p.beta;
#if SPLITS > 1 || MASK == 3
  // the fp32 tile in shared memory. With a split of K every block of the cluster holds a partial one and block
  // `split` sums rows [split * R, split * R + R) of all; with dropout on the product the mask applies to the sum,
  // 8 columns of a row (one Philox call) at a time, before alpha and beta.
  float* cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int row = wm + i * 16 + (lane >> 2), col = wn + t * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(cs + row * CS_LD + col) = make_float2(acc[i][t][0], acc[i][t][1]);
      *reinterpret_cast<float2*>(cs + (row + 8) * CS_LD + col) = make_float2(acc[i][t][2], acc[i][t][3]);
    }
#if SPLITS > 1
  cluster_sync();
#else
  __syncthreads();
#endif
  const int R = (BM + SPLITS - 1) / SPLITS;
  const int row_begin = split * R;
  const unsigned local = smem_addr(cs);
  for (int e = threadIdx.x; e < R * (BN / 8); e += THREADS) {
    const int row = row_begin + e / (BN / 8), col = (e % (BN / 8)) * 8;
    if (row >= BM) break;
    const long long gm = m0 + row, gn = n0 + col;
    if (gm >= p.m || gn >= p.n) continue;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#if SPLITS > 1
    add_cluster8<SPLITS>(v, local + (unsigned)((row * CS_LD + col) * 4));
#else
    load8(v, cs + row * CS_LD + col);  // the block's own tile
#endif
#if MASK == 3
    const uint4 kept = kept8(seed, (u64)(gm * p.n + gn), threshold);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = is_kept(kept, i) ? v[i] : 0.0f;
#endif
    finish8(p, c, d, bias, gm, gn, v, alpha, beta);
  }
#if SPLITS > 1
  // no block leaves while another may still read its shared memory
  cluster_sync();
#endif
#else
  // the finished tile, rounded to the output type, staged in shared memory, then written in 16-byte pieces
  out_t* ts = reinterpret_cast<out_t*>(smem);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int row = wm + i * 16 + (lane >> 2), col = wn + t * 8 + (lane & 3) * 2;
      const long long gm = m0 + row, gn = n0 + col;
      if (gn < p.n) {
        if (gm < p.m) finish2(p, c, bias, gm, gn, acc[i][t][0], acc[i][t][1], alpha, beta, ts + row * TS_LD + col);
        if (gm + 8 < p.m)
          finish2(p, c, bias, gm + 8, gn, acc[i][t][2], acc[i][t][3], alpha, beta, ts + (row + 8) * TS_LD + col);
      }
    }
  __syncthreads();
  for (int e = threadIdx.x; e < BM * (BN / 8); e += THREADS) {
    const int row = e / (BN / 8), col = (e % (BN / 8)) * 8;
    const long long gm = m0 + row, gn = n0 + col;
    if (gm >= p.m || gn >= p.n) continue;
#if OUT_F32
    const float4* from = reinterpret_cast<const float4*>(ts + row * TS_LD + col);
    float4* to = reinterpret_cast<float4*>(d + gm * p.ldd + gn);
    to[0] = from[0];
    to[1] = from[1];
#else
    *reinterpret_cast<uint4*>(d + gm * p.ldd + gn) = *reinterpret_cast<const uint4*>(ts + row * TS_LD + col);
#endif
  }
#endif
}
