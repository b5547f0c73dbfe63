// Shared by every generated kernel: storage types and conversions.
// fp16 and bf16 are held as raw 16-bit words so no CUDA header is needed under NVRTC.
typedef long long lg_i64;

// Programmatic dependent launch (sm_90+): a kernel launched with the attribute may start while
// the kernel before it in the stream is still running. lg_pdl_wait() blocks until that kernel
// has finished and its writes are visible, so a kernel calls it before it reads or writes
// anything another kernel touches; lg_pdl_launch_dependents() lets the next kernel be scheduled.
// Both are no-ops for an ordinary launch and below sm_90.
__device__ __forceinline__ void lg_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void lg_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float lg_f16_to_f32(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short lg_f32_to_f16(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float lg_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short lg_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (unsigned short)(u >> 16);
}

// Storage dtype tags: lg_unpack / lg_pack convert one vector of storage to floats and back.
// A 16-byte vector (uint4) holds 8 16-bit values or 4 fp32 values; vectors of one element are the
// storage type itself.
struct lg_f32 {};
struct lg_f16 {};
struct lg_bf16 {};
__device__ __forceinline__ float lg_to_f32(float v, lg_f32) { return v; }
__device__ __forceinline__ float lg_to_f32(unsigned short v, lg_f16) { return lg_f16_to_f32(v); }
__device__ __forceinline__ float lg_to_f32(unsigned short v, lg_bf16) { return lg_bf16_to_f32(v); }
__device__ __forceinline__ float lg_from_f32(float v, lg_f32) { return v; }
__device__ __forceinline__ unsigned short lg_from_f32(float v, lg_f16) { return lg_f32_to_f16(v); }
__device__ __forceinline__ unsigned short lg_from_f32(float v, lg_bf16) { return lg_f32_to_bf16(v); }

template <typename S, typename Tag>
__device__ __forceinline__ void lg_unpack(S v, float (&f)[1], Tag t) { f[0] = lg_to_f32(v, t); }
__device__ __forceinline__ void lg_unpack(uint4 v, float (&f)[4], lg_f32) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}
template <typename Tag>
__device__ __forceinline__ void lg_unpack(uint4 v, float (&f)[8], Tag t) {
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = lg_to_f32((unsigned short)(u[i] & 0xffffu), t);
        f[2 * i + 1] = lg_to_f32((unsigned short)(u[i] >> 16), t);
    }
}

template <typename Tag>
__device__ __forceinline__ auto lg_pack(const float (&f)[1], Tag t) -> decltype(lg_from_f32(0.0f, t)) {
    return lg_from_f32(f[0], t);
}
__device__ __forceinline__ uint4 lg_pack(const float (&f)[4], lg_f32) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
template <typename Tag>
__device__ __forceinline__ uint4 lg_pack(const float (&f)[8], Tag t) {
    unsigned u[4];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        u[i] = (unsigned)lg_from_f32(f[2 * i], t) | ((unsigned)lg_from_f32(f[2 * i + 1], t) << 16);
    return make_uint4(u[0], u[1], u[2], u[3]);
}

// gather_rows_f16_d4096: out[b, :] = x[idx[b], :]
// x: [*, 4096] float16, idx: [n] int32, out: [n, 4096]
// One thread per 16-byte piece of an output row.
namespace gather_rows_f16_d4096_impl {

constexpr int PIECES = 4096 * sizeof(unsigned short) / sizeof(uint4);  // pieces per row

__device__ __forceinline__ void run(const unsigned short* x, const int* idx, unsigned short* out, int n) {
    const lg_i64 i = (lg_i64)blockIdx.x * 256 + threadIdx.x;
    if (i >= (lg_i64)n * PIECES) return;
    const int b = (int)(i / PIECES), p = (int)(i % PIECES);
    const uint4* src = reinterpret_cast<const uint4*>(x) + (lg_i64)idx[b] * PIECES;
    reinterpret_cast<uint4*>(out)[i] = src[p];
}

}  // namespace gather_rows_f16_d4096_impl

extern "C" __global__ void __launch_bounds__(256)
gather_rows_f16_d4096(const unsigned short* x, const int* idx, unsigned short* out, int n) {
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): nothing is read before this
    lg_pdl_launch_dependents();
    gather_rows_f16_d4096_impl::run(x, idx, out, n);
}

// gemv_f16_n3072_k4096_r1_rms1em05_rope_h16_kv4_d128_rh_s4096: decode GEMV / skinny GEMM, h[r, n] = sum_k x[r, k] * W[n, k]
// prologue rmsnorm: x is first replaced by rmsnorm(x) * norm_w (fp32 statistics of each whole row,
// each element rounded to float16 as the rmsnorm kernel stores it)
// epilogue rope: W's rows are the qkv rows permuted so that each 16-row tile holds 8 rotary pairs
// (tile rows g and g+8 are the pair's two elements); h is rounded to float16, q and k heads are
// rotated, q goes to out [rows, 16, 128], k and v to the caches at (seq_ids[r], positions[r])
// x: [rows, 4096] float16, W: [3072, 4096] float16, bias: [3072] or null, out: [rows, 3072] float16
// Rows are taken 1 at a time; W is streamed from memory once per row tile.
namespace gemv_f16_n3072_k4096_r1_rms1em05_rope_h16_kv4_d128_rh_s4096_impl {

constexpr int K = 4096;
constexpr int N_OUT = 3072;  // output columns
constexpr int MT = 1;  // W rows per output column: 2 when gate and up rows pair up
constexpr int ROW_TILE = 1;
constexpr int WARPS = 8;
constexpr int U = 4;  // 16-byte W loads per W row and lane issued before any is used
constexpr bool NORM = true;
constexpr int THREADS = WARPS * 32;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack
constexpr float EPS = 1e-05f;
constexpr int H = 16, KV = 4, HD = 128, MAX_SEQ = 4096;

__device__ __forceinline__ float epilogue(const float (&h)[MT]) {
    return h[0];
}

// rstd of each row of the tile into s_rstd (every thread takes part: call it from the whole block).
// The block reads the tile's rows whole; they are L2-resident and small next to its W rows.
__device__ __forceinline__ void row_rstd(const unsigned short* x, int row0, int here, float* s_rstd) {
    __shared__ float part[WARPS][ROW_TILE];
    constexpr int E = 16 / sizeof(unsigned short);  // elements per 16-byte vector
    constexpr int CV = K / E;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint4* x4 = reinterpret_cast<const uint4*>(x) + (lg_i64)row0 * CV;
    float ss[ROW_TILE];
    #pragma unroll
    for (int r = 0; r < ROW_TILE; ++r) ss[r] = 0.0f;
    for (int c = threadIdx.x; c < CV; c += THREADS) {
        #pragma unroll
        for (int r = 0; r < ROW_TILE; ++r) {
            if (r < here) {
                float f[E];
                lg_unpack(x4[(lg_i64)r * CV + c], f, Tag());
                #pragma unroll
                for (int j = 0; j < E; ++j) ss[r] += f[j] * f[j];
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < ROW_TILE; ++r) {
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], off);
        if (lane == 0) part[warp][r] = ss[r];
    }
    __syncthreads();
    if (threadIdx.x < ROW_TILE) {
        float t = 0.0f;
        #pragma unroll
        for (int w = 0; w < WARPS; ++w) t += part[w][threadIdx.x];
        s_rstd[threadIdx.x] = rsqrtf(t / (float)K + EPS);
    }
    __syncthreads();
}

// 16-bit weights on tensor cores (mma.m16n8k16, fp32 accumulate). A block owns 16 output
// columns; its WARPS warps split K and add their partial tiles through shared memory.
// The mma's A operand is 16 W rows, its B operand up to 8 rows of x, so the fragment of
// each lane is two 16-byte chunks of W (rows g and g+8) and one of x (row g), all at the
// same k offset: the dot product does not care in which order k is visited, so the mma's
// k positions {2t, 2t+1, 2t+8, 2t+9} map onto the lane's 8 contiguous k values (two mmas).
// A "step" is 4 lanes x 16 B = 32 k of all 16 W rows; the warps of a block take adjacent steps.
constexpr int C = K / 8;  // 16-byte chunks per row of W and x
constexpr int S_FULL = C / 4;  // steps with all 4 chunks inside the row
constexpr int S = (C + 3) / 4;
constexpr int BATCH = WARPS * U;  // steps the block consumes per batch
constexpr int NB_FULL = S_FULL / BATCH;  // batches needing no bounds checks
constexpr bool TAIL = S > NB_FULL * BATCH;
constexpr int NT = (ROW_TILE + 7) / 8;  // n8 tiles of x rows per pass

__device__ __forceinline__ uint4 ld_weight(const uint4* p) {
    // W is read exactly once: keep it out of L1 so x stays resident there; the 256-byte
    // L2 fetch brings in the neighbouring steps that the other warps of the block read next
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_act(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 { %0, %1, %2, %3 }, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// d[16x8] += A[16x16] * B[16x8]
__device__ __forceinline__ void mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// U steps of one warp: every load is issued before the first mma, so U * MT * 2 independent
// 16-byte W loads per lane are in flight together. GUARD checks the ragged end of K.
// Before a block may read x (it waits for the kernel before it, and with the rmsnorm prologue it
// reduces whole x rows first) it asks L2 for the start of its W rows, so HBM is busy meanwhile
// (PF_BYTES of each row, ~32 KB a block).
constexpr int PF_BYTES = K * (int)sizeof(unsigned short) < 2048 ? K * (int)sizeof(unsigned short) : 2048;
constexpr int PF_LINES = (PF_BYTES + 127) / 128;  // 128-byte lines of each W row

__device__ __forceinline__ void prefetch_w(const uint4* W4, int col0) {
    for (int i = threadIdx.x; i < MT * 16 * PF_LINES; i += THREADS) {
        const int r = i / PF_LINES, line = i % PF_LINES;
        const int col = min(col0 + (r & 15), N_OUT - 1);
        const char* p = reinterpret_cast<const char*>(W4 + (lg_i64)((r >> 4) * N_OUT + col) * C) + line * 128;
        asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
    }
}

// With the rmsnorm prologue each x chunk becomes round(x * rs * norm_w) before it feeds the mma.
template <bool GUARD>
__device__ __forceinline__ void batch(int step0, int t, const uint4* const (&wrow)[MT][2], const uint4* const (&xrow)[NT],
                                      const bool (&xok)[NT], const float (&rs)[NT], const uint4* nw4,
                                      float (&acc)[MT][NT][4]) {
    uint4 w[U][MT][2];
    uint4 xv[U][NT];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;  // this lane's chunk
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int h = 0; h < 2; ++h) w[u][m][h] = ok ? ld_weight(wrow[m][h] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            // unconditional load (rows past the tile read row 0) then select: no branch splits the batch
            const uint4 v = ld_act(xrow[n] + (ok ? c : 0));
            xv[u][n] = ok && xok[n] ? v : make_uint4(0u, 0u, 0u, 0u);
        }
        if (NORM) {
            const uint4 nv = ld_act(nw4 + (ok ? c : 0));
            float nf[8];
            lg_unpack(nv, nf, Tag());
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                float f[8];
                lg_unpack(xv[u][n], f, Tag());
                #pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = f[j] * rs[n] * nf[j];
                xv[u][n] = lg_pack(f, Tag());
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 a = w[u][m][0], b = w[u][m][1], xx = xv[u][n];
                mma(acc[m][n], a.x, b.x, a.y, b.y, xx.x, xx.y);  // k = chunk elements 0..3
                mma(acc[m][n], a.z, b.z, a.w, b.w, xx.z, xx.w);  // k = chunk elements 4..7
            }
}

// One rotary pair of one row: h1, h2 are the pair's two qkv values (rounded to float16 as the
// unfused qkv stores them); p its index in the head's pair order. Same arithmetic as rope_kv_append.
__device__ __forceinline__ void rope_store(int row, int head, int p, float h1, float h2, const int* positions,
                                           const int* seq_ids, const int* seq_lens, const float* inv_freq,
                                           unsigned short* q_out, unsigned short* kcache, unsigned short* vcache) {
    const int pos = positions[row];
    const int slot = seq_ids[row];
    const int e1 = p, e2 = p + HD / 2;  // rotate_half pairs (i, i + D/2)
    if (head < H + KV) {
        const float inv = inv_freq[p];
        const float ang = __fmul_rn((float)pos, inv);  // one fp32 rounding, as numpy's pos * inv
        float sn, cs;
        sincosf(ang, &sn, &cs);
        // explicit roundings (no FMA contraction) keep the result equal to the numpy formula
        const float r1 = __fsub_rn(__fmul_rn(h1, cs), __fmul_rn(h2, sn));
        const float r2 = __fadd_rn(__fmul_rn(h2, cs), __fmul_rn(h1, sn));
        h1 = r1;
        h2 = r2;
    }
    unsigned short* dst;
    if (head < H) {
        dst = q_out + ((lg_i64)row * H + head) * HD;
    } else {
        if (pos < 0 || pos >= MAX_SEQ) return;  // outside the cache: another slot's rows, drop it
        const int kvh = head < H + KV ? head - H : head - H - KV;
        dst = (head < H + KV ? kcache : vcache) + (((lg_i64)slot * MAX_SEQ + pos) * KV + kvh) * HD;
    }
    dst[e1] = lg_f32_to_f16(h1);
    dst[e2] = lg_f32_to_f16(h2);
}

__device__ __forceinline__ void run(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows,
                                    const unsigned short* norm_w, const unsigned short* res, const int* positions, const int* seq_ids,
                                    const int* seq_lens, const float* inv_freq, unsigned short* kcache, unsigned short* vcache) {
    __shared__ float red[WARPS][MT][NT][4][32];  // each warp's partial C fragments
    __shared__ float s_rstd[ROW_TILE];  // rmsnorm prologue: each tile row's rsqrt(mean(x^2) + eps)
    const uint4* nw4 = reinterpret_cast<const uint4*>(norm_w);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 16;
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* wrow[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = min(col0 + g + 8 * h, N_OUT - 1);  // past the end: computed, never stored
            wrow[m][h] = W4 + (lg_i64)(m * N_OUT + col) * C;
        }

    for (int row0 = 0; row0 < rows; row0 += ROW_TILE) {
        const int here = min(ROW_TILE, rows - row0);
        row_rstd(x, row0, here, s_rstd);
        const uint4* xrow[NT];
        bool xok[NT];
        float rs[NT];
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int r = 8 * n + g;  // the x row this lane feeds into B
            xok[n] = r < here;
            xrow[n] = x4 + (lg_i64)(row0 + (xok[n] ? r : 0)) * C;
            rs[n] = NORM && xok[n] ? s_rstd[r] : 0.0f;
        }
        float acc[MT][NT][4];
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.0f;

        #pragma unroll 1
        for (int b = 0; b < NB_FULL; ++b) batch<false>(b * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);
        if (TAIL) batch<true>(NB_FULL * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);

        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][m][n][i][lane] = acc[m][n][i];
        __syncthreads();
        // rotary pair e of the tile: fragments i and i + 2 of lane l in n-tile n are the same x row's
        // values of W rows g and g + 8, the pair's two elements
        for (int e = threadIdx.x; e < NT * 64; e += WARPS * 32) {
            const int n = e >> 6, i = (e >> 5) & 1, l = e & 31;
            const int col = col0 + (l >> 2);  // the pair's first (permuted) row
            const int r = 8 * n + 2 * (l & 3) + i;
            if (r >= here) continue;
            float h1 = 0.0f, h2 = 0.0f;
            #pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                h1 += red[w][0][n][i][l];
                h2 += red[w][0][n][i + 2][l];
            }
            const int head = col / HD, j = col % HD;
            rope_store(row0 + r, head, (j >> 4) * 8 + (j & 7), lg_f16_to_f32(lg_f32_to_f16(h1)),
                       lg_f16_to_f32(lg_f32_to_f16(h2)), positions, seq_ids, seq_lens, inv_freq, out, kcache, vcache);
        }
        __syncthreads();  // red is rewritten by the next row tile
    }
}

}  // namespace gemv_f16_n3072_k4096_r1_rms1em05_rope_h16_kv4_d128_rh_s4096_impl

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_f16_n3072_k4096_r1_rms1em05_rope_h16_kv4_d128_rh_s4096(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows, const unsigned short* norm_w,
    const int* positions, const int* seq_ids, const int* seq_lens, const float* inv_freq, unsigned short* kcache, unsigned short* vcache) {
    gemv_f16_n3072_k4096_r1_rms1em05_rope_h16_kv4_d128_rh_s4096_impl::prefetch_w(reinterpret_cast<const uint4*>(W), blockIdx.x * 16);  // weights only: safe before the wait
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): x and out only after this
    lg_pdl_launch_dependents();
    gemv_f16_n3072_k4096_r1_rms1em05_rope_h16_kv4_d128_rh_s4096_impl::run(x, W, bias, out, rows, norm_w, nullptr,
        positions, seq_ids, seq_lens, inv_freq, kcache, vcache);
}

