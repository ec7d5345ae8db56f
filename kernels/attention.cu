// Causal scaled-dot-product attention on q, k, v [B, H, T, D], viewed as
// B·H independent heads of [T, D]; P = softmax(mask(Q·Kᵀ·scale)) and O = P·V.
//
// This is the plain, obviously-correct rung of the ladder: the full
// probability matrix P [B·H, T, T] is written to global memory (the backward
// reuses it), and every product is one thread per output element looping
// over the reduction dim, reading its operands from global memory (through
// L1/L2). Memory traffic is therefore O(T²) per head plus O(T²·D) cache
// reads. The next rung is a fused flash-style kernel: tiles of Q, K and V in
// shared memory, an online softmax (running max and sum) so P never leaves
// the chip, and the backward recomputing P tile by tile from the saved row
// log-sum-exp instead of reading it.
//
// Indexing: row r = h·T + i of a head-major [B·H·T] axis; Q[h, i, c] is
// q[r·D + c], K[h, j, c] is k[(h·T + j)·D + c], P[h, i, j] is probs[r·T + j].
// Causal mask: query i sees keys j ≤ i; P is 0 above the diagonal.
//
// Formats: q, k, v, O and their gradients are f32, bf16 or f16 (`format`);
// P and dS are always f32, and every value is computed in f32 and rounded
// once on the store.
#include "common.cuh"
#include "half.cuh"

// Mirrors AttentionParams in src/ops/attention/cuda.rs; one struct for every
// kernel of the file, unused pointers null.
struct AttentionParams {
    const void* q;        // q, k, v, out, d_out, dq, dk, dv: of `format`
    const void* k;
    const void* v;
    float* probs;         // P, [B·H, T, T]: written by the forward, read by the backward
    void* out;            // O, [B·H, T, D]
    const void* d_out;    // dL/dO
    float* d_scores;      // dS, [B·H, T, T] scratch of the backward
    void* dq;
    void* dk;
    void* dv;
    i64 heads;            // B·H
    i64 seq;              // T
    i64 head_dim;         // D
    float scale;          // 1/√D unless the caller gave another
    u32 format;
};
static_assert(sizeof(AttentionParams) == 112, "AttentionParams must match its Rust mirror");

// One block per query row r = (h, i):
// s_j = (q_i·k_j)·scale for j ≤ i;  P[i, j] = exp(s_j − max s) / Σ exp(s − max s);  P[i, j > i] = 0
extern "C" __global__ void attention_probs(const AttentionParams p) {
    __shared__ float scratch[32];
    const i64 T = p.seq, D = p.head_dim;
    for (i64 r = blockIdx.x; r < p.heads * T; r += gridDim.x) {
        i64 h = r / T, i = r - h * T;
        const i64 q_row = r * D, k_head = h * T * D;
        float* p_row = p.probs + r * T;
        // Each thread keeps to the same columns j in every loop below, so it
        // reads back only what it wrote itself: no barrier needed between.
        float max = -KILN_INFINITY;
        for (i64 j = threadIdx.x; j <= i; j += blockDim.x) {
            float dot = 0.0f;
            for (i64 c = 0; c < D; ++c)
                dot += load_f32(p.q, q_row + c, p.format) * load_f32(p.k, k_head + j * D + c, p.format);
            float score = dot * p.scale;
            p_row[j] = score;
            max = fmaxf(max, score);
        }
        max = block_max(max, scratch);
        float sum = 0.0f;
        for (i64 j = threadIdx.x; j <= i; j += blockDim.x) {
            float e = expf(p_row[j] - max);
            p_row[j] = e;
            sum += e;
        }
        float inv_sum = 1.0f / block_sum(sum, scratch);
        for (i64 j = threadIdx.x; j < T; j += blockDim.x) p_row[j] = (j <= i) ? p_row[j] * inv_sum : 0.0f;
    }
}

