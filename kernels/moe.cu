// Mixture-of-Experts stages: router, stable permute/align (contiguous and masked layouts), a plain SIMT grouped FP8
// GEMM, fused SwiGLU + 1x128 requant, and the weighted combine. Every stage is deterministic (no float atomics, no
// order-dependent atomics) and reads its sizes from device buffers, so a whole layer is CUDA-graph capturable.
//
// Numbers (t tokens, top-k, E experts, hidden H, intermediate I, R = permuted rows ~ t·k):
//   router: ~30·t·E flops; bytes 4·t·E (+4E bias) in, 8·t·k out.
//   permute: count/rank reads t·k ids once per expert CTA (E·4·t·k bytes from L2); gather moves R·H code bytes.
//   grouped GEMM (gate+up): 2·R·2I·H flops; minimum bytes = weights of the touched experts (E_used·2I·H) + R·H + 2·R·2I.
//   down: 2·R·H·I flops; E_used·H·I + R·I + 2·R·H bytes. SwiGLU: R·2I·2 in, R·I out. Combine: 2·t·k·H in, 2·t·H out.
//
// Router: one warp per token, 4 tokens per 128-thread CTA; the warp keeps the token's scores and selection values
// in shared memory (2·E floats), lane g scores group g (sum of its two best), the kept groups and then the k experts
// are chosen by k warp-wide (value desc, index asc) arg-max reductions, so ties go to the lower index.
//
// Permute (4 launches, no host sync):
//   count_rank  one CTA per expert scans the ids in order in 256-wide chunks; ballot + popc gives each matching
//               pair its rank within the expert in (token, slot) order: stable without atomics.
//   offsets     one CTA: padded segment sizes, exclusive scan (i64) -> offsets[E+1]; valid counts per expert.
//   scatter     one thread per pair: row = offsets[e] + rank; src_index[row] = pair, row_of[pair] = row.
//   gather      one CTA per row: copies the token's FP8 codes (16 B vectors) and its 1x128 scales into the
//               MN-major layout [H/128, round_up(rows, 4)]; padding rows get zero codes/scales and src −1.
// Ids outside 0..E never match an expert, so they are skipped: no out-of-bounds access whatever the ids hold.
//
// Grouped GEMM: out[r, n] = Σ_k a[r, k]·w[e(r), n, k], 64x64 output tile per 256-thread CTA, 4x4 per thread, K in
// chunks of 32 staged (dequantized to f32) in shared memory; fp32 partial sums over each 128-wide K group are
// promoted into the accumulator with scale_a[row]·scale_b[block]. A tile's expert is the last e with
// offsets[e] <= row0 (binary search over the device offsets); tiles at or past offsets[e] + counts[e] exit.
// Segments must start on multiples of 64 rows (the permute's block_m is validated on the host).
//
// SwiGLU: one half-warp per 128-wide group (8 values per lane), silu(g)·u in f32, amax by xor-shuffles, one
// division per code, as reference::quant does. Combine: one thread per 8 columns of a token, f32 fma in slot order.
//
// The kernels copy their struct's pointers into __restrict__ locals: a struct member cannot carry the qualifier, and
// the loads need it to take the read-only path (LDG.CONSTANT); no two of a kernel's pointers alias.
//
// r1k: portable
#include "common/fp8.cuh"
#include "common/moe.cuh"
#include "common/moe_params.cuh"

