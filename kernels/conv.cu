// Convolutions (conv2d and conv_transpose2d). Every kernel sees its problem
// in conv2d terms through one ConvGeometry (see src/ops/conv/mod.rs): a
// kernel window slides over an input image [N, C, H, W] and produces an
// output grid [N, O, Ho, Wo]; the weight is [O, Cg, kh, kw] with Cg = C/groups.
// Output position (oh, ow) with tap (i, j) reads input pixel
// (oh·stride − pad + i·dilation, ow·stride − pad + j·dilation), zero outside.
// conv_transpose2d runs the same kernels with the roles swapped, so its
// output_padding (and conv2d's padding="same" odd extra row/column at the
// bottom/right) is just the out_size/in_size pair, no extra padding field.
//
// Groups: output channel o = g·Og + o' (Og = O/groups) reads only input
// channels g·Cg .. g·Cg + Cg − 1 of its image, through weight row o. The
// tiled forwards take the group g from blockIdx.z, so each tile is a plain
// GEMM of one group's columns by that group's block of weight rows.
//
// Forward: the convolution is a GEMM, y[N·Ho·Wo, O] = im2col(x)[N·Ho·Wo,
// C·kh·kw] · Wᵀ, and its arithmetic (2·C·kh·kw flops per output value) is
// what costs. conv2d_forward_direct (one thread per output value) states the
// definition but rereads x and W from global memory for every product.
// conv2d_forward_implicit_gemm tiles the product in shared memory like a GEMM
// (64 positions × 64 channels per block, 4 × 4 values per thread), so each
// value loaded is reused 64 times; its A tile is gathered straight from the
// image (padding → 0) instead of from an im2col buffer, which would cost
// kh·kw times the input in memory and traffic. The engine uses the tiled one
// for f32. For bf16/f16 it uses conv2d_forward_tensor_core: the same implicit
// GEMM on the tensor-core tile of the 16-bit GEMM (tensor_core.cuh).
//
// Formats: image, weight, grid, bias and out share one float format (f32,
// bf16 or f16, ConvParams::format). Every kernel but the f32 implicit GEMM
// reads it through load_f32, accumulates in f32 and rounds once on the store.
//
// Backward-data gathers: one thread per input pixel sums the dy·W products
// of the outputs that read it. Scattering instead (one thread per output,
// atomicAdd into dx) would contend on the pixels windows share, and the
// float atomics would make the sum order, hence the result, vary run to run.
// Backward-weight and bias-grad are reductions over batch and positions: one
// block per weight element / channel with block_sum, again no atomics, so
// every gradient is deterministic.
#include "common.cuh"
#include "half.cuh"
#include "tensor_core.cuh"

// Mirrors ConvGeometry / ConvShape in src/ops/conv/cuda.rs.
struct ConvShape {
    i64 batch;
    i64 in_channels;
    i64 in_h, in_w;
    i64 out_channels;
    i64 out_h, out_w;
    i64 kernel_h, kernel_w;
    i64 stride_h, stride_w;
    i64 pad_h, pad_w;
    i64 dilation_h, dilation_w;
    i64 groups;          // in_channels and out_channels are multiples of it
};
static_assert(sizeof(ConvShape) == 128, "ConvShape must match its Rust mirror");

// Mirrors ConvParams in src/ops/conv/cuda.rs. Each kernel reads two of
// image / weight / grid and writes `out`, all of `format`.
struct ConvParams {
    const void* image;   // [N, C, H, W]
    const void* weight;  // [O, C/groups, kh, kw]
    const void* grid;    // [N, O, Ho, Wo]
    const void* bias;    // forward: [O], backward_data: [C]; null for none
    void* out;
    ConvShape geometry;
    u32 format;          // KILN_F32, KILN_BF16 or KILN_F16
    u32 pad;
};
static_assert(sizeof(ConvParams) == 176, "ConvParams must match its Rust mirror");

// Input channels per group and output channels per group.
__device__ __forceinline__ i64 in_per_group(const ConvShape& g) { return g.in_channels / g.groups; }
__device__ __forceinline__ i64 out_per_group(const ConvShape& g) { return g.out_channels / g.groups; }

