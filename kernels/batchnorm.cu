// 2-D batch normalisation on x [N, C, H, W], forward (training and eval) and
// backward. A channel c is N planes of H·W contiguous values, so element i of
// the channel (i over N·H·W) lives at (n·C + c)·HW + s with n = i / HW, s = i % HW.
//
// Statistics: one block per channel loops over the channel's m = N·H·W
// values with block_sum, in two passes (mean, then Σ(x − mean)²; accurate when
// |mean| ≫ std). Each pass reads the channel once; consecutive threads read
// consecutive values of a plane, so loads are coalesced. The running
// statistics are then blended in place by a tiny per-channel kernel.
// Normalisation (and the backward's dx) is one thread per element, memory
// bound: x read once, y written once, the per-channel values come from cache.
// Backward: one block per channel computes Σdy and Σdy·x̂ (which are dbias
// and dweight), then the elementwise dx kernel uses them.
//
// Formats: x, y, dy and dx are f32, bf16 or f16 (`format`); the statistics,
// running statistics, affine parameters and their gradients are always f32,
// and every value is computed in f32 (PyTorch's autocast runs batch norm in
// x's dtype the same way).
#include "common.cuh"
#include "half.cuh"

// Position of the i-th value (i in [0, N·HW)) of channel c.
__device__ __forceinline__ i64 channel_offset(i64 i, i64 c, i64 channels, i64 spatial) {
    i64 n = i / spatial, s = i - n * spatial;
    return (n * channels + c) * spatial + s;
}

// Mirrors BatchNormStatsParams in src/ops/batchnorm/cuda.rs.
struct BatchNormStatsParams {
    const void* x;        // of `format`
    float* mean;          // [C]
    float* invstd;        // [C], 1/√(biased var + eps)
    float* unbiased_var;  // [C], var·m/(m − 1), for the running statistics
    i64 batch;
    i64 channels;
    i64 spatial;
    float eps;
    u32 format;
};
static_assert(sizeof(BatchNormStatsParams) == 64, "BatchNormStatsParams must match its Rust mirror");

// mean_c = Σx/m;  var_c = Σ(x − mean_c)²/m (biased);  m = N·H·W
extern "C" __global__ void batch_norm_channel_stats(const BatchNormStatsParams p) {
    __shared__ float scratch[32];
    i64 count = p.batch * p.spatial;
    for (i64 c = blockIdx.x; c < p.channels; c += gridDim.x) {
        float sum = 0.0f;
        for (i64 i = threadIdx.x; i < count; i += blockDim.x)
            sum += load_f32(p.x, channel_offset(i, c, p.channels, p.spatial), p.format);
        float mean = block_sum(sum, scratch) / (float)count;
        float squares = 0.0f;
        for (i64 i = threadIdx.x; i < count; i += blockDim.x) {
            float centred = load_f32(p.x, channel_offset(i, c, p.channels, p.spatial), p.format) - mean;
            squares += centred * centred;
        }
        float var = block_sum(squares, scratch) / (float)count;
        if (threadIdx.x == 0) {
            p.mean[c] = mean;
            p.invstd[c] = 1.0f / sqrtf(var + p.eps);
            p.unbiased_var[c] = var * ((float)count / (float)(count - 1));
        }
    }
}

// Mirrors RunningStatParams in src/ops/batchnorm/cuda.rs.
struct RunningStatParams {
    float* running;           // [C], updated in place
    const float* batch_stat;  // [C]
    i64 channels;
    float momentum;
    u32 pad;
};
static_assert(sizeof(RunningStatParams) == 32, "RunningStatParams must match its Rust mirror");

// running ← (1 − momentum)·running + momentum·batch_stat
extern "C" __global__ void batch_norm_update_running_stat(const RunningStatParams p) {
    GRID_STRIDE_LOOP(c, p.channels) p.running[c] = (1.0f - p.momentum) * p.running[c] + p.momentum * p.batch_stat[c];
}

// Mirrors BatchNormEvalStatsParams in src/ops/batchnorm/cuda.rs.
struct BatchNormEvalStatsParams {
    const float* running_mean;
    const float* running_var;
    float* mean;    // [C], a copy the backward keeps even if the running stats change later
    float* invstd;  // [C]
    i64 channels;
    float eps;
    u32 pad;
};
static_assert(sizeof(BatchNormEvalStatsParams) == 48, "BatchNormEvalStatsParams must match its Rust mirror");

