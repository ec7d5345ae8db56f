// Fused optimizer updates and the gradient norm for clipping.
// `sgd_update` and `adam_update` mirror the CPU kernels of the same names in
// src/optim/cpu.rs operation for operation (`adam_update` given a
// max_exp_avg_sq buffer mirrors `adam_amsgrad_update`): one thread per
// element reads the parameter, its gradient and its state once and writes
// parameter and state back in place (memory-bound, so one pass is the whole
// cost). Every scalar that depends only on the step (bias corrections,
// lr·wd, 1 − β) is computed on the host in f64 and arrives here rounded to
// f32, as the CPU kernel rounds it. (NVRTC may contract a·b + c into one
// fused multiply-add, so results can differ from the CPU in the last bit.)
// `sum_of_squares_partials` + `finish_sum_of_squares` give Σ g² over many
// gradients deterministically: each gradient gets a fixed number of blocks
// that write double partial sums side by side in one buffer, then one block
// adds them all in a fixed order; the host reads that one number back.
// Both updates can also write the parameter's 16-bit forward copy in the
// same pass (src/optim/forward_copy.rs): rounded to nearest even, or
// stochastically with the CPU's hash of (stream, element index).
#include "common.cuh"
#include "half.cuh"

// ---- forward copies --------------------------------------------------------------------------
// The copy modes; mirror CopyFormat::mode in src/optim/forward_copy.rs.
#define COPY_NONE 0u
#define COPY_BF16_NEAREST 1u
#define COPY_F16_NEAREST 2u
#define COPY_BF16_STOCHASTIC 3u

// Wellons' lowbias32 integer hash, as forward_copy.rs's mix32.
__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

// The 16 bits of the copy of updated value x, element i, in `mode`.
// Stochastic: the random low 16 bits are added to the dropped half of x's
// magnitude, carrying into the kept half with probability dropped / 2¹⁶.
__device__ __forceinline__ u16 forward_copy_bits(float x, u32 mode, u32 stream, i64 i) {
    if (mode == COPY_F16_NEAREST) return f32_to_f16(x);
    u32 bits = __float_as_uint(x);
    if (mode == COPY_BF16_NEAREST || (bits & 0x7FFFFFFFu) >= 0x7F800000u) return f32_to_bf16(x);
    u32 random = mix32(stream ^ ((u32)i * 0x9E3779B9u));
    return (u16)((bits + (random & 0xFFFFu)) >> 16);
}

// ---- SGD --------------------------------------------------------------------------------
// Mirrors SgdParams in src/optim/cuda.rs.
struct SgdParams {
    float* param;
    const float* grad;
    float* momentum_buffer;     // null without momentum
    i64 n;
    float lr;
    float weight_decay;
    float momentum;
    float one_minus_dampening;
    u32 apply_weight_decay;     // weight_decay != 0
    u32 first_step;             // the buffer is set to d instead of updated
    u32 nesterov;
    u32 copy_mode;              // COPY_*: whether and how the forward copy is written
    u16* copy;                  // the forward copy; null without one
    u32 copy_stream;            // the random stream of stochastic rounding
    u32 maximize;               // ascend: g = −g before everything else
};
static_assert(sizeof(SgdParams) == 80, "SgdParams must match its Rust mirror");

// g = −g (maximize); d = g + wd·p; buf = d (first step) or μ·buf + (1 − dampening)·d;
// d = d + μ·buf (Nesterov) or buf; p = p − lr·d.
extern "C" __global__ void sgd_update(const SgdParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        float param = p.param[i];
        float d = p.maximize ? -p.grad[i] : p.grad[i];
        if (p.apply_weight_decay) d = d + p.weight_decay * param;
        if (p.momentum_buffer) {
            float buf = p.first_step ? d : p.momentum_buffer[i] * p.momentum + p.one_minus_dampening * d;
            p.momentum_buffer[i] = buf;
            d = p.nesterov ? d + p.momentum * buf : buf;
        }
        float updated = param - p.lr * d;
        p.param[i] = updated;
        if (p.copy_mode != COPY_NONE) p.copy[i] = forward_copy_bits(updated, p.copy_mode, p.copy_stream, i);
    }
}

// ---- Adam / AdamW -------------------------------------------------------------------------
// Mirrors AdamParams in src/optim/cuda.rs.
struct AdamParams {
    float* param;
    const float* grad;
    float* exp_avg;
    float* exp_avg_sq;
    float* max_exp_avg_sq;         // AMSGrad's max of exp_avg_sq; null without amsgrad
    i64 n;
    float weight_decay;
    float decay_factor;            // 1 − lr·wd (AdamW)
    float one_minus_beta1;
    float beta2;
    float one_minus_beta2;
    float neg_step_size;           // −lr / (1 − β1ᵗ)
    float bias_correction2_sqrt;   // √(1 − β2ᵗ)
    float eps;
    u32 apply_weight_decay;        // weight_decay != 0
    u32 decoupled_weight_decay;    // AdamW: p·(1 − lr·wd) instead of g + wd·p
    u16* copy;                     // the forward copy; null without one
    u32 copy_mode;                 // COPY_*
    u32 copy_stream;               // the random stream of stochastic rounding
    u32 maximize;                  // ascend: g = −g before everything else
    u32 pad;
};
static_assert(sizeof(AdamParams) == 112, "AdamParams must match its Rust mirror");