// Offset in one group's channels [Cg, H, W] of image n of im2col row k = (c, i, j)
// (c within the group) for the window whose top-left corner is
// (corner_h, corner_w); −1 where it falls in the padding.
__device__ __forceinline__ i64 im2col_offset(const ConvShape& g, i64 corner_h, i64 corner_w, int k) {
    const int taps = (int)(g.kernel_h * g.kernel_w);
    const int c = k / taps;
    const int tap = k - c * taps;
    const int i = tap / (int)g.kernel_w;
    const int j = tap - i * (int)g.kernel_w;
    const i64 ih = corner_h + i * g.dilation_h;
    const i64 iw = corner_w + j * g.dilation_w;
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return -1;
    return (c * g.in_h + ih) * g.in_w + iw;
}

// The input window of output position m = (n, oh, ow) of an implicit GEMM's
// A tile for group `group`: the offset of that group's first channel plane
// in image n, and the top-left corner (in padded input coordinates) that
// tap (0, 0) reads. Past the last position: not valid.
struct GatherWindow {
    bool valid;
    i64 image_offset;
    i64 corner_h, corner_w;
};

__device__ __forceinline__ GatherWindow gather_window(const ConvShape& g, i64 m, i64 group) {
    const i64 positions = g.out_h * g.out_w;
    const bool valid = m < g.batch * positions;
    const i64 n = valid ? m / positions : 0;
    const i64 pos = valid ? m % positions : 0;
    return GatherWindow{valid, (n * g.in_channels + group * in_per_group(g)) * g.in_h * g.in_w,
                        (pos / g.out_w) * g.stride_h - g.pad_h, (pos % g.out_w) * g.stride_w - g.pad_w};
}

// The bias term of output channel (or, backward-data, input channel) c.
__device__ __forceinline__ float bias_at(const ConvParams& p, i64 c) {
    return p.bias ? load_f32(p.bias, c, p.format) : 0.0f;
}

// ---- forward v1: one thread per output value ------------------------------------
// y[n, o, oh, ow] = b[o] + Σ_{c,i,j} x[n, g·Cg + c, oh·s − p + i·d, ow·s − p + j·d] · W[o, c, i, j]
// over the Cg channels c of o's group g = o / Og.
extern "C" __global__ void conv2d_forward_direct(const ConvParams p) {
    const ConvShape g = p.geometry;
    const i64 total = g.batch * g.out_channels * g.out_h * g.out_w;
    GRID_STRIDE_LOOP(idx, total) {
        const i64 ow = idx % g.out_w;
        const i64 oh = (idx / g.out_w) % g.out_h;
        const i64 o = (idx / (g.out_w * g.out_h)) % g.out_channels;
        const i64 n = idx / (g.out_w * g.out_h * g.out_channels);
        const i64 cg = in_per_group(g);
        const i64 image_n = (n * g.in_channels + o / out_per_group(g) * cg) * g.in_h * g.in_w;
        const i64 weight_o = o * cg * g.kernel_h * g.kernel_w;
        float acc = bias_at(p, o);
        for (i64 c = 0; c < cg; ++c) {
            const i64 plane = image_n + c * g.in_h * g.in_w;
            const i64 taps = weight_o + c * g.kernel_h * g.kernel_w;
            for (i64 i = 0; i < g.kernel_h; ++i) {
                const i64 ih = oh * g.stride_h - g.pad_h + i * g.dilation_h;
                if (ih < 0 || ih >= g.in_h) continue;
                for (i64 j = 0; j < g.kernel_w; ++j) {
                    const i64 iw = ow * g.stride_w - g.pad_w + j * g.dilation_w;
                    if (iw < 0 || iw >= g.in_w) continue;
                    acc += load_f32(p.image, plane + ih * g.in_w + iw, p.format) *
                           load_f32(p.weight, taps + i * g.kernel_w + j, p.format);
                }
            }
        }
        store_f32(p.out, idx, acc, p.format);
    }
}

// ---- forward v2: implicit GEMM with shared-memory tiles ---------------------------
// C[m, o] = Σ_k A[m, k] · B[k, o] with m = (n, oh, ow), k = (c, i, j),
// A = im2col(x) gathered on the fly and B = Wᵀ (W is row-major [O, K]), each
// taken for one group: A over the group's Cg channels, W its block of Og rows.
// Launch: grid (⌈N·Ho·Wo / 64⌉, ⌈Og / 64⌉, min(groups, 65535)), 256 threads;
// K = Cg·kh·kw < 2^31.
// f32 only (format is KILN_F32).
#define IG_TILE_M 64    // output positions per block
#define IG_TILE_N 64    // output channels per block
#define IG_TILE_K 16    // (channel, tap) pairs per shared-memory stage
// The block is 256 threads, 16 × 16, each owning 4 × 4 outputs.

