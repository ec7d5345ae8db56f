// Reductions over one dim of a tensor viewed as [outer, n, inner]: sum (and
// mean, a sum with a scale), max with its argmax, and max's backward.
//
// Two sum kernels, side by side:
//   sum_dim_v1_thread_per_output: one thread per (outer, inner) output walks
//     the n inputs. For inner > 1 neighbouring threads read neighbouring
//     addresses, so loads coalesce; it accumulates in double like the CPU.
//   sum_rows_v2_block: for inner == 1 (a row sum, e.g. a loss or the last dim)
//     v1 would give each thread a whole row and leave most of the GPU idle;
//     here one block reduces one row: strided partial sums, then a warp-shuffle
//     block reduction. Every input is read once, every output written once.
#include "common.cuh"

// Mirrors SumParams in src/ops/reduce/cuda.rs.
struct SumParams {
    const float* x;
    float* out;
    i64 outer;
    i64 n;
    i64 inner;
    float scale;  // 1 for sum, 1/count for the last step of a mean
    u32 pad;
};
static_assert(sizeof(SumParams) == 48, "SumParams must match its Rust mirror");

// out[o, i] = scale · Σ_j x[o, j, i]
extern "C" __global__ void sum_dim_v1_thread_per_output(const SumParams p) {
    GRID_STRIDE_LOOP(k, p.outer * p.inner) {
        i64 o = k / p.inner, i = k % p.inner;
        const float* column = p.x + o * p.n * p.inner + i;
        double acc = 0.0;
        for (i64 j = 0; j < p.n; ++j) acc += (double)column[j * p.inner];
        p.out[k] = (float)acc * p.scale;
    }
}

// out[o] = scale · Σ_j x[o, j]   (inner == 1; one block per row, blockDim.x a multiple of 32)
extern "C" __global__ void sum_rows_v2_block(const SumParams p) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < p.outer; row += gridDim.x) {
        const float* x = p.x + row * p.n;
        float partial = 0.0f;
        for (i64 j = threadIdx.x; j < p.n; j += blockDim.x) partial += x[j];
        float total = block_sum(partial, scratch);
        if (threadIdx.x == 0) p.out[row] = total * p.scale;
    }
}

// Mirrors MaxParams in src/ops/reduce/cuda.rs.
struct MaxParams {
    const float* x;
    float* values;
    u32* indices;
    i64 outer;
    i64 n;
    i64 inner;
};
static_assert(sizeof(MaxParams) == 48, "MaxParams must match its Rust mirror");

// values[o, i] = max_j x[o, j, i], indices[o, i] = the first such j.
// NaN propagates (the first NaN wins), exactly as the CPU reference.
extern "C" __global__ void max_dim(const MaxParams p) {
    GRID_STRIDE_LOOP(k, p.outer * p.inner) {
        i64 o = k / p.inner, i = k % p.inner;
        const float* column = p.x + o * p.n * p.inner + i;
        float best = column[0];
        u32 best_j = 0;
        for (i64 j = 1; j < p.n; ++j) {
            float v = column[j * p.inner];
            bool v_nan = v != v, best_nan = best != best;
            if (v > best || (v_nan && !best_nan)) {
                best = v;
                best_j = (u32)j;
            }
        }
        p.values[k] = best;
        p.indices[k] = best_j;
    }
}

// Mirrors MaxBackwardParams in src/ops/reduce/cuda.rs.
struct MaxBackwardParams {
    const float* dy;
    const u32* argmax;
    float* dx;
    i64 outer;
    i64 n;
    i64 inner;
};
static_assert(sizeof(MaxBackwardParams) == 48, "MaxBackwardParams must match its Rust mirror");

// dx[o, j, i] = (j == argmax[o, i]) ? dy[o, i] : 0; one thread per dx element,
// so dx needs no zero fill and no atomics.
extern "C" __global__ void max_backward(const MaxBackwardParams p) {
    GRID_STRIDE_LOOP(k, p.outer * p.n * p.inner) {
        i64 i = k % p.inner;
        i64 j = (k / p.inner) % p.n;
        i64 o = k / (p.n * p.inner);
        i64 out = o * p.inner + i;
        p.dx[k] = ((i64)p.argmax[out] == j) ? p.dy[out] : 0.0f;
    }
}