// rmsnorm_f16_d4096_e1em05: norm_out = y * rsqrt(mean(y^2) + eps) * w
// y, r, sum_out, norm_out: [rows, 4096] float16; bias, w: [4096]. One block per row.
// sum_out may alias y or r: each element is read, then written, by the same thread.
namespace rmsnorm_f16_d4096_e1em05_impl {

constexpr int D = 4096;
constexpr int V = 8;  // elements per vector access
constexpr int NV = D / V;  // vectors per row
constexpr int THREADS = 256;
constexpr int PER = (NV + THREADS - 1) / THREADS;  // vectors of the row each thread keeps in registers
typedef uint4 Vec;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack

// Sum over the block; every thread gets the total.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[THREADS / 32];
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (THREADS == 32) return v;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? part[lane] : 0.0f;
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

__device__ __forceinline__ void run(const unsigned short* y, const unsigned short* r, const unsigned short* bias, const unsigned short* w,
                                    unsigned short* sum_out, unsigned short* norm_out, int rows) {
    const int row = blockIdx.x;
    if (row >= rows) return;  // the whole block leaves together
    const lg_i64 base = (lg_i64)row * NV;
    const Vec* yv = reinterpret_cast<const Vec*>(y) + base;
    // load the whole row first (all loads in flight), then compute and store
    Vec ya[PER];
    #pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int i = threadIdx.x + p * THREADS;
        if (i < NV) {
            ya[p] = yv[i];
        }
    }
    float s[PER][V];
    float ss = 0.0f;
    #pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int i = threadIdx.x + p * THREADS;
        if (i < NV) {
            lg_unpack(ya[p], s[p], Tag());
            #pragma unroll
            for (int j = 0; j < V; ++j) ss += s[p][j] * s[p][j];
        }
    }
    const float rstd = rsqrtf(block_sum(ss) / (float)D + 1e-05f);
    Vec* ov = reinterpret_cast<Vec*>(norm_out) + base;
    #pragma unroll
    for (int p = 0; p < PER; ++p) {
        const int i = threadIdx.x + p * THREADS;
        if (i < NV) {
            float wf[V], o[V];
            lg_unpack(reinterpret_cast<const Vec*>(w)[i], wf, Tag());
            #pragma unroll
            for (int j = 0; j < V; ++j) o[j] = s[p][j] * rstd * wf[j];
            ov[i] = lg_pack(o, Tag());
        }
    }
}

}  // namespace rmsnorm_f16_d4096_e1em05_impl

extern "C" __global__ void __launch_bounds__(256)
rmsnorm_f16_d4096_e1em05(const unsigned short* y, const unsigned short* r, const unsigned short* bias_or_null, const unsigned short* w, unsigned short* sum_out,
    unsigned short* norm_out, int rows) {
    rmsnorm_f16_d4096_e1em05_impl::run(y, r, bias_or_null, w, sum_out, norm_out, rows);
}

// rope_kv_append_fused_pairs_f16_h16_kv4_d128_rh_s4096: mode "fused".
//   fused:  qkv [T, (H+2KV)*D] -> q_out [T, H, D] (rotated), kcache[slot, pos] (rotated k), vcache[slot, pos] (v)
//   rope:   qkv [T, (H+2KV)*D] -> qkv_rot [T, H+2KV, D] (q and k heads rotated, v copied)
//   append: qkv_rot [T, H+2KV, D] -> kcache[slot, pos], vcache[slot, pos] (no rotation)
// Grid (T, ceil(work / blockDim.x)); one thread per element pair of one head of one token.
extern "C" __global__ void rope_kv_append_fused_pairs_f16_h16_kv4_d128_rh_s4096(
    const unsigned short* __restrict__ src,        // qkv or qkv_rot: [T, H+2KV, D] (same memory layout)
    const int* __restrict__ positions,      // [T] position of each token
    const int* __restrict__ seq_ids,        // [T] KV-cache slot of each token
    const int* __restrict__ seq_lens,       // [max_batch] slot length after this step (dynamic rope only)
    const float* __restrict__ inv_freq,     // [D/2] host-computed inverse frequencies (static rope types)
    unsigned short* __restrict__ out,              // fused: q_out [T, H, D]; rope: qkv_rot [T, H+2KV, D]; append: unused
    unsigned short* __restrict__ kcache,           // [max_batch, max_seq, KV, D] (fused, append)
    unsigned short* __restrict__ vcache,           // [max_batch, max_seq, KV, D] (fused, append)
    int n_tokens)
{
    constexpr int H = 16, KV = 4, D = 128, HALF = D / 2;
    constexpr int NHEADS = H + 2 * KV;
    constexpr int MAX_SEQ = 4096;
    constexpr int WORK = 1536;  // element pairs handled per token
    const int t = blockIdx.x;
    if (t >= n_tokens) return;  // whole block: safe before the barrier below
    const int pos = positions[t];
    const int slot = seq_ids[t];

    // cos/sin of this token's angles, shared by every head: s_cos/s_sin: [D/2]
    __shared__ float s_cos[HALF], s_sin[HALF];
    for (int i = threadIdx.x; i < HALF; i += blockDim.x) {
        const float inv = inv_freq[i];
        const float ang = __fmul_rn((float)pos, inv);  // one fp32 rounding, as numpy's pos * inv
        float s, c;
        sincosf(ang, &s, &c);  // precise (no fast math): large angles keep full accuracy
        s_cos[i] = c;
        s_sin[i] = s;
    }
    __syncthreads();

    const int w = blockIdx.y * blockDim.x + threadIdx.x;
    if (w >= WORK) return;
    const int head = 0 + w / HALF;  // 0..H-1 q, H..H+KV-1 k, H+KV.. v
    const int i = w % HALF;
    const int e1 = i, e2 = i + HALF;          // rotate_half pairs (i, i+D/2)
    const unsigned short* x = src + ((long long)t * NHEADS + head) * D;
    // src rows in rope pair order (a GEMM with the pair-ordered qkv weight): each 16 elements of a
    // head hold 8 pairs, first elements then second elements
    const int s1 = (i >> 3) * 16 + (i & 7);
    float x1 = lg_f16_to_f32(x[s1]), x2 = lg_f16_to_f32(x[s1 + 8]);
    if (head < H + KV) {
        // explicit roundings (no FMA contraction) keep the result equal to the numpy formula
        const float c = s_cos[i], s = s_sin[i];
        const float r1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
        const float r2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
        x1 = r1;
        x2 = r2;
    }
    unsigned short* dst;
    if (head < H) {
        dst = out + ((long long)t * H + head) * D;
    } else
    {
        // a position outside the cache would write another slot's rows: drop it
        if (pos < 0 || pos >= MAX_SEQ) return;
        const int kvh = head < H + KV ? head - H : head - H - KV;
        unsigned short* cache = head < H + KV ? kcache : vcache;
        dst = cache + (((long long)slot * MAX_SEQ + pos) * KV + kvh) * D;
    }
    dst[e1] = lg_f32_to_f16(x1);
    dst[e2] = lg_f32_to_f16(x2);
}

// attn_decode_f16_h16_kv4_d128_q2048_s4096_c64_n64: split-KV decode attention, phase 1: one (max, sum, acc) partial per key chunk.
// Grid (KV * 1, T, MAX_SPLITS), 128 threads. A block owns 4 q heads of one
// kv-head group (all of them when H/KV <= 8), so each K/V row it reads serves every one of them.
// Lanes: 16 per key row (16-byte loads, 1 per lane), 2 keys per warp
// instruction; each key group of lanes is an independent stream with its own online softmax,
// merged through registers and shared memory at the end.
extern "C" __global__ void __launch_bounds__(128, 3) attn_decode_f16_h16_kv4_d128_q2048_s4096_c64_n64(
    const unsigned short* __restrict__ q,          // [T, QSTRIDE]: head h of token t at q[t*QSTRIDE + h*D]
    const unsigned short* __restrict__ kcache,     // [max_batch, MAX_SEQ, KV, D]
    const unsigned short* __restrict__ vcache,     // [max_batch, MAX_SEQ, KV, D]
    const int* __restrict__ positions,      // [T]
    const int* __restrict__ seq_ids,        // [T] cache slot
    float* __restrict__ ws,                 // [T, H, MAX_SPLITS, D+2]: max (log2 domain), sum, acc[D]
    int* __restrict__ counters,             // [T, gridDim.x] splits finished; all 0 between launches
    unsigned short* __restrict__ out,              // [T, H*D]
    int n_tokens)
{
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): nothing is read before this
    lg_pdl_launch_dependents();
    constexpr int H = 16, KV = 4, D = 128, GROUP = H / KV, GPB = 4, HSPLIT = GROUP / GPB;
    constexpr int QSTRIDE = 2048, MAX_SEQ = 4096, CHUNK = 64, MAX_SPLITS = 64;
    constexpr int NT = 128, NW = NT / 32;
    constexpr int EPV = 8;           // elements per vector load
    constexpr int NV = D / EPV;              // vectors per row
    constexpr int LPK = 16;           // lanes per key row
    constexpr int VPL = 1;           // vectors per lane
    constexpr int EL = VPL * EPV;            // row elements held per lane
    constexpr int KPW = 32 / LPK;            // keys per warp instruction
    constexpr int NSTREAM = NW * KPW;        // independent key streams per block
    constexpr int UNROLL = 4;     // keys per stream per batch
    const float NEG_INF = __int_as_float(0xff800000u);

    const int t = blockIdx.y;
    if (t >= n_tokens) return;
    const int kvh = blockIdx.x / HSPLIT;
    const int h0 = kvh * GROUP + (blockIdx.x % HSPLIT) * GPB;  // first q head of this block
    const int split = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kg = lane / LPK, li = lane % LPK;  // key group in the warp, lane in the key row

    const int n_keys = min(max(positions[t] + 1, 0), MAX_SEQ);
    const int per = CHUNK * ((((n_keys + CHUNK - 1) / CHUNK) + MAX_SPLITS - 1) / MAX_SPLITS);
    const int k0 = split * per, k1 = min(k0 + per, n_keys);
    float* part = ws + ((long long)(t * H + h0) * MAX_SPLITS + split) * (D + 2);  // this block's first head
    constexpr long long HEAD_STRIDE = (long long)MAX_SPLITS * (D + 2);
    // Every block of this (token, head group) counts itself done once its partial is written; the
    // last one merges all splits exactly as the combine kernel does (same order: bit-identical
    // output) and sets the counter back to 0 for the next launch (a captured graph's replay).
    __shared__ int s_last;
    auto merge_if_last = [&]() {
        __threadfence();  // this block's partials are visible device-wide before it is counted
        __syncthreads();
        if (threadIdx.x == 0) {
            int* c = counters + (long long)t * gridDim.x + blockIdx.x;
            s_last = atomicAdd(c, 1) == MAX_SPLITS - 1;
            if (s_last) *c = 0;
        }
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        const int n_splits = n_keys > 0 ? (n_keys + per - 1) / per : 0;
        for (int idx = threadIdx.x; idx < GPB * D; idx += NT) {
            const int g = idx / D, d = idx % D;
            const float* p = ws + (long long)(t * H + h0 + g) * HEAD_STRIDE;  // p: [MAX_SPLITS, D+2]
            float M = NEG_INF;
            for (int s = 0; s < n_splits; ++s) M = fmaxf(M, __ldcg(p + s * (D + 2)));  // L2: other blocks wrote it
            float L = 0.f, A = 0.f;
            for (int s = 0; s < n_splits; ++s) {
                const float ms = __ldcg(p + s * (D + 2));
                const float f = ms == NEG_INF ? 0.f : exp2f(ms - M);
                L += f * __ldcg(p + s * (D + 2) + 1);
                A += f * __ldcg(p + s * (D + 2) + 2 + d);
            }
            out[((long long)t * H + h0 + g) * D + d] = lg_f32_to_f16(L > 0.f ? A / L : 0.f);
        }
    };
    if (k0 >= k1) {
        // empty split (chunk starts past the last key): mark it so a reader can skip it
        for (int g = threadIdx.x; g < GPB; g += NT) {
            part[g * HEAD_STRIDE] = NEG_INF;
            part[g * HEAD_STRIDE + 1] = 0.f;
        }
        merge_if_last();
        return;
    }
    const int slot = seq_ids[t];

    // q fragment of every head, pre-scaled into the log2 domain: qf: [GPB][EL]
    float qf[GPB][EL];
#pragma unroll
    for (int g = 0; g < GPB; ++g) {
        const uint4* qrow = reinterpret_cast<const uint4*>(q + (long long)t * QSTRIDE + (long long)(h0 + g) * D);
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
            const int vi = j * LPK + li;
            uint4 v = {};
            if (vi < NV) v = qrow[vi];
            float f[EPV];
                f[0 + 0] = lg_f16_to_f32((unsigned short)(v.x & 0xffffu));
                f[0 + 1] = lg_f16_to_f32((unsigned short)(v.x >> 16));
                f[0 + 2] = lg_f16_to_f32((unsigned short)(v.y & 0xffffu));
                f[0 + 3] = lg_f16_to_f32((unsigned short)(v.y >> 16));
                f[0 + 4] = lg_f16_to_f32((unsigned short)(v.z & 0xffffu));
                f[0 + 5] = lg_f16_to_f32((unsigned short)(v.z >> 16));
                f[0 + 6] = lg_f16_to_f32((unsigned short)(v.w & 0xffffu));
                f[0 + 7] = lg_f16_to_f32((unsigned short)(v.w >> 16));

#pragma unroll
            for (int e = 0; e < EPV; ++e) qf[g][j * EPV + e] = f[e] * 0.127517431974411f;
        }
    }

    float m[GPB], l[GPB], acc[GPB][EL];