extern "C" __global__ void conv2d_forward_implicit_gemm(const ConvParams p) {
    const ConvShape g = p.geometry;
    // a_tile[k][m]: consecutive threads gather consecutive positions (coalesced
    // along ow) and read consecutive m. b_tile[k][o] is W transposed on the
    // way in; the +1 column spreads that transposing store over the banks.
    __shared__ float a_tile[IG_TILE_K][IG_TILE_M];
    __shared__ float b_tile[IG_TILE_K][IG_TILE_N + 1];

    const int t = threadIdx.x;
    const i64 positions = g.out_h * g.out_w;
    const i64 m_total = g.batch * positions;
    const i64 og = out_per_group(g);
    const int k_total = (int)(in_per_group(g) * g.kernel_h * g.kernel_w);
    const i64 m0 = (i64)blockIdx.x * IG_TILE_M;
    const i64 o0 = (i64)blockIdx.y * IG_TILE_N;

    // A loader: this thread gathers position a_m of the tile, rows a_k + 4r.
    const int a_m = t % IG_TILE_M;
    const int a_k = t / IG_TILE_M;
    // B loader: row b_k, channels b_o + 16r (16 consecutive k per channel: coalesced).
    const int b_k = t % IG_TILE_K;
    const int b_o = t / IG_TILE_K;
    // Compute: positions tx + 16r, channels ty + 16c (of the group).
    const int tx = t % 16;
    const int ty = t / 16;

    // Group-stride over blockIdx.z (past the gridDim.z limit); o is the
    // channel within the group, group·Og + o the output channel.
    for (i64 group = blockIdx.z; group < g.groups; group += gridDim.z) {
        // This thread's output position, hence the window corner, is the same every stage.
        const GatherWindow window = gather_window(g, m0 + a_m, group);
        const float* image_n = static_cast<const float*>(p.image) + window.image_offset;
        const float* weight = static_cast<const float*>(p.weight) + group * og * k_total;

        float acc[4][4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;

        for (int k0 = 0; k0 < k_total; k0 += IG_TILE_K) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int kl = a_k + 4 * r;
                const int k = k0 + kl;
                const i64 at =
                    (window.valid && k < k_total) ? im2col_offset(g, window.corner_h, window.corner_w, k) : -1;
                a_tile[kl][a_m] = at >= 0 ? image_n[at] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int ol = b_o + 16 * r;
                const i64 o = o0 + ol;
                const int k = k0 + b_k;
                b_tile[b_k][ol] = (o < og && k < k_total) ? weight[o * k_total + k] : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < IG_TILE_K; ++kk) {
                float a[4], b[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) a[r] = a_tile[kk][tx + 16 * r];
#pragma unroll
                for (int c = 0; c < 4; ++c) b[c] = b_tile[kk][ty + 16 * c];
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
            }
            __syncthreads();
        }

        // y[n, o, pos] = C[m, o] + b[o]; 16 consecutive positions per store (coalesced).
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const i64 m = m0 + tx + 16 * r;
            if (m >= m_total) continue;
            const i64 n = m / positions;
            const i64 pos = m % positions;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const i64 o = o0 + ty + 16 * c;
                if (o >= og) continue;
                const i64 channel = group * og + o;
                static_cast<float*>(p.out)[(n * g.out_channels + channel) * positions + pos] =
                    acc[r][c] + bias_at(p, channel);
            }
        }
    }
}

