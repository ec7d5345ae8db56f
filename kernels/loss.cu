// Fused losses: mse, binary cross entropy on logits, cross entropy on class
// targets, and the Gaussian KL term of a VAE. Each forward reduces a whole
// tensor to one number in two launches, with no float atomics, so the result
// is the same on every run:
//   1. `*_partials`: a grid whose size depends only on the element count;
//      each thread sums its grid-stride elements in double (as the CPU
//      reference sums in f64), each block writes one partial sum;
//   2. `finish_sum`: one block adds the partials in a fixed order and writes
//      total · scale as the rank-0 f32 loss.
// Cross entropy replaces step 1 by one block per row (max, then Σ e^(x − max)
// over the row's classes) and keeps each row's logsumexp for the backward.
// Every kernel reads its inputs once; the backward kernels are one thread per
// element. They read dL/d(loss) from device memory (`upstream`, the rank-0
// gradient), so a backward pass never waits for a copy to the host.
// Target checks (class targets below C) run inside the forward kernels and
// raise a flag in a one-word device buffer; the host reads that word once
// after the launch and, only if it is set, looks for the first bad value to
// report it exactly as the CPU path does. Binary cross entropy takes any real
// target, as PyTorch's does.
// The loss options (no reduction, class weights, ignore_index, label
// smoothing, bce weights) are compositions of differentiable ops, each of
// which runs on the device; two kernels here serve them: the unreduced bce
// terms (with their backward) and the preparation of class targets (ignored
// ones masked).
#include "common.cuh"

// dL/d(loss) · scale in double; each kernel rounds its own factor of it to
// f32 once, exactly as the CPU backward rounds its f64 scale.
__device__ __forceinline__ double upstream_scale(const float* upstream, double scale) {
    return (double)upstream[0] * scale;
}

// ---- elementwise losses: partial sums -----------------------------------------
// Mirrors LossPartialsParams in src/ops/loss/cuda.rs.
struct LossPartialsParams {
    const float* x;     // input (mse, bce) or mu (gaussian_kl)
    const float* y;     // target (mse, bce) or logvar (gaussian_kl)
    double* partials;   // one per block
    i64 n;
};
static_assert(sizeof(LossPartialsParams) == 32, "LossPartialsParams must match its Rust mirror");

// Σ (x − y)², the difference taken in f32 as on the CPU.
extern "C" __global__ void mse_partials(const LossPartialsParams p) {
    __shared__ double scratch[32];
    double total = 0.0;
    GRID_STRIDE_LOOP(i, p.n) {
        double d = (double)(p.x[i] - p.y[i]);
        total += d * d;
    }
    total = block_sum_double(total, scratch);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
}

// Σ max(x, 0) − x·y + ln(1 + e^(−|x|)) in double, for any real target y.
extern "C" __global__ void bce_with_logits_partials(const LossPartialsParams p) {
    __shared__ double scratch[32];
    double total = 0.0;
    GRID_STRIDE_LOOP(i, p.n) {
        double x = (double)p.x[i], y = (double)p.y[i];
        total += fmax(x, 0.0) - x * y + log1p(exp(-fabs(x)));
    }
    total = block_sum_double(total, scratch);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
}

// Σ −½(1 + logvar − mu² − e^logvar) in double.
extern "C" __global__ void gaussian_kl_partials(const LossPartialsParams p) {
    __shared__ double scratch[32];
    double total = 0.0;
    GRID_STRIDE_LOOP(i, p.n) {
        double mu = (double)p.x[i], logvar = (double)p.y[i];
        total += -0.5 * (1.0 + logvar - mu * mu - exp(logvar));
    }
    total = block_sum_double(total, scratch);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
}

// ---- cross entropy: one block per row -------------------------------------------
// Mirrors CrossEntropyForwardParams in src/ops/loss/cuda.rs.
struct CrossEntropyForwardParams {
    const float* logits;    // [rows, classes]
    const u32* targets;     // [rows]
    float* row_logsumexp;   // [rows], kept for the backward
    double* row_loss;       // [rows]: logsumexp(x_n) − x_n[t_n]
    u32* error_flag;        // set to 1 if a target is ≥ classes
    i64 rows;
    i64 classes;
};
static_assert(sizeof(CrossEntropyForwardParams) == 56, "CrossEntropyForwardParams must match its Rust mirror");

