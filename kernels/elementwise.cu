// Elementwise arithmetic: broadcast binary ops and pointwise maps with their
// derivatives. One thread per output element, grid-stride loops; these are
// memory-bound, so the only goal is to read each input once and write once.
// Every kernel takes f32, bf16 or f16 data (`format`, see half.cuh) and
// computes in f32.
#include "common.cuh"
#include "half.cuh"

// ---- binary: out = a (op) b, with broadcasting --------------------------------
// Mirrors BinaryParams in src/ops/elementwise/cuda.rs.
struct BinaryParams {
    const float* a;
    const float* b;
    float* out;
    i64 n;            // output elements
    u32 op;           // 0 add, 1 sub, 2 mul, 3 div
    u32 same_shape;   // 1: a, b and out share one shape (no index arithmetic)
    Strides6 a_index; // output dims + a's strides (0 on broadcast dims)
    Strides6 b_index;
    u32 format;       // KILN_F32, KILN_BF16 or KILN_F16, for a, b and out
    u32 pad;
};
static_assert(sizeof(BinaryParams) == 240, "BinaryParams must match its Rust mirror");

__device__ __forceinline__ float binary_apply(u32 op, float x, float y) {
    switch (op) {
        case 0: return x + y;
        case 1: return x - y;
        case 2: return x * y;
        default: return x / y;
    }
}

extern "C" __global__ void binary_forward(const BinaryParams p) {
    if (p.same_shape) {
        GRID_STRIDE_LOOP(i, p.n) {
            store_f32(p.out, i, binary_apply(p.op, load_f32(p.a, i, p.format), load_f32(p.b, i, p.format)), p.format);
        }
    } else {
        GRID_STRIDE_LOOP(i, p.n) {
            float x = load_f32(p.a, broadcast_offset(i, p.a_index), p.format);
            float y = load_f32(p.b, broadcast_offset(i, p.b_index), p.format);
            store_f32(p.out, i, binary_apply(p.op, x, y), p.format);
        }
    }
}

// ---- pointwise maps: y = f(x) and dx = dy * f'(x) --------------------------------
// Mirrors PointwiseParams in src/ops/elementwise/cuda.rs.
struct PointwiseParams {
    const float* x;
    const float* dy;  // backward only
    float* out;
    i64 n;
    u32 op;           // see UNARY_* below
    float a;          // op parameter (exponent, scalar, clamp min)
    float b;          // second parameter (clamp max)
    u32 format;       // KILN_F32, KILN_BF16 or KILN_F16, for x, dy and out
};
static_assert(sizeof(PointwiseParams) == 48, "PointwiseParams must match its Rust mirror");

enum { UNARY_NEG = 0, UNARY_EXP, UNARY_LOG, UNARY_SQRT, UNARY_POWF, UNARY_CLAMP, UNARY_ADD_SCALAR, UNARY_MUL_SCALAR };

__device__ __forceinline__ float unary_value(u32 op, float x, float a, float b) {
    switch (op) {
        case UNARY_NEG: return -x;
        case UNARY_EXP: return expf(x);
        case UNARY_LOG: return logf(x);
        case UNARY_SQRT: return sqrtf(x);
        case UNARY_POWF: return powf(x, a);
        case UNARY_CLAMP: return isnan(x) ? x : fminf(fmaxf(x, a), b);  // min > max gives max, NaN stays NaN, as in PyTorch
        case UNARY_ADD_SCALAR: return x + a;
        default: return x * a;  // UNARY_MUL_SCALAR
    }
}

__device__ __forceinline__ float unary_derivative(u32 op, float x, float a, float b) {
    switch (op) {
        case UNARY_NEG: return -1.0f;
        case UNARY_EXP: return expf(x);
        case UNARY_LOG: return 1.0f / x;
        case UNARY_SQRT: return 0.5f / sqrtf(x);
        case UNARY_POWF: return a * powf(x, a - 1.0f);
        case UNARY_CLAMP: return (x >= a && x <= b) ? 1.0f : 0.0f;
        case UNARY_ADD_SCALAR: return 1.0f;
        default: return a;  // UNARY_MUL_SCALAR
    }
}

extern "C" __global__ void unary_forward(const PointwiseParams p) {
    GRID_STRIDE_LOOP(i, p.n) store_f32(p.out, i, unary_value(p.op, load_f32(p.x, i, p.format), p.a, p.b), p.format);
}

extern "C" __global__ void unary_backward(const PointwiseParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        const float dx = load_f32(p.dy, i, p.format) * unary_derivative(p.op, load_f32(p.x, i, p.format), p.a, p.b);
        store_f32(p.out, i, dx, p.format);
    }
}
