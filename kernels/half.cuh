// 16-bit floats in kernels. Tensors of bf16 or f16 arrive as raw 16-bit
// patterns (u16); values are widened to f32 for every arithmetic step and
// rounded back once, with integer arithmetic that gives the same bits as
// the CPU's conversions (the `half` crate's): round to nearest even, NaN
// kept NaN, overflow to ±∞. No CUDA header is needed (NVRTC may run with no
// include directory), and the emulator compiles this file as it is.
// Include it after common.cuh (headers are inlined one level deep).
#pragma once

typedef unsigned short u16;

// The format of a kernel's float data; mirrors float_format in src/cuda/mod.rs.
#define KILN_BF16 0u
#define KILN_F16 1u
#define KILN_F32 2u

// bf16 is the top half of an f32.
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float((u32)h << 16); }

// Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly
// when the dropped half is over one half, or one half with the kept half odd.
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((bits >> 16) | 0x0040u);  // quiet NaN
    return (u16)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000u) << 16;
    u32 exponent = (h >> 10) & 0x1Fu;
    u32 mantissa = h & 0x3FFu;
    if (exponent == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (mantissa << 13));  // ±∞, NaN
    if (exponent == 0u) {
        // Zero or subnormal: mantissa · 2⁻²⁴, exact in f32.
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ u16 f32_to_f16(float x) {
    u32 bits = __float_as_uint(x);
    u32 sign = (bits >> 16) & 0x8000u;
    u32 magnitude = bits & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u) return (u16)(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));  // NaN
    if (magnitude >= 0x477FF000u) return (u16)(sign | 0x7C00u);  // ≥ 65520 rounds to ∞
    if (magnitude >= 0x38800000u) {
        // Normal: rebias the exponent (127 → 15), round the 13 dropped bits.
        u32 rebiased = magnitude - 0x38000000u;
        return (u16)(sign | ((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13));
    }
    if (magnitude < 0x33000000u) return (u16)sign;  // below 2⁻²⁵: zero (2⁻²⁵ itself ties to 0)
    // Subnormal: the 24-bit significand shifted down to units of 2⁻²⁴.
    u32 shift = 126u - (magnitude >> 23);
    u32 significand = (magnitude & 0x7FFFFFu) | 0x800000u;
    u32 kept = significand >> shift;
    u32 dropped = significand & ((1u << shift) - 1u);
    u32 half_unit = 1u << (shift - 1u);
    if (dropped > half_unit || (dropped == half_unit && (kept & 1u))) kept += 1u;
    return (u16)(sign | kept);
}

__device__ __forceinline__ float half_to_f32(u16 h, u32 kind) {
    return kind == KILN_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

__device__ __forceinline__ u16 f32_to_half(float x, u32 kind) {
    return kind == KILN_BF16 ? f32_to_bf16(x) : f32_to_f16(x);
}

// Element i of float data in `format`, as f32: one kernel body serves f32,
// bf16 and f16 tensors (the format is the same for every thread, so the
// branch costs no divergence).
__device__ __forceinline__ float load_f32(const void* data, i64 i, u32 format) {
    if (format == KILN_F32) return static_cast<const float*>(data)[i];
    return half_to_f32(static_cast<const u16*>(data)[i], format);
}

// Stores v as element i of float data in `format`, rounding once.
__device__ __forceinline__ void store_f32(void* data, i64 i, float v, u32 format) {
    if (format == KILN_F32) {
        static_cast<float*>(data)[i] = v;
    } else {
        static_cast<u16*>(data)[i] = f32_to_half(v, format);
    }
}

// Two 16-bit values in one 32-bit register, `low` in the low half (the
// element with the smaller index, as the PTX fragment layouts expect).
__device__ __forceinline__ u32 pack_half2(u16 low, u16 high) { return (u32)low | ((u32)high << 16); }

// D += A·B for one warp-wide m16n8k16 tile on tensor cores: A 16×16 (row),
// B 16×8 (col), 16-bit inputs of `kind`, f32 accumulators. Fragments follow
// the PTX ISA's layout for mma.m16n8k16 with .bf16/.f16 (groupID = lane/4,
// t = lane%4): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
// d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]. The emulator's
// prelude defines the same function for the host.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void mma_m16n8k16(float d[4], const u32 a[4], const u32 b[2], u32 kind) {
#if __CUDA_ARCH__ >= 800
    if (kind == KILN_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#else
    // Tensor cores with bf16 need sm_80; the host never launches this below it.
    __trap();
#endif
}
#endif
