// The tensor-core block tile shared by the 16-bit GEMM (gemm_v4_tensor_core)
// and the 16-bit implicit-GEMM convolution (conv2d_forward_tensor_core):
// a 128-thread block computes a 64×64 tile of C = A·Bᵀ over K-slices of 16.
// Each of its 4 warps owns a 32×32 quarter as 2×4 tiles of
// mma.sync.m16n8k16 (8 tensor-core instructions per slice), fed from shared
// memory in the PTX fragment layout. A kernel stages each slice of A
// (64 rows × 16) and of B (64 columns × 16, stored as rows: Bᵀ) however its
// operand is laid out in memory, then calls tc_multiply_slice; only the
// staging and the final store differ between the GEMM and the convolution.
// Include it after common.cuh and half.cuh.
#pragma once

#define TC_BM 64
#define TC_BN 64
#define TC_BK 16
#define TC_THREADS 128
// Row length of the staged tiles: 8 spare halves keep the fragment reads of
// one warp off a single shared-memory bank.
#define TC_STRIDE (TC_BK + 8)

// Per thread: 2 (m) × 4 (n) mma tiles of 4 f32 accumulators each.
struct TensorCoreAccumulators {
    float d[2][4][4];
};

__device__ __forceinline__ void tc_zero(TensorCoreAccumulators& acc) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc.d[mi][ni][e] = 0.0f;
}

// Stages the 64×16 slice of a row-major-or-not matrix at (row0, k0) into
// tile[row][k], zeros past `rows` × `depth`. Element (row, k) is
// data[row·row_stride + k·k_stride]. Consecutive threads take consecutive
// addresses: along k when k is the contiguous dimension, else along rows.
__device__ __forceinline__ void tc_stage(u16 (*tile)[TC_STRIDE], const u16* data, i64 rows, i64 depth, i64 row0,
                                         i64 k0, i64 row_stride, i64 k_stride) {
    const bool k_contiguous = k_stride == 1;
    for (int e = threadIdx.x; e < TC_BM * TC_BK; e += TC_THREADS) {
        const int r = k_contiguous ? e / TC_BK : e % TC_BM;
        const int q = k_contiguous ? e % TC_BK : e / TC_BM;
        const i64 row = row0 + r, kk = k0 + q;
        tile[r][q] = (row < rows && kk < depth) ? data[row * row_stride + kk * k_stride] : (u16)0;
    }
}

// First row and column of this thread's warp quarter inside the 64×64 tile.
__device__ __forceinline__ int tc_warp_row() { return (threadIdx.x / 32 / 2) * 32; }
__device__ __forceinline__ int tc_warp_col() { return (threadIdx.x / 32 % 2) * 32; }

// acc += a_tile · b_tileᵀ over one staged K-slice (a_tile[row][k], b_tile[col][k]).
__device__ __forceinline__ void tc_multiply_slice(TensorCoreAccumulators& acc, const u16 (*a_tile)[TC_STRIDE],
                                                  const u16 (*b_tile)[TC_STRIDE], u32 kind) {
    const int lane = threadIdx.x % 32;
    const int group = lane / 4, t = lane % 4;
    u32 a_frag[2][4], b_frag[4][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int r = tc_warp_row() + mi * 16 + group;
        a_frag[mi][0] = pack_half2(a_tile[r][2 * t], a_tile[r][2 * t + 1]);
        a_frag[mi][1] = pack_half2(a_tile[r + 8][2 * t], a_tile[r + 8][2 * t + 1]);
        a_frag[mi][2] = pack_half2(a_tile[r][2 * t + 8], a_tile[r][2 * t + 9]);
        a_frag[mi][3] = pack_half2(a_tile[r + 8][2 * t + 8], a_tile[r + 8][2 * t + 9]);
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
        const int j = tc_warp_col() + ni * 8 + group;
        b_frag[ni][0] = pack_half2(b_tile[j][2 * t], b_tile[j][2 * t + 1]);
        b_frag[ni][1] = pack_half2(b_tile[j][2 * t + 8], b_tile[j][2 * t + 9]);
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_m16n8k16(acc.d[mi][ni], a_frag[mi], b_frag[ni], kind);
}

// Where accumulator d[mi][ni][e] lands, given the tile's first row and
// column: d[0..1] is row group, columns 2t and 2t + 1 of its mma tile;
// d[2..3] row group + 8. (Written as one 64-bit sum of the terms: summing
// them in 32 bits first costs v4 a few bytes of register spills.)
__device__ __forceinline__ i64 tc_output_row(i64 row0, int mi, int e) {
    return row0 + (threadIdx.x / 64) * 32 + mi * 16 + (threadIdx.x % 32) / 4 + (e >= 2 ? 8 : 0);
}
__device__ __forceinline__ i64 tc_output_col(i64 col0, int ni, int e) {
    return col0 + (threadIdx.x / 32 % 2) * 32 + ni * 8 + 2 * (threadIdx.x % 4) + (e & 1);
}

// Calls store(i, j, value) for each of this thread's accumulators, with i
// and j its row and column in C (the tile at row0, col0); the caller checks
// the bounds and writes.
template <typename Store>
__device__ __forceinline__ void tc_for_each_output(const TensorCoreAccumulators& acc, i64 row0, i64 col0,
                                                   Store store) {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) store(tc_output_row(row0, mi, e), tc_output_col(col0, ni, e), acc.d[mi][ni][e]);
}