#pragma unroll
    for (int g = 0; g < GPB; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < EL; ++e) acc[g][e] = 0.f;
    }

    // row of key k: base + k * KV * D
    const unsigned short* kbase = kcache + ((long long)slot * MAX_SEQ * KV + kvh) * D;
    const unsigned short* vbase = vcache + ((long long)slot * MAX_SEQ * KV + kvh) * D;
    // Warp-uniform loop (all lanes shuffle); key of stream (warp, kg), batch slot u: kb + kg + u*NSTREAM.
    for (int kb = k0 + warp * KPW; kb < k1; kb += NSTREAM * UNROLL) {
        uint4 kv[UNROLL][VPL], vv[UNROLL][VPL];
        // issue every load of the batch before using any, to keep many bytes in flight
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int key = kb + kg + u * NSTREAM;
            const uint4* kr = reinterpret_cast<const uint4*>(kbase + (long long)key * (KV * D));
            const uint4* vr = reinterpret_cast<const uint4*>(vbase + (long long)key * (KV * D));
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                const int vi = j * LPK + li;
                kv[u][j] = uint4{};
                vv[u][j] = uint4{};
                if (key < k1 && vi < NV) {
                    kv[u][j] = kr[vi];
                    vv[u][j] = vr[vi];
                }
            }
        }
        // scores s: [UNROLL][GPB], partial over this lane's elements, then summed over the key row's lanes
        float s[UNROLL][GPB];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float kf[EL];
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                kf[j * EPV + 0] = lg_f16_to_f32((unsigned short)(kv[u][j].x & 0xffffu));
                kf[j * EPV + 1] = lg_f16_to_f32((unsigned short)(kv[u][j].x >> 16));
                kf[j * EPV + 2] = lg_f16_to_f32((unsigned short)(kv[u][j].y & 0xffffu));
                kf[j * EPV + 3] = lg_f16_to_f32((unsigned short)(kv[u][j].y >> 16));
                kf[j * EPV + 4] = lg_f16_to_f32((unsigned short)(kv[u][j].z & 0xffffu));
                kf[j * EPV + 5] = lg_f16_to_f32((unsigned short)(kv[u][j].z >> 16));
                kf[j * EPV + 6] = lg_f16_to_f32((unsigned short)(kv[u][j].w & 0xffffu));
                kf[j * EPV + 7] = lg_f16_to_f32((unsigned short)(kv[u][j].w >> 16));

            }
#pragma unroll
            for (int g = 0; g < GPB; ++g) {
                float a = 0.f;
#pragma unroll
                for (int e = 0; e < EL; ++e) a = fmaf(qf[g][e], kf[e], a);
                s[u][g] = a;
            }
        }
#pragma unroll
        for (int off = LPK / 2; off > 0; off /= 2) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int g = 0; g < GPB; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
        }
        // online softmax update, once per batch
        float p[UNROLL][GPB];
#pragma unroll
        for (int g = 0; g < GPB; ++g) {
            float bm = NEG_INF;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (kb + kg + u * NSTREAM >= k1) s[u][g] = NEG_INF;
                bm = fmaxf(bm, s[u][g]);
            }
            const float mn = fmaxf(m[g], bm);
            const float mu = mn == NEG_INF ? 0.f : mn;  // no key yet: keep exp2 away from (-inf) - (-inf)
            const float alpha = exp2f(m[g] - mu);
            m[g] = mn;
            float ls = 0.f;
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                p[u][g] = exp2f(s[u][g] - mu);
                ls += p[u][g];
            }
            l[g] = l[g] * alpha + ls;
#pragma unroll
            for (int e = 0; e < EL; ++e) acc[g][e] *= alpha;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float vf[EL];
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                vf[j * EPV + 0] = lg_f16_to_f32((unsigned short)(vv[u][j].x & 0xffffu));
                vf[j * EPV + 1] = lg_f16_to_f32((unsigned short)(vv[u][j].x >> 16));
                vf[j * EPV + 2] = lg_f16_to_f32((unsigned short)(vv[u][j].y & 0xffffu));
                vf[j * EPV + 3] = lg_f16_to_f32((unsigned short)(vv[u][j].y >> 16));
                vf[j * EPV + 4] = lg_f16_to_f32((unsigned short)(vv[u][j].z & 0xffffu));
                vf[j * EPV + 5] = lg_f16_to_f32((unsigned short)(vv[u][j].z >> 16));
                vf[j * EPV + 6] = lg_f16_to_f32((unsigned short)(vv[u][j].w & 0xffffu));
                vf[j * EPV + 7] = lg_f16_to_f32((unsigned short)(vv[u][j].w >> 16));

            }
#pragma unroll
            for (int g = 0; g < GPB; ++g)
#pragma unroll
                for (int e = 0; e < EL; ++e) acc[g][e] = fmaf(p[u][g], vf[e], acc[g][e]);
        }
    }

    // merge the key groups of this warp (lanes with equal li hold the same elements)
#pragma unroll
    for (int g = 0; g < GPB; ++g) {
        float mw = m[g];
#pragma unroll
        for (int off = LPK; off < 32; off *= 2) mw = fmaxf(mw, __shfl_xor_sync(0xffffffffu, mw, off));
        const float f = mw == NEG_INF ? 0.f : exp2f(m[g] - mw);
        l[g] *= f;
#pragma unroll
        for (int e = 0; e < EL; ++e) acc[g][e] *= f;
#pragma unroll
        for (int off = LPK; off < 32; off *= 2) {
            l[g] += __shfl_xor_sync(0xffffffffu, l[g], off);
#pragma unroll
            for (int e = 0; e < EL; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], off);
        }
        m[g] = mw;
    }

    // merge the warps through shared memory: s_acc: [NW][GPB][D]
    __shared__ float s_m[NW][GPB], s_l[NW][GPB];
    __shared__ float s_acc[NW][GPB][D];
    if (kg == 0) {
#pragma unroll
        for (int g = 0; g < GPB; ++g) {
            if (li == 0) {
                s_m[warp][g] = m[g];
                s_l[warp][g] = l[g];
            }
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                const int vi = j * LPK + li;
                if (vi < NV) {
#pragma unroll
                    for (int e = 0; e < EPV; ++e) s_acc[warp][g][vi * EPV + e] = acc[g][j * EPV + e];
                }
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < GPB * D; idx += NT) {
        const int g = idx / D, d = idx % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, s_m[w][g]);
        float L = 0.f, A = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float f = s_m[w][g] == NEG_INF ? 0.f : exp2f(s_m[w][g] - M);
            L += f * s_l[w][g];
            A += f * s_acc[w][g][d];
        }
        float* pg = part + g * HEAD_STRIDE;
        pg[2 + d] = A;
        if (d == 0) {
            pg[0] = M;
            pg[1] = L;
        }
    }
    merge_if_last();
}

// attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2: causal attention of one tile of <= 64 query rows (one sequence) for one head,
// with mma.m16n8k16 (float16 in, fp32 accumulate) and an online softmax in fp32 registers.
// 8 warps: warp w owns the 16 query rows 16*(w % 4).. and, of every 64-key tile, the half
// of 32 keys starting at 32*(w / 4). The two warps of a row group keep their own running
// max, sum and output and merge them once at the end, so no warp waits on another inside the loop.
// Key tiles are visited from the last (the only ones needing the causal mask) down to 0;
// tile j - 1 loads (cp.async, second buffer pair) while tile j is processed.
namespace attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2_impl {

constexpr int H = 16, KV = 4, D = 128, GROUP = H / KV;
constexpr int QSTRIDE = 2048, MAX_SEQ = 4096;
constexpr int NT = 256, BQ = 64, BK = 64, STAGES = 2;
constexpr int DP = D + 8;     // shared row pitch in elements: 16 B past a multiple of 32 B, so the 8 rows
                              // of one ldmatrix phase fall in 8 different 16-byte bank groups
constexpr int CH = D / 8;     // 16-byte chunks per head row
constexpr int KD = D / 16;    // k steps of Q.K^T; n16 column pairs of P.V
constexpr int NDT = D / 8;    // n8 output tiles per row group
constexpr int HK = BK / 2;    // keys per warp per tile
constexpr int NS = HK / 8;    // n8 score tiles per warp
constexpr float QS = 0.127517431974411f;
static_assert(D % 16 == 0 && BQ == 64 && NT == 256 && HK % 16 == 0, "tiling");

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared without a register round trip; ok == false writes zeros and reads nothing
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(ok ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// rows [0, 64) of a head-row matrix (row r at src + r * STRIDE) into a padded shared tile; with
// GUARD, rows >= n are zero (and not read). Strides are constants, so each 16-byte copy is the
// thread's base address plus an immediate offset.
template <long long STRIDE, bool GUARD>
__device__ __forceinline__ void load_tile(unsigned dst, const unsigned short* src, int n, int tid) {
    constexpr int TOTAL = 64 * CH, ITERS = (TOTAL + NT - 1) / NT;
    if (NT % CH == 0) {  // every pass covers whole rows: pass `it` is the first pass moved down NT / CH rows
        constexpr int RSTEP = NT % CH == 0 ? NT / CH : 1;
        const int r = tid / CH, c = tid % CH;
        dst += (unsigned)((r * DP + c * 8) * 2);
        src += r * STRIDE + c * 8;
#pragma unroll
        for (int it = 0; it < ITERS; ++it) {
            // fewer copies than threads (D < 32): the threads past the tile's 64 rows copy nothing (they
            // would write the next tile's bytes and read rows past this tile)
            if (TOTAL % NT != 0 && r + it * RSTEP >= 64) break;
            const bool ok = !GUARD || r + it * RSTEP < n;
            cp_async16(dst + it * (RSTEP * DP * 2), ok ? src + it * (RSTEP * STRIDE) : src, ok);
        }
        return;
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
        const int i = tid + it * NT;
        if (TOTAL % NT == 0 || i < TOTAL) {
            const int r = i / CH, c = i % CH;
            const bool ok = !GUARD || r < n;
            cp_async16(dst + (unsigned)((r * DP + c * 8) * 2), src + (ok ? r * STRIDE + c * 8 : 0), ok);
        }
    }
}

// four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 { %0, %1, %2, %3 }, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 { %0, %1, %2, %3 }, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// d[16x8] += A[16x16] * B[16x8]
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two floats -> one register of two 16-bit values, lo in the low half (round to nearest even)
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; 2^-inf = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2_impl

extern "C" __global__ void __launch_bounds__(256, 2) attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2(
    const unsigned short* __restrict__ q,       // [T, QSTRIDE]: head h of row r at q[r*QSTRIDE + h*D]
    const unsigned short* __restrict__ kcache,  // [max_batch, MAX_SEQ, KV, D]
    const unsigned short* __restrict__ vcache,  // [max_batch, MAX_SEQ, KV, D]
    const int* __restrict__ positions,          // [T]
    const int* __restrict__ seq_ids,            // [T] cache slot
    const int* __restrict__ tiles,              // [n_tiles, 2]: first row, row count
    unsigned short* __restrict__ out,           // [T, H*D]
    int n_tiles)
{
    using namespace attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2_impl;
    const float NEG_INF = __int_as_float(0xff800000u);
    // Qs [BQ][DP], then per stage Ks [BK][DP], Vs [BK][DP]; after the loop the same bytes hold the
    // merge buffers
    extern __shared__ uint4 attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2_smem[];
    const unsigned qs_a = smem_u32(attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2_smem);
    constexpr unsigned TILE_B = BK * DP * 2;  // bytes of one K or V tile

    // blocks start in launch order: the tiles with the most keys (last in the table) first, and
    // the heads of one tile side by side, so a GQA group's blocks read the same K/V from L2
    const int lin = blockIdx.y * gridDim.x + blockIdx.x;
    const int tile = n_tiles - 1 - lin / H, h = lin % H, kvh = h / GROUP;
    if (tile < 0) return;
    const int first = tiles[2 * tile], cnt = tiles[2 * tile + 1];
    if (cnt <= 0) return;
    const int slot = seq_ids[first];
    const int n_keys = min(positions[first + cnt - 1] + 1, MAX_SEQ);  // positions ascend within a tile
    const int n_kt = (n_keys + BK - 1) / BK;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int rg = warp & 3, kh = warp >> 2;   // row group, key half
    const int g = lane >> 2, t = lane & 3;     // mma fragment row and column pair
    const int r0 = 16 * rg + g, r1 = r0 + 8;
    // the last key each of the lane's two rows sees; padding rows copy the tile's last row
    const int p0 = min(r0 < cnt ? positions[first + r0] : n_keys - 1, n_keys - 1);
    const int p1 = min(r1 < cnt ? positions[first + r1] : n_keys - 1, n_keys - 1);
    const int plo = __reduce_min_sync(0xffffffffu, min(p0, p1));
    const int phi = __reduce_max_sync(0xffffffffu, max(p0, p1));
    const bool rows_live = 16 * rg < cnt;

    const unsigned short* kbase = kcache + ((long long)slot * MAX_SEQ * KV + kvh) * D;
    const unsigned short* vbase = vcache + ((long long)slot * MAX_SEQ * KV + kvh) * D;
    constexpr long long KSTRIDE = (long long)KV * D;

    // shared address of the K tile of stage st (its V tile follows it)
    auto k_at = [&](int st) -> unsigned { return qs_a + BQ * DP * 2 + (STAGES == 1 ? 0u : (unsigned)st * 2 * TILE_B); };
    if (n_kt > 0) {  // only the last tile can hold keys past n_keys
        const int last = n_kt - 1;
        load_tile<QSTRIDE, true>(qs_a, q + (long long)first * QSTRIDE + (long long)h * D, cnt, tid);
        load_tile<KSTRIDE, true>(k_at(last & 1), kbase + (long long)last * BK * KSTRIDE, n_keys - last * BK, tid);
        load_tile<KSTRIDE, true>(k_at(last & 1) + TILE_B, vbase + (long long)last * BK * KSTRIDE, n_keys - last * BK, tid);
        cp_async_commit();
    }

    // per-lane byte offsets of the ldmatrix row addresses (see the fragment layouts of mma.m16n8k16):
    // Q (A, row major): matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15), row = lane % 16
    const unsigned q_off = (unsigned)(((16 * rg + (lane & 15)) * DP + (lane >> 4) * 8) * 2);
    // K (B = K^T, k = head dim): matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), ...
    const unsigned k_off = (unsigned)(((HK * kh + (lane & 7) + ((lane >> 4) << 3)) * DP + ((lane >> 3) & 1) * 8) * 2);
    // V (B, k = key, transposed by ldmatrix): matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), ...
    const unsigned v_off = (unsigned)(((HK * kh + (lane & 7) + ((lane >> 3) & 1) * 8) * DP + (lane >> 4) * 8) * 2);

    float o[NDT][4];  // output rows r0 (elements 0, 1) and r1 (2, 3), columns 8j + 2t, 8j + 2t + 1
#pragma unroll
    for (int j = 0; j < NDT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m0 = NEG_INF, m1 = NEG_INF;  // running max of the rows, log2 units
    float l0 = 0.f, l1 = 0.f;          // running sums of this lane's columns (the row's 4 lanes add up at the end)

    for (int j = n_kt - 1; j >= 0; --j) {
        const int kt = j * BK;
        const unsigned ks_a = k_at(j & 1), vs_a = ks_a + TILE_B;
        cp_async_wait_all();
        __syncthreads();  // tile j (and Q) visible to every warp; every warp is done with tile j + 1's buffers
        if (j > 0) {
            const unsigned nk = k_at((j - 1) & 1);
            load_tile<KSTRIDE, false>(nk, kbase + (long long)(kt - BK) * KSTRIDE, BK, tid);
            load_tile<KSTRIDE, false>(nk + TILE_B, vbase + (long long)(kt - BK) * KSTRIDE, BK, tid);
            cp_async_commit();
        }

        const int kb = kt + HK * kh;  // the warp's first key
        const bool live = rows_live && kb <= phi;  // some row of the warp sees some key of its half
        float s[NS][4];
        if (live) {
#pragma unroll
            for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                unsigned a[4];
                ldsm_x4(a, qs_a + q_off + 32 * kd);
#pragma unroll
                for (int np = 0; np < NS / 2; ++np) {
                    unsigned b[4];
                    ldsm_x4(b, ks_a + k_off + np * (16 * DP * 2) + 32 * kd);
                    mma(s[2 * np], a, b[0], b[1]);
                    mma(s[2 * np + 1], a, b[2], b[3]);
                }
            }
        }
        if (live) {
            // scores into log2 units; keys past a row's position are masked (only near the diagonal)
            const bool diag = kb + HK - 1 > plo;
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = kb + 8 * n + 2 * t + e;
                    s[n][e] = diag && key > p0 ? NEG_INF : s[n][e] * QS;
                    s[n][2 + e] = diag && key > p1 ? NEG_INF : s[n][2 + e] * QS;
                }
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
            }
#pragma unroll
            for (int off = 1; off < 4; off *= 2) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            // a row with every key so far masked keeps max -inf: subtract 0, not -inf, so its p stay 0
            const float mu0 = mn0 == NEG_INF ? 0.f : mn0, mu1 = mn1 == NEG_INF ? 0.f : mn1;
            const float al0 = ex2(m0 - mu0), al1 = ex2(m1 - mu1);
            m0 = mn0;
            m1 = mn1;
            float rs0 = 0.f, rs1 = 0.f;
            unsigned pf[NS / 2][4];  // P as the A operand of P.V, k = the warp's keys 16kk..16kk+15
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                const float e0 = ex2(s[n][0] - mu0), e1 = ex2(s[n][1] - mu0);
                const float e2 = ex2(s[n][2] - mu1), e3 = ex2(s[n][3] - mu1);
                rs0 += e0 + e1;
                rs1 += e2 + e3;
                pf[n / 2][(n % 2) * 2] = pack2(e0, e1);
                pf[n / 2][(n % 2) * 2 + 1] = pack2(e2, e3);
            }
            l0 = l0 * al0 + rs0;
            l1 = l1 * al1 + rs1;
#pragma unroll
            for (int d = 0; d < NDT; ++d) {
                o[d][0] *= al0; o[d][1] *= al0;
                o[d][2] *= al1; o[d][3] *= al1;
            }
#pragma unroll
            for (int kk = 0; kk < NS / 2; ++kk)
#pragma unroll
                for (int dp = 0; dp < KD; ++dp) {
                    unsigned b[4];
                    ldsm_x4_t(b, vs_a + v_off + kk * (16 * DP * 2) + 32 * dp);
                    mma(o[2 * dp], pf[kk], b[0], b[1]);
                    mma(o[2 * dp + 1], pf[kk], b[2], b[3]);
                }
        }
    }

    // merge the two key halves of each row group: warp (rg, kh) finishes output tiles
    // [kh*NDT/2, (kh+1)*NDT/2) and hands the other half of its tiles to its partner