// ---- forward, 16-bit: implicit GEMM on the tensor-core tile ----------------------
// The same product as conv2d_forward_implicit_gemm, C[m, o] = Σ_k A[m, k]·Wᵀ[k, o],
// with bf16/f16 operands on mma.sync (tensor_core.cuh), f32 accumulation and
// the bias added before the one rounding. A is gathered from the image into
// a_tile[m][k] (zeros in the padding and past the edges); W's rows are
// already Bᵀ's rows, contiguous in k.
// Launch: grid (⌈N·Ho·Wo / 64⌉, ⌈Og / 64⌉, min(groups, 65535)), 128 threads;
// K = Cg·kh·kw < 2^31.
extern "C" __launch_bounds__(TC_THREADS) __global__ void conv2d_forward_tensor_core(const ConvParams p) {
    const ConvShape g = p.geometry;
    __shared__ __align__(16) u16 a_tile[TC_BM][TC_STRIDE];  // [position][k]
    __shared__ __align__(16) u16 b_tile[TC_BN][TC_STRIDE];  // [channel][k]
    const i64 positions = g.out_h * g.out_w;
    const i64 m_total = g.batch * positions;
    const i64 og = out_per_group(g);
    const int k_total = (int)(in_per_group(g) * g.kernel_h * g.kernel_w);
    const i64 m0 = (i64)blockIdx.x * TC_BM;
    const i64 o0 = (i64)blockIdx.y * TC_BN;

    // Gather: this thread fills position a_m of the tile (consecutive
    // threads, consecutive positions: coalesced along ow), k rows a_k + 2s.
    const int a_m = threadIdx.x % TC_BM;
    const int a_k = threadIdx.x / TC_BM;
    u16* out = static_cast<u16*>(p.out);

    // Group-stride over blockIdx.z, as in conv2d_forward_implicit_gemm.
    for (i64 group = blockIdx.z; group < g.groups; group += gridDim.z) {
        const GatherWindow window = gather_window(g, m0 + a_m, group);
        const u16* image_n = static_cast<const u16*>(p.image) + window.image_offset;
        const u16* weight = static_cast<const u16*>(p.weight) + group * og * k_total;

        TensorCoreAccumulators acc;
        tc_zero(acc);
        for (int k0 = 0; k0 < k_total; k0 += TC_BK) {
#pragma unroll
            for (int kl = a_k; kl < TC_BK; kl += TC_THREADS / TC_BM) {
                const int k = k0 + kl;
                const i64 at =
                    (window.valid && k < k_total) ? im2col_offset(g, window.corner_h, window.corner_w, k) : -1;
                a_tile[a_m][kl] = at >= 0 ? image_n[at] : (u16)0;
            }
            tc_stage(b_tile, weight, og, k_total, o0, k0, k_total, 1);
            __syncthreads();
            tc_multiply_slice(acc, a_tile, b_tile, p.format);
            __syncthreads();
        }

        // y[n, group·Og + o, pos] = C[m, o] + b, rounded once.
        tc_for_each_output(acc, m0, o0, [&](i64 m, i64 o, float value) {
            if (m >= m_total || o >= og) return;
            const i64 n = m / positions, pos = m % positions;
            const i64 channel = group * og + o;
            out[(n * g.out_channels + channel) * positions + pos] = f32_to_half(value + bias_at(p, channel), p.format);
        });
    }
}

// ---- backward-data (also conv_transpose2d's forward) ------------------------------
// dx[n, c, h, w] = b[c] + Σ_{o,i,j} dy[n, o, oh, ow] · W[o, c − g·Cg, i, j] over
// the output channels o of c's group g = c / Cg and the taps with
// h + p − i·d = oh·s (and the same for w), i.e. the outputs whose window
// read pixel (h, w). One thread per pixel; no atomics.
extern "C" __global__ void conv2d_backward_data(const ConvParams p) {
    const ConvShape g = p.geometry;
    const i64 total = g.batch * g.in_channels * g.in_h * g.in_w;
    const i64 grid_plane = g.out_h * g.out_w;
    const i64 cg = in_per_group(g), og = out_per_group(g);
    const i64 weight_per_out = cg * g.kernel_h * g.kernel_w;
    GRID_STRIDE_LOOP(idx, total) {
        const i64 w = idx % g.in_w;
        const i64 h = (idx / g.in_w) % g.in_h;
        const i64 c = (idx / (g.in_w * g.in_h)) % g.in_channels;
        const i64 n = idx / (g.in_w * g.in_h * g.in_channels);
        const i64 grid_n = n * g.out_channels * grid_plane;
        const i64 weight_c = (c % cg) * g.kernel_h * g.kernel_w;
        const i64 first_o = c / cg * og;
        float acc = bias_at(p, c);
        for (i64 i = 0; i < g.kernel_h; ++i) {
            const i64 th = h + g.pad_h - i * g.dilation_h;
            if (th < 0 || th % g.stride_h != 0) continue;
            const i64 oh = th / g.stride_h;
            if (oh >= g.out_h) continue;
            for (i64 j = 0; j < g.kernel_w; ++j) {
                const i64 tw = w + g.pad_w - j * g.dilation_w;
                if (tw < 0 || tw % g.stride_w != 0) continue;
                const i64 ow = tw / g.stride_w;
                if (ow >= g.out_w) continue;
                const i64 dy_at = grid_n + oh * g.out_w + ow;
                const i64 weight_at = weight_c + i * g.kernel_w + j;
                for (i64 o = first_o; o < first_o + og; ++o) {
                    acc += load_f32(p.grid, dy_at + o * grid_plane, p.format) *
                           load_f32(p.weight, weight_at + o * weight_per_out, p.format);
                }
            }
        }
        store_f32(p.out, idx, acc, p.format);
    }
}