namespace {

constexpr int kGroup = 128;
constexpr int kRouterWarps = 4;

__device__ __forceinline__ float sanitize(float x) { return isnan(x) ? -INFINITY : x; }

// (value desc, index asc); index −1 marks "no candidate".
__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
    if (ai < 0) return false;
    if (bi < 0) return true;
    return av > bv || (av == bv && ai < bi);
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, off);
        int oi = __shfl_xor_sync(0xffffffffu, i, off);
        if (better(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

__device__ __forceinline__ float load_logit(const float* p) { return *p; }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ void router_impl(const T* __restrict__ logits, const float* __restrict__ bias, int has_bias,
                            int* __restrict__ topk_ids, float* __restrict__ topk_weights, int t, int num_experts,
                            int k, int num_groups, int topk_groups, int softmax, int renormalize, float scale) {
    extern __shared__ float router_smem[];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const long long token = static_cast<long long>(blockIdx.x) * kRouterWarps + warp;
    if (token >= t) return;
    float* s = router_smem + static_cast<size_t>(warp) * 2 * num_experts;  // unbiased scores
    float* v = s + num_experts;                                             // selection values
    const T* row = logits + token * num_experts;

    if (softmax) {
        float mx = -INFINITY;
        for (int e = lane; e < num_experts; e += 32) {
            float x = fminf(fmaxf(sanitize(load_logit(row + e)), -3.402823466e38f), 3.402823466e38f);
            s[e] = x;
            mx = fmaxf(mx, x);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float sum = 0.0f;
        for (int e = lane; e < num_experts; e += 32) {
            float ex = r1k::moe_expf(s[e] - mx);
            s[e] = ex;
            sum += ex;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        for (int e = lane; e < num_experts; e += 32) s[e] = s[e] / sum;
    } else {
        for (int e = lane; e < num_experts; e += 32) s[e] = 1.0f / (1.0f + r1k::moe_expf(-sanitize(load_logit(row + e))));
    }
    for (int e = lane; e < num_experts; e += 32) v[e] = sanitize(s[e] + (has_bias ? bias[e] : 0.0f));
    __syncwarp();

    const int group_size = num_experts / num_groups;
    unsigned kept_groups = 0xffffffffu;
    if (num_groups > 1 && topk_groups < num_groups) {
        float gscore = -INFINITY;
        if (lane < num_groups) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = lane * group_size; e < (lane + 1) * group_size; ++e) {
                const float x = v[e];
                if (x > b1) {
                    b2 = b1;
                    b1 = x;
                } else if (x > b2) {
                    b2 = x;
                }
            }
            gscore = sanitize(group_size >= 2 ? b1 + b2 : b1);
        }
        kept_groups = 0;
        for (int r = 0; r < topk_groups; ++r) {
            float bv = gscore;
            int bi = (lane < num_groups && !((kept_groups >> lane) & 1u)) ? lane : -1;
            warp_argmax(bv, bi);
            if (bi >= 0) kept_groups |= 1u << bi;
        }
    }
    unsigned avail = 0;
    for (int j = 0; j < 32; ++j) {
        const int e = lane + 32 * j;
        if (e < num_experts && ((kept_groups >> (e / group_size)) & 1u)) avail |= 1u << j;
    }
    int my_id = -1;
    float my_s = 0.0f;
    for (int slot = 0; slot < k; ++slot) {
        float bv = -INFINITY;
        int bi = -1;
        for (unsigned m = avail; m != 0; m &= m - 1) {
            const int e = lane + 32 * (__ffs(m) - 1);
            if (better(v[e], e, bv, bi)) {
                bv = v[e];
                bi = e;
            }
        }
        warp_argmax(bv, bi);
        if (bi >= 0 && (bi % 32) == lane) avail &= ~(1u << (bi / 32));
        if (lane == slot) {
            my_id = bi;
            my_s = bi >= 0 ? s[bi] : 0.0f;
        }
    }
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += __shfl_sync(0xffffffffu, my_s, j);
    if (lane < k) {
        float w = renormalize ? (sum > 0.0f ? my_s / sum : 0.0f) : my_s;
        topk_ids[token * k + lane] = my_id;
        topk_weights[token * k + lane] = w * scale;
    }
}

}  // namespace

// One RouterParams (common/moe_params.cuh): logits [t, E] (f32 or bf16), bias [E] (read when has_bias),
// topk_ids/topk_weights [t, k].
// Grid ceil(t/4), block 128, dynamic smem 4·2·E·4 bytes.
extern "C" __global__ void __launch_bounds__(128)
    moe_router_f32(const __grid_constant__ r1k_moe_params::RouterParams p) {
    router_impl(static_cast<const float*>(p.logits), p.bias, p.has_bias, p.topk_ids, p.topk_weights, p.t, p.e, p.k,
                p.groups, p.topk_groups, p.softmax, p.renormalize, p.scale);
}

extern "C" __global__ void __launch_bounds__(128)
    moe_router_bf16(const __grid_constant__ r1k_moe_params::RouterParams p) {
    router_impl(static_cast<const __nv_bfloat16*>(p.logits), p.bias, p.has_bias, p.topk_ids, p.topk_weights, p.t,
                p.e, p.k, p.groups, p.topk_groups, p.softmax, p.renormalize, p.scale);
}

// One CountRankParams (common/moe_params.cuh). Grid E, block 256. counts_raw[e] = pairs routed to e; rank[i] = rank
// of pair i within its expert, (token, slot) order. Only pairs with ids[i] == e are written by CTA e.
extern "C" __global__ void __launch_bounds__(256)
    moe_count_rank(const __grid_constant__ r1k_moe_params::CountRankParams p) {
    const int* __restrict__ ids = p.ids;
    int* __restrict__ counts_raw = p.counts_raw;
    int* __restrict__ rank = p.rank;
    __shared__ int warp_totals[8];
    const int e = blockIdx.x;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    int running = 0;
    // 64-bit: with n_pairs near 2^31, base + 256 would overflow an int (the masked capacity does not bound t·k).
    for (long long base = 0; base < p.n_pairs; base += 256) {
        const long long i = base + threadIdx.x;
        const bool match = i < p.n_pairs && __ldg(ids + i) == e;  // __restrict__ alone does not get LDG.CONSTANT here
        const unsigned ballot = __ballot_sync(0xffffffffu, match);
        if (lane == 0) warp_totals[warp] = __popc(ballot);
        __syncthreads();
        int before = 0, total = 0;
#pragma unroll
        for (int w = 0; w < 8; ++w) {
            before += w < warp ? warp_totals[w] : 0;
            total += warp_totals[w];
        }
        if (match) rank[i] = running + before + __popc(ballot & ((1u << lane) - 1u));
        running += total;
        __syncthreads();
    }
    if (threadIdx.x == 0) counts_raw[e] = running;
}

// One OffsetsParams (common/moe_params.cuh). One CTA of 1024 threads (num_experts <= 1024). Contiguous
// (masked == 0): segment e holds round_up(raw, block_m) rows. Masked: segment e is rows [e·max_m, (e+1)·max_m),
// counts clamped to max_m.
extern "C" __global__ void __launch_bounds__(1024)
    moe_offsets(const __grid_constant__ r1k_moe_params::OffsetsParams p) {
    const int* __restrict__ counts_raw = p.counts_raw;
    long long* __restrict__ offsets = p.offsets;
    int* __restrict__ counts = p.counts;
    __shared__ long long scan[1024];
    const int e = threadIdx.x;
    long long cap = 0;
    if (e < p.num_experts) {
        const int raw = counts_raw[e];
        if (p.masked) {
            counts[e] = min(raw, p.max_m);
            cap = p.max_m;
        } else {
            counts[e] = raw;
            cap = (static_cast<long long>(raw) + p.block_m - 1) / p.block_m * p.block_m;
        }
    }
    scan[e] = cap;
    __syncthreads();
    for (int d = 1; d < 1024; d <<= 1) {
        const long long add = e >= d ? scan[e - d] : 0;
        __syncthreads();
        scan[e] += add;
        __syncthreads();
    }
    if (e == 0) offsets[0] = 0;
    if (e < p.num_experts) offsets[e + 1] = scan[e];
}

// One ScatterParams (common/moe_params.cuh). One thread per pair.
extern "C" __global__ void __launch_bounds__(256) moe_scatter(const __grid_constant__ r1k_moe_params::ScatterParams p) {
    const int* __restrict__ ids = p.ids;
    const int* __restrict__ rank = p.rank;
    const long long* __restrict__ offsets = p.offsets;
    const int* __restrict__ counts = p.counts;
    int* __restrict__ row_of = p.row_of;
    int* __restrict__ src_index = p.src_index;
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= p.n_pairs) return;
    const int id = ids[i];
    int out_row = -1;
    if (id >= 0 && id < p.num_experts) {
        const int r = rank[i];
        if (r < counts[id]) {
            const long long row = offsets[id] + r;
            if (row < p.capacity) {
                src_index[row] = static_cast<int>(i);
                out_row = static_cast<int>(row);
            }
        }
    }
    row_of[i] = out_row;
}