#pragma unroll
    for (int off = 1; off < 4; off *= 2) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    __syncthreads();  // every warp is done with Qs, Ks, Vs (no copy is issued after tile 1)
    constexpr int HALF = NDT / 2;
    float4* xo = reinterpret_cast<float4*>(attn_prefill_mma_f16_h16_kv4_d128_q2048_s4096_bq64_bk64_st2_mb2_smem);  // [4 rg][2 kh][HALF][32 lanes]
    float4* xs = xo + 4 * 2 * HALF * 32;                         // [4 rg][2 kh][32 lanes]: m0, m1, l0, l1
    static_assert((4 * 2 * HALF * 32 + 4 * 2 * 32) * 16 <= (BQ + 2 * BK) * DP * 2, "merge buffers fit");
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
        // the tile the partner finishes; both sides of the select index o at compile time
        xo[((rg * 2 + kh) * HALF + i) * 32 + lane] =
            kh ? make_float4(o[i][0], o[i][1], o[i][2], o[i][3])
               : make_float4(o[HALF + i][0], o[HALF + i][1], o[HALF + i][2], o[HALF + i][3]);
    }
    xs[(rg * 2 + kh) * 32 + lane] = make_float4(m0, m1, l0, l1);
    __syncthreads();
    const float4 st = xs[(rg * 2 + (1 - kh)) * 32 + lane];
    const float mm0 = fmaxf(m0, st.x), mm1 = fmaxf(m1, st.y);
    const float mu0 = mm0 == NEG_INF ? 0.f : mm0, mu1 = mm1 == NEG_INF ? 0.f : mm1;
    const float ca0 = ex2(m0 - mu0), cb0 = ex2(st.x - mu0), ca1 = ex2(m1 - mu1), cb1 = ex2(st.y - mu1);
    const float sum0 = l0 * ca0 + st.z * cb0, sum1 = l1 * ca1 + st.w * cb1;
    const float i0 = sum0 > 0.f ? 1.f / sum0 : 0.f, i1 = sum1 > 0.f ? 1.f / sum1 : 0.f;
    const float fa0 = ca0 * i0, fb0 = cb0 * i0, fa1 = ca1 * i1, fb1 = cb1 * i1;
    // the tile's first row and count again, rather than holding them in registers through the loop
    const int first_o = tiles[2 * tile], cnt_o = tiles[2 * tile + 1];
    unsigned short* orow0 = out + (long long)(first_o + r0) * (H * D) + (long long)h * D + 2 * t;
    unsigned short* orow1 = orow0 + 8 * (H * D);
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
        const float4 f = xo[((rg * 2 + (1 - kh)) * HALF + i) * 32 + lane];
        const float4 mine = kh ? make_float4(o[HALF + i][0], o[HALF + i][1], o[HALF + i][2], o[HALF + i][3])
                               : make_float4(o[i][0], o[i][1], o[i][2], o[i][3]);
        const int col = 8 * (kh * HALF + i);
        if (r0 < cnt_o)
            *reinterpret_cast<unsigned*>(orow0 + col) = pack2(mine.x * fa0 + f.x * fb0, mine.y * fa0 + f.y * fb0);
        if (r1 < cnt_o)
            *reinterpret_cast<unsigned*>(orow1 + col) = pack2(mine.z * fa1 + f.z * fb1, mine.w * fa1 + f.w * fb1);
    }
}

