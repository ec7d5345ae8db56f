// Shape copies: permute and broadcast_to (one strided gather), narrow and cat.
// These ops move values and never compute with them, so every kernel copies
// elements of `elem_bytes` bytes unchanged: 4 for f32 values and u32 indices,
// 2 for bf16 and f16. One thread per output
// element, grid-stride; each writes one contiguous output element, so stores
// always coalesce and only the gathers' loads may be scattered.
// convert_dtype is to_dtype between f32 and the 16-bit formats.
#include "common.cuh"
#include "half.cuh"

// Mirrors StridedGatherParams in src/ops/shape/cuda.rs.
struct StridedGatherParams {
    const void* src;
    void* out;
    i64 n;              // output elements
    Strides6 index;     // output dims + the source stride of each output dim
    u32 elem_bytes;     // 4 or 2
    u32 pad;
};
static_assert(sizeof(StridedGatherParams) == 128, "StridedGatherParams must match its Rust mirror");

// dst[to] = src[from] for elements of `bytes` bytes (4 or 2).
__device__ __forceinline__ void copy_element(void* dst, i64 to, const void* src, i64 from, u32 bytes) {
    if (bytes == 4) {
        static_cast<u32*>(dst)[to] = static_cast<const u32*>(src)[from];
    } else {
        static_cast<u16*>(dst)[to] = static_cast<const u16*>(src)[from];
    }
}

// out[i] = src[Σ_d coord_d(i) · stride_d]. permute: stride_d is the source
// stride of dim perm[d]; broadcast_to: 0 on repeated dims.
extern "C" __global__ void strided_gather(const StridedGatherParams p) {
    GRID_STRIDE_LOOP(i, p.n) copy_element(p.out, i, p.src, broadcast_offset(i, p.index), p.elem_bytes);
}

// Mirrors SliceCopyParams in src/ops/shape/cuda.rs.
struct SliceCopyParams {
    const void* src;
    void* dst;
    i64 outer;
    i64 len;        // entries along the middle dim that are copied
    i64 inner;
    i64 src_dim;    // size of the middle dim in src
    i64 src_start;  // first copied entry along src's middle dim
    i64 dst_dim;    // size of the middle dim in dst
    i64 dst_start;  // where the copied entries land along dst's middle dim
    u32 elem_bytes; // 4 or 2
    u32 pad;
};
static_assert(sizeof(SliceCopyParams) == 80, "SliceCopyParams must match its Rust mirror");

// dst[o, dst_start + j, i] = src[o, src_start + j, i] for j < len.
// narrow: src is the input, dst the (whole) output (dst_start 0, dst_dim len).
// cat: one launch per part, src the whole part (src_start 0, src_dim len),
// dst the output at the part's offset.
extern "C" __global__ void slice_copy(const SliceCopyParams p) {
    i64 block = p.len * p.inner;  // contiguous run per outer index
    GRID_STRIDE_LOOP(k, p.outer * block) {
        i64 o = k / block, r = k % block;
        copy_element(p.dst, (o * p.dst_dim + p.dst_start) * p.inner + r, p.src,
                     (o * p.src_dim + p.src_start) * p.inner + r, p.elem_bytes);
    }
}

// ---- to_dtype: f32 <-> bf16/f16 --------------------------------------------
// Mirrors ConvertParams in src/ops/shape/cuda.rs.
struct ConvertParams {
    const void* src;
    void* out;
    i64 n;
    u32 kind;     // KILN_BF16 or KILN_F16: the 16-bit side's format
    u32 narrow;   // 1: f32 -> 16-bit (round to nearest even); 0: 16-bit -> f32 (exact)
};
static_assert(sizeof(ConvertParams) == 32, "ConvertParams must match its Rust mirror");

extern "C" __global__ void convert_dtype(const ConvertParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        if (p.narrow) {
            static_cast<u16*>(p.out)[i] = f32_to_half(static_cast<const float*>(p.src)[i], p.kind);
        } else {
            static_cast<float*>(p.out)[i] = half_to_f32(static_cast<const u16*>(p.src)[i], p.kind);
        }
    }
}