// One GatherParams (common/moe_params.cuh). Grid capacity rows, block 128. xq [t, H] codes, xs [H/128, t_pad]
// scales; aq [capacity, H], as [H/128, cap_pad]. Rows past offsets[E] only get src −1 (no tile of the GEMM reads them).
extern "C" __global__ void __launch_bounds__(128) moe_gather(const __grid_constant__ r1k_moe_params::GatherParams p) {
    const uint8_t* __restrict__ xq = p.x_codes;
    const float* __restrict__ xs = p.x_scales;
    const long long* __restrict__ offsets = p.offsets;
    const int* __restrict__ counts = p.counts;
    int* __restrict__ src_index = p.src_index;
    uint8_t* __restrict__ aq = p.a_codes;
    float* __restrict__ as = p.a_scales;
    const long long capacity = p.capacity, cap_pad = p.cap_pad;
    const int num_experts = p.num_experts, k = p.k, t = p.t, t_pad = p.t_pad, hidden = p.hidden;
    const long long row = blockIdx.x;
    const int groups = hidden / kGroup;
    if (row == capacity - 1) {
        const int pad = static_cast<int>(cap_pad - capacity);
        for (int idx = threadIdx.x; idx < groups * pad; idx += 128)
            as[static_cast<long long>(idx / pad) * cap_pad + capacity + idx % pad] = 0.0f;
    }
    const int e = r1k::moe_find_segment(offsets, num_experts, row);
    if (e >= num_experts) {
        if (threadIdx.x == 0) src_index[row] = -1;
        return;
    }
    const bool real = row < r1k::moe_segment_valid_end(offsets, counts, e, capacity);
    int src = real ? src_index[row] : -1;
    const long long token = src >= 0 ? src / k : -1;
    if (token >= t) src = -1;
    uint4* dst = reinterpret_cast<uint4*>(aq + row * hidden);
    const int vecs = hidden / 16;
    if (src >= 0) {
        const uint4* from = reinterpret_cast<const uint4*>(xq + token * hidden);
        for (int c = threadIdx.x; c < vecs; c += 128) dst[c] = from[c];
        for (int g = threadIdx.x; g < groups; g += 128) as[g * cap_pad + row] = xs[g * static_cast<long long>(t_pad) + token];
    } else {
        if (threadIdx.x == 0) src_index[row] = -1;
        for (int c = threadIdx.x; c < vecs; c += 128) dst[c] = make_uint4(0, 0, 0, 0);
        for (int g = threadIdx.x; g < groups; g += 128) as[g * cap_pad + row] = 0.0f;
    }
}

