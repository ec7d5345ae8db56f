// Layer normalisation over rows (the normalised trailing dims of x flattened
// into one), forward and backward.
//
// Forward: one block per row; two block reductions (mean, then Σ(x − mean)²,
// which stays accurate when |mean| ≫ std), then the normalised, affine row.
// The row (a few hundred floats) stays in cache between the passes.
//
// Backward: dx again takes one block per row (two block sums of dx̂ and
// dx̂·x̂). dweight and dbias are sums over all rows; rather than atomics
// (whose order, and so whose rounding, changes from run to run) each thread
// sums one column over a chunk of LN_ROWS_PER_CHUNK rows into a partial, and a
// second kernel adds the partials of each column in chunk order: the result
// is deterministic, and neighbouring threads read neighbouring columns, so
// every load is coalesced.
#include "common.cuh"

#define LN_ROWS_PER_CHUNK 64

// Mirrors LayerNormParams in src/ops/layernorm/cuda.rs.
struct LayerNormParams {
    const float* x;
    const float* weight;  // null: weight 1
    const float* bias;    // null: bias 0
    float* out;
    float* mean;          // [rows]
    float* invstd;        // [rows], 1/√(var + eps)
    i64 rows;
    i64 width;
    float eps;
    u32 pad;
};
static_assert(sizeof(LayerNormParams) == 72, "LayerNormParams must match its Rust mirror");

// y = (x − mean)·invstd·weight + bias, per row
extern "C" __global__ void layer_norm_forward(const LayerNormParams p) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float* x = p.x + row * p.width;
        float* y = p.out + row * p.width;
        float sum = 0.0f;
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) sum += x[j];
        float mean = block_sum(sum, scratch) / (float)p.width;
        float squares = 0.0f;
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) {
            float centred = x[j] - mean;
            squares += centred * centred;
        }
        float var = block_sum(squares, scratch) / (float)p.width;
        float invstd = 1.0f / sqrtf(var + p.eps);
        if (threadIdx.x == 0) {
            p.mean[row] = mean;
            p.invstd[row] = invstd;
        }
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) {
            float xhat = (x[j] - mean) * invstd;
            float w = p.weight ? p.weight[j] : 1.0f;
            float b = p.bias ? p.bias[j] : 0.0f;
            y[j] = xhat * w + b;
        }
    }
}

// Mirrors LayerNormBackwardParams in src/ops/layernorm/cuda.rs; one struct
// for the three backward kernels.
struct LayerNormBackwardParams {
    const float* x;
    const float* dy;
    const float* weight;     // null: weight 1
    const float* mean;       // saved by the forward, [rows]
    const float* invstd;
    float* dx;
    float* partial_dweight;  // [row_chunks, width]
    float* partial_dbias;    // [row_chunks, width]
    float* dweight;          // [width]
    float* dbias;            // [width]
    i64 rows;
    i64 width;
    i64 row_chunks;          // ceil(rows / LN_ROWS_PER_CHUNK)
};
static_assert(sizeof(LayerNormBackwardParams) == 104, "LayerNormBackwardParams must match its Rust mirror");

// dx = invstd · (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), dx̂ = dy·weight, means over the row
extern "C" __global__ void layer_norm_backward_dx(const LayerNormBackwardParams p) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const float* x = p.x + row * p.width;
        const float* dy = p.dy + row * p.width;
        float* dx = p.dx + row * p.width;
        float mean = p.mean[row], invstd = p.invstd[row];
        float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) {
            float xhat = (x[j] - mean) * invstd;
            float dxhat = dy[j] * (p.weight ? p.weight[j] : 1.0f);
            sum_dxhat += dxhat;
            sum_dxhat_xhat += dxhat * xhat;
        }
        float mean_dxhat = block_sum(sum_dxhat, scratch) / (float)p.width;
        float mean_dxhat_xhat = block_sum(sum_dxhat_xhat, scratch) / (float)p.width;
        for (i64 j = threadIdx.x; j < p.width; j += blockDim.x) {
            float xhat = (x[j] - mean) * invstd;
            float dxhat = dy[j] * (p.weight ? p.weight[j] : 1.0f);
            dx[j] = invstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        }
    }
}

// partial[chunk, j] = Σ over the chunk's rows of dy·x̂ (dweight) and dy (dbias)
extern "C" __global__ void layer_norm_backward_param_partials(const LayerNormBackwardParams p) {
    GRID_STRIDE_LOOP(i, p.row_chunks * p.width) {
        i64 chunk = i / p.width, j = i - chunk * p.width;
        i64 first = chunk * LN_ROWS_PER_CHUNK;
        i64 last = first + LN_ROWS_PER_CHUNK < p.rows ? first + LN_ROWS_PER_CHUNK : p.rows;
        float dweight = 0.0f, dbias = 0.0f;
        for (i64 row = first; row < last; ++row) {
            float dy = p.dy[row * p.width + j];
            float xhat = (p.x[row * p.width + j] - p.mean[row]) * p.invstd[row];
            dweight += dy * xhat;
            dbias += dy;
        }
        p.partial_dweight[i] = dweight;
        p.partial_dbias[i] = dbias;
    }
}

// dweight[j] = Σ_chunks partial_dweight[chunk, j], likewise dbias, in chunk order
extern "C" __global__ void layer_norm_backward_param_sums(const LayerNormBackwardParams p) {
    GRID_STRIDE_LOOP(j, p.width) {
        float dweight = 0.0f, dbias = 0.0f;
        for (i64 chunk = 0; chunk < p.row_chunks; ++chunk) {
            dweight += p.partial_dweight[chunk * p.width + j];
            dbias += p.partial_dbias[chunk * p.width + j];
        }
        p.dweight[j] = dweight;
        p.dbias[j] = dbias;
    }
}
