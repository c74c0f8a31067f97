// What gemmbridge's GEMM kernels (skinny.cu, dyonce.cu) share: the half and output types, the PTX primitives
// (cp.async, ldmatrix, mma.sync m16n8k16 with fp32 accumulation), conversions, the cluster's barrier and sum in
// distributed shared memory, the Loader of pipeline stages, and (pdl.cuh) the waits of a programmatic dependent launch.
// The includer defines HALF_BF16 (1: bf16, 0: fp16), OUT_F32 (1: float32 outputs), THREADS (threads per block) and
// BK (the K extent of one stage) first.

#include "pdl.cuh"
#include "philox.cuh"

typedef unsigned short half_t;
#if OUT_F32
typedef float out_t;
#else
typedef half_t out_t;
#endif

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned r;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

__device__ __forceinline__ void copy16(unsigned dst, const half_t* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void wait_groups() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix4(unsigned* r, unsigned address) {
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

__device__ __forceinline__ void mma(float* c, const unsigned* a, const unsigned* b) {
#if HALF_BF16
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
#endif
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ float half_to_float(half_t h) {
#if HALF_BF16
  return __uint_as_float(((unsigned)h) << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ half_t float_to_half(float f) {
  half_t h;
#if HALF_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}

// every block of the cluster has arrived: its shared-memory writes before are visible to the cluster's reads after
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// v[0..7] += the 8 floats at shared-memory byte offset `offset` of each of the cluster's blocks 0 .. N - 1, in rank
// order (distributed shared memory: the caller has passed a cluster_sync since they were written)
template <int N>
__device__ __forceinline__ void add_cluster8(float* v, unsigned offset) {
#pragma unroll
  for (int rank = 0; rank < N; ++rank) {
    unsigned remote;
    float4 x, y;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(offset), "r"(rank));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(x.x), "=f"(x.y), "=f"(x.z), "=f"(x.w) : "r"(remote));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(y.x), "=f"(y.y), "=f"(y.z), "=f"(y.w) : "r"(remote + 16));
    v[0] += x.x; v[1] += x.y; v[2] += x.z; v[3] += x.w; v[4] += y.x; v[5] += y.y; v[6] += y.z; v[7] += y.w;
  }
}

// 8 consecutive values (half or float32) as floats, and back
__device__ __forceinline__ void load8(float* v, const float* p) {
  float4 x = *reinterpret_cast<const float4*>(p), y = *reinterpret_cast<const float4*>(p + 4);
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w; v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
}

__device__ __forceinline__ void load8(float* v, const half_t* p) {
  uint4 x = *reinterpret_cast<const uint4*>(p);
  const half_t* h = reinterpret_cast<const half_t*>(&x);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = half_to_float(h[i]);
}

__device__ __forceinline__ void store8(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(half_t* p, const float* v) {
  uint4 x;
  half_t* h = reinterpret_cast<half_t*>(&x);
#pragma unroll
  for (int i = 0; i < 8; ++i) h[i] = float_to_half(v[i]);
  *reinterpret_cast<uint4*>(p) = x;
}

// One operand's share of each pipeline stage: a ROWS x COLS tile whose rows are contiguous in global memory, in
// 16-byte pieces; thread tid copies pieces tid, tid + THREADS, ... which lie ROW_STEP rows apart in the same column,
// so every address and bound is worked out once and a stage costs an add, a compare and a cp.async per piece.
// K_COLS: K runs along the tile's columns (a K-contiguous operand), else along its rows. Outside the matrix
// (M or N at mn_limit, K at the split's end) the pieces are zero-filled.
template <int ROWS, int COLS, bool K_COLS>
struct Loader {
  enum { PER_ROW = COLS / 8, CHUNKS = ROWS * PER_ROW, PASSES = (CHUNKS + THREADS - 1) / THREADS,
         ROW_STEP = THREADS / PER_ROW, LD = COLS + 8 };
  const half_t* src;
  long long stride, mn_left;
  u64 first;  // dropout: the row-major index of the thread's first piece of tile 0 in the operand (row i, column j)
  unsigned dst;
  int row, col;

  __device__ __forceinline__ Loader(const half_t* base, long long ld, long long mn0, long long mn_limit,
                                    long long k_begin, long long cols, unsigned smem) {
    row = threadIdx.x / PER_ROW;
    col = (threadIdx.x % PER_ROW) * 8;
    stride = ld;
    if (K_COLS) {
      src = base + (mn0 + row) * ld + k_begin + col;
      mn_left = mn_limit - mn0 - row;
      first = (u64)((mn0 + row) * cols + k_begin + col);
    } else {
      src = base + (k_begin + row) * ld + mn0 + col;
      mn_left = mn_limit - mn0 - col;
      first = (u64)((k_begin + row) * cols + mn0 + col);
    }
    dst = smem + (unsigned)((row * LD + col) * 2);
  }

  // the piece r rows below the thread's first, in the tile at K offset k0, lies inside the matrix and the split
  __device__ __forceinline__ bool inside(int r, long long k0, long long k_len) const {
    return K_COLS ? r < mn_left && k0 + col < k_len : mn_left > 0 && k0 + row + r < k_len;
  }

  // tile t of the split: K offsets [t * BK, t * BK + BK) of the k_len the split covers
  __device__ __forceinline__ void load(unsigned stage, int t, long long k_len) const {
    const long long k0 = (long long)t * BK;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      if (CHUNKS % THREADS != 0 && threadIdx.x + i * THREADS >= CHUNKS) break;
      const int r = i * ROW_STEP;
      const bool ok = inside(r, k0, k_len);
      const half_t* from = K_COLS ? src + r * stride + k0 : src + (k0 + r) * stride;
      copy16(dst + stage + (unsigned)(r * LD * 2), ok ? from : src, ok);
    }
  }

  // dropout: zero the dropped elements of the thread's own pieces of tile t once they have landed in the stage
  // (cp.async.wait_group makes a thread's copies visible to itself; the block's barrier follows). `cols`: the
  // operand's columns (K when K_COLS, else N), so that the piece at (row i, column j) has index i * cols + j.
  __device__ __forceinline__ void drop(unsigned stage, int t, long long k_len, long long cols, u64 seed,
                                       unsigned threshold) const {
    const long long k0 = (long long)t * BK;
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      if (CHUNKS % THREADS != 0 && threadIdx.x + i * THREADS >= CHUNKS) break;
      const int r = i * ROW_STEP;
      if (!inside(r, k0, k_len)) continue;  // zero-filled
      const uint4 k = kept8(seed, first + (u64)(K_COLS ? r * cols + k0 : (k0 + r) * cols), threshold);
      const unsigned at = dst + stage + (unsigned)(r * LD * 2);
      unsigned x, y, z, w;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(x), "=r"(y), "=r"(z), "=r"(w) : "r"(at));
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(at), "r"(x & k.x), "r"(y & k.y), "r"(z & k.z),
                   "r"(w & k.w) : "memory");
    }
  }
};