// gemv_f16_n4096_k2048_r1: decode GEMV / skinny GEMM, h[r, n] = sum_k x[r, k] * W[n, k]
// x: [rows, 2048] float16, W: [4096, 2048] float16, bias: [4096] or null, out: [rows, 4096] float16
// Rows are taken 1 at a time; W is streamed from memory once per row tile.
namespace gemv_f16_n4096_k2048_r1_impl {

constexpr int K = 2048;
constexpr int N_OUT = 4096;  // output columns
constexpr int MT = 1;  // W rows per output column: 2 when gate and up rows pair up
constexpr int ROW_TILE = 1;
constexpr int WARPS = 8;
constexpr int U = 8;  // 16-byte W loads per W row and lane issued before any is used
constexpr bool NORM = false;
constexpr int THREADS = WARPS * 32;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack

__device__ __forceinline__ float epilogue(const float (&h)[MT]) {
    return h[0];
}


// 16-bit weights on tensor cores (mma.m16n8k16, fp32 accumulate). A block owns 16 output
// columns; its WARPS warps split K and add their partial tiles through shared memory.
// The mma's A operand is 16 W rows, its B operand up to 8 rows of x, so the fragment of
// each lane is two 16-byte chunks of W (rows g and g+8) and one of x (row g), all at the
// same k offset: the dot product does not care in which order k is visited, so the mma's
// k positions {2t, 2t+1, 2t+8, 2t+9} map onto the lane's 8 contiguous k values (two mmas).
// A "step" is 4 lanes x 16 B = 32 k of all 16 W rows; the warps of a block take adjacent steps.
constexpr int C = K / 8;  // 16-byte chunks per row of W and x
constexpr int S_FULL = C / 4;  // steps with all 4 chunks inside the row
constexpr int S = (C + 3) / 4;
constexpr int BATCH = WARPS * U;  // steps the block consumes per batch
constexpr int NB_FULL = S_FULL / BATCH;  // batches needing no bounds checks
constexpr bool TAIL = S > NB_FULL * BATCH;
constexpr int NT = (ROW_TILE + 7) / 8;  // n8 tiles of x rows per pass

__device__ __forceinline__ uint4 ld_weight(const uint4* p) {
    // W is read exactly once: keep it out of L1 so x stays resident there; the 256-byte
    // L2 fetch brings in the neighbouring steps that the other warps of the block read next
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_act(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 { %0, %1, %2, %3 }, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// d[16x8] += A[16x16] * B[16x8]
__device__ __forceinline__ void mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// U steps of one warp: every load is issued before the first mma, so U * MT * 2 independent
// 16-byte W loads per lane are in flight together. GUARD checks the ragged end of K.
// Before a block may read x (it waits for the kernel before it, and with the rmsnorm prologue it
// reduces whole x rows first) it asks L2 for the start of its W rows, so HBM is busy meanwhile
// (PF_BYTES of each row, ~32 KB a block).
constexpr int PF_BYTES = K * (int)sizeof(unsigned short) < 2048 ? K * (int)sizeof(unsigned short) : 2048;
constexpr int PF_LINES = (PF_BYTES + 127) / 128;  // 128-byte lines of each W row

__device__ __forceinline__ void prefetch_w(const uint4* W4, int col0) {
    for (int i = threadIdx.x; i < MT * 16 * PF_LINES; i += THREADS) {
        const int r = i / PF_LINES, line = i % PF_LINES;
        const int col = min(col0 + (r & 15), N_OUT - 1);
        const char* p = reinterpret_cast<const char*>(W4 + (lg_i64)((r >> 4) * N_OUT + col) * C) + line * 128;
        asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
    }
}

// With the rmsnorm prologue each x chunk becomes round(x * rs * norm_w) before it feeds the mma.
template <bool GUARD>
__device__ __forceinline__ void batch(int step0, int t, const uint4* const (&wrow)[MT][2], const uint4* const (&xrow)[NT],
                                      const bool (&xok)[NT], const float (&rs)[NT], const uint4* nw4,
                                      float (&acc)[MT][NT][4]) {
    uint4 w[U][MT][2];
    uint4 xv[U][NT];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;  // this lane's chunk
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int h = 0; h < 2; ++h) w[u][m][h] = ok ? ld_weight(wrow[m][h] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            // unconditional load (rows past the tile read row 0) then select: no branch splits the batch
            const uint4 v = ld_act(xrow[n] + (ok ? c : 0));
            xv[u][n] = ok && xok[n] ? v : make_uint4(0u, 0u, 0u, 0u);
        }
        if (NORM) {
            const uint4 nv = ld_act(nw4 + (ok ? c : 0));
            float nf[8];
            lg_unpack(nv, nf, Tag());
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                float f[8];
                lg_unpack(xv[u][n], f, Tag());
                #pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = f[j] * rs[n] * nf[j];
                xv[u][n] = lg_pack(f, Tag());
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 a = w[u][m][0], b = w[u][m][1], xx = xv[u][n];
                mma(acc[m][n], a.x, b.x, a.y, b.y, xx.x, xx.y);  // k = chunk elements 0..3
                mma(acc[m][n], a.z, b.z, a.w, b.w, xx.z, xx.w);  // k = chunk elements 4..7
            }
}


__device__ __forceinline__ void run(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows,
                                    const unsigned short* norm_w, const unsigned short* res, const int* positions, const int* seq_ids,
                                    const int* seq_lens, const float* inv_freq, unsigned short* kcache, unsigned short* vcache) {
    __shared__ float red[WARPS][MT][NT][4][32];  // each warp's partial C fragments
    __shared__ float s_rstd[ROW_TILE];  // rmsnorm prologue: each tile row's rsqrt(mean(x^2) + eps)
    const uint4* nw4 = reinterpret_cast<const uint4*>(norm_w);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 16;
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* wrow[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = min(col0 + g + 8 * h, N_OUT - 1);  // past the end: computed, never stored
            wrow[m][h] = W4 + (lg_i64)(m * N_OUT + col) * C;
        }

    for (int row0 = 0; row0 < rows; row0 += ROW_TILE) {
        const int here = min(ROW_TILE, rows - row0);
        const uint4* xrow[NT];
        bool xok[NT];
        float rs[NT];
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int r = 8 * n + g;  // the x row this lane feeds into B
            xok[n] = r < here;
            xrow[n] = x4 + (lg_i64)(row0 + (xok[n] ? r : 0)) * C;
            rs[n] = NORM && xok[n] ? s_rstd[r] : 0.0f;
        }
        float acc[MT][NT][4];
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.0f;

        #pragma unroll 1
        for (int b = 0; b < NB_FULL; ++b) batch<false>(b * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);
        if (TAIL) batch<true>(NB_FULL * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);

        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][m][n][i][lane] = acc[m][n][i];
        __syncthreads();
        // element e of the tile: fragment i of lane l in n-tile n; C row = output column, C col = x row
        for (int e = threadIdx.x; e < NT * 128; e += WARPS * 32) {
            const int n = e >> 7, i = (e >> 5) & 3, l = e & 31;
            const int col = col0 + (l >> 2) + 8 * (i >> 1);
            const int r = 8 * n + 2 * (l & 3) + (i & 1);
            if (col >= N_OUT || r >= here) continue;
            float h[MT];
            #pragma unroll
            for (int m = 0; m < MT; ++m) {
                float s = 0.0f;
                #pragma unroll
                for (int w = 0; w < WARPS; ++w) s += red[w][m][n][i][l];
                h[m] = s;
            }
            const lg_i64 o = (lg_i64)(row0 + r) * N_OUT + col;
            out[o] = lg_f32_to_f16(epilogue(h));
        }
        __syncthreads();  // red is rewritten by the next row tile
    }
}

}  // namespace gemv_f16_n4096_k2048_r1_impl

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_f16_n4096_k2048_r1(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows) {
    gemv_f16_n4096_k2048_r1_impl::prefetch_w(reinterpret_cast<const uint4*>(W), blockIdx.x * 16);  // weights only: safe before the wait
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): x and out only after this
    lg_pdl_launch_dependents();
    gemv_f16_n4096_k2048_r1_impl::run(x, W, bias, out, rows, nullptr, nullptr,
        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// allreduce_residual_f16_d4096_r2_c262144: the tensor-parallel all-reduce of a row-parallel projection's partial sums, with the
// residual add (and the projection's bias) after it, over 2 ranks in one process:
//   out[rows, 4096] = round(round(round(sum over ranks of y) + bias) + r)     (float16 storage)
// The sum is taken in fp32 in rank order, so every rank computes the same bits.
//
// One-shot push over peer memory (P2P: NVLink or PCIe), low-latency form: every 32-bit word of
// y travels in one 8-byte store together with the call's epoch, so the receiver polls the words
// themselves and no fence or flag round trip is needed. Each rank's mailbox (a workspace on its
// own GPU) holds block epochs u32 [32], then at byte 256 two parity slots per source
// rank of 262144 elements as 8-byte (word, epoch) pairs: u64 [2][2][131072]. Block b of rank r:
//   1. takes the next epoch e of block b (a counter in r's mailbox; parity p = e & 1);
//   2. stores each word w of its slice of y, with e beside it, at slot [p][r] of every peer's mailbox;
//   3. sums its slice in rank order: y itself for rank r; for a peer q, its own mailbox's slot
//      [p][q] word w, read until its epoch reads e (it is then q's word of this call).
// Every block runs every call, every rank makes the same calls, so epochs agree across ranks.
// Reuse is safe: rank r writes a slot of parity p again two calls later, after its call between
// read a word of that call from every peer, written only after the peer's earlier call, reads
// included, had finished (stream order, and each kernel waits for the one before it).
// All 32 blocks must be resident at once (they wait on the peers' same blocks): a small grid.
// local != 0: no peers (the sums are already reduced, as NCCL leaves them): out = y + bias + r.
namespace allreduce_residual_f16_d4096_r2_c262144_impl {

constexpr int N = 2, G = 32, EPW = 2;  // EPW: elements per 32-bit word
constexpr lg_i64 WPR = 4096 / EPW;  // words per row
constexpr lg_i64 SLOT = 262144 / EPW;  // words per mailbox slot
constexpr lg_i64 DATA_OFFSET = 256;
typedef lg_f16 Tag;

__device__ __forceinline__ void unpack_word(unsigned w, float (&f)[EPW]) {
    f[0] = lg_to_f32((unsigned short)(w & 0xffffu), Tag());
    f[1] = lg_to_f32((unsigned short)(w >> 16), Tag());
}
__device__ __forceinline__ unsigned pack_word(const float (&f)[EPW]) {
    return (unsigned)lg_from_f32(f[0], Tag()) | ((unsigned)lg_from_f32(f[1], Tag()) << 16);
}
__device__ __forceinline__ void add_word(float (&acc)[EPW], unsigned w) {
    float t[EPW];
    unpack_word(w, t);
    #pragma unroll
    for (int j = 0; j < EPW; ++j) acc[j] += t[j];
}
__device__ __forceinline__ unsigned long long* slot(unsigned long long mailbox, int parity, int src) {
    return reinterpret_cast<unsigned long long*>(mailbox + DATA_OFFSET) + ((lg_i64)parity * N + src) * SLOT;
}
// 8-byte stores and loads at system scope: single-copy atomic, so a word is never seen with the
// wrong epoch, and never served stale from L1
__device__ __forceinline__ void store_sys(unsigned long long* p, unsigned long long v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ unsigned long long load_sys(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void run(const unsigned short* y, const unsigned short* r, const unsigned short* bias, unsigned short* out, int rows,
                                    const unsigned long long* peers, int local) {
    // may be launched early (programmatic dependent launch): nothing is read before the wait; the
    // kernel after it may then start (its weight prefetch overlaps this kernel's wait for its peers)
    lg_pdl_wait();
    lg_pdl_launch_dependents();
    const lg_i64 nw = (lg_i64)rows * WPR;
    const lg_i64 per = (nw + G - 1) / G;  // this block's slice of the words
    const lg_i64 first = (lg_i64)blockIdx.x * per, last = first + per < nw ? first + per : nw;
    const unsigned* yw = reinterpret_cast<const unsigned*>(y);
    int rank = 0, ranks = 1, parity = 0;
    unsigned e = 0;
    unsigned long long own = 0;
    if (!local) {
        __shared__ unsigned epoch;
        rank = (int)peers[0];
        ranks = N;
        own = peers[1 + rank];
        if (threadIdx.x == 0) {
            unsigned* counter = reinterpret_cast<unsigned*>(own) + blockIdx.x;
            epoch = *counter + 1u;
            *counter = epoch;
        }
        __syncthreads();
        e = epoch;
        parity = (int)(e & 1u);
        for (lg_i64 w = first + threadIdx.x; w < last; w += 256) {  // 2. push
            const unsigned long long packed = ((unsigned long long)e << 32) | yw[w];
            #pragma unroll
            for (int q = 0; q < N; ++q)
                if (q != rank) store_sys(slot(peers[1 + q], parity, rank) + w, packed);
        }
    }
    for (lg_i64 w = first + threadIdx.x; w < last; w += 256) {  // 3. sum in rank order
        float acc[EPW];
        #pragma unroll
        for (int j = 0; j < EPW; ++j) acc[j] = 0.0f;
        for (int q = 0; q < ranks; ++q) {
            if (q == rank) {
                add_word(acc, yw[w]);
                continue;
            }
            const unsigned long long* p = slot(own, parity, q) + w;
            unsigned long long v = load_sys(p);
            while ((unsigned)(v >> 32) != e) v = load_sys(p);
            add_word(acc, (unsigned)v);
        }
        unpack_word(pack_word(acc), acc);  // the reduced sums, stored
        if (bias != nullptr) {
            add_word(acc, reinterpret_cast<const unsigned*>(bias)[w % WPR]);
            unpack_word(pack_word(acc), acc);  // the biased sums, stored
        }
        add_word(acc, reinterpret_cast<const unsigned*>(r)[w]);
        reinterpret_cast<unsigned*>(out)[w] = pack_word(acc);
    }
}

}  // namespace allreduce_residual_f16_d4096_r2_c262144_impl

extern "C" __global__ void __launch_bounds__(256)
allreduce_residual_f16_d4096_r2_c262144(const unsigned short* y, const unsigned short* r, const unsigned short* bias_or_null, unsigned short* out, int rows,
          const unsigned long long* peers, int local) {
    allreduce_residual_f16_d4096_r2_c262144_impl::run(y, r, bias_or_null, out, rows, peers, local);
}

// gemv_f16_n14336_k4096_r1_rms1em05_silu: decode GEMV / skinny GEMM, h[r, n] = sum_k x[r, k] * W[n, k]
// prologue rmsnorm: x is first replaced by rmsnorm(x) * norm_w (fp32 statistics of each whole row,
// each element rounded to float16 as the rmsnorm kernel stores it)
// epilogue silu_mul: W = [gate rows; up rows], out[r, j] = silu(h[r, j]) * h[r, 7168 + j]
// x: [rows, 4096] float16, W: [14336, 4096] float16, bias: [14336] or null, out: [rows, 7168] float16
// Rows are taken 1 at a time; W is streamed from memory once per row tile.
namespace gemv_f16_n14336_k4096_r1_rms1em05_silu_impl {

constexpr int K = 4096;
constexpr int N_OUT = 7168;  // output columns
constexpr int MT = 2;  // W rows per output column: 2 when gate and up rows pair up
constexpr int ROW_TILE = 1;
constexpr int WARPS = 8;
constexpr int U = 4;  // 16-byte W loads per W row and lane issued before any is used
constexpr bool NORM = true;
constexpr int THREADS = WARPS * 32;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack
constexpr float EPS = 1e-05f;

__device__ __forceinline__ float epilogue(const float (&h)[MT]) {
    return h[0] / (1.0f + expf(-h[0])) * h[1];
}

// rstd of each row of the tile into s_rstd (every thread takes part: call it from the whole block).
// The block reads the tile's rows whole; they are L2-resident and small next to its W rows.
__device__ __forceinline__ void row_rstd(const unsigned short* x, int row0, int here, float* s_rstd) {
    __shared__ float part[WARPS][ROW_TILE];
    constexpr int E = 16 / sizeof(unsigned short);  // elements per 16-byte vector
    constexpr int CV = K / E;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint4* x4 = reinterpret_cast<const uint4*>(x) + (lg_i64)row0 * CV;
    float ss[ROW_TILE];
    #pragma unroll
    for (int r = 0; r < ROW_TILE; ++r) ss[r] = 0.0f;
    for (int c = threadIdx.x; c < CV; c += THREADS) {
        #pragma unroll
        for (int r = 0; r < ROW_TILE; ++r) {
            if (r < here) {
                float f[E];
                lg_unpack(x4[(lg_i64)r * CV + c], f, Tag());
                #pragma unroll
                for (int j = 0; j < E; ++j) ss[r] += f[j] * f[j];
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < ROW_TILE; ++r) {
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], off);
        if (lane == 0) part[warp][r] = ss[r];
    }
    __syncthreads();
    if (threadIdx.x < ROW_TILE) {
        float t = 0.0f;
        #pragma unroll
        for (int w = 0; w < WARPS; ++w) t += part[w][threadIdx.x];
        s_rstd[threadIdx.x] = rsqrtf(t / (float)K + EPS);
    }
    __syncthreads();
}

// 16-bit weights on tensor cores (mma.m16n8k16, fp32 accumulate). A block owns 16 output
// columns; its WARPS warps split K and add their partial tiles through shared memory.
// The mma's A operand is 16 W rows, its B operand up to 8 rows of x, so the fragment of
// each lane is two 16-byte chunks of W (rows g and g+8) and one of x (row g), all at the
// same k offset: the dot product does not care in which order k is visited, so the mma's
// k positions {2t, 2t+1, 2t+8, 2t+9} map onto the lane's 8 contiguous k values (two mmas).
// A "step" is 4 lanes x 16 B = 32 k of all 16 W rows; the warps of a block take adjacent steps.
constexpr int C = K / 8;  // 16-byte chunks per row of W and x
constexpr int S_FULL = C / 4;  // steps with all 4 chunks inside the row
constexpr int S = (C + 3) / 4;
constexpr int BATCH = WARPS * U;  // steps the block consumes per batch
constexpr int NB_FULL = S_FULL / BATCH;  // batches needing no bounds checks
constexpr bool TAIL = S > NB_FULL * BATCH;
constexpr int NT = (ROW_TILE + 7) / 8;  // n8 tiles of x rows per pass

__device__ __forceinline__ uint4 ld_weight(const uint4* p) {
    // W is read exactly once: keep it out of L1 so x stays resident there; the 256-byte
    // L2 fetch brings in the neighbouring steps that the other warps of the block read next
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_act(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 { %0, %1, %2, %3 }, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// d[16x8] += A[16x16] * B[16x8]
__device__ __forceinline__ void mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// U steps of one warp: every load is issued before the first mma, so U * MT * 2 independent
// 16-byte W loads per lane are in flight together. GUARD checks the ragged end of K.
// Before a block may read x (it waits for the kernel before it, and with the rmsnorm prologue it
// reduces whole x rows first) it asks L2 for the start of its W rows, so HBM is busy meanwhile
// (PF_BYTES of each row, ~32 KB a block).
constexpr int PF_BYTES = K * (int)sizeof(unsigned short) < 2048 ? K * (int)sizeof(unsigned short) : 2048;
constexpr int PF_LINES = (PF_BYTES + 127) / 128;  // 128-byte lines of each W row

__device__ __forceinline__ void prefetch_w(const uint4* W4, int col0) {
    for (int i = threadIdx.x; i < MT * 16 * PF_LINES; i += THREADS) {
        const int r = i / PF_LINES, line = i % PF_LINES;
        const int col = min(col0 + (r & 15), N_OUT - 1);
        const char* p = reinterpret_cast<const char*>(W4 + (lg_i64)((r >> 4) * N_OUT + col) * C) + line * 128;
        asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
    }
}

// With the rmsnorm prologue each x chunk becomes round(x * rs * norm_w) before it feeds the mma.
template <bool GUARD>
__device__ __forceinline__ void batch(int step0, int t, const uint4* const (&wrow)[MT][2], const uint4* const (&xrow)[NT],
                                      const bool (&xok)[NT], const float (&rs)[NT], const uint4* nw4,
                                      float (&acc)[MT][NT][4]) {
    uint4 w[U][MT][2];
    uint4 xv[U][NT];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;  // this lane's chunk
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int h = 0; h < 2; ++h) w[u][m][h] = ok ? ld_weight(wrow[m][h] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            // unconditional load (rows past the tile read row 0) then select: no branch splits the batch
            const uint4 v = ld_act(xrow[n] + (ok ? c : 0));
            xv[u][n] = ok && xok[n] ? v : make_uint4(0u, 0u, 0u, 0u);
        }
        if (NORM) {
            const uint4 nv = ld_act(nw4 + (ok ? c : 0));
            float nf[8];
            lg_unpack(nv, nf, Tag());
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                float f[8];
                lg_unpack(xv[u][n], f, Tag());
                #pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = f[j] * rs[n] * nf[j];
                xv[u][n] = lg_pack(f, Tag());
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 a = w[u][m][0], b = w[u][m][1], xx = xv[u][n];
                mma(acc[m][n], a.x, b.x, a.y, b.y, xx.x, xx.y);  // k = chunk elements 0..3
                mma(acc[m][n], a.z, b.z, a.w, b.w, xx.z, xx.w);  // k = chunk elements 4..7
            }
}


__device__ __forceinline__ void run(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows,
                                    const unsigned short* norm_w, const unsigned short* res, const int* positions, const int* seq_ids,
                                    const int* seq_lens, const float* inv_freq, unsigned short* kcache, unsigned short* vcache) {
    __shared__ float red[WARPS][MT][NT][4][32];  // each warp's partial C fragments
    __shared__ float s_rstd[ROW_TILE];  // rmsnorm prologue: each tile row's rsqrt(mean(x^2) + eps)
    const uint4* nw4 = reinterpret_cast<const uint4*>(norm_w);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 16;
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* wrow[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = min(col0 + g + 8 * h, N_OUT - 1);  // past the end: computed, never stored
            wrow[m][h] = W4 + (lg_i64)(m * N_OUT + col) * C;
        }

    for (int row0 = 0; row0 < rows; row0 += ROW_TILE) {
        const int here = min(ROW_TILE, rows - row0);
        row_rstd(x, row0, here, s_rstd);
        const uint4* xrow[NT];
        bool xok[NT];
        float rs[NT];
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int r = 8 * n + g;  // the x row this lane feeds into B
            xok[n] = r < here;
            xrow[n] = x4 + (lg_i64)(row0 + (xok[n] ? r : 0)) * C;
            rs[n] = NORM && xok[n] ? s_rstd[r] : 0.0f;
        }
        float acc[MT][NT][4];
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.0f;

        #pragma unroll 1
        for (int b = 0; b < NB_FULL; ++b) batch<false>(b * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);
        if (TAIL) batch<true>(NB_FULL * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);

        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][m][n][i][lane] = acc[m][n][i];
        __syncthreads();
        // element e of the tile: fragment i of lane l in n-tile n; C row = output column, C col = x row
        for (int e = threadIdx.x; e < NT * 128; e += WARPS * 32) {
            const int n = e >> 7, i = (e >> 5) & 3, l = e & 31;
            const int col = col0 + (l >> 2) + 8 * (i >> 1);
            const int r = 8 * n + 2 * (l & 3) + (i & 1);
            if (col >= N_OUT || r >= here) continue;
            float h[MT];
            #pragma unroll
            for (int m = 0; m < MT; ++m) {
                float s = 0.0f;
                #pragma unroll
                for (int w = 0; w < WARPS; ++w) s += red[w][m][n][i][l];
                h[m] = s;
            }
            const lg_i64 o = (lg_i64)(row0 + r) * N_OUT + col;
            out[o] = lg_f32_to_f16(epilogue(h));
        }
        __syncthreads();  // red is rewritten by the next row tile
    }
}

}  // namespace gemv_f16_n14336_k4096_r1_rms1em05_silu_impl

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_f16_n14336_k4096_r1_rms1em05_silu(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows, const unsigned short* norm_w) {
    gemv_f16_n14336_k4096_r1_rms1em05_silu_impl::prefetch_w(reinterpret_cast<const uint4*>(W), blockIdx.x * 16);  // weights only: safe before the wait
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): x and out only after this
    lg_pdl_launch_dependents();
    gemv_f16_n14336_k4096_r1_rms1em05_silu_impl::run(x, W, bias, out, rows, norm_w, nullptr,
        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// ew_silu_mul_halves_f16_d7168: out = silu(a) * b over [rows, 7168] float16, computed in fp32
// a: [rows, 14336] read as a = a[:, :7168], b = a[:, 7168:]; the b argument is unused; out must not alias a
// One thread per 8-element vector; out may alias an input it has the shape of.
namespace ew_silu_mul_halves_f16_d7168_impl {

constexpr int V = 8;  // elements per vector access
constexpr int NV = 7168 / V;  // vectors per output row
typedef uint4 Vec;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float op(float a, float b) { return silu(a) * b; }

__device__ __forceinline__ void run(const unsigned short* a, const unsigned short* b, unsigned short* out, int rows) {
    const lg_i64 i = (lg_i64)blockIdx.x * 256 + threadIdx.x;  // output vector
    if (i >= (lg_i64)rows * NV) return;
    const Vec* a4 = reinterpret_cast<const Vec*>(a);
    float av[V], bv[V];
    const lg_i64 row = i / NV, c = i % NV;
    lg_unpack(a4[row * 2 * NV + c], av, Tag());
    lg_unpack(a4[row * 2 * NV + NV + c], bv, Tag());
    float o[V];
    #pragma unroll
    for (int j = 0; j < V; ++j) o[j] = op(av[j], bv[j]);
    reinterpret_cast<Vec*>(out)[i] = lg_pack(o, Tag());
}

}  // namespace ew_silu_mul_halves_f16_d7168_impl

extern "C" __global__ void __launch_bounds__(256)
ew_silu_mul_halves_f16_d7168(const unsigned short* a, const unsigned short* b_or_null, unsigned short* out, int rows) {
    ew_silu_mul_halves_f16_d7168_impl::run(a, b_or_null, out, rows);
}

// gemv_f16_n4096_k7168_r1: decode GEMV / skinny GEMM, h[r, n] = sum_k x[r, k] * W[n, k]
// x: [rows, 7168] float16, W: [4096, 7168] float16, bias: [4096] or null, out: [rows, 4096] float16
// Rows are taken 1 at a time; W is streamed from memory once per row tile.
namespace gemv_f16_n4096_k7168_r1_impl {

constexpr int K = 7168;
constexpr int N_OUT = 4096;  // output columns
constexpr int MT = 1;  // W rows per output column: 2 when gate and up rows pair up
constexpr int ROW_TILE = 1;
constexpr int WARPS = 8;
constexpr int U = 8;  // 16-byte W loads per W row and lane issued before any is used
constexpr bool NORM = false;
constexpr int THREADS = WARPS * 32;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack

__device__ __forceinline__ float epilogue(const float (&h)[MT]) {
    return h[0];
}


// 16-bit weights on tensor cores (mma.m16n8k16, fp32 accumulate). A block owns 16 output
// columns; its WARPS warps split K and add their partial tiles through shared memory.
// The mma's A operand is 16 W rows, its B operand up to 8 rows of x, so the fragment of
// each lane is two 16-byte chunks of W (rows g and g+8) and one of x (row g), all at the
// same k offset: the dot product does not care in which order k is visited, so the mma's
// k positions {2t, 2t+1, 2t+8, 2t+9} map onto the lane's 8 contiguous k values (two mmas).
// A "step" is 4 lanes x 16 B = 32 k of all 16 W rows; the warps of a block take adjacent steps.
constexpr int C = K / 8;  // 16-byte chunks per row of W and x
constexpr int S_FULL = C / 4;  // steps with all 4 chunks inside the row
constexpr int S = (C + 3) / 4;
constexpr int BATCH = WARPS * U;  // steps the block consumes per batch
constexpr int NB_FULL = S_FULL / BATCH;  // batches needing no bounds checks
constexpr bool TAIL = S > NB_FULL * BATCH;
constexpr int NT = (ROW_TILE + 7) / 8;  // n8 tiles of x rows per pass

__device__ __forceinline__ uint4 ld_weight(const uint4* p) {
    // W is read exactly once: keep it out of L1 so x stays resident there; the 256-byte
    // L2 fetch brings in the neighbouring steps that the other warps of the block read next
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_act(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 { %0, %1, %2, %3 }, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// d[16x8] += A[16x16] * B[16x8]
__device__ __forceinline__ void mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// U steps of one warp: every load is issued before the first mma, so U * MT * 2 independent
// 16-byte W loads per lane are in flight together. GUARD checks the ragged end of K.
// Before a block may read x (it waits for the kernel before it, and with the rmsnorm prologue it
// reduces whole x rows first) it asks L2 for the start of its W rows, so HBM is busy meanwhile
// (PF_BYTES of each row, ~32 KB a block).
constexpr int PF_BYTES = K * (int)sizeof(unsigned short) < 2048 ? K * (int)sizeof(unsigned short) : 2048;
constexpr int PF_LINES = (PF_BYTES + 127) / 128;  // 128-byte lines of each W row

__device__ __forceinline__ void prefetch_w(const uint4* W4, int col0) {
    for (int i = threadIdx.x; i < MT * 16 * PF_LINES; i += THREADS) {
        const int r = i / PF_LINES, line = i % PF_LINES;
        const int col = min(col0 + (r & 15), N_OUT - 1);
        const char* p = reinterpret_cast<const char*>(W4 + (lg_i64)((r >> 4) * N_OUT + col) * C) + line * 128;
        asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
    }
}

// With the rmsnorm prologue each x chunk becomes round(x * rs * norm_w) before it feeds the mma.
template <bool GUARD>
__device__ __forceinline__ void batch(int step0, int t, const uint4* const (&wrow)[MT][2], const uint4* const (&xrow)[NT],
                                      const bool (&xok)[NT], const float (&rs)[NT], const uint4* nw4,
                                      float (&acc)[MT][NT][4]) {
    uint4 w[U][MT][2];
    uint4 xv[U][NT];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;  // this lane's chunk
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int h = 0; h < 2; ++h) w[u][m][h] = ok ? ld_weight(wrow[m][h] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            // unconditional load (rows past the tile read row 0) then select: no branch splits the batch
            const uint4 v = ld_act(xrow[n] + (ok ? c : 0));
            xv[u][n] = ok && xok[n] ? v : make_uint4(0u, 0u, 0u, 0u);
        }
        if (NORM) {
            const uint4 nv = ld_act(nw4 + (ok ? c : 0));
            float nf[8];
            lg_unpack(nv, nf, Tag());
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                float f[8];
                lg_unpack(xv[u][n], f, Tag());
                #pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = f[j] * rs[n] * nf[j];
                xv[u][n] = lg_pack(f, Tag());
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 a = w[u][m][0], b = w[u][m][1], xx = xv[u][n];
                mma(acc[m][n], a.x, b.x, a.y, b.y, xx.x, xx.y);  // k = chunk elements 0..3
                mma(acc[m][n], a.z, b.z, a.w, b.w, xx.z, xx.w);  // k = chunk elements 4..7
            }
}


__device__ __forceinline__ void run(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows,
                                    const unsigned short* norm_w, const unsigned short* res, const int* positions, const int* seq_ids,
                                    const int* seq_lens, const float* inv_freq, unsigned short* kcache, unsigned short* vcache) {
    __shared__ float red[WARPS][MT][NT][4][32];  // each warp's partial C fragments
    __shared__ float s_rstd[ROW_TILE];  // rmsnorm prologue: each tile row's rsqrt(mean(x^2) + eps)
    const uint4* nw4 = reinterpret_cast<const uint4*>(norm_w);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 16;
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* wrow[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = min(col0 + g + 8 * h, N_OUT - 1);  // past the end: computed, never stored
            wrow[m][h] = W4 + (lg_i64)(m * N_OUT + col) * C;
        }

    for (int row0 = 0; row0 < rows; row0 += ROW_TILE) {
        const int here = min(ROW_TILE, rows - row0);
        const uint4* xrow[NT];
        bool xok[NT];
        float rs[NT];
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int r = 8 * n + g;  // the x row this lane feeds into B
            xok[n] = r < here;
            xrow[n] = x4 + (lg_i64)(row0 + (xok[n] ? r : 0)) * C;
            rs[n] = NORM && xok[n] ? s_rstd[r] : 0.0f;
        }
        float acc[MT][NT][4];
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.0f;

        #pragma unroll 1
        for (int b = 0; b < NB_FULL; ++b) batch<false>(b * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);
        if (TAIL) batch<true>(NB_FULL * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);

        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][m][n][i][lane] = acc[m][n][i];
        __syncthreads();
        // element e of the tile: fragment i of lane l in n-tile n; C row = output column, C col = x row
        for (int e = threadIdx.x; e < NT * 128; e += WARPS * 32) {
            const int n = e >> 7, i = (e >> 5) & 3, l = e & 31;
            const int col = col0 + (l >> 2) + 8 * (i >> 1);
            const int r = 8 * n + 2 * (l & 3) + (i & 1);
            if (col >= N_OUT || r >= here) continue;
            float h[MT];
            #pragma unroll
            for (int m = 0; m < MT; ++m) {
                float s = 0.0f;
                #pragma unroll
                for (int w = 0; w < WARPS; ++w) s += red[w][m][n][i][l];
                h[m] = s;
            }
            const lg_i64 o = (lg_i64)(row0 + r) * N_OUT + col;
            out[o] = lg_f32_to_f16(epilogue(h));
        }
        __syncthreads();  // red is rewritten by the next row tile
    }
}

}  // namespace gemv_f16_n4096_k7168_r1_impl

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_f16_n4096_k7168_r1(const unsigned short* x, const unsigned short* W, const unsigned short* bias, unsigned short* out, int rows) {
    gemv_f16_n4096_k7168_r1_impl::prefetch_w(reinterpret_cast<const uint4*>(W), blockIdx.x * 16);  // weights only: safe before the wait
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): x and out only after this
    lg_pdl_launch_dependents();
    gemv_f16_n4096_k7168_r1_impl::run(x, W, bias, out, rows, nullptr, nullptr,
        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// gemv_f16_of32_n64128_k4096_r1_rms1em05: decode GEMV / skinny GEMM, h[r, n] = sum_k x[r, k] * W[n, k]
// prologue rmsnorm: x is first replaced by rmsnorm(x) * norm_w (fp32 statistics of each whole row,
// each element rounded to float16 as the rmsnorm kernel stores it)
// x: [rows, 4096] float16, W: [64128, 4096] float16, bias: [64128] or null, out: [rows, 64128] float32
// Rows are taken 1 at a time; W is streamed from memory once per row tile.
namespace gemv_f16_of32_n64128_k4096_r1_rms1em05_impl {

constexpr int K = 4096;
constexpr int N_OUT = 64128;  // output columns
constexpr int MT = 1;  // W rows per output column: 2 when gate and up rows pair up
constexpr int ROW_TILE = 1;
constexpr int WARPS = 8;
constexpr int U = 4;  // 16-byte W loads per W row and lane issued before any is used
constexpr bool NORM = true;
constexpr int THREADS = WARPS * 32;
typedef lg_f16 Tag;  // storage dtype, for lg_unpack / lg_pack
constexpr float EPS = 1e-05f;

__device__ __forceinline__ float epilogue(const float (&h)[MT]) {
    return h[0];
}

// rstd of each row of the tile into s_rstd (every thread takes part: call it from the whole block).
// The block reads the tile's rows whole; they are L2-resident and small next to its W rows.
__device__ __forceinline__ void row_rstd(const unsigned short* x, int row0, int here, float* s_rstd) {
    __shared__ float part[WARPS][ROW_TILE];
    constexpr int E = 16 / sizeof(unsigned short);  // elements per 16-byte vector
    constexpr int CV = K / E;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const uint4* x4 = reinterpret_cast<const uint4*>(x) + (lg_i64)row0 * CV;
    float ss[ROW_TILE];
    #pragma unroll
    for (int r = 0; r < ROW_TILE; ++r) ss[r] = 0.0f;
    for (int c = threadIdx.x; c < CV; c += THREADS) {
        #pragma unroll
        for (int r = 0; r < ROW_TILE; ++r) {
            if (r < here) {
                float f[E];
                lg_unpack(x4[(lg_i64)r * CV + c], f, Tag());
                #pragma unroll
                for (int j = 0; j < E; ++j) ss[r] += f[j] * f[j];
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < ROW_TILE; ++r) {
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) ss[r] += __shfl_xor_sync(0xffffffffu, ss[r], off);
        if (lane == 0) part[warp][r] = ss[r];
    }
    __syncthreads();
    if (threadIdx.x < ROW_TILE) {
        float t = 0.0f;
        #pragma unroll
        for (int w = 0; w < WARPS; ++w) t += part[w][threadIdx.x];
        s_rstd[threadIdx.x] = rsqrtf(t / (float)K + EPS);
    }
    __syncthreads();
}

// 16-bit weights on tensor cores (mma.m16n8k16, fp32 accumulate). A block owns 16 output
// columns; its WARPS warps split K and add their partial tiles through shared memory.
// The mma's A operand is 16 W rows, its B operand up to 8 rows of x, so the fragment of
// each lane is two 16-byte chunks of W (rows g and g+8) and one of x (row g), all at the
// same k offset: the dot product does not care in which order k is visited, so the mma's
// k positions {2t, 2t+1, 2t+8, 2t+9} map onto the lane's 8 contiguous k values (two mmas).
// A "step" is 4 lanes x 16 B = 32 k of all 16 W rows; the warps of a block take adjacent steps.
constexpr int C = K / 8;  // 16-byte chunks per row of W and x
constexpr int S_FULL = C / 4;  // steps with all 4 chunks inside the row
constexpr int S = (C + 3) / 4;
constexpr int BATCH = WARPS * U;  // steps the block consumes per batch
constexpr int NB_FULL = S_FULL / BATCH;  // batches needing no bounds checks
constexpr bool TAIL = S > NB_FULL * BATCH;
constexpr int NT = (ROW_TILE + 7) / 8;  // n8 tiles of x rows per pass

__device__ __forceinline__ uint4 ld_weight(const uint4* p) {
    // W is read exactly once: keep it out of L1 so x stays resident there; the 256-byte
    // L2 fetch brings in the neighbouring steps that the other warps of the block read next
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 { %0, %1, %2, %3 }, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint4 ld_act(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 { %0, %1, %2, %3 }, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// d[16x8] += A[16x16] * B[16x8]
__device__ __forceinline__ void mma(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                    unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{ %0, %1, %2, %3 }, { %4, %5, %6, %7 }, { %8, %9 }, { %0, %1, %2, %3 };"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// U steps of one warp: every load is issued before the first mma, so U * MT * 2 independent
// 16-byte W loads per lane are in flight together. GUARD checks the ragged end of K.
// Before a block may read x (it waits for the kernel before it, and with the rmsnorm prologue it
// reduces whole x rows first) it asks L2 for the start of its W rows, so HBM is busy meanwhile
// (PF_BYTES of each row, ~32 KB a block).
constexpr int PF_BYTES = K * (int)sizeof(unsigned short) < 2048 ? K * (int)sizeof(unsigned short) : 2048;
constexpr int PF_LINES = (PF_BYTES + 127) / 128;  // 128-byte lines of each W row

__device__ __forceinline__ void prefetch_w(const uint4* W4, int col0) {
    for (int i = threadIdx.x; i < MT * 16 * PF_LINES; i += THREADS) {
        const int r = i / PF_LINES, line = i % PF_LINES;
        const int col = min(col0 + (r & 15), N_OUT - 1);
        const char* p = reinterpret_cast<const char*>(W4 + (lg_i64)((r >> 4) * N_OUT + col) * C) + line * 128;
        asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
    }
}

// With the rmsnorm prologue each x chunk becomes round(x * rs * norm_w) before it feeds the mma.
template <bool GUARD>
__device__ __forceinline__ void batch(int step0, int t, const uint4* const (&wrow)[MT][2], const uint4* const (&xrow)[NT],
                                      const bool (&xok)[NT], const float (&rs)[NT], const uint4* nw4,
                                      float (&acc)[MT][NT][4]) {
    uint4 w[U][MT][2];
    uint4 xv[U][NT];
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;  // this lane's chunk
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int h = 0; h < 2; ++h) w[u][m][h] = ok ? ld_weight(wrow[m][h] + c) : make_uint4(0u, 0u, 0u, 0u);
    }
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = (step0 + u * WARPS) * 4 + t;
        const bool ok = !GUARD || c < C;
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            // unconditional load (rows past the tile read row 0) then select: no branch splits the batch
            const uint4 v = ld_act(xrow[n] + (ok ? c : 0));
            xv[u][n] = ok && xok[n] ? v : make_uint4(0u, 0u, 0u, 0u);
        }
        if (NORM) {
            const uint4 nv = ld_act(nw4 + (ok ? c : 0));
            float nf[8];
            lg_unpack(nv, nf, Tag());
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                float f[8];
                lg_unpack(xv[u][n], f, Tag());
                #pragma unroll
                for (int j = 0; j < 8; ++j) f[j] = f[j] * rs[n] * nf[j];
                xv[u][n] = lg_pack(f, Tag());
            }
        }
    }
    #pragma unroll
    for (int u = 0; u < U; ++u)
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n) {
                const uint4 a = w[u][m][0], b = w[u][m][1], xx = xv[u][n];
                mma(acc[m][n], a.x, b.x, a.y, b.y, xx.x, xx.y);  // k = chunk elements 0..3
                mma(acc[m][n], a.z, b.z, a.w, b.w, xx.z, xx.w);  // k = chunk elements 4..7
            }
}


__device__ __forceinline__ void run(const unsigned short* x, const unsigned short* W, const unsigned short* bias, float* out, int rows,
                                    const unsigned short* norm_w, const unsigned short* res, const int* positions, const int* seq_ids,
                                    const int* seq_lens, const float* inv_freq, unsigned short* kcache, unsigned short* vcache) {
    __shared__ float red[WARPS][MT][NT][4][32];  // each warp's partial C fragments
    __shared__ float s_rstd[ROW_TILE];  // rmsnorm prologue: each tile row's rsqrt(mean(x^2) + eps)
    const uint4* nw4 = reinterpret_cast<const uint4*>(norm_w);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * 16;
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);
    const uint4* wrow[MT][2];
    #pragma unroll
    for (int m = 0; m < MT; ++m)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int col = min(col0 + g + 8 * h, N_OUT - 1);  // past the end: computed, never stored
            wrow[m][h] = W4 + (lg_i64)(m * N_OUT + col) * C;
        }

    for (int row0 = 0; row0 < rows; row0 += ROW_TILE) {
        const int here = min(ROW_TILE, rows - row0);
        row_rstd(x, row0, here, s_rstd);
        const uint4* xrow[NT];
        bool xok[NT];
        float rs[NT];
        #pragma unroll
        for (int n = 0; n < NT; ++n) {
            const int r = 8 * n + g;  // the x row this lane feeds into B
            xok[n] = r < here;
            xrow[n] = x4 + (lg_i64)(row0 + (xok[n] ? r : 0)) * C;
            rs[n] = NORM && xok[n] ? s_rstd[r] : 0.0f;
        }
        float acc[MT][NT][4];
        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[m][n][i] = 0.0f;

        #pragma unroll 1
        for (int b = 0; b < NB_FULL; ++b) batch<false>(b * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);
        if (TAIL) batch<true>(NB_FULL * BATCH + warp, t, wrow, xrow, xok, rs, nw4, acc);

        #pragma unroll
        for (int m = 0; m < MT; ++m)
            #pragma unroll
            for (int n = 0; n < NT; ++n)
                #pragma unroll
                for (int i = 0; i < 4; ++i) red[warp][m][n][i][lane] = acc[m][n][i];
        __syncthreads();
        // element e of the tile: fragment i of lane l in n-tile n; C row = output column, C col = x row
        for (int e = threadIdx.x; e < NT * 128; e += WARPS * 32) {
            const int n = e >> 7, i = (e >> 5) & 3, l = e & 31;
            const int col = col0 + (l >> 2) + 8 * (i >> 1);
            const int r = 8 * n + 2 * (l & 3) + (i & 1);
            if (col >= N_OUT || r >= here) continue;
            float h[MT];
            #pragma unroll
            for (int m = 0; m < MT; ++m) {
                float s = 0.0f;
                #pragma unroll
                for (int w = 0; w < WARPS; ++w) s += red[w][m][n][i][l];
                h[m] = s;
            }
            const lg_i64 o = (lg_i64)(row0 + r) * N_OUT + col;
            out[o] = (epilogue(h));
        }
        __syncthreads();  // red is rewritten by the next row tile
    }
}

}  // namespace gemv_f16_of32_n64128_k4096_r1_rms1em05_impl

