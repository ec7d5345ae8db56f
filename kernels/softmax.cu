// Softmax and log-softmax over the last dim, forward and backward.
//
// One block per row (blocks loop over rows when there are more rows than
// blocks). A row is read three times (max, Σexp, write) from global memory;
// for the widths kiln meets (a vocabulary of ~100, attention rows of a few
// hundred) the row stays in L1/L2 between passes, so the kernel costs about
// one read and one write of the tensor. The host picks the block size from
// the row width (32..256 threads) so rows of 1 or 31 do not idle 256 threads.
// Numerically stable: the row maximum is subtracted before exp.
#include "common.cuh"

// Mirrors SoftmaxParams in src/ops/softmax/cuda.rs.
struct SoftmaxParams {
    const float* x;   // forward: logits x; backward: the saved output y
    const float* dy;  // backward only: dL/dy
    float* out;       // forward: y; backward: dL/dx
    i64 rows;
    i64 width;
    u32 log;          // 0: softmax, 1: log-softmax
    u32 masked_rows_to_zero;  // forward softmax only: a row of all −∞ gives zeros, not NaN
};
static_assert(sizeof(SoftmaxParams) == 48, "SoftmaxParams must match its Rust mirror");

// softmax: yᵢ = exp(xᵢ − max) / Σⱼ exp(xⱼ − max)  (or 0 on an all −∞ row, if asked)
// log-softmax: yᵢ = xᵢ − max − ln Σⱼ exp(xⱼ − max)
extern "C" __global__ void softmax_forward(const SoftmaxParams p) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float* x = p.x + row * p.width;
        float* y = p.out + row * p.width;
        float max = -KILN_INFINITY;
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) max = fmaxf(max, x[j]);
        max = block_max(max, scratch);
        // Every thread has the same max, so the whole block takes one branch.
        if (p.masked_rows_to_zero && max == -KILN_INFINITY) {
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) y[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) sum += expf(x[j] - max);
        sum = block_sum(sum, scratch);
        if (p.log) {
            float log_sum = logf(sum);
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) y[j] = x[j] - max - log_sum;
        } else {
            float inv_sum = 1.0f / sum;
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) y[j] = expf(x[j] - max) * inv_sum;
        }
    }
}

// softmax:     dxᵢ = yᵢ·(dyᵢ − Σⱼ dyⱼ·yⱼ)
// log-softmax: dxᵢ = dyᵢ − exp(yᵢ)·Σⱼ dyⱼ
extern "C" __global__ void softmax_backward(const SoftmaxParams p) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float* y = p.x + row * p.width;
        const float* dy = p.dy + row * p.width;
        float* dx = p.out + row * p.width;
        float partial = 0.0f;
        if (p.log) {
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) partial += dy[j];
        } else {
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) partial += dy[j] * y[j];
        }
        float total = block_sum(partial, scratch);
        if (p.log) {
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) dx[j] = dy[j] - expf(y[j]) * total;
        } else {
            for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) dx[j] = y[j] * (dy[j] - total);
        }
    }
}
