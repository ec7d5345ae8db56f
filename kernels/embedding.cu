// Indexing: index_select (embedding is index_select along dim 0 of the
// table), PyTorch's gather, their scatter-add backwards, and a range check
// of index values. Forward kernels copy 32-bit words (f32 values and u32
// indices alike), one thread per output element. Backward kernels scatter
// one thread per dL/dy element into a zeroed dL/dx with atomicAdd on float,
// since repeated indices make several threads hit the same address (so the
// summation order, and the last bits of a repeated row, may vary per run).
#include "common.cuh"

// Mirrors IndexCheckParams in src/ops/embedding/cuda.rs.
struct IndexCheckParams {
    const u32* indices;
    u32* error_flag;  // one zeroed u32; set to 1 if any index is >= bound
    i64 n;
    i64 bound;
};
static_assert(sizeof(IndexCheckParams) == 32, "IndexCheckParams must match its Rust mirror");

// The host reads one flag instead of copying every index back.
extern "C" __global__ void check_index_range(const IndexCheckParams p) {
    GRID_STRIDE_LOOP(i, p.n) {
        if ((i64)p.indices[i] >= p.bound) atomicOr(p.error_flag, 1u);
    }
}

// Mirrors IndexSelectParams in src/ops/embedding/cuda.rs.
struct IndexSelectParams {
    const u32* src;      // viewed as [outer, dim_size, inner]
    const u32* indices;  // [picked], each < dim_size (checked before launch)
    u32* out;            // [outer, picked, inner]
    i64 outer;
    i64 dim_size;
    i64 inner;
    i64 picked;
};
static_assert(sizeof(IndexSelectParams) == 56, "IndexSelectParams must match its Rust mirror");

// out[o, j, i] = src[o, indices[j], i]
extern "C" __global__ void index_select(const IndexSelectParams p) {
    GRID_STRIDE_LOOP(k, p.outer * p.picked * p.inner) {
        i64 i = k % p.inner;
        i64 j = (k / p.inner) % p.picked;
        i64 o = k / (p.picked * p.inner);
        p.out[k] = p.src[(o * p.dim_size + (i64)p.indices[j]) * p.inner + i];
    }
}

// Mirrors IndexAddParams in src/ops/embedding/cuda.rs.
struct IndexAddParams {
    const float* dy;     // [outer, picked, inner]
    const u32* indices;  // [picked]
    float* dx;           // [outer, dim_size, inner], zeroed before launch
    i64 outer;
    i64 dim_size;
    i64 inner;
    i64 picked;
    i64 skipped_index;   // entries of this index get no gradient; -1: none
};
static_assert(sizeof(IndexAddParams) == 64, "IndexAddParams must match its Rust mirror");

// dx[o, indices[j], i] += dy[o, j, i] for indices[j] != skipped_index
// (embedding's padding_idx, whose row of dx stays zero)
extern "C" __global__ void index_add(const IndexAddParams p) {
    GRID_STRIDE_LOOP(k, p.outer * p.picked * p.inner) {
        i64 i = k % p.inner;
        i64 j = (k / p.inner) % p.picked;
        i64 o = k / (p.picked * p.inner);
        i64 index = (i64)p.indices[j];
        if (index != p.skipped_index) atomicAdd(&p.dx[(o * p.dim_size + index) * p.inner + i], p.dy[k]);
    }
}

// Mirrors GatherParams in src/ops/embedding/cuda.rs. `layout.dims` are the
// index's dims and `layout.strides` the source's strides, both padded in
// front to 6 dims; `dim` is the gathered dim in that padded numbering.
struct GatherParams {
    const u32* src;
    const u32* index;
    u32* out;           // the shape of index
    i64 n;              // elements of index
    i64 dim;
    Strides6 layout;
};
static_assert(sizeof(GatherParams) == 136, "GatherParams must match its Rust mirror");

// The source offset element k of index reads: k's own coordinates, except
// index[k] along dim.
__device__ __forceinline__ i64 gather_source_offset(i64 k, u32 position, i64 dim, const Strides6& s) {
    i64 rest = k, offset = 0;
    for (int d = KILN_MAX_DIMS - 1; d >= 0; --d) {
        i64 coord = rest % s.dims[d];
        rest /= s.dims[d];
        if (d == dim) coord = (i64)position;
        offset += coord * s.strides[d];
    }
    return offset;
}

// out[k] = src[source_offset(k)]
extern "C" __global__ void gather(const GatherParams p) {
    GRID_STRIDE_LOOP(k, p.n) p.out[k] = p.src[gather_source_offset(k, p.index[k], p.dim, p.layout)];
}

// Mirrors ScatterAddParams in src/ops/embedding/cuda.rs (layout as GatherParams).
struct ScatterAddParams {
    const float* dy;    // the shape of index
    const u32* index;
    float* dx;          // the source's shape, zeroed before launch
    i64 n;
    i64 dim;
    Strides6 layout;
};
static_assert(sizeof(ScatterAddParams) == 136, "ScatterAddParams must match its Rust mirror");

// dx[source_offset(k)] += dy[k]
extern "C" __global__ void scatter_add(const ScatterAddParams p) {
    GRID_STRIDE_LOOP(k, p.n) atomicAdd(&p.dx[gather_source_offset(k, p.index[k], p.dim, p.layout)], p.dy[k]);
}
