// Matrix multiply, the kernel ladder: C[b] = op(A[b]) · op(B[b]) in f32,
// row-major, op = transpose or identity, read through strides (no copies).
// A is [batch, M, K] ([batch, K, M] if trans_a), B is [batch, K, N]
// ([batch, N, K] if trans_b), C is [batch, M, N]; the batch is gridDim.z.
// Every version computes the same thing; each rung removes the bottleneck
// of the one before it.
//
// v1 naive: one thread per C element, a K-long dot product straight from
//   global memory. Every element of A is read N times and every element of
//   B M times: 2·M·N·K loads for 2·M·N·K flops, so it is bound by memory
//   (and by the L1/L2 hit rate) at a few percent of peak.
//
// v2 shared-memory tiles: a 32×32 block of threads stages a 32×32 tile of
//   op(A) and of op(B) in shared memory, then every thread runs 32 steps of
//   its dot product from there. Each global load now feeds 32 multiply-adds
//   instead of 1, so global traffic falls 32×. Loads are arranged so
//   consecutive threads read consecutive addresses whatever the transpose
//   (coalescing). The limit is now shared memory: 2 shared loads per FMA.
//
// v3 register blocking: a 256-thread block computes a 128×128 tile of C
//   over K-slices of 8; each thread keeps an 8×8 micro-tile of C in
//   registers. Per K step a thread reads 8 values of op(A) and 8 of op(B)
//   from shared memory and does 64 FMAs with them (outer product), so
//   shared traffic per FMA drops 8× and global traffic per FMA 128×
//   against v1. Global loads and C stores use float4 (16-byte) accesses
//   when the contiguous dimension is a multiple of 4 and the pointer is
//   16-byte aligned; other shapes and the ragged edges of a tile fall back
//   to bounds-checked scalar accesses, so every shape stays correct.
//
// v4 tensor cores (16-bit operands only: bf16 or f16 in, f32 accumulate,
//   C rounded once to the operands' format): a 128-thread block computes a
//   64×64 tile of C over K-slices of 16; each of its 4 warps owns a 32×32
//   quarter as 2×4 tiles of mma.sync.m16n8k16, 8 tensor-core instructions
//   per slice, fed from shared memory in the PTX fragment layout (the tile
//   lives in tensor_core.cuh: the 16-bit convolution uses it too). Tiles are
//   staged with bounds-checked 16-bit loads (zeros past the ragged edges),
//   arranged so consecutive threads read along whichever dimension is
//   contiguous. Still to come on this rung: ldmatrix, cp.async pipelining,
//   vector loads and larger warp tiles.
//
// Grids: x runs over column tiles of C, y over row tiles, z over the batch.
// y and z are capped at 65 535 by the hardware, so kernels stride over
// row tiles and batch items beyond the grid (a no-op for usual sizes).
#include "common.cuh"
#include "half.cuh"
#include "tensor_core.cuh"

// Mirrors GemmParams in src/ops/gemm/cuda.rs.
struct GemmParams {
    const float* a;
    const float* b;
    float* c;
    i64 batch;
    i64 m;
    i64 n;
    i64 k;
    u32 trans_a;  // 1: A is stored [K, M]
    u32 trans_b;  // 1: B is stored [N, K]
};
static_assert(sizeof(GemmParams) == 64, "GemmParams must match its Rust mirror");

// Element strides of op(A) = M×K and op(B) = K×N inside one batch item:
// op(A)[i, p] = a[i·row + p·col], as GemmDims::a_strides on the CPU.
struct MatrixStrides {
    i64 row;
    i64 col;
};

__device__ __forceinline__ MatrixStrides a_strides(const GemmParams& p) {
    return p.trans_a ? MatrixStrides{1, p.m} : MatrixStrides{p.k, 1};
}

__device__ __forceinline__ MatrixStrides b_strides(const GemmParams& p) {
    return p.trans_b ? MatrixStrides{1, p.k} : MatrixStrides{p.n, 1};
}

// ---- v1: one thread per element of C ---------------------------------------
#define V1_BLOCK 16

