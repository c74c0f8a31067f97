// Programmatic dependent launch (PDL, sm_90): kernels/launch.py may launch a kernel with
// CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, so that it starts while its predecessor on the stream drains.
// Every kernel of the project calls wait_for_predecessor() before its first access to global memory (a read of any
// operand, the dropout seed, a workspace; any write) and may call allow_dependents() once it has issued its last loads.
// Both are no-ops in a kernel launched without the attribute, so one cubin serves both launch kinds; both compile to
// nothing below sm_90 (no PDL there: launch.py never sets the attribute).
// Included by pipeline.cuh and mask.cu (kernels/compiler.py passes it to NVRTC by name). docs/kernels.md, "The skinny
// sequence at copy speed".

// returns once every prerequisite grid has completed and its memory operations are visible to this thread
__device__ __forceinline__ void wait_for_predecessor() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// the next kernel (launched with the attribute) may be scheduled once every block of this grid has called this or
// exited; it still waits in its own wait_for_predecessor() for this grid's completion and memory
__device__ __forceinline__ void allow_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