// Grouped FP8 GEMM. a [rows, K] codes, sa [K/128, rows_pad]; w [E, N, K] codes, sw [E, N/128, K/128];
// out [rows, N] bf16. Grid (ceil(rows/64), N/64), block 256. K % 128 == 0, N % 64 == 0.
extern "C" __global__ void __launch_bounds__(256)
    moe_grouped_gemm_fp8(const __grid_constant__ r1k_moe_params::GroupedGemmParams p) {
    const uint8_t* __restrict__ a = p.a;
    const float* __restrict__ a_scales = p.a_scales;
    const uint8_t* __restrict__ w = p.w;
    const float* __restrict__ w_scales = p.w_scales;
    const long long* __restrict__ offsets = p.offsets;
    const int* __restrict__ counts = p.counts;
    __nv_bfloat16* __restrict__ out = p.out;
    constexpr int BM = 64, BN = 64, BK = 32, LD = BM + 4;
    __shared__ __align__(16) float As[BK][LD];
    __shared__ __align__(16) float Bs[BK][LD];
    const long long row0 = static_cast<long long>(blockIdx.x) * BM;
    const int e = r1k::moe_find_segment(offsets, p.num_experts, row0);
    if (e >= p.num_experts) return;
    const long long valid_end = r1k::moe_segment_valid_end(offsets, counts, e, p.rows);
    if (row0 >= valid_end) return;
    const int n0 = blockIdx.y * BN;
    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    const int lrow = tid / 4, lpart = (tid % 4) * 8;
    const bool a_ok = row0 + lrow < valid_end;
    const uint8_t* a_ptr = a + (row0 + lrow) * static_cast<long long>(p.k) + lpart;
    const uint8_t* w_ptr = w + (static_cast<long long>(e) * p.n + n0 + lrow) * p.k + lpart;
    const int kblocks = p.k / kGroup;
    const float* sw_e = w_scales + (static_cast<long long>(e) * (p.n / kGroup) + n0 / kGroup) * kblocks;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    for (int kb = 0; kb < kblocks; ++kb) {
        float part[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) part[i][j] = 0.0f;
        for (int kc = 0; kc < kGroup; kc += BK) {
            const int koff = kb * kGroup + kc;
            uint2 av = a_ok ? *reinterpret_cast<const uint2*>(a_ptr + koff) : make_uint2(0, 0);
            uint2 bv = *reinterpret_cast<const uint2*>(w_ptr + koff);
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                const uint32_t aw = q < 4 ? av.x : av.y, bw = q < 4 ? bv.x : bv.y;
                As[lpart + q][lrow] = r1k::e4m3_to_f32(static_cast<uint8_t>(aw >> (8 * (q % 4))));
                Bs[lpart + q][lrow] = r1k::e4m3_to_f32(static_cast<uint8_t>(bw >> (8 * (q % 4))));
            }
            __syncthreads();
#pragma unroll 8
            for (int kk = 0; kk < BK; ++kk) {
                const float4 x = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
                const float4 y = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
                const float xa[4] = {x.x, x.y, x.z, x.w}, ya[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
                for (int i = 0; i < 4; ++i)
#pragma unroll
                    for (int j = 0; j < 4; ++j) part[i][j] = fmaf(xa[i], ya[j], part[i][j]);
            }
            __syncthreads();
        }
        const float sb = sw_e[kb];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const long long r = row0 + ty * 4 + i;
            const float s = r < valid_end ? a_scales[kb * p.rows_pad + r] * sb : 0.0f;
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(part[i][j], s, acc[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long r = row0 + ty * 4 + i;
        if (r >= valid_end) continue;
        __nv_bfloat162 lo = __floats2bfloat162_rn(acc[i][0], acc[i][1]);
        __nv_bfloat162 hi = __floats2bfloat162_rn(acc[i][2], acc[i][3]);
        uint2 packed;
        packed.x = *reinterpret_cast<uint32_t*>(&lo);
        packed.y = *reinterpret_cast<uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(out + r * p.n + n0 + tx * 4) = packed;
    }
}

// One SwigluQuantParams (common/moe_params.cuh): h [rows, 2I] bf16 (gate | up) -> q [rows, I] codes, scales
// [I/128, rows_pad] (padding rows zeroed). With has_limit, rows at or past offsets[num_experts] are left untouched.
// One half-warp per 128-wide group; block 256.
extern "C" __global__ void __launch_bounds__(256)
    moe_swiglu_quant(const __grid_constant__ r1k_moe_params::SwigluQuantParams p) {
    const __nv_bfloat16* __restrict__ h = p.h;
    uint8_t* __restrict__ q = p.q;
    float* __restrict__ scales = p.scales;
    const long long* __restrict__ offsets = p.offsets;
    const long long rows = p.rows;
    const int inter = p.inter;
    const int groups = inter / kGroup;
    const long long total = rows * groups;
    const long long g = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 16;
    const int lane = threadIdx.x % 16;
    // Rows past the permuted rows in use are never read downstream: skip them (bounds the decode-time waste).
    const long long limit = p.has_limit ? min(rows, offsets[p.num_experts]) : rows;
    const bool active = g < total && g / groups < limit;
    const long long row = active ? g / groups : 0;
    const int grp = active ? static_cast<int>(g % groups) : 0;
    const int col = grp * kGroup + lane * 8;
    float v[8];
    if (active) {
        const __nv_bfloat16* hr = h + row * 2 * inter;
        const uint4 graw = *reinterpret_cast<const uint4*>(hr + col);
        const uint4 uraw = *reinterpret_cast<const uint4*>(hr + inter + col);
        const __nv_bfloat162* gp = reinterpret_cast<const __nv_bfloat162*>(&graw);
        const __nv_bfloat162* up = reinterpret_cast<const __nv_bfloat162*>(&uraw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 gf = __bfloat1622float2(gp[i]);
            const float2 uf = __bfloat1622float2(up[i]);
            v[2 * i] = __fmul_rn(__fdiv_rn(gf.x, 1.0f + r1k::moe_expf(-gf.x)), uf.x);
            v[2 * i + 1] = __fmul_rn(__fdiv_rn(gf.y, 1.0f + r1k::moe_expf(-gf.y)), uf.y);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int m = 8; m > 0; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    if (!active) return;
    const float scale = r1k::scale_for_amax(amax, p.ue8m0 != 0);
    uint16_t c[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = r1k::f32x2_to_e4m3x2(__fdiv_rn(v[2 * i], scale), __fdiv_rn(v[2 * i + 1], scale));
    uint2 packed;
    packed.x = uint32_t(c[0]) | (uint32_t(c[1]) << 16);
    packed.y = uint32_t(c[2]) | (uint32_t(c[3]) << 16);
    *reinterpret_cast<uint2*>(q + row * inter + col) = packed;
    if (lane == 0) {
        float* column = scales + static_cast<long long>(grp) * p.rows_pad;
        column[row] = scale;
        if (row == rows - 1)
            for (long long r = rows; r < p.rows_pad; ++r) column[r] = 0.0f;
    }
}

// One CombineParams (common/moe_params.cuh): out[t, H] = Σ_slots w·y[row_of[t, slot]] (+ shared[t]) in f32 fma,
// slot order; bf16 out. Grid (t, ceil(H/8/128)), block 128; each thread owns 8 columns. H % 8 == 0.
extern "C" __global__ void __launch_bounds__(128) moe_combine(const __grid_constant__ r1k_moe_params::CombineParams p) {
    const __nv_bfloat16* __restrict__ y = p.y;
    const int* __restrict__ row_of = p.row_of;
    const float* __restrict__ weights = p.weights;
    const __nv_bfloat16* __restrict__ shared = p.shared;
    __nv_bfloat16* __restrict__ out = p.out;
    const long long token = blockIdx.x;
    const int k = p.k, hidden = p.hidden;
    const int col = (blockIdx.y * 128 + threadIdx.x) * 8;
    if (col >= hidden) return;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int slot = 0; slot < k; ++slot) {
        const int row = row_of[token * k + slot];
        if (row < 0 || row >= p.rows) continue;
        const float wt = p.skip_weights ? 1.0f : weights[token * k + slot];
        const uint4 raw = *reinterpret_cast<const uint4*>(y + static_cast<long long>(row) * hidden + col);
        const __nv_bfloat162* pair = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(pair[i]);
            acc[2 * i] = fmaf(wt, f.x, acc[2 * i]);
            acc[2 * i + 1] = fmaf(wt, f.y, acc[2 * i + 1]);
        }
    }
    if (p.has_shared) {
        const uint4 raw = *reinterpret_cast<const uint4*>(shared + token * hidden + col);
        const __nv_bfloat162* pair = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(pair[i]);
            acc[2 * i] = __fadd_rn(acc[2 * i], f.x);
            acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], f.y);
        }
    }
    uint4 packed;
    uint32_t* pw = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 b = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
        pw[i] = *reinterpret_cast<uint32_t*>(&b);
    }
    *reinterpret_cast<uint4*>(out + token * hidden + col) = packed;
}