// ---- backward-weight (also conv_transpose2d's dL/dW) -------------------------------
// dW[o, c, i, j] = Σ_{n,oh,ow} dy[n, o, oh, ow] · x[n, g·Cg + c, oh·s − p + i·d, ow·s − p + j·d]
// with g = o / Og, o's group.
// One block per weight element (block-stride over elements), threads stride
// over (n, oh, ow) and block_sum combines them. blockDim.x: a multiple of 32.
extern "C" __global__ void conv2d_backward_weight(const ConvParams p) {
    __shared__ float scratch[32];
    const ConvShape g = p.geometry;
    const i64 cg = in_per_group(g);
    const i64 weights = g.out_channels * cg * g.kernel_h * g.kernel_w;
    const i64 positions = g.out_h * g.out_w;
    const i64 reduction = g.batch * positions;
    for (i64 widx = blockIdx.x; widx < weights; widx += gridDim.x) {
        const i64 j = widx % g.kernel_w;
        const i64 i = (widx / g.kernel_w) % g.kernel_h;
        const i64 c = (widx / (g.kernel_w * g.kernel_h)) % cg;
        const i64 o = widx / (g.kernel_w * g.kernel_h * cg);
        const i64 image_c = o / out_per_group(g) * cg + c;
        float partial = 0.0f;
        for (i64 r = threadIdx.x; r < reduction; r += blockDim.x) {
            const i64 n = r / positions;
            const i64 pos = r % positions;
            const i64 ih = (pos / g.out_w) * g.stride_h - g.pad_h + i * g.dilation_h;
            const i64 iw = (pos % g.out_w) * g.stride_w - g.pad_w + j * g.dilation_w;
            if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
            partial += load_f32(p.grid, (n * g.out_channels + o) * positions + pos, p.format) *
                       load_f32(p.image, ((n * g.in_channels + image_c) * g.in_h + ih) * g.in_w + iw, p.format);
        }
        const float total = block_sum(partial, scratch);
        if (threadIdx.x == 0) store_f32(p.out, widx, total, p.format);
    }
}

// ---- bias gradient -----------------------------------------------------------
// Mirrors BiasGradParams in src/ops/conv/cuda.rs.
struct BiasGradParams {
    const void* grad;  // [batch, channels, pixels]
    void* out;         // [channels], the same format
    i64 batch;
    i64 channels;
    i64 pixels;
    u32 format;
    u32 pad;
};
static_assert(sizeof(BiasGradParams) == 48, "BiasGradParams must match its Rust mirror");

// dL/db[c] = Σ_{n,p} dy[n, c, p]: one block per channel (block-stride), block_sum.
extern "C" __global__ void bias_grad(const BiasGradParams p) {
    __shared__ float scratch[32];
    const i64 reduction = p.batch * p.pixels;
    for (i64 c = blockIdx.x; c < p.channels; c += gridDim.x) {
        float partial = 0.0f;
        for (i64 r = threadIdx.x; r < reduction; r += blockDim.x) {
            const i64 n = r / p.pixels;
            partial += load_f32(p.grad, (n * p.channels + c) * p.pixels + r % p.pixels, p.format);
        }
        const float total = block_sum(partial, scratch);
        if (threadIdx.x == 0) store_f32(p.out, c, total, p.format);
    }
}