extern "C" __launch_bounds__(V1_BLOCK * V1_BLOCK) __global__ void gemm_v1_naive(const GemmParams p) {
    const MatrixStrides as = a_strides(p), bs = b_strides(p);
    // threadIdx.x walks along a row of C, so a warp writes consecutive addresses.
    const i64 j = (i64)blockIdx.x * V1_BLOCK + threadIdx.x;
    for (i64 batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
        const float* a = p.a + batch * p.m * p.k;
        const float* b = p.b + batch * p.k * p.n;
        float* c = p.c + batch * p.m * p.n;
        for (i64 i = (i64)blockIdx.y * V1_BLOCK + threadIdx.y; i < p.m; i += (i64)gridDim.y * V1_BLOCK) {
            if (j >= p.n) continue;
            float acc = 0.0f;
            for (i64 q = 0; q < p.k; ++q) acc += a[i * as.row + q * as.col] * b[q * bs.row + j * bs.col];
            c[i * p.n + j] = acc;
        }
    }
}

// ---- v2: 32×32 shared-memory tiles ------------------------------------------
#define V2_TILE 32

// Element (r, c) of a rows×cols matrix with the given strides, 0 outside it
// (the zero padding of tiles that overhang the matrix).
__device__ __forceinline__ float v2_load(const float* x, MatrixStrides s, i64 rows, i64 cols, i64 r, i64 c) {
    return (r < rows && c < cols) ? x[r * s.row + c * s.col] : 0.0f;
}

extern "C" __launch_bounds__(V2_TILE * V2_TILE) __global__ void gemm_v2_smem_tiled(const GemmParams p) {
    // +1 column: a column-wise store (transposed operand) hits 32 different banks.
    __shared__ float a_tile[V2_TILE][V2_TILE + 1];  // op(A)[row0 + r, k0 + c]
    __shared__ float b_tile[V2_TILE][V2_TILE + 1];  // op(B)[k0 + r, col0 + c]
    const MatrixStrides as = a_strides(p), bs = b_strides(p);
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 col0 = (i64)blockIdx.x * V2_TILE;
    // A warp (fixed ty, tx = 0..31) must read consecutive addresses, so tx runs
    // along whichever tile dimension is contiguous in memory.
    const int a_r = p.trans_a ? tx : ty, a_c = p.trans_a ? ty : tx;
    const int b_r = p.trans_b ? tx : ty, b_c = p.trans_b ? ty : tx;
    for (i64 batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
        const float* a = p.a + batch * p.m * p.k;
        const float* b = p.b + batch * p.k * p.n;
        float* c = p.c + batch * p.m * p.n;
        for (i64 row0 = (i64)blockIdx.y * V2_TILE; row0 < p.m; row0 += (i64)gridDim.y * V2_TILE) {
            float acc = 0.0f;
            for (i64 k0 = 0; k0 < p.k; k0 += V2_TILE) {
                a_tile[a_r][a_c] = v2_load(a, as, p.m, p.k, row0 + a_r, k0 + a_c);
                b_tile[b_r][b_c] = v2_load(b, bs, p.k, p.n, k0 + b_r, col0 + b_c);
                __syncthreads();
                // Zero padding past K makes the full-length loop exact.
#pragma unroll
                for (int q = 0; q < V2_TILE; ++q) acc += a_tile[ty][q] * b_tile[q][tx];
                __syncthreads();
            }
            const i64 i = row0 + ty, j = col0 + tx;
            if (i < p.m && j < p.n) c[i * p.n + j] = acc;
        }
    }
}

// ---- v3: 128×128×8 block tile, 8×8 register micro-tile per thread ------------
#define V3_BM 128
#define V3_BN 128
#define V3_BK 8
#define V3_THREADS 256
// Shared rows are padded by 4 floats (keeps 16-byte alignment) so the
// transposed stores of the load phase spread over all 32 banks.
#define V3_STRIDE (V3_BM + 4)

// A 16×16 grid of threads covers the 128×128 tile. Thread (tx, ty) owns rows
// ty·4 + {0..3} and 64 + ty·4 + {0..3}, and the same pattern of columns with
// tx: its float4 reads of a shared row are then 16 bytes apart from its
// neighbours' (conflict-free) and its float4 stores of C are coalesced.
__device__ __forceinline__ int v3_micro_offset(int thread, int idx) {
    return (idx / 4) * 64 + thread * 4 + (idx % 4);
}

__device__ __forceinline__ bool aligned16(const float* x) {
    return ((u64)x & 15) == 0;
}

