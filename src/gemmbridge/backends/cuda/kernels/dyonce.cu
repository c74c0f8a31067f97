// gemmbridge's dy-once kernels: a LoRA layer's two GEMMs that read dy (T x O, row-major), from one read of it:
//   g  = alpha_g * dy @ B                      (T x R, half; B O x R row-major)
//   dB = alpha_db * dy^T @ xa + beta_db * C    (O x R, half or float32; xa T x R row-major)
//
// Compiled at run time by NVRTC (kernels/compiler.py) with these macros from kernels/lora.py:
//   HALF_BF16   1: bf16, 0: fp16       OUT_F32   1: dB and C float32     R   the rank (8, 16 or 32)
//   SLICES      dy columns per block, in slices of BK = 128              STAGES   cp.async pipeline depth
//
// gemmbridge_dyonce, grid (8, P), clusters of 8 blocks along O: block `rank` of cluster c covers dy's columns
// [rank * SLICES * BK, +SLICES * BK) and the cluster walks row tiles c, c + P, c + 2P, ... of BT rows. A block streams
// its columns of each row tile in SLICES slices of BT x BK through the pipeline; each slice held in shared memory feeds
// two products: g's (the slice as A, K running over O) and dB's (its transpose as A, K running over T), so dy is read
// from memory once. After each row tile the cluster sums its blocks' g partials in distributed shared memory (block
// `rank` writes rows rank * 16 ... of the tile). dB's partial sums stay in registers over the cluster's row tiles and
// are written once, in fp32, to the workspace ws[P][O][R]; gemmbridge_dyonce_reduce sums the P partials in a fixed
// order (deterministic), applies alpha_db and beta_db * C, and writes dB.
// Both kernels wait for their predecessor before touching memory (a programmatic dependent launch, pdl.cuh).
// Requirements checked by kernels/lora.py: 16-byte aligned pointers, leading dimensions multiples of 8, O % 8 == 0.

#define THREADS 256  // 8 warps
#define BT 128       // rows of a row tile: 8 warps x 16 (g's M)
#define BK 128       // dy columns of a slice: 8 warps x 16 (dB's M)
#define CLUSTER 8
#define NT (R / 8)  // n-tiles of 8 across the rank
#define DY_LD (BK + 8)
#define SMALL_LD (R + 8)  // xa's and B's rows in shared memory
#define G_LD (R + 4)      // floats per row of the g partial the cluster sums

#include "pipeline.cuh"

struct DyOnceParams {
  u64 dy, b, xa, g, ws;
  long long ld_dy, ld_b, ld_xa, ld_g;
  long long t, o;      // dy is t x o
  long long clusters;  // P
  double alpha_g;
};

struct ReduceParams {
  u64 ws, c, db;
  long long ld_c, ld_db, o, clusters;
  double alpha, beta;
};