// Router gate GEMM: logits[t, E] = x[t, H] · w_gate[E, H]ᵀ, bf16 in, fp32 out (the fused front of the router).
// Grid (ceil(E/8), ceil(t/8)), block 256: warp w owns expert blockIdx.x·8 + w for 8 tokens. Lane l accumulates the
// 8-element chunks l, l+32, ... of H with sequential fmaf, then an xor-tree sums the 32 lane partials: a fixed
// order, reproduced bit for bit by reference::moe::gate_logits. Each W row is read once per 8 tokens. H % 8 == 0.
// One GateLogitsParams (common/moe_params.cuh).
extern "C" __global__ void __launch_bounds__(256)
    moe_gate_logits(const __grid_constant__ r1k_moe_params::GateLogitsParams p) {
    const __nv_bfloat16* __restrict__ x = p.x;
    const __nv_bfloat16* __restrict__ w = p.w;
    float* __restrict__ logits = p.logits;
    constexpr int TOK = 8;
    const int hidden = p.hidden;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int e = blockIdx.x * 8 + warp;
    if (e >= p.num_experts) return;
    const long long t0 = static_cast<long long>(blockIdx.y) * TOK;
    const int ntok = static_cast<int>(min(static_cast<long long>(TOK), p.t - t0));
    float acc[TOK];
#pragma unroll
    for (int j = 0; j < TOK; ++j) acc[j] = 0.0f;
    const __nv_bfloat16* wrow = w + static_cast<long long>(e) * hidden;
    for (int c = lane; c < hidden / 8; c += 32) {
        const uint4 wraw = *reinterpret_cast<const uint4*>(wrow + c * 8);
        const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&wraw);
        float wf[8];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float2 f = __bfloat1622float2(wp[q]);
            wf[2 * q] = f.x;
            wf[2 * q + 1] = f.y;
        }
#pragma unroll
        for (int j = 0; j < TOK; ++j) {
            if (j >= ntok) break;
            const uint4 xraw = *reinterpret_cast<const uint4*>(x + (t0 + j) * hidden + c * 8);
            const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xraw);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float2 f = __bfloat1622float2(xp[q]);
                acc[j] = fmaf(f.x, wf[2 * q], acc[j]);
                acc[j] = fmaf(f.y, wf[2 * q + 1], acc[j]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < TOK; ++j) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
        if (lane == 0 && j < ntok) logits[(t0 + j) * p.num_experts + e] = acc[j];
    }
}