// Stages the V3_BK × V3_BM slice op(A)[row0 .. row0+128, k0 .. k0+8] as
// a_tile[q][r] = op(A)[row0 + r, k0 + q] (K-major, so the compute loop reads
// a row of it). Each of the 256 threads moves 4 values, as one float4 when
// the 4 values are contiguous, in range and aligned.
__device__ __forceinline__ void v3_load_a(const GemmParams& p, const float* a, i64 row0, i64 k0, bool vector_ok,
                                          float (*a_tile)[V3_STRIDE]) {
    const int t = threadIdx.x;
    if (!p.trans_a) {
        // A is [M, K]: 4 consecutive q of one row r.
        const int r = t / 2, q0 = (t % 2) * 4;
        const i64 i = row0 + r, kq = k0 + q0;
        float v[4];
        if (vector_ok && i < p.m && kq + 3 < p.k) {
            const float4 x = *reinterpret_cast<const float4*>(a + i * p.k + kq);
            v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] = (i < p.m && kq + e < p.k) ? a[i * p.k + kq + e] : 0.0f;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) a_tile[q0 + e][r] = v[e];
    } else {
        // A is [K, M]: 4 consecutive r of one row q of memory.
        const int q = t / 32, r0 = (t % 32) * 4;
        const i64 kq = k0 + q, i = row0 + r0;
        if (vector_ok && kq < p.k && i + 3 < p.m) {
            *reinterpret_cast<float4*>(&a_tile[q][r0]) = *reinterpret_cast<const float4*>(a + kq * p.m + i);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) a_tile[q][r0 + e] = (kq < p.k && i + e < p.m) ? a[kq * p.m + i + e] : 0.0f;
        }
    }
}

// Stages op(B)[k0 .. k0+8, col0 .. col0+128] as b_tile[q][c] = op(B)[k0 + q, col0 + c].
__device__ __forceinline__ void v3_load_b(const GemmParams& p, const float* b, i64 col0, i64 k0, bool vector_ok,
                                          float (*b_tile)[V3_STRIDE]) {
    const int t = threadIdx.x;
    if (!p.trans_b) {
        // B is [K, N]: 4 consecutive c of one row q.
        const int q = t / 32, c0 = (t % 32) * 4;
        const i64 kq = k0 + q, j = col0 + c0;
        if (vector_ok && kq < p.k && j + 3 < p.n) {
            *reinterpret_cast<float4*>(&b_tile[q][c0]) = *reinterpret_cast<const float4*>(b + kq * p.n + j);
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) b_tile[q][c0 + e] = (kq < p.k && j + e < p.n) ? b[kq * p.n + j + e] : 0.0f;
        }
    } else {
        // B is [N, K]: 4 consecutive q of one row c of memory.
        const int c = t / 2, q0 = (t % 2) * 4;
        const i64 j = col0 + c, kq = k0 + q0;
        float v[4];
        if (vector_ok && j < p.n && kq + 3 < p.k) {
            const float4 x = *reinterpret_cast<const float4*>(b + j * p.k + kq);
            v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] = (j < p.n && kq + e < p.k) ? b[j * p.k + kq + e] : 0.0f;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) b_tile[q0 + e][c] = v[e];
    }
}

