// Activations and their derivatives, one thread per element (memory-bound).
// The op codes match `Activation` in src/ops/activation/mod.rs. f32, bf16 or
// f16 data (`format`, see half.cuh), computed in f32.
#include "common.cuh"
#include "half.cuh"

// Mirrors PointwiseParams in src/ops/elementwise/cuda.rs (shared with elementwise.cu).
struct PointwiseParams {
    const float* x;
    const float* dy;
    float* out;
    i64 n;
    u32 op;
    float a;   // leaky_relu slope
    float b;
    u32 format;  // KILN_F32, KILN_BF16 or KILN_F16, for x, dy and out
};
static_assert(sizeof(PointwiseParams) == 48, "PointwiseParams must match its Rust mirror");

enum { ACT_RELU = 0, ACT_LEAKY_RELU, ACT_TANH, ACT_SIGMOID, ACT_GELU, ACT_GELU_TANH };

#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f
#define INV_SQRT_2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float activation_value(u32 op, float x, float slope) {
    switch (op) {
        case ACT_RELU: return (x > 0.0f || isnan(x)) ? x : 0.0f;  // NaN stays NaN, as in PyTorch
        case ACT_LEAKY_RELU: return x > 0.0f ? x : x * slope;
        case ACT_TANH: return tanhf(x);
        case ACT_SIGMOID: return sigmoid(x);
        case ACT_GELU: return 0.5f * x * (1.0f + erff(x * INV_SQRT_2));
        default: {  // ACT_GELU_TANH
            float u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
            return 0.5f * x * (1.0f + tanhf(u));
        }
    }
}

__device__ __forceinline__ float activation_derivative(u32 op, float x, float slope) {
    switch (op) {
        case ACT_RELU: return x > 0.0f ? 1.0f : 0.0f;
        case ACT_LEAKY_RELU: return x > 0.0f ? 1.0f : slope;
        case ACT_TANH: { float t = tanhf(x); return 1.0f - t * t; }
        case ACT_SIGMOID: { float s = sigmoid(x); return s * (1.0f - s); }
        case ACT_GELU: {
            float cdf = 0.5f * (1.0f + erff(x * INV_SQRT_2));
            float pdf = expf(-0.5f * x * x) * INV_SQRT_2PI;
            return cdf + x * pdf;
        }
        default: {  // ACT_GELU_TANH
            float t = tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
            return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_CUBIC * x * x);
        }
    }
}

extern "C" __global__ void activation_forward(const PointwiseParams p) {
    GRID_STRIDE_LOOP(i, p.n) store_f32(p.out, i, activation_value(p.op, load_f32(p.x, i, p.format), p.a), p.format);
}

extern "C" __global__ void activation_backward(const PointwiseParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        const float dx = load_f32(p.dy, i, p.format) * activation_derivative(p.op, load_f32(p.x, i, p.format), p.a);
        store_f32(p.out, i, dx, p.format);
    }
}
