// gemmbridge's dropout mask as bytes (1 kept, 0 dropped): out[index] for index in [0, count), the mask of philox.cuh
// with the seed read from device memory. For tests and for comparing against other libraries with the same mask;
// the GEMMs never store it (skinny.cu regenerates it where x is read). Launched by kernels/dropout.py's fill_mask.

#include "pdl.cuh"
#include "philox.cuh"

struct MaskParams {
  u64 seed;  // address of the 64-bit seed
  u64 out;   // address of `count` bytes
  long long count, threshold;
};

// the 8 flags of a kept8 result as 8 bytes, element 0 in the lowest
__device__ __forceinline__ u64 flag_bytes(const uint4& k) {
  const unsigned lo = (k.x & 1u) | ((k.x >> 8) & 0x100u) | ((k.y & 1u) << 16) | ((k.y << 8) & 0x1000000u);
  const unsigned hi = (k.z & 1u) | ((k.z >> 8) & 0x100u) | ((k.w & 1u) << 16) | ((k.w << 8) & 0x1000000u);
  return (u64)lo | ((u64)hi << 32);
}

extern "C" __global__ void __launch_bounds__(256) gemmbridge_fill_mask(const MaskParams p) {
  wait_for_predecessor();  // a programmatic dependent launch: the seed (drawn by the previous kernel) read after this
  const u64 seed = *reinterpret_cast<const u64*>(p.seed);
  unsigned char* out = reinterpret_cast<unsigned char*>(p.out);
  const bool aligned = (p.out & 7) == 0;
  const long long step = (long long)gridDim.x * blockDim.x * 8;
  for (long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; first < p.count; first += step) {
    const u64 bytes = flag_bytes(kept8(seed, (u64)first, (unsigned)p.threshold));
    if (aligned && first + 8 <= p.count) {
      *reinterpret_cast<u64*>(out + first) = bytes;
    } else {
      for (int e = 0; e < 8 && first + e < p.count; ++e) out[first + e] = (unsigned char)(bytes >> (8 * e));
    }
  }
}