// O[h, i, c] = Σ_{j ≤ i} P[h, i, j]·V[h, j, c], one thread per output element
extern "C" __global__ void attention_output(const AttentionParams p) {
    const i64 T = p.seq, D = p.head_dim;
    GRID_STRIDE_LOOP(idx, p.heads * T * D) {
        i64 r = idx / D, c = idx - r * D;
        i64 h = r / T, i = r - h * T;
        const float* p_row = p.probs + r * T;
        const i64 v_head = h * T * D;
        float acc = 0.0f;
        for (i64 j = 0; j <= i; ++j) acc += p_row[j] * load_f32(p.v, v_head + j * D + c, p.format);
        store_f32(p.out, idx, acc, p.format);
    }
}

// One block per query row r = (h, i):
// dP[i, j] = dO_i·v_j;  dS[i, j] = P[i, j]·(dP[i, j] − Σ_l P[i, l]·dP[i, l]) for j ≤ i, 0 above
extern "C" __global__ void attention_score_grads(const AttentionParams p) {
    __shared__ float scratch[32];
    const i64 T = p.seq, D = p.head_dim;
    for (i64 r = blockIdx.x; r < p.heads * T; r += gridDim.x) {
        i64 h = r / T, i = r - h * T;
        const i64 d_out_row = r * D, v_head = h * T * D;
        const float* p_row = p.probs + r * T;
        float* ds_row = p.d_scores + r * T;
        // As in attention_probs, each thread revisits only its own columns j.
        float weighted = 0.0f;
        for (i64 j = threadIdx.x; j <= i; j += blockDim.x) {
            float dp = 0.0f;
            for (i64 c = 0; c < D; ++c)
                dp += load_f32(p.d_out, d_out_row + c, p.format) * load_f32(p.v, v_head + j * D + c, p.format);
            ds_row[j] = dp;
            weighted += p_row[j] * dp;
        }
        weighted = block_sum(weighted, scratch);
        for (i64 j = threadIdx.x; j < T; j += blockDim.x) ds_row[j] = (j <= i) ? p_row[j] * (ds_row[j] - weighted) : 0.0f;
    }
}

// dQ[h, i, c] = scale·Σ_{j ≤ i} dS[h, i, j]·K[h, j, c], one thread per element
extern "C" __global__ void attention_query_grads(const AttentionParams p) {
    const i64 T = p.seq, D = p.head_dim;
    GRID_STRIDE_LOOP(idx, p.heads * T * D) {
        i64 r = idx / D, c = idx - r * D;
        i64 h = r / T, i = r - h * T;
        const float* ds_row = p.d_scores + r * T;
        const i64 k_head = h * T * D;
        float acc = 0.0f;
        for (i64 j = 0; j <= i; ++j) acc += ds_row[j] * load_f32(p.k, k_head + j * D + c, p.format);
        store_f32(p.dq, idx, acc * p.scale, p.format);
    }
}

// dK[h, j, c] = scale·Σ_{i ≥ j} dS[h, i, j]·Q[h, i, c];  dV[h, j, c] = Σ_{i ≥ j} P[h, i, j]·dO[h, i, c]
// one thread per key element (h, j, c), both sums walk the same column j
extern "C" __global__ void attention_key_value_grads(const AttentionParams p) {
    const i64 T = p.seq, D = p.head_dim;
    GRID_STRIDE_LOOP(idx, p.heads * T * D) {
        i64 r = idx / D, c = idx - r * D;
        i64 h = r / T, j = r - h * T;
        const float* ds_head = p.d_scores + h * T * T;
        const float* p_head = p.probs + h * T * T;
        const i64 head = h * T * D;  // of q and d_out
        float dk = 0.0f, dv = 0.0f;
        for (i64 i = j; i < T; ++i) {
            dk += ds_head[i * T + j] * load_f32(p.q, head + i * D + c, p.format);
            dv += p_head[i * T + j] * load_f32(p.d_out, head + i * D + c, p.format);
        }
        store_f32(p.dk, idx, dk * p.scale, p.format);
        store_f32(p.dv, idx, dv, p.format);
    }
}

