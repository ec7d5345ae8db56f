// Kernels that do nothing but meet, for timing the CUDA emulator's
// scheduler: what a barrier, a shuffle and a thread cost on the host.
#include "common.cuh"

struct MeetParams {
    float* out;
    i64 rounds;
};
static_assert(sizeof(MeetParams) == 16, "MeetParams must match its Rust mirror");

// `rounds` block-wide barriers.
extern "C" __global__ void barrier_rounds(const MeetParams p) {
    for (i64 r = 0; r < p.rounds; ++r) __syncthreads();
    if (threadIdx.x == 0) p.out[blockIdx.x] = (float)p.rounds;
}

// `rounds` full-warp shuffles.
extern "C" __global__ void shuffle_rounds(const MeetParams p) {
    float v = (float)threadIdx.x;
    for (i64 r = 0; r < p.rounds; ++r) v = __shfl_xor_sync(0xffffffffu, v, 1);
    if (threadIdx.x == 0) p.out[blockIdx.x] = v;
}

// One store per thread, no meeting: the cost of running a thread at all.
extern "C" __global__ void one_store_per_thread(const MeetParams p) {
    GRID_STRIDE_LOOP(i, p.rounds) p.out[i] = 1.0f;
}