// Block n: m = max_c x[n, c]; lse = m + ln Σ_c e^(x[n, c] − m) (the sum in
// double, as on the CPU); row_loss[n] = lse − x[n, t_n].
extern "C" __global__ void cross_entropy_rows(const CrossEntropyForwardParams p) {
    __shared__ float max_scratch[32];
    __shared__ double sum_scratch[32];
    i64 n = blockIdx.x;
    const float* row = p.logits + n * p.classes;
    float row_max = -KILN_INFINITY;
    for (i64 c = threadIdx.x; c < p.classes; c += blockDim.x) row_max = fmaxf(row_max, row[c]);
    row_max = block_max(row_max, max_scratch);
    double sum = 0.0;
    for (i64 c = threadIdx.x; c < p.classes; c += blockDim.x) sum += (double)expf(row[c] - row_max);
    sum = block_sum_double(sum, sum_scratch);
    if (threadIdx.x == 0) {
        float lse = row_max + (float)log(sum);
        u32 target = p.targets[n];
        p.row_logsumexp[n] = lse;
        if (target >= p.classes) {
            atomicOr(p.error_flag, 1u);
            p.row_loss[n] = 0.0;
        } else {
            p.row_loss[n] = (double)(lse - row[target]);
        }
    }
}

// ---- the second reduction ------------------------------------------------------------
// Mirrors FinishSumParams in src/ops/loss/cuda.rs.
struct FinishSumParams {
    const double* partials;
    float* out;             // rank 0
    i64 count;
    double scale;           // 1/count of the mean, or 1
};
static_assert(sizeof(FinishSumParams) == 32, "FinishSumParams must match its Rust mirror");

// One block: out = scale · Σ partials, each thread summing a fixed stride.
extern "C" __global__ void finish_sum(const FinishSumParams p) {
    __shared__ double scratch[32];
    double total = 0.0;
    for (i64 i = threadIdx.x; i < p.count; i += blockDim.x) total += p.partials[i];
    total = block_sum_double(total, scratch);
    if (threadIdx.x == 0) p.out[0] = (float)(total * p.scale);
}

// ---- elementwise backward -----------------------------------------------------------
// Mirrors LossBackwardParams in src/ops/loss/cuda.rs.
struct LossBackwardParams {
    const float* x;
    const float* y;         // unused by the kernels of one input
    const float* upstream;  // dL/d(loss), rank 0
    float* out;
    i64 n;
    double scale;           // 1/count of the mean, or 1
};
static_assert(sizeof(LossBackwardParams) == 48, "LossBackwardParams must match its Rust mirror");

// dL/dx = 2(x − y) · g · scale
extern "C" __global__ void mse_backward(const LossBackwardParams p) {
    float two_scale = (float)(2.0 * upstream_scale(p.upstream, p.scale));
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = (p.x[i] - p.y[i]) * two_scale;
}

// dL/dx = (σ(x) − y) · g · scale
extern "C" __global__ void bce_with_logits_backward_input(const LossBackwardParams p) {
    float s = (float)upstream_scale(p.upstream, p.scale);
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = (sigmoid(p.x[i]) - p.y[i]) * s;
}

// dL/dy = −x · g · scale
extern "C" __global__ void bce_with_logits_backward_target(const LossBackwardParams p) {
    float neg_s = (float)(-upstream_scale(p.upstream, p.scale));
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = p.x[i] * neg_s;
}

// dL/dmu = mu · g · scale
extern "C" __global__ void gaussian_kl_backward_mu(const LossBackwardParams p) {
    float s = (float)upstream_scale(p.upstream, p.scale);
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = p.x[i] * s;
}

// dL/dlogvar = ½(e^logvar − 1) · g · scale
extern "C" __global__ void gaussian_kl_backward_logvar(const LossBackwardParams p) {
    float half_s = (float)(0.5 * upstream_scale(p.upstream, p.scale));
    GRID_STRIDE_LOOP(i, p.n) p.out[i] = (expf(p.x[i]) - 1.0f) * half_s;
}

// ---- cross entropy backward ---------------------------------------------------------
// Mirrors CrossEntropyBackwardParams in src/ops/loss/cuda.rs.
struct CrossEntropyBackwardParams {
    const float* logits;        // [rows, classes]
    const u32* targets;         // [rows], checked by the forward
    const float* row_logsumexp; // [rows], from the forward
    const float* upstream;      // dL/d(loss), rank 0
    float* dx;                  // [rows, classes]
    i64 rows;
    i64 classes;
    double scale;               // 1/rows of the mean, or 1
};
static_assert(sizeof(CrossEntropyBackwardParams) == 64, "CrossEntropyBackwardParams must match its Rust mirror");

