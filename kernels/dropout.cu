// Inverted dropout with a counter-based mask: element i is kept when the
// i-th output of a SplitMix64 stream (keyed by the seed) is at or above an
// integer threshold. The mask is a pure function of (key, i), so it needs no
// storage, the backward pass recomputes it, and it equals the CPU's bit for
// bit (src/ops/dropout/cpu.rs: mix64, random_bits, keep_threshold). One
// thread per element, grid-stride; memory-bound (read x once, write once).
// f32, bf16 or f16 data (`format`, see half.cuh), scaled in f32.
#include "common.cuh"
#include "half.cuh"

// Mirrors DropoutParams in src/ops/dropout/cuda.rs.
struct DropoutParams {
    const void* x;    // x forward, dL/dy backward: the same map
    void* out;
    i64 n;
    u64 key;          // stream_key(seed), hashed on the host
    u64 threshold;    // keep when the 53 random bits are >= this
    float scale;      // 1 / (1 - p), rounded to f32 as the CPU does
    u32 format;       // KILN_F32, KILN_BF16 or KILN_F16, for x and out
};
static_assert(sizeof(DropoutParams) == 48, "DropoutParams must match its Rust mirror");

// SplitMix64's increment: 2^64 / golden ratio, odd.
#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull

// SplitMix64's output function (Stafford's Mix13).
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 53 uniform bits for element `index` (unsigned arithmetic wraps mod 2^64).
__device__ __forceinline__ u64 random_bits(u64 key, u64 index) {
    return mix64(key + (index + 1ull) * GOLDEN_GAMMA) >> 11;
}

// out[i] = kept(i) ? x[i] · scale : 0
extern "C" __global__ void dropout_apply(const DropoutParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        bool kept = random_bits(p.key, (u64)i) >= p.threshold;
        store_f32(p.out, i, kept ? load_f32(p.x, i, p.format) * p.scale : 0.0f, p.format);
    }
}