// B fragments of n-tiles 0 .. NT-1 for k rows [k, k + 16) of a row-major (K x R) tile at byte address `base`
__device__ __forceinline__ void b_fragments(unsigned (*bf)[2], unsigned base, int k, int lane) {
  const int j = lane >> 3;
  const unsigned at = base + (unsigned)((((lane & 7) + (j & 1) * 8 + k) * SMALL_LD + (j >> 1) * 8) * 2);
#pragma unroll
  for (int t = 0; t < NT; t += 2) {
    unsigned r[4];
    ldmatrix4<true>(r, at + (unsigned)(t * 8 * 2));
    bf[t][0] = r[0];
    bf[t][1] = r[1];
    if (t + 1 < NT) {  // R = 8: the second n-tile is the padding, unread
      bf[t + 1][0] = r[2];
      bf[t + 1][1] = r[3];
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) __cluster_dims__(CLUSTER, 1, 1)
gemmbridge_dyonce(const DyOnceParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* gsm = reinterpret_cast<float*>(smem);
  const unsigned gsm_addr = smem_addr(smem);
  const unsigned dy_smem = gsm_addr + BT * G_LD * 4;
  const unsigned xa_smem = dy_smem + STAGES * BT * DY_LD * 2;
  const unsigned b_smem = xa_smem + 2 * BT * SMALL_LD * 2;

  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const long long cluster = blockIdx.y, tiles_total = (p.t + BT - 1) / BT;
  const int tiles = (int)((tiles_total - cluster + p.clusters - 1) / p.clusters);
  const long long o_begin = (long long)rank * SLICES * BK;
  const long long o_len = p.o - o_begin;  // columns of this block inside dy (<= 0: none; the loads zero-fill)
  const half_t* dy = reinterpret_cast<const half_t*>(p.dy);
  const half_t* xa = reinterpret_cast<const half_t*>(p.xa);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  wait_for_predecessor();  // a programmatic dependent launch: dy, B, xa, g and ws are touched only after this

  // the block's rows of B, once; then the first STAGES - 1 steps (step q: slice q % SLICES of row tile q / SLICES)
  const Loader<SLICES * BK, R, true> load_b(reinterpret_cast<const half_t*>(p.b), p.ld_b, o_begin, p.o, 0, 0, b_smem);
  load_b.load(0, 0, R);
  const int steps = tiles * SLICES;
  auto issue = [&](int q) {
    if (q < steps) {
      const long long t0 = (cluster + (long long)(q / SLICES) * p.clusters) * BT;
      const Loader<BT, BK, true> load_dy(dy, p.ld_dy, t0, p.t, o_begin, 0, dy_smem);
      load_dy.load((unsigned)((q % STAGES) * BT * DY_LD * 2), q % SLICES, o_len);
      if (q % SLICES == 0) {
        const Loader<BT, R, true> load_xa(xa, p.ld_xa, t0, p.t, 0, 0, xa_smem);
        load_xa.load((unsigned)(((q / SLICES) % 2) * BT * SMALL_LD * 2), 0, R);
      }
    }
    commit();
  };
#pragma unroll
  for (int q = 0; q < STAGES - 1; ++q) issue(q);

  float g_acc[NT][4], db_acc[SLICES][NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      g_acc[t][e] = 0.0f;
#pragma unroll
      for (int s = 0; s < SLICES; ++s) db_acc[s][t][e] = 0.0f;
    }

  const int j = lane >> 3;
  // g's A: the slice's rows [warp * 16, +16) (K along the slice's columns); dB's A: its columns [warp * 16, +16)
  const unsigned g_lane = (unsigned)(((warp * 16 + (lane & 15)) * DY_LD + (lane >> 4) * 8) * 2);
  const unsigned db_lane = (unsigned)((((lane & 7) + (j >> 1) * 8) * DY_LD + warp * 16 + (j & 1) * 8) * 2);
  for (int tile = 0; tile < tiles; ++tile) {
    const unsigned xa_buf = xa_smem + (unsigned)((tile % 2) * BT * SMALL_LD * 2);
#pragma unroll
    for (int s = 0; s < SLICES; ++s) {
      const int q = tile * SLICES + s;
      wait_groups<STAGES - 2>();
      __syncthreads();
      issue(q + STAGES - 1);
      if (q + STAGES - 1 >= steps - 1) allow_dependents();  // the block's last loads are issued (repeats: no-ops)
      const unsigned stage = dy_smem + (unsigned)((q % STAGES) * BT * DY_LD * 2);
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {  // g += slice @ B[slice rows]
        unsigned af[4], bf[NT][2];
        ldmatrix4<false>(af, stage + g_lane + (unsigned)(kk * 2));
        b_fragments(bf, b_smem, s * BK + kk, lane);
#pragma unroll
        for (int t = 0; t < NT; ++t) mma(g_acc[t], af, bf[t]);
      }
#pragma unroll
      for (int kk = 0; kk < BT; kk += 16) {  // dB[slice] += slice^T @ xa
        unsigned af[4], bf[NT][2];
        ldmatrix4<true>(af, stage + db_lane + (unsigned)(kk * DY_LD * 2));
        b_fragments(bf, xa_buf, kk, lane);
#pragma unroll
        for (int t = 0; t < NT; ++t) mma(db_acc[s][t], af, bf[t]);
      }
    }

    // the row tile's g: partials to shared memory, summed across the cluster, rows rank * 16 .. by this block
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int row = warp * 16 + (lane >> 2), col = t * 8 + (lane & 3) * 2;
      *reinterpret_cast<float2*>(gsm + row * G_LD + col) = make_float2(g_acc[t][0], g_acc[t][1]);
      *reinterpret_cast<float2*>(gsm + (row + 8) * G_LD + col) = make_float2(g_acc[t][2], g_acc[t][3]);
      g_acc[t][0] = g_acc[t][1] = g_acc[t][2] = g_acc[t][3] = 0.0f;
    }
    cluster_sync();
    const long long t0 = (cluster + (long long)tile * p.clusters) * BT;
    for (int e = threadIdx.x; e < (BT / CLUSTER) * NT; e += THREADS) {
      const int row = (int)rank * (BT / CLUSTER) + e / NT, col = (e % NT) * 8;
      if (t0 + row >= p.t) continue;
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      add_cluster8<CLUSTER>(v, gsm_addr + (unsigned)((row * G_LD + col) * 4));
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] *= (float)p.alpha_g;
      store8(reinterpret_cast<half_t*>(p.g) + (t0 + row) * p.ld_g + col, v);
    }
    // no block writes its partial of the next row tile while another may still read this one
    cluster_sync();
  }
  wait_groups<0>();

  // the cluster's dB partial over its row tiles, rows o_begin + s * BK + warp * 16 ..., to ws[cluster]
  float* ws = reinterpret_cast<float*>(p.ws) + cluster * p.o * R;
#pragma unroll
  for (int s = 0; s < SLICES; ++s)
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const long long row = o_begin + s * BK + warp * 16 + (lane >> 2);
      const int col = t * 8 + (lane & 3) * 2;
      if (row < p.o) *reinterpret_cast<float2*>(ws + row * R + col) = make_float2(db_acc[s][t][0], db_acc[s][t][1]);
      if (row + 8 < p.o)
        *reinterpret_cast<float2*>(ws + (row + 8) * R + col) = make_float2(db_acc[s][t][2], db_acc[s][t][3]);
    }
}

// dB = alpha * (ws[0] + ws[1] + ... + ws[P - 1]) + beta * C, 8 columns of a row per thread and step
extern "C" __global__ void __launch_bounds__(THREADS) gemmbridge_dyonce_reduce(const ReduceParams p) {
  wait_for_predecessor();  // the workspace, C (possibly dB itself) and dB are touched only after this
  allow_dependents();      // few blocks: the next kernel's come up on the idle SMs (and wait for this grid there)
  const float* ws = reinterpret_cast<const float*>(p.ws);
  const long long pieces = p.o * NT, step = (long long)gridDim.x * THREADS;
  for (long long e = (long long)blockIdx.x * THREADS + threadIdx.x; e < pieces; e += step) {
    const long long row = e / NT;
    const int col = (int)(e % NT) * 8;
    float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (long long c = 0; c < p.clusters; ++c) {
      float x[8];
      load8(x, ws + (c * p.o + row) * R + col);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += x[i];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= (float)p.alpha;
    if (p.beta != 0.0) {
      float x[8];
      load8(x, reinterpret_cast<const out_t*>(p.c) + row * p.ld_c + col);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += (float)p.beta * x[i];
    }
    store8(reinterpret_cast<out_t*>(p.db) + row * p.ld_db + col, v);
  }
}