// dL/dx[n, c] = (e^(x[n, c] − lse_n) − [c = t_n]) · g · scale, one thread per element.
extern "C" __global__ void cross_entropy_backward(const CrossEntropyBackwardParams p) {
    float s = (float)upstream_scale(p.upstream, p.scale);
    GRID_STRIDE_LOOP(i, p.rows * p.classes) {
        i64 n = i / p.classes, c = i % p.classes;
        float d = expf(p.logits[i] - p.row_logsumexp[n]) * s;
        if (c == (i64)p.targets[n]) d -= s;
        p.dx[i] = d;
    }
}

// ---- unreduced binary cross entropy (weights, pos_weight, no reduction) -----------
// Mirrors BceTermsParams in src/ops/loss/cuda.rs.
struct BceTermsParams {
    const float* x;
    const float* y;
    const float* pos_weight;  // one per element, or null for 1
    const float* upstream;    // backward only: dL/d(term), one per element
    float* out;               // forward: the terms; backward: dL/dx
    float* out_target;        // backward only: dL/dy, or null when y takes no gradient
    i64 n;
};
static_assert(sizeof(BceTermsParams) == 56, "BceTermsParams must match its Rust mirror");

// softplus(−x) = ln(1 + e^(−x)) = max(−x, 0) + ln(1 + e^(−|x|)): no exponential overflows.
__device__ __forceinline__ float softplus_of_negated(float x) {
    return fmaxf(-x, 0.0f) + log1pf(expf(-fabsf(x)));
}

// term = (1 − y)·x + (1 + (pw − 1)·y)·softplus(−x)
//      = −pw·y·ln σ(x) − (1 − y)·ln(1 − σ(x)), for any real y.
extern "C" __global__ void bce_with_logits_terms(const BceTermsParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        float x = p.x[i], y = p.y[i];
        float pw = p.pos_weight ? p.pos_weight[i] : 1.0f;
        p.out[i] = (1.0f - y) * x + (1.0f + (pw - 1.0f) * y) * softplus_of_negated(x);
    }
}

// dL/dx = g·((1 + (pw − 1)·y)·σ(x) − pw·y),  dL/dy = g·((pw − 1)·softplus(−x) − x)
extern "C" __global__ void bce_with_logits_terms_backward(const BceTermsParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        float x = p.x[i], y = p.y[i], g = p.upstream[i];
        float pw = p.pos_weight ? p.pos_weight[i] : 1.0f;
        p.out[i] = g * ((1.0f + (pw - 1.0f) * y) * sigmoid(x) - pw * y);
        if (p.out_target) p.out_target[i] = g * ((pw - 1.0f) * softplus_of_negated(x) - x);
    }
}

// ---- class targets of cross entropy with options ---------------------------------
// Mirrors ClassTargetsParams in src/ops/loss/cuda.rs.
struct ClassTargetsParams {
    const u32* targets;
    u32* safe_targets;   // the targets, with ignored (and out-of-range) ones replaced by class 0
    float* kept;         // 1 where the target counts, 0 where it equals ignore_index
    u32* flags;          // bit 0: a counted target is ≥ classes; bit 1: some target counts
    i64 n;
    i64 classes;
    i64 ignore_index;    // −1 when no class is ignored
};
static_assert(sizeof(ClassTargetsParams) == 56, "ClassTargetsParams must match its Rust mirror");

// One thread per target. An ignored target may be any value (≥ classes
// included, as PyTorch's 255 for segmentation borders); it gathers class 0
// and is masked out by `kept`.
extern "C" __global__ void cross_entropy_class_targets(const ClassTargetsParams p) {
    bool out_of_range = false, any_kept = false;
    GRID_STRIDE_LOOP(i, p.n) {
        u32 t = p.targets[i];
        bool ignored = p.ignore_index >= 0 && (i64)t == p.ignore_index;
        bool bad = !ignored && (i64)t >= p.classes;
        out_of_range |= bad;
        any_kept |= !ignored;
        p.safe_targets[i] = (ignored || bad) ? 0u : t;
        p.kept[i] = ignored ? 0.0f : 1.0f;
    }
    if (out_of_range) atomicOr(p.flags, 1u);
    if (any_kept) atomicOr(p.flags, 2u);
}