extern "C" __global__ void __launch_bounds__(256, 2)
gemv_f16_of32_n64128_k4096_r1_rms1em05(const unsigned short* x, const unsigned short* W, const unsigned short* bias, float* out, int rows, const unsigned short* norm_w) {
    gemv_f16_of32_n64128_k4096_r1_rms1em05_impl::prefetch_w(reinterpret_cast<const uint4*>(W), blockIdx.x * 16);  // weights only: safe before the wait
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): x and out only after this
    lg_pdl_launch_dependents();
    gemv_f16_of32_n64128_k4096_r1_rms1em05_impl::run(x, W, bias, out, rows, norm_w, nullptr,
        nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// vocab_concat_r2_c64128_v128256: the all-gathered vocabulary chunks of 2 ranks into whole logits rows.
// chunks: [2, n, 64128] fp32 (rank r's logits of its vocabulary rows r*64128..),
// out: [n, 128256] fp32; the last chunk's padding columns (past 128256) are dropped.
namespace vocab_concat_r2_c64128_v128256_impl {

constexpr int RANKS = 2, CHUNK = 64128, VOCAB = 128256;

__device__ __forceinline__ void run(const float* chunks, float* out, int n) {
    const lg_i64 i = (lg_i64)blockIdx.x * 256 + threadIdx.x;  // one output element
    if (i >= (lg_i64)n * VOCAB) return;
    const int b = (int)(i / VOCAB), v = (int)(i % VOCAB);
    const int r = v / CHUNK, j = v % CHUNK;
    out[i] = chunks[((lg_i64)r * n + b) * CHUNK + j];
}

}  // namespace vocab_concat_r2_c64128_v128256_impl

extern "C" __global__ void __launch_bounds__(256)
vocab_concat_r2_c64128_v128256(const float* chunks, float* out, int n) {
    vocab_concat_r2_c64128_v128256_impl::run(chunks, out, n);
}

// vocab_argmax_partial_c64128_s32: each rank's candidates for greedy decoding. logits: [n, 64128] fp32, this
// rank's vocabulary chunk; pairs: [n, 32] x (value, local index as float): block (s, b)
// holds the first maximum of row b's columns s*per .. (s+1)*per - 1. Grid (32, n).
extern "C" __global__ void __launch_bounds__(256)
vocab_argmax_partial_c64128_s32(const float* __restrict__ logits, float2* __restrict__ pairs, int n) {
    lg_pdl_wait();  // launched early: the LM head's logits are ready past this point
    lg_pdl_launch_dependents();
    constexpr int CHUNK = 64128, SLICES = 32, NT = 256;
    constexpr int PER = (CHUNK + SLICES - 1) / SLICES;
    const int b = blockIdx.y, s = blockIdx.x;
    if (b >= n) return;
    const int c0 = s * PER, c1 = min(c0 + PER, CHUNK);
    const float* row = logits + (lg_i64)b * CHUNK;
    float best = __int_as_float(0xff800000u);  // -inf
    int at = CHUNK;  // past every column: loses every tie
    for (int c = c0 + threadIdx.x; c < c1; c += NT) {
        const float x = row[c];
        if (x > best) { best = x; at = c; }  // ascending c per thread: the first maximum is kept
    }
    // block argmax, ties to the lower column
    __shared__ float s_best[NT / 32];
    __shared__ int s_at[NT / 32];
    for (int off = 16; off > 0; off /= 2) {
        const float ob = __shfl_down_sync(0xffffffffu, best, off);
        const int oa = __shfl_down_sync(0xffffffffu, at, off);
        if (ob > best || (ob == best && oa < at)) { best = ob; at = oa; }
    }
    if (threadIdx.x % 32 == 0) { s_best[threadIdx.x / 32] = best; s_at[threadIdx.x / 32] = at; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < NT / 32; ++w)
            if (s_best[w] > best || (s_best[w] == best && s_at[w] < at)) { best = s_best[w]; at = s_at[w]; }
        pairs[(lg_i64)b * SLICES + s] = make_float2(best, (float)at);
    }
}