// eval: mean_c = running_mean_c;  invstd_c = 1/√(running_var_c + eps)
extern "C" __global__ void batch_norm_eval_stats(const BatchNormEvalStatsParams p) {
    GRID_STRIDE_LOOP(c, p.channels) {
        p.mean[c] = p.running_mean[c];
        p.invstd[c] = 1.0f / sqrtf(p.running_var[c] + p.eps);
    }
}

// Mirrors BatchNormForwardParams in src/ops/batchnorm/cuda.rs.
struct BatchNormForwardParams {
    const void* x;        // of `format`, like out
    const float* weight;  // null: weight 1
    const float* bias;    // null: bias 0
    const float* mean;
    const float* invstd;
    void* out;
    i64 n;                // N·C·H·W
    i64 channels;
    i64 spatial;
    u32 format;
    u32 pad;
};
static_assert(sizeof(BatchNormForwardParams) == 80, "BatchNormForwardParams must match its Rust mirror");

// y = (x − mean_c)·(invstd_c·weight_c) + bias_c
extern "C" __global__ void batch_norm_forward(const BatchNormForwardParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        i64 c = (i / p.spatial) % p.channels;
        float scale = p.invstd[c] * (p.weight ? p.weight[c] : 1.0f);
        float shift = p.bias ? p.bias[c] : 0.0f;
        store_f32(p.out, i, (load_f32(p.x, i, p.format) - p.mean[c]) * scale + shift, p.format);
    }
}

// Mirrors BatchNormBackwardParams in src/ops/batchnorm/cuda.rs; one struct
// for both backward kernels.
struct BatchNormBackwardParams {
    const void* x;        // x, dy and dx of `format`
    const void* dy;
    const float* weight;  // null: weight 1
    const float* mean;    // saved by the forward, [C]
    const float* invstd;
    void* dx;
    float* dweight;       // [C], Σ dy·x̂
    float* dbias;         // [C], Σ dy
    i64 batch;
    i64 channels;
    i64 spatial;
    u32 training;         // 1: the statistics came from this batch
    u32 format;
};
static_assert(sizeof(BatchNormBackwardParams) == 96, "BatchNormBackwardParams must match its Rust mirror");

// dbias_c = Σ dy;  dweight_c = Σ dy·x̂  (sums over N, H, W)
extern "C" __global__ void batch_norm_backward_channel_sums(const BatchNormBackwardParams p) {
    __shared__ float scratch[32];
    i64 count = p.batch * p.spatial;
    for (i64 c = blockIdx.x; c < p.channels; c += gridDim.x) {
        float mean = p.mean[c], invstd = p.invstd[c];
        float sum_dy = 0.0f, sum_dy_xhat = 0.0f;
        for (i64 i = threadIdx.x; i < count; i += blockDim.x) {
            i64 at = channel_offset(i, c, p.channels, p.spatial);
            float xhat = (load_f32(p.x, at, p.format) - mean) * invstd;
            float dy = load_f32(p.dy, at, p.format);
            sum_dy += dy;
            sum_dy_xhat += dy * xhat;
        }
        sum_dy = block_sum(sum_dy, scratch);
        sum_dy_xhat = block_sum(sum_dy_xhat, scratch);
        if (threadIdx.x == 0) {
            p.dbias[c] = sum_dy;
            p.dweight[c] = sum_dy_xhat;
        }
    }
}

// training: dx = γ·invstd · (dy − Σdy/m − x̂·Σ(dy·x̂)/m);  eval: dx = γ·invstd·dy
// (reads the sums that batch_norm_backward_channel_sums wrote to dbias and dweight)
extern "C" __global__ void batch_norm_backward_dx(const BatchNormBackwardParams p) {
    float count = (float)(p.batch * p.spatial);
    GRID_STRIDE_LOOP(i, p.batch * p.channels * p.spatial) {
        i64 c = (i / p.spatial) % p.channels;
        float scale = p.invstd[c] * (p.weight ? p.weight[c] : 1.0f);
        float dy = load_f32(p.dy, i, p.format);
        if (p.training) {
            float xhat = (load_f32(p.x, i, p.format) - p.mean[c]) * p.invstd[c];
            store_f32(p.dx, i, scale * (dy - p.dbias[c] / count - xhat * (p.dweight[c] / count)), p.format);
        } else {
            store_f32(p.dx, i, scale * dy, p.format);
        }
    }
}