extern "C" __launch_bounds__(V3_THREADS) __global__ void gemm_v3_register_blocked(const GemmParams p) {
    __shared__ __align__(16) float a_tile[V3_BK][V3_STRIDE];
    __shared__ __align__(16) float b_tile[V3_BK][V3_STRIDE];
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const i64 col0 = (i64)blockIdx.x * V3_BN;
    // float4 needs the contiguous dimension to be a multiple of 4 (so every
    // row, and every batch item, starts 16-byte aligned) and an aligned base.
    const bool a_vector = (p.trans_a ? p.m : p.k) % 4 == 0 && aligned16(p.a);
    const bool b_vector = (p.trans_b ? p.k : p.n) % 4 == 0 && aligned16(p.b);
    const bool c_vector = p.n % 4 == 0 && aligned16(p.c);
    for (i64 batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
        const float* a = p.a + batch * p.m * p.k;
        const float* b = p.b + batch * p.k * p.n;
        float* c = p.c + batch * p.m * p.n;
        for (i64 row0 = (i64)blockIdx.y * V3_BM; row0 < p.m; row0 += (i64)gridDim.y * V3_BM) {
            float acc[8][8];
#pragma unroll
            for (int r = 0; r < 8; ++r)
#pragma unroll
                for (int s = 0; s < 8; ++s) acc[r][s] = 0.0f;

            for (i64 k0 = 0; k0 < p.k; k0 += V3_BK) {
                v3_load_a(p, a, row0, k0, a_vector, a_tile);
                v3_load_b(p, b, col0, k0, b_vector, b_tile);
                __syncthreads();
                // Zero padding past K makes the full-length loop exact.
#pragma unroll
                for (int q = 0; q < V3_BK; ++q) {
                    float a_frag[8], b_frag[8];
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float4 x = *reinterpret_cast<const float4*>(&a_tile[q][h * 64 + ty * 4]);
                        const float4 y = *reinterpret_cast<const float4*>(&b_tile[q][h * 64 + tx * 4]);
                        a_frag[h * 4 + 0] = x.x; a_frag[h * 4 + 1] = x.y; a_frag[h * 4 + 2] = x.z; a_frag[h * 4 + 3] = x.w;
                        b_frag[h * 4 + 0] = y.x; b_frag[h * 4 + 1] = y.y; b_frag[h * 4 + 2] = y.z; b_frag[h * 4 + 3] = y.w;
                    }
                    // Outer product: 16 shared loads feed 64 FMAs.
#pragma unroll
                    for (int r = 0; r < 8; ++r)
#pragma unroll
                        for (int s = 0; s < 8; ++s) acc[r][s] += a_frag[r] * b_frag[s];
                }
                __syncthreads();
            }

#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const i64 i = row0 + v3_micro_offset(ty, r);
                if (i >= p.m) continue;
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const i64 j = col0 + v3_micro_offset(tx, h * 4);
                    float* out = c + i * p.n + j;
                    if (c_vector && j + 3 < p.n) {
                        *reinterpret_cast<float4*>(out) =
                            make_float4(acc[r][h * 4 + 0], acc[r][h * 4 + 1], acc[r][h * 4 + 2], acc[r][h * 4 + 3]);
                    } else {
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (j + e < p.n) out[e] = acc[r][h * 4 + e];
                    }
                }
            }
        }
    }
}

// ---- v4: tensor cores, 16-bit operands ------------------------------------
// Mirrors GemmHalfParams in src/ops/gemm/cuda.rs.
struct GemmHalfParams {
    GemmParams gemm;  // a, b and c point at 16-bit values of `kind`
    u32 kind;         // KILN_BF16 or KILN_F16
    u32 pad;
};
static_assert(sizeof(GemmHalfParams) == 72, "GemmHalfParams must match its Rust mirror");

extern "C" __launch_bounds__(TC_THREADS) __global__ void gemm_v4_tensor_core(const GemmHalfParams params) {
    const GemmParams& p = params.gemm;
    __shared__ __align__(16) u16 a_tile[TC_BM][TC_STRIDE];
    __shared__ __align__(16) u16 b_tile[TC_BN][TC_STRIDE];
    // op(A)[i, q], and op(B)ᵀ[j, q]: B is staged as rows of N, like A's rows of M.
    const MatrixStrides as = a_strides(p), bs = b_strides(p);
    const i64 col0 = (i64)blockIdx.x * TC_BN;
    for (i64 batch = blockIdx.z; batch < p.batch; batch += gridDim.z) {
        const u16* a = reinterpret_cast<const u16*>(p.a) + batch * p.m * p.k;
        const u16* b = reinterpret_cast<const u16*>(p.b) + batch * p.k * p.n;
        u16* c = reinterpret_cast<u16*>(p.c) + batch * p.m * p.n;
        for (i64 row0 = (i64)blockIdx.y * TC_BM; row0 < p.m; row0 += (i64)gridDim.y * TC_BM) {
            TensorCoreAccumulators acc;
            tc_zero(acc);
            for (i64 k0 = 0; k0 < p.k; k0 += TC_BK) {
                tc_stage(a_tile, a, p.m, p.k, row0, k0, as.row, as.col);
                tc_stage(b_tile, b, p.n, p.k, col0, k0, bs.col, bs.row);
                __syncthreads();
                tc_multiply_slice(acc, a_tile, b_tile, params.kind);
                __syncthreads();
            }
            tc_for_each_output(acc, row0, col0, [&](i64 i, i64 j, float value) {
                if (i < p.m && j < p.n) c[i * p.n + j] = f32_to_half(value, params.kind);
            });
        }
    }
}