// g = −g (maximize); (Adam) g = g + wd·p, or (AdamW) p = p·(1 − lr·wd);
// m = lerp(m, g, 1 − β1); v = β2·v + (1 − β2)·g²;
// AMSGrad: v_max = max(v_max, v) (NaN propagating, as torch.maximum), which replaces v below;
// p = p − step_size · m / (√v / √(1 − β2ᵗ) + eps).
extern "C" __global__ void adam_update(const AdamParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        float param = p.param[i];
        float g = p.maximize ? -p.grad[i] : p.grad[i];
        if (p.apply_weight_decay) {
            if (p.decoupled_weight_decay) {
                param = param * p.decay_factor;
            } else {
                g = g + p.weight_decay * param;
            }
        }
        float m = p.exp_avg[i];
        // PyTorch's lerp, which picks the form that is exact at its nearer end.
        m = p.one_minus_beta1 < 0.5f ? m + p.one_minus_beta1 * (g - m)
                                     : g - (g - m) * (1.0f - p.one_minus_beta1);
        float v = p.exp_avg_sq[i] * p.beta2 + p.one_minus_beta2 * g * g;
        float second_moment = v;
        if (p.max_exp_avg_sq) {
            float v_max = p.max_exp_avg_sq[i];
            if (v > v_max || isnan(v)) v_max = v;
            p.max_exp_avg_sq[i] = v_max;
            second_moment = v_max;
        }
        float denom = sqrtf(second_moment) / p.bias_correction2_sqrt + p.eps;
        p.exp_avg[i] = m;
        p.exp_avg_sq[i] = v;
        float updated = param + p.neg_step_size * m / denom;
        p.param[i] = updated;
        if (p.copy_mode != COPY_NONE) p.copy[i] = forward_copy_bits(updated, p.copy_mode, p.copy_stream, i);
    }
}

// ---- Σ g² for clip_grad_norm ---------------------------------------------------------------
// Mirrors SumOfSquaresParams in src/optim/cuda.rs.
struct SumOfSquaresParams {
    const float* x;
    double* partials;   // this gradient's slice of the shared buffer, one per block
    i64 n;
};
static_assert(sizeof(SumOfSquaresParams) == 24, "SumOfSquaresParams must match its Rust mirror");

// partials[block] = Σ x² over the block's grid-stride elements, in double as on the CPU.
extern "C" __global__ void sum_of_squares_partials(const SumOfSquaresParams p) {
    __shared__ double scratch[32];
    double total = 0.0;
    GRID_STRIDE_LOOP(i, p.n) {
        double x = (double)p.x[i];
        total += x * x;
    }
    total = block_sum_double(total, scratch);
    if (threadIdx.x == 0) p.partials[blockIdx.x] = total;
}

// Mirrors FinishSumOfSquaresParams in src/optim/cuda.rs.
struct FinishSumOfSquaresParams {
    const double* partials;
    double* total;      // one value
    i64 count;
};
static_assert(sizeof(FinishSumOfSquaresParams) == 24, "FinishSumOfSquaresParams must match its Rust mirror");

// One block: total = Σ partials, each thread summing a fixed stride.
extern "C" __global__ void finish_sum_of_squares(const FinishSumOfSquaresParams p) {
    __shared__ double scratch[32];
    double total = 0.0;
    for (i64 i = threadIdx.x; i < p.count; i += blockDim.x) total += p.partials[i];
    total = block_sum_double(total, scratch);
    if (threadIdx.x == 0) p.total[0] = total;
}

// ---- GradScaler's unscale ------------------------------------------------------------------
// Mirrors UnscaleParams in src/optim/cuda.rs.
struct UnscaleParams {
    const float* grad;
    float* out;
    unsigned int* found_non_finite;   // one flag shared by every gradient of the step
    i64 n;
    float inv_scale;
    unsigned int pad;
};
static_assert(sizeof(UnscaleParams) == 40, "UnscaleParams must match its Rust mirror");

// out = grad · (1/scale), and the flag set if any result is Inf or NaN: one
// read and one write per element. Every writer stores the same 1, so the
// race between them is harmless and no atomic is needed.
extern "C" __global__ void unscale_and_check_finite(const UnscaleParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        float g = p.grad[i] * p.inv_scale;
        p.out[i] = g;
        if (!isfinite(g)) *p.found_non_finite = 1u;
    }
}
