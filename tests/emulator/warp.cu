// Every warp-level operation the prelude emulates, used correctly, so the
// emulator's results can be checked against the CUDA semantics lane by lane.
#include "common.cuh"

struct WarpParams {
    const float* x;
    float* out;  // 9 rows of blockDim.x values
    i64 n;
};
static_assert(sizeof(WarpParams) == 24, "WarpParams must match its Rust mirror");

extern "C" __global__ void warp_operations(const WarpParams p) {
    const int t = threadIdx.x, lane = t & 31;
    const i64 n = blockDim.x;
    const float v = p.x[t];
    float* out = p.out + t;
    out[0 * n] = __shfl_sync(0xffffffffu, v, 3);
    out[1 * n] = __shfl_up_sync(0xffffffffu, v, 2);
    out[2 * n] = __shfl_down_sync(0xffffffffu, v, 5, 16);
    out[3 * n] = __shfl_xor_sync(0xffffffffu, v, 4, 8);
    out[4 * n] = (float)__popc(__ballot_sync(0xffffffffu, v > 0.0f));
    out[5 * n] = (float)__any_sync(0xffffffffu, v > 100.0f);
    out[6 * n] = (float)__all_sync(0xffffffffu, v > -100.0f);
    __syncwarp();
    // The lower half-warp exchanges neighbours under its own mask.
    out[7 * n] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : v;
    // Each lane names its own source: a rotation of the warp by one.
    out[8 * n] = __shfl_sync(0xffffffffu, v, (lane + 1) & 31);
}

// Every thread adds to one __shared__ counter with atomicAdd: concurrent
// atomics are not a race, and the total is exact.
extern "C" __global__ void shared_atomic_count(const WarpParams p) {
    __shared__ unsigned count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, 1u);
    __syncthreads();
    if (threadIdx.x == 0) p.out[blockIdx.x] = (float)count;
}
