// Shared device helpers for every kernel file. Self-contained: NVRTC may run
// with no CUDA include directory, so nothing here includes a system header.
#pragma once

typedef long long i64;
typedef unsigned int u32;
typedef unsigned long long u64;

#define KILN_INFINITY __int_as_float(0x7f800000)

// Grid-stride loop over [0, n): any launch size covers any n.
#define GRID_STRIDE_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds
// 32 floats of shared memory. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// Maximum over the whole block, as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : -KILN_INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ double warp_sum_double(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// block_sum in double, for sums that must stay accurate over millions of
// f32 terms (losses, gradient norms); `scratch` holds 32 doubles.
__device__ __forceinline__ double block_sum_double(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_double(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? scratch[threadIdx.x] : 0.0;
    if (warp == 0) v = warp_sum_double(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// σ(x), the same formula as the CPU's: never exp of a large positive number.
__device__ __forceinline__ float sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// Broadcast indexing: up to 6 dims, row-major; a stride of 0 repeats a dim.
#define KILN_MAX_DIMS 6
struct Strides6 {
    i64 dims[KILN_MAX_DIMS];     // output dims, leading dims padded with 1
    i64 strides[KILN_MAX_DIMS];  // input element strides, 0 where broadcast
};

__device__ __forceinline__ i64 broadcast_offset(i64 linear, const Strides6& s) {
    i64 offset = 0;
    for (int d = KILN_MAX_DIMS - 1; d >= 0; --d) {
        i64 idx = linear % s.dims[d];
        linear /= s.dims[d];
        offset += idx * s.strides[d];
    }
    return offset;
}