// sample_v128256: one token per row of logits [B, 128256]; grid (B), 1024 threads.
__device__ __forceinline__ unsigned int sample_v128256_key(float x) {
    // order-preserving: a > b  <=>  key(a) > key(b) for non-NaN floats
    const unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long sample_v128256_splitmix64(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// mass of one logit: round(exp(x / temp - zmax) * 2^40); explicit roundings keep it bit-identical
// wherever it is recomputed
__device__ __forceinline__ unsigned long long sample_v128256_mass(float x, float temp, float zmax) {
    const float e = expf(__fsub_rn(__fdiv_rn(x, temp), zmax));
    return __float2ull_rn(__fmul_rn(e, 1099511627776.0f));
}

// exclusive suffix sum over the block: sum of v over threads with a larger index
template <class U>
__device__ __forceinline__ U sample_v128256_suffix(U v, U* scratch /* [32] */) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    U x = v;  // inclusive suffix within the warp
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
        const U y = __shfl_down_sync(0xffffffffu, x, off);
        if (lane + off < 32) x += y;
    }
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    U above = 0;
    for (int w = warp + 1; w < nw; ++w) above += scratch[w];
    __syncthreads();  // scratch may be reused at once
    return x - v + above;
}

// block sum, result in every thread
__device__ __forceinline__ unsigned long long sample_v128256_sum(unsigned long long v, unsigned long long* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    unsigned long long s = 0;
    for (int w = 0; w < nw; ++w) s += scratch[w];
    __syncthreads();
    return s;
}

// Adds (count, mass) of this lane's element to histogram bin `bin` when `on`; lanes of a warp
// that share a bin are combined first, so each distinct bin costs one atomic per warp.
// Must be called by all 32 lanes of the warp.
__device__ __forceinline__ void sample_v128256_hist_add(bool on, unsigned int bin, unsigned long long mass, bool with_mass,
                                                   unsigned int* cnt, unsigned long long* msum) {
    const int lane = threadIdx.x % 32;
    unsigned int todo = __ballot_sync(0xffffffffu, on);
    while (todo) {
        const int leader = __ffs(todo) - 1;
        const unsigned int b = __shfl_sync(0xffffffffu, bin, leader);
        const bool mine = on && bin == b;
        const unsigned int group = __ballot_sync(0xffffffffu, mine);
        if (with_mass) {
            // mass < 2^41: two 21-bit halves, each summed over <= 32 lanes without overflow
            const unsigned int lo = __reduce_add_sync(0xffffffffu, mine ? (unsigned int)(mass & 0x1fffffu) : 0u);
            const unsigned int hi = __reduce_add_sync(0xffffffffu, mine ? (unsigned int)(mass >> 21) : 0u);
            if (lane == leader) atomicAdd(&msum[b], ((unsigned long long)hi << 21) + lo);
        }
        if (lane == leader) atomicAdd(&cnt[b], (unsigned int)__popc(group));
        todo &= ~group;
    }
}

// f(index, value, valid) for every element of the warp's vocabulary range [lo, hi), called by all
// 32 lanes (the loop is warp-uniform, so f may use warp collectives)
template <class F>
__device__ __forceinline__ void sample_v128256_each(const float* __restrict__ row, int lo, int hi, F f) {
    constexpr int VEC = 4, CH = 32 * VEC;
    const int lane = threadIdx.x % 32;
    for (int base = lo; base < hi; base += CH) {
        const int i = base + lane * VEC;
        const bool ok = i < hi;
        float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
        if (ok) x = *reinterpret_cast<const float4*>(row + i);
        f(i, x.x, ok);
        f(i + 1, x.y, ok);
        f(i + 2, x.z, ok);
        f(i + 3, x.w, ok);
    }
}

