// gemmbridge's dropout mask: Philox4x32-10 (Salmon et al., SC 2011; Random123's constants) keyed by a 64-bit seed.
//
// Element `index` (= i * cols + j of a row-major rows x cols matrix x) is kept iff h < threshold, where
//   o         = philox4x32_10(counter = (index / 8) as words (lo, hi, 0, 0), key = seed as words (lo, hi)),
//   h         = 16-bit half (index % 2) (the low half first) of word (index % 8) / 2 of o,
//   threshold = ceil(keep * 65536): the uniform h / 2^16 is below keep.
// One Philox call covers 8 consecutive elements: a 16-byte piece of a half-precision row. kernels/dropout.py holds the
// NumPy reference (`mask`) and the host side; included by skinny.cu and mask.cu (kernels/compiler.py passes it to
// NVRTC by name).

typedef unsigned long long u64;

// the 64-bit product of two 32-bit words (one IMAD.WIDE.U32)
__device__ __forceinline__ u64 mul_wide(unsigned a, unsigned b) {
  u64 p;
  asm("mul.wide.u32 %0, %1, %2;" : "=l"(p) : "r"(a), "r"(b));
  return p;
}

__device__ __forceinline__ uint4 philox4x32_10(u64 counter, u64 seed) {
  unsigned c0 = (unsigned)counter, c1 = (unsigned)(counter >> 32), c2 = 0, c3 = 0;
  unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const u64 p0 = mul_wide(0xD2511F53u, c0), p1 = mul_wide(0xCD9E8D57u, c2);
    const unsigned n0 = (unsigned)(p1 >> 32) ^ c1 ^ k0, n2 = (unsigned)(p0 >> 32) ^ c3 ^ k1;
    c1 = (unsigned)p1;
    c3 = (unsigned)p0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// the kept halves of one word: 0xffff where the element is kept, 0 where dropped (an AND mask for two 16-bit values)
__device__ __forceinline__ unsigned kept_halves(unsigned word, unsigned threshold) {
  return ((word & 0xffffu) < threshold ? 0x0000ffffu : 0u) | ((word >> 16) < threshold ? 0xffff0000u : 0u);
}

// the AND masks of elements first .. first + 7 (first a multiple of 8), two per word in element order
__device__ __forceinline__ uint4 kept8(u64 seed, u64 first, unsigned threshold) {
  const uint4 o = philox4x32_10(first >> 3, seed);
  return make_uint4(kept_halves(o.x, threshold), kept_halves(o.y, threshold), kept_halves(o.z, threshold),
                    kept_halves(o.w, threshold));
}

// element e (0..7) of a kept8 result is kept
__device__ __forceinline__ bool is_kept(const uint4& k, int e) {
  const unsigned word = e < 2 ? k.x : e < 4 ? k.y : e < 6 ? k.z : k.w;
  return (word >> ((e & 1) * 16)) & 1u;
}
