// Deliberately broken kernels (and correct twins) for the emulator's faults
// suite: each breaks one rule a GPU or compute-sanitizer would catch. Kept
// valid CUDA, so they compile under NVRTC like kernels/.
#include "common.cuh"

struct FaultParams {
    const float* x;
    float* out;
    i64 n;
};
static_assert(sizeof(FaultParams) == 24, "FaultParams must match its Rust mirror");

// out[0] = Σ x[0 .. blockDim.x) by a shared-memory tree. `barrier` = 0 drops
// the __syncthreads between the loads into shared memory and the first
// reads of other threads' slots: a race that only the thread order decides.
#define TREE_THREADS 256

__device__ __forceinline__ void tree_sum(const FaultParams& p, bool barrier) {
    __shared__ float partial[TREE_THREADS];
    const int t = threadIdx.x;
    partial[t] = t < p.n ? p.x[t] : 0.0f;
    if (barrier) __syncthreads();
    for (int stride = TREE_THREADS / 2; stride > 0; stride >>= 1) {
        if (t < stride) partial[t] += partial[t + stride];
        __syncthreads();
    }
    if (t == 0) p.out[0] = partial[0];
}

extern "C" __launch_bounds__(TREE_THREADS) __global__ void tree_sum_missing_barrier(const FaultParams p) {
    tree_sum(p, false);
}

extern "C" __launch_bounds__(TREE_THREADS) __global__ void tree_sum_with_barrier(const FaultParams p) {
    tree_sum(p, true);
}

// out[i] = x[i + 1] for i < n: reads one element past the end of x.
extern "C" __global__ void read_one_past_the_end(const FaultParams p) {
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = p.x[i + 1];
}

// out[i] = x[i - 1] for i < n: reads one element before the start of x.
extern "C" __global__ void read_one_before_the_start(const FaultParams p) {
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = p.x[i - 1];
}

// out[i + 1] = x[i] for i < n: writes one element past the end of out.
extern "C" __global__ void write_one_past_the_end(const FaultParams p) {
    GRID_STRIDE_LOOP(i, p.n) p.out[i + 1] = p.x[i];
}

// A barrier only the first 16 threads reach.
extern "C" __global__ void barrier_in_a_branch(const FaultParams p) {
    if (threadIdx.x < 16) __syncthreads();
    if (threadIdx.x < p.n) p.out[threadIdx.x] = p.x[threadIdx.x];
}

// Threads past n return before a barrier the others wait at.
extern "C" __global__ void return_before_a_barrier(const FaultParams p) {
    if (threadIdx.x >= p.n) return;
    __syncthreads();
    p.out[threadIdx.x] = p.x[threadIdx.x];
}

// Threads past n return after the block's last barrier: allowed.
extern "C" __global__ void return_after_the_last_barrier(const FaultParams p) {
    __shared__ float staged[64];
    if (threadIdx.x < 64) staged[threadIdx.x] = threadIdx.x < p.n ? p.x[threadIdx.x] : 0.0f;
    __syncthreads();
    if (threadIdx.x >= p.n) return;
    p.out[threadIdx.x] = staged[(threadIdx.x + 1) % p.n];
}

// Lane 7 skips a full-warp shuffle.
extern "C" __global__ void shuffle_missing_a_lane(const FaultParams p) {
    float v = threadIdx.x < p.n ? p.x[threadIdx.x] : 0.0f;
    if ((threadIdx.x & 31) != 7) v = __shfl_xor_sync(0xffffffffu, v, 1);
    if (threadIdx.x < p.n) p.out[threadIdx.x] = v;
}

// Every lane takes the full-warp shuffle: out[i] = x[i ^ 1].
extern "C" __global__ void shuffle_every_lane(const FaultParams p) {
    float v = threadIdx.x < p.n ? p.x[threadIdx.x] : 0.0f;
    v = __shfl_xor_sync(0xffffffffu, v, 1);
    if (threadIdx.x < p.n) p.out[threadIdx.x] = v;
}

// A float4 load from x + 1: 4 bytes past a 16-byte boundary.
extern "C" __global__ void misaligned_float4(const FaultParams p) {
    if (threadIdx.x == 0) {
        const float4 v = *reinterpret_cast<const float4*>(p.x + 1);
        p.out[0] = v.x + v.y + v.z + v.w;
    }
}

// A 32-float shared array indexed by every thread of a 64-thread block.
extern "C" __global__ void shared_index_out_of_bounds(const FaultParams p) {
    __shared__ float slots[32];
    slots[threadIdx.x] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) p.out[0] = slots[0] + (float)p.n;
}

// Declares at most 128 threads a block.
extern "C" __launch_bounds__(128) __global__ void bounded_to_128_threads(const FaultParams p) {
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = p.x[i];
}

// Recursion far deeper than an emulated thread's 64 KiB stack allows.
__device__ float deep_recursion(int depth, float x) {
    volatile float frame[256];
    frame[depth & 255] = x;
    if (depth == 0) return frame[0];
    return deep_recursion(depth - 1, x + 1.0f) + frame[depth & 255];
}

extern "C" __global__ void stack_overflow(const FaultParams p) {
    if (threadIdx.x == 0) p.out[0] = deep_recursion((int)p.n, p.x[0]);
}

// Never ends: the loop's bound is never reached (the volatile counter keeps
// the compiler from assuming the loop terminates).
extern "C" __global__ void endless_loop(const FaultParams p) {
    volatile i64 spins = 0;
    while (spins >= 0 && p.n > 0) spins = spins + 0;
    p.out[0] = (float)spins;
}