extern "C" __global__ void __launch_bounds__(1024) sample_v128256(
    const float* __restrict__ logits,       // [B, V] fp32
    const float* __restrict__ temperature,  // [B]; <= 0: greedy
    const int* __restrict__ top_k,          // [B]; <= 0 or >= V: off
    const float* __restrict__ top_p,        // [B]; >= 1: off
    const long long* __restrict__ seed,     // [B]
    const int* __restrict__ step,           // [B]
    const int* __restrict__ want_logprob,   // [B]; 0: skip the logprob (it costs a pass of exps)
    int* __restrict__ out,                  // [B] token ids
    float* __restrict__ logprob,            // [B] log_softmax(logits)[token] before temperature, else 0
    int n_rows)
{
    lg_pdl_wait();  // may be launched early (programmatic dependent launch): nothing is read before this
    lg_pdl_launch_dependents();
    constexpr int V = 128256, NT = 1024, NW = NT / 32, VEC = 4;
    constexpr int CH = 32 * VEC;                               // elements per warp per iteration
    constexpr int RANGE = (V + NW * CH - 1) / (NW * CH) * CH;  // contiguous elements per warp
    constexpr int NBINS = 2048;
    const float NEG_INF = __int_as_float(0xff800000u);

    __shared__ unsigned int s_cnt[NBINS];
    __shared__ unsigned long long s_mass[NBINS];
    __shared__ unsigned long long s_u64[32];
    __shared__ unsigned int s_u32[32];
    __shared__ float s_bv[32];
    __shared__ float s_se[32];
    __shared__ int s_bi[32];
    __shared__ int s_sel;
    __shared__ unsigned long long s_sel_above;

    const int b = blockIdx.x;
    if (b >= n_rows) return;
    const float* row = logits + (long long)b * V;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int lo = warp * RANGE, hi = min(lo + RANGE, V);  // this warp's vocabulary range

    const float temp = temperature[b];
    const bool greedy = !(temp > 0.f);
    const int k = top_k[b];
    const float tp = top_p[b];
    const bool use_k = !greedy && k > 0 && k < V;
    const bool use_p = !greedy && tp < 1.f;

    auto clear_hist = [&]() {
        for (int j = tid; j < NBINS; j += NT) {
            s_cnt[j] = 0u;
            s_mass[j] = 0ull;
        }
        __syncthreads();
    };

    // ---- pass 1: the maximum (first index on ties) and, for top-k, the first-digit histogram
    if (use_k) clear_hist();
    float bv = NEG_INF;
    int bi = V;
    sample_v128256_each(row, lo, hi, [&](int i, float x, bool ok) {
        if (ok && (x > bv || bi == V)) {  // indices ascend per lane: strict > keeps the first
            bv = x;
            bi = i;
        }
        if (use_k) sample_v128256_hist_add(ok, sample_v128256_key(x) >> 21, 0ull, false, s_cnt, s_mass);
    });
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (oi < V && (bi == V || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        s_bv[warp] = bv;
        s_bi[warp] = bi;
    }
    __syncthreads();
    bv = NEG_INF;
    bi = V;
    for (int w = 0; w < NW; ++w) {
        const float ov = s_bv[w];
        const int oi = s_bi[w];
        if (oi < V && (bi == V || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    if (bi == V) bi = 0;

    // ---- the row's log-sum-exp, for the chosen token's logprob (before temperature), when asked:
    // a vocabulary of exps on one SM costs more than the rest of the greedy path
    const bool with_logprob = want_logprob[b] != 0;  // the same in every thread of the block
    float lse = 0.f;
    if (with_logprob) {
        float se = 0.f;
        sample_v128256_each(row, lo, hi, [&](int i, float x, bool ok) {
            if (ok) se += __expf(x - bv);  // x - bv <= 0: the fast exp is accurate to ~1e-6 relative here
        });
#pragma unroll
        for (int off = 16; off > 0; off /= 2) se += __shfl_xor_sync(0xffffffffu, se, off);
        if (lane == 0) s_se[warp] = se;
        __syncthreads();
        se = 0.f;
        for (int w = 0; w < NW; ++w) se += s_se[w];  // the same order in every thread: one value
        lse = bv + logf(se);
    }
    auto emit = [&](int tok) {  // called by one thread
        out[b] = tok;
        logprob[b] = with_logprob ? row[tok] - lse : 0.f;
    };

    if (greedy) {
        if (tid == 0) emit(bi);
        return;
    }
    const float zmax = __fdiv_rn(bv, temp);  // max(logits / T) = max(logits) / T: division is monotone

    // ---- top-k: the k-th largest key, digit by digit (counts only)
    unsigned int keep_key = 0u;  // keep keys >= keep_key
    if (use_k) {
        unsigned int prefix = 0u, pmask = 0u, rank = (unsigned int)k;  // rank counted from the top, 1-based
#pragma unroll 1
        for (int dg = 0; dg < 3; ++dg) {
            const int shift = dg == 0 ? 21 : dg == 1 ? 10 : 0;
            const unsigned int dmask = dg == 2 ? 0x3ffu : 0x7ffu;
            if (dg > 0) {
                clear_hist();
                sample_v128256_each(row, lo, hi, [&](int i, float x, bool ok) {
                    const unsigned int key = sample_v128256_key(x);
                    sample_v128256_hist_add(ok && (key & pmask) == prefix, (key >> shift) & dmask, 0ull, false, s_cnt, s_mass);
                });
            }
            __syncthreads();
            // the bin holding rank: above(bin) < rank <= above(bin) + cnt(bin); thread owns bins 2t, 2t+1
            const unsigned int c0 = s_cnt[2 * tid], c1 = s_cnt[2 * tid + 1];
            const unsigned int above = sample_v128256_suffix<unsigned int>(c0 + c1, s_u32);
            if (above < rank && rank <= above + c1) {
                s_sel = 2 * tid + 1;
                s_u32[0] = above;
            } else if (above + c1 < rank && rank <= above + c1 + c0) {
                s_sel = 2 * tid;
                s_u32[0] = above + c1;
            }
            __syncthreads();
            const unsigned int sel = (unsigned int)s_sel, sel_above = s_u32[0];
            __syncthreads();
            rank -= sel_above;
            prefix |= sel << shift;
            pmask |= dmask << shift;
        }
        keep_key = prefix;
    }

    // ---- pass 2: kept mass per lane (after top-k) and, for top-p, the first-digit histogram
    if (use_p) clear_hist();
    unsigned long long lane_mass = 0ull;
    sample_v128256_each(row, lo, hi, [&](int i, float x, bool ok) {
        const unsigned int key = sample_v128256_key(x);
        const bool kept = ok && key >= keep_key;
        const unsigned long long m = kept ? sample_v128256_mass(x, temp, zmax) : 0ull;
        lane_mass += m;
        if (use_p) sample_v128256_hist_add(kept, key >> 21, m, true, s_cnt, s_mass);
    });

    // ---- top-p: the smallest key whose strictly larger kept keys hold < top_p of the kept mass
    if (use_p) {
        const unsigned long long kept_total = sample_v128256_sum(lane_mass, s_u64);
        // mass < top_p * total  <=>  mass < ceil(top_p * total) for integer masses; >= 1 keeps the top token
        unsigned long long limit = (unsigned long long)ceil((double)tp * (double)kept_total);
        if (limit == 0ull) limit = 1ull;
        unsigned long long a = 0ull;  // kept mass of keys above the current prefix
        unsigned int prefix = 0u, pmask = 0u;
#pragma unroll 1
        for (int dg = 0; dg < 3; ++dg) {
            const int shift = dg == 0 ? 21 : dg == 1 ? 10 : 0;
            const unsigned int dmask = dg == 2 ? 0x3ffu : 0x7ffu;
            if (dg > 0) {
                clear_hist();
                sample_v128256_each(row, lo, hi, [&](int i, float x, bool ok) {
                    const unsigned int key = sample_v128256_key(x);
                    const bool on = ok && key >= keep_key && (key & pmask) == prefix;
                    const unsigned long long m = on ? sample_v128256_mass(x, temp, zmax) : 0ull;
                    sample_v128256_hist_add(on, (key >> shift) & dmask, m, true, s_cnt, s_mass);
                });
            }
            if (tid == 0) s_sel = NBINS;
            __syncthreads();
            // lowest non-empty bin whose top element still has less than `limit` above it
            const unsigned int c0 = s_cnt[2 * tid], c1 = s_cnt[2 * tid + 1];
            const unsigned long long m0 = s_mass[2 * tid], m1 = s_mass[2 * tid + 1];
            const unsigned long long above = sample_v128256_suffix<unsigned long long>(m0 + m1, s_u64);
            int cand = NBINS;
            if (c1 > 0u && a + above < limit) cand = 2 * tid + 1;
            if (c0 > 0u && a + above + m1 < limit) cand = 2 * tid;
            if (cand < NBINS) atomicMin(&s_sel, cand);
            __syncthreads();
            const int sel = s_sel;
            if (sel == cand) s_sel_above = cand == 2 * tid ? above + m1 : above;
            __syncthreads();
            a += s_sel_above;
            prefix |= (unsigned int)sel << shift;
            pmask |= dmask << shift;
            __syncthreads();
        }
        keep_key = prefix;  // >= the top-k key: top-p only looked at top-k survivors

        // ---- pass 3: kept mass per lane after both filters
        lane_mass = 0ull;
        sample_v128256_each(row, lo, hi, [&](int i, float x, bool ok) {
            if (ok && sample_v128256_key(x) >= keep_key) lane_mass += sample_v128256_mass(x, temp, zmax);
        });
    }

    // ---- inverse CDF in vocabulary order
    unsigned long long wm = lane_mass;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) wm += __shfl_xor_sync(0xffffffffu, wm, off);
    __syncthreads();  // s_u64 may still be read by a reduction above
    if (lane == 0) s_u64[warp] = wm;
    __syncthreads();
    unsigned long long total = 0ull;
    for (int w = 0; w < NW; ++w) total += s_u64[w];
    const unsigned long long key64 = sample_v128256_splitmix64(
        (unsigned long long)seed[b] ^ ((unsigned long long)(long long)step[b] * 0xD1B54A32D192ED03ull));
    const unsigned long long U = key64 >> 40;  // u = U / 2^24
    // target = floor(U * total / 2^24): the first index whose running kept mass exceeds it is drawn
    const unsigned long long target = (__umul64hi(U, total) << 40) | ((U * total) >> 24);
    unsigned long long before = 0ull;  // kept mass of the warps before this one
    for (int w = 0; w < warp; ++w) before += s_u64[w];
    const bool here = before <= target && target < before + wm;
    if (here) {  // exactly one warp (its mass is non-zero), unless total is 0
        unsigned long long run = before;
        for (int base = lo; base < hi; base += CH) {  // warp-uniform
            const int i0 = base + lane * VEC;
            unsigned long long mv[VEC], c = 0ull;
            float4 x4 = make_float4(0.f, 0.f, 0.f, 0.f);
            if (i0 < hi) x4 = *reinterpret_cast<const float4*>(row + i0);
            const float xs[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                mv[j] = (i0 < hi && sample_v128256_key(xs[j]) >= keep_key) ? sample_v128256_mass(xs[j], temp, zmax) : 0ull;
                c += mv[j];
            }
            unsigned long long incl = c;  // inclusive prefix over lanes
#pragma unroll
            for (int off = 1; off < 32; off *= 2) {
                const unsigned long long y = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += y;
            }
            const unsigned long long chunk = __shfl_sync(0xffffffffu, incl, 31);
            if (run + chunk > target) {
                const unsigned int hit = __ballot_sync(0xffffffffu, run + incl > target);
                if (lane == __ffs(hit) - 1) {
                    unsigned long long r = run + incl - c;
                    int pick = i0 + VEC - 1;
#pragma unroll
                    for (int j = 0; j < VEC; ++j) {  // the first element that carries r past target
                        r += mv[j];
                        if (r > target) {
                            pick = i0 + j;
                            break;
                        }
                    }
                    emit(pick);
                }
                break;
            }
            run += chunk;
        }
    }
    if (total == 0ull && tid == 0) emit(bi);  // nothing kept with non-zero mass: the maximum
}

// vocab_argmax_combine_r2_c64128_v128256_s32: the greedy token of each row from every rank's candidates (all-gathered):
// pairs: [2, n, 32] x (value, local index); rank r's local index c is vocabulary
// row r*64128 + c. The first maximum wins (the lowest vocabulary row among equal values), as
// the sampler's greedy choice over whole logits does. out: [n] int32; logprob: [n] fp32, set to 0
// (a step that asks for logprobs gathers the logits instead). Grid (n), 256 threads.
extern "C" __global__ void __launch_bounds__(256)
vocab_argmax_combine_r2_c64128_v128256_s32(const float2* __restrict__ pairs, int* __restrict__ out, float* __restrict__ logprob, int n) {
    lg_pdl_wait();  // launched early: the gathered candidates are ready past this point
    lg_pdl_launch_dependents();
    constexpr int CHUNK = 64128, SLICES = 32, RANKS = 2, VOCAB = 128256, NT = 256;
    const int b = blockIdx.x;
    if (b >= n) return;
    float best = __int_as_float(0xff800000u);
    int at = 0x7fffffff;
    for (int i = threadIdx.x; i < RANKS * SLICES; i += NT) {
        const int r = i / SLICES, s = i % SLICES;
        const float2 p = pairs[((lg_i64)r * n + b) * SLICES + s];
        const int c = (int)p.y, v = r * CHUNK + c;
        if (c >= CHUNK || v >= VOCAB) continue;  // an empty slice, or the last chunk's padding rows
        if (p.x > best || (p.x == best && v < at)) { best = p.x; at = v; }
    }
    __shared__ float s_best[NT / 32];
    __shared__ int s_at[NT / 32];
    for (int off = 16; off > 0; off /= 2) {
        const float ob = __shfl_down_sync(0xffffffffu, best, off);
        const int oa = __shfl_down_sync(0xffffffffu, at, off);
        if (ob > best || (ob == best && oa < at)) { best = ob; at = oa; }
    }
    if (threadIdx.x % 32 == 0) { s_best[threadIdx.x / 32] = best; s_at[threadIdx.x / 32] = at; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < NT / 32; ++w)
            if (s_best[w] > best || (s_best[w] == best && s_at[w] < at)) { best = s_best[w]; at = s_at[w]; }
        out[b] = at == 0x7fffffff ? 0 : at;
        logprob[b] = 0.f;
    }
}

// advance_decode: after a decode step (one token per sequence, B rows), rewrite that step's inputs into
// the next step's, so the step can be replayed without the host: row b feeds back the token it
// sampled, one position further on; its sequence's cache holds one more token; its sampler draws
// its next number. Everything else a decode step reads (seq_ids, last_index = b, targets = -1, the
// sampling parameters) is the same in the next step.
// next_token [B] int32; tokens, positions, seq_ids [B] int32 (T = B); seq_lens [slots] int32;
// sample_step [B] int32. Grid ceil(B / 128).
extern "C" __global__ void __launch_bounds__(128)
advance_decode(const int* next_token, int* tokens, int* positions, const int* seq_ids, int* seq_lens,
           int* sample_step, int B) {
    lg_pdl_wait();  // launched early: the sampler's token and every reader of these inputs are done
    const int b = blockIdx.x * 128 + threadIdx.x;
    if (b >= B) return;
    tokens[b] = next_token[b];
    positions[b] += 1;
    seq_lens[seq_ids[b]] += 1;  // a decode step holds each sequence once: no two rows share a slot
    sample_step[b] += 1;
}
