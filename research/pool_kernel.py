"""Hand-written CPU kernels for 2x2 max-pooling, spliced into the compiled step after autograd.

Under torch.compile, F.max_pool2d reaches inductor's post-grad graph as named nodes: the forward
prims._low_memory_max_pool_with_offsets (the maxima, and each one's offset in its window as int8), the
backward a zero tensor that aten.scatter_add fills at prims._low_memory_max_pool_offsets_to_indices'
indices, reshaped to the input's shape. Inductor compiles that scatter to scalar loops. `rewrite`
swaps both for ops inductor calls as they are, C loops (compiled once with the system's gcc, loaded with
ctypes) bit for bit equal to ATen's ops, and to inductor's but for the sign of a zero maximum:

- pool2x2_forward: each window's first maximum and its offset, in the input's layout (vectorized over
  the channels of a channels-last input, with AVX2 over the width of an NCHW one);
- pool2x2_backward: each window's two rows of the gradient, written laid out (C, N, H, W), the layout
  transforms/first_conv.py's weight gradient permutes it to (AVX2 for a contiguous gradient);
- where the pool reads a ReLU's output, the ReLU's backward folded in at the pooled size: a picked
  position's input is its window's maximum, so its mask is the maximum's.

    python research/pool_kernel.py   (the ops against inductor's and ATen's, bit for bit)
    python research/first_block_backward.py --data-dir DIR --variants aten-pool,c-backward --check
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import itertools
import operator
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from tinymnist.transforms.graph_splice import spliced

prims = torch.ops.prims
aten = torch.ops.aten

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
/* v where on, else +0.0: a bit mask. Not a branch (the picked position is random), and not v * (float)on,
   whose int-to-float conversion chained every iteration to the last: 3.5x slower. */
static inline float keep(float v, int on) {
    uint32_t bits;
    memcpy(&bits, &v, 4);
    bits &= -(uint32_t)on;
    memcpy(&v, &bits, 4);
    return v + 0.0f; /* a -0.0 gradient lands as +0.0, as ATen's scatter into zeros leaves it */
}
/* Whether x takes a window's maximum from m, the values seen before it: larger, or the first NaN
   (as inductor's compiled pool and train's argmax pick it). */
static inline int beats(float x, float m) { return x > m || (x != x && m == m); }
#define TAKE(x, at)                                \
    do {                                           \
        const int32_t later = -(int32_t)beats(x, m); \
        pick = (pick & ~later) | ((at) & later);   \
        m = later ? (x) : m;                       \
    } while (0)
/* Rows [begin, end) of the pooled gradient's N*C*H' rows; strides in elements (out's: u). */
void pool2x2_backward(const float* restrict grad, const int8_t* restrict offsets, float* restrict out,
                      int64_t channels, int64_t rows, int64_t cols, const int64_t* g, const int64_t* o,
                      const int64_t* u, int64_t begin, int64_t end) {
    const int64_t g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], o0 = o[0], o1 = o[1], o2 = o[2], o3 = o[3];
    const int64_t u0 = u[0], u1 = u[1], u2 = u[2], u3 = u[3];
    /* row r's (n, c, i), counted rather than divided out: 64-bit divisions cost more than a small row's stores */
    int64_t n = begin / (channels * rows), c = (begin / rows) % channels, i = begin % rows;
    for (int64_t r = begin; r < end; r++) {
        const float* restrict gr = grad + n * g0 + c * g1 + i * g2;
        const int8_t* restrict orow = offsets + n * o0 + c * o1 + i * o2;
        float* restrict top = out + n * u0 + c * u1 + 2 * i * u2;
        float* restrict bottom = top + u2;
        int64_t j = 0;
#ifdef __AVX2__
        if (g3 == 1 && o3 == 1 && u3 == 1) { /* 8 windows at a time: four masked vectors, interleaved */
            for (; j + 8 <= cols; j += 8) {
                const __m256 v = _mm256_loadu_ps(gr + j);
                const __m256i k = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(orow + j)));
                __m256 m[4];
                for (int p = 0; p < 4; p++) {
                    const __m256 picked = _mm256_castsi256_ps(_mm256_cmpeq_epi32(k, _mm256_set1_epi32(p)));
                    m[p] = _mm256_add_ps(_mm256_and_ps(v, picked), _mm256_setzero_ps()); /* + 0.0: as keep() */
                }
                for (int row = 0; row < 2; row++) {
                    const __m256 lo = _mm256_unpacklo_ps(m[2 * row], m[2 * row + 1]);
                    const __m256 hi = _mm256_unpackhi_ps(m[2 * row], m[2 * row + 1]);
                    float* restrict dst = (row ? bottom : top) + 2 * j;
                    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));
                    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
                }
            }
        }
#endif
        for (; j < cols; j++) {
            const float v = gr[j * g3];
            const int k = orow[j * o3];
            top[2 * j * u3] = keep(v, k == 0);
            top[(2 * j + 1) * u3] = keep(v, k == 1);
            bottom[2 * j * u3] = keep(v, k == 2);
            bottom[(2 * j + 1) * u3] = keep(v, k == 3);
        }
        if (++i == rows) {
            i = 0;
            if (++c == channels) c = 0, n++;
        }
    }
}
/* Output rows [begin, end) of N*H' (channels-last x: s[1] == 1) or N*C*H' (else); x's strides in elements.
   values and offsets (N, C, H', W') in x's layout: each window's first maximum (row-major) and its offset 0-3. */
void pool2x2_forward(const float* restrict x, float* restrict values, int8_t* restrict offsets, int64_t channels,
                     int64_t rows, int64_t cols, const int64_t* s, int64_t begin, int64_t end) {
    const int64_t s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
    if (s1 == 1) { /* channels innermost: every window's four values are four contiguous rows of C */
        for (int64_t r = begin; r < end; r++) {
            const int64_t n = r / rows, i = r % rows;
            for (int64_t j = 0; j < cols; j++) {
                const float* restrict a = x + n * s0 + 2 * i * s2 + 2 * j * s3;
                const float* restrict b = a + s3;
                const float* restrict c = a + s2;
                const float* restrict d = c + s3;
                float* restrict v = values + (r * cols + j) * channels;
                int8_t* restrict o = offsets + (r * cols + j) * channels;
                int32_t at[256]; /* channels <= 256 (rewrite checks); 32 bits, as the floats: one vector width */
                for (int64_t k = 0; k < channels; k++) {
                    float m = a[k];
                    int32_t pick = 0;
                    TAKE(b[k], 1);
                    TAKE(c[k], 2);
                    TAKE(d[k], 3);
                    v[k] = m;
                    at[k] = pick;
                }
                for (int64_t k = 0; k < channels; k++) o[k] = (int8_t)at[k];
            }
        }
    } else {
        int64_t n = begin / (channels * rows), ch = (begin / rows) % channels, i = begin % rows; /* counted, as above */
        for (int64_t r = begin; r < end; r++) {
            const float* restrict top = x + n * s0 + ch * s1 + 2 * i * s2;
            int64_t j = 0;
#ifdef __AVX2__
            if (s3 == 1) { /* 8 windows at a time: each row's 16 values split into the windows' left and right */
                for (; j + 8 <= cols; j += 8) {
                    __m256 q[4]; /* a, b (top row), c, d (bottom row) of windows 0 1 4 5 2 3 6 7 */
                    for (int row = 0; row < 2; row++) {
                        const __m256 lo = _mm256_loadu_ps(top + row * s2 + 2 * j);
                        const __m256 hi = _mm256_loadu_ps(top + row * s2 + 2 * j + 8);
                        q[2 * row] = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
                        q[2 * row + 1] = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
                    }
                    __m256 m = q[0];
                    __m256i pick = _mm256_setzero_si256();
                    for (int p = 1; p < 4; p++) {
                        const __m256 first_nan = _mm256_and_ps(_mm256_cmp_ps(q[p], q[p], _CMP_UNORD_Q),
                                                               _mm256_cmp_ps(m, m, _CMP_ORD_Q));
                        const __m256 later = _mm256_or_ps(_mm256_cmp_ps(q[p], m, _CMP_GT_OQ), first_nan);
                        m = _mm256_blendv_ps(m, q[p], later);
                        pick = _mm256_blendv_epi8(pick, _mm256_set1_epi32(p), _mm256_castps_si256(later));
                    }
                    m = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), _MM_SHUFFLE(3, 1, 2, 0)));
                    pick = _mm256_permute4x64_epi64(pick, _MM_SHUFFLE(3, 1, 2, 0));
                    _mm256_storeu_ps(values + r * cols + j, m);
                    int32_t at[8];
                    _mm256_storeu_si256((__m256i*)at, pick);
                    for (int k = 0; k < 8; k++) offsets[r * cols + j + k] = (int8_t)at[k];
                }
            }
#endif
            for (; j < cols; j++) {
                const float a = top[2 * j * s3], b = top[(2 * j + 1) * s3];
                const float c = top[s2 + 2 * j * s3], d = top[s2 + (2 * j + 1) * s3];
                float m = a;
                int32_t pick = 0;
                TAKE(b, 1);
                TAKE(c, 2);
                TAKE(d, 3);
                values[r * cols + j] = m;
                offsets[r * cols + j] = (int8_t)pick;
            }
            if (++i == rows) {
                i = 0;
                if (++ch == channels) ch = 0, n++;
            }
        }
    }
}
"""
# On the calling thread alone: split between two Python threads, fast's step ran 1.07x train's against 1.02x
# on one (the kernels then wait for torch's OpenMP threads, which spin for a while after each parallel op)
THREADS = 1
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


@functools.cache
def library() -> ctypes.CDLL:
    """SOURCE compiled once per text, flags and processor (a cached .so in inductor's cache folder, which is
    this user's: a predictable name in the shared temp folder could be a library someone else put there) and
    loaded."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.machine()
    flags = next((line for line in cpu.splitlines() if line.startswith("flags")), cpu)  # what -march=native sees
    digest = hashlib.sha256("\n".join([SOURCE, *FLAGS, flags]).encode()).hexdigest()[:16]
    path = Path(cache_dir()) / "tinymnist" / f"pool2x2_{digest}.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # each process writes its own files, and the last rename wins
        with tempfile.TemporaryDirectory() as folder:
            source, built = Path(folder) / "pool2x2.c", Path(folder) / "pool2x2.so"
            source.write_text(SOURCE)
            subprocess.run(["gcc", *FLAGS, source, "-o", built], check=True)
            handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name)
            with os.fdopen(handle, "wb") as file:
                file.write(built.read_bytes())
            Path(partial).replace(path)
    lib = ctypes.CDLL(str(path))
    lib.pool2x2_backward.restype = None
    return lib


@functools.cache
def pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(THREADS)


@torch.library.custom_op("tinymnist_research::pool2x2_backward", mutates_args=(), tags=[torch.Tag.flexible_layout])
def pool2x2_backward(grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """grad (N, C, H', W') float32 and offsets (N, C, H', W') int8, row-major in each 2x2 window -> the input's
    gradient (N, C, 2H', 2W'), laid out (C, N, 2H', 2W'): each window's picked position gets its gradient, else 0."""
    n, channels, rows, cols = grad.shape
    out = gradient_like(grad)
    g = (ctypes.c_int64 * 4)(*grad.stride())
    o = (ctypes.c_int64 * 4)(*offsets.stride())
    pointers = (ctypes.c_void_p(grad.data_ptr()), ctypes.c_void_p(offsets.data_ptr()), ctypes.c_void_p(out.data_ptr()))
    u = (ctypes.c_int64 * 4)(*out.stride())
    sizes = (ctypes.c_int64(channels), ctypes.c_int64(rows), ctypes.c_int64(cols))
    in_threads(library().pool2x2_backward, n * channels * rows, *pointers, *sizes, g, o, u)
    return out


def in_threads(kernel, rows: int, *arguments) -> None:
    """kernel(*arguments, begin, end) over [0, rows), the rows split between THREADS threads."""
    if THREADS == 1:
        return kernel(*arguments, ctypes.c_int64(0), ctypes.c_int64(rows))
    bounds = [rows * t // THREADS for t in range(THREADS + 1)]
    calls = [
        pool().submit(kernel, *arguments, ctypes.c_int64(a), ctypes.c_int64(b)) for a, b in itertools.pairwise(bounds)
    ]
    for call in calls:
        call.result()


def pooled_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (N, C, H/2, W/2) tensor in x's layout: channels-last where x is (and not also contiguous)."""
    n, channels, height, width = x.shape
    layout = torch.channels_last if channels_last(x) else torch.contiguous_format
    return torch.empty(n, channels, height // 2, width // 2, dtype=dtype, device=x.device, memory_format=layout)


def channels_last(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.shape[1] > 1


@torch.library.custom_op("tinymnist_research::pool2x2_forward", mutates_args=(), tags=[torch.Tag.flexible_layout])
def pool2x2_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, C, H, W) float32, H and W even -> each 2x2 window's first maximum and its offset (int8), both
    (N, C, H/2, W/2) in x's layout: prims._low_memory_max_pool_with_offsets for these windows."""
    n, channels, height, width = x.shape
    torch._check(not channels_last(x) or channels <= 256, lambda: "a channels-last input of at most 256 channels")
    values, offsets = pooled_like(x, torch.float32), pooled_like(x, torch.int8)
    rows, cols = height // 2, width // 2
    s = (ctypes.c_int64 * 4)(*x.stride())
    pointers = (ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(values.data_ptr()), ctypes.c_void_p(offsets.data_ptr()))
    sizes = (ctypes.c_int64(channels), ctypes.c_int64(rows), ctypes.c_int64(cols))
    total = n * rows if channels_last(x) else n * channels * rows
    in_threads(library().pool2x2_forward, total, *pointers, *sizes, s)
    return values, offsets


@pool2x2_forward.register_fake
def _(x):
    return pooled_like(x, torch.float32), pooled_like(x, torch.int8)


@pool2x2_backward.register_fake
def _(grad, offsets):
    return gradient_like(grad)


# The backward's output layout: "cnhw", (C, N, H, W), what first_conv.py's weight gradient permutes the
# gradient to; "nhwc", channels-last, inductor's choice in train's step
GRADIENT_LAYOUT = "cnhw"


def gradient_like(grad: torch.Tensor) -> torch.Tensor:
    """An empty (N, C, 2H', 2W') gradient for the pool's input, laid out as GRADIENT_LAYOUT says."""
    n, channels, rows, cols = grad.shape
    if GRADIENT_LAYOUT == "nhwc":
        return torch.empty(n, channels, 2 * rows, 2 * cols, device=grad.device, memory_format=torch.channels_last)
    return torch.empty(channels, n, 2 * rows, 2 * cols, device=grad.device).transpose(0, 1)


def rewrite(graph: torch.fx.Graph) -> None:
    """Each 2x2, stride-2 max-pool (`ours`) becomes pool2x2_forward, and its backward (reshape(scatter_add(zeros,
    1, indices from its offsets, grad))) pool2x2_backward(grad, offsets), with a ReLU's backward before it folded in."""
    for node in list(graph.nodes):
        if node.target is not aten.scatter_add.default:
            continue
        _, dim, index, src = node.args
        indices = index.args[0] if index.target is aten.reshape.default else None
        if dim != 1 or indices is None or indices.target is not prims._low_memory_max_pool_offsets_to_indices.default:
            continue
        offsets = indices.args[0]  # getitem 1 of the forward pool
        pool = offsets.args[0]
        grad = src.args[0] if src.target is aten.reshape.default else None  # grad (N, C, H', W') as (N*C, H'*W')
        if not ours(pool) or grad is None or grad.meta["val"].shape != offsets.meta["val"].shape:
            continue
        (reshaped,) = node.users  # (N*C, H*W) -> (N, C, H, W)
        relu = only_relu_backward(reshaped, pool.args[0])
        if relu is None:
            replacement = spliced(graph, reshaped, pool2x2_backward, [grad, offsets])
            reshaped.replace_all_uses_with(replacement)
        else:  # the ReLU's mask at the pooled size: a picked position's input is its window's maximum
            replacement = spliced(graph, relu, relu_then_pool_backward, [grad, maxima(graph, pool), offsets])
            relu.replace_all_uses_with(replacement)
    for node in list(graph.nodes):  # then the forward pools, whose offsets the backward ops now read
        if ours(node):
            outputs = spliced(graph, node, pool2x2_forward, [node.args[0]])
            for user in list(node.users):  # getitem 0 (the maxima), 1 (the offsets)
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
            graph.erase_node(node)
    graph.eliminate_dead_code()


FORWARD_ARGS = [[2, 2], [2, 2], [0, 0], [1, 1], False]  # kernel, stride, padding, dilation, ceil_mode


def ours(pool: torch.fx.Node) -> bool:
    """A forward pool the C kernels compute: 2x2 windows tiling a float32 CPU input of even height and width,
    and at most 256 channels where it is channels-last (the forward's buffer)."""
    if pool.target is not prims._low_memory_max_pool_with_offsets.default or list(pool.args[1:]) != FORWARD_ARGS:
        return False
    x = pool.args[0].meta["val"]  # (N, C, H, W)
    tiles = x.dim() == 4 and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0
    return tiles and x.dtype == torch.float32 and x.device.type == "cpu" and (x.stride(1) != 1 or x.shape[1] <= 256)


def maxima(graph: torch.fx.Graph, pool: torch.fx.Node) -> torch.fx.Node:
    """The forward pool's first output (its maxima), a new getitem where none is left (a loss not returned)."""
    for user in pool.users:
        if user.args[1] == 0:
            return user
    with graph.inserting_after(pool):
        node = graph.call_function(operator.getitem, (pool, 0))
    node.meta["val"] = pool.meta["val"][0]
    return node


def relu_then_pool_backward(grad, values, offsets):
    """The gradient of max_pool(relu(y)) at y: the ReLU's backward folded into the pool's, at the pooled size."""
    return pool2x2_backward(torch.where(values <= 0, 0.0, grad), offsets)


def only_relu_backward(reshaped: torch.fx.Node, pooled_input: torch.fx.Node) -> torch.fx.Node | None:
    """The ReLU backward the pool's gradient (reshaped) goes to alone, where the pool read the ReLU's output
    (threshold_backward(gradient, relu output, 0)); else None."""
    if len(reshaped.users) != 1 or pooled_input.target is not aten.relu.default:
        return None
    (user,) = reshaped.users
    if user.target is aten.threshold_backward.default and user.args[1:] == (pooled_input, 0):
        return user
    if user.target is aten.where.self and user.args[2] is reshaped:  # decomposed: where(relu <= 0, 0, gradient)
        mask, zero = user.args[:2]
        is_zero = zero.target is aten.full.default and zero.args == ([], 0.0)
        if mask.target is aten.le.Scalar and mask.args == (pooled_input, 0) and is_zero:
            return user
    return None


def one_per_window(shape) -> torch.Tensor:
    """A mask with one True at a random place of a fifth of the 2x2 windows: where first and last NaN coincide
    (of two NaNs in a window ATen picks the last, inductor's compiled pool and these kernels the first)."""
    n, channels, height, width = shape
    place = torch.randint(0, 4, (n, channels, height // 2, width // 2))
    hit = torch.nn.functional.one_hot(place, 4).bool() & (torch.rand(place.shape) < 0.2)[..., None]
    return hit.view(n, channels, height // 2, width // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(shape)


def main() -> None:
    """The two ops against the ones they replace, bit for bit (float bits, so NaN and the sign of zero count), on
    random inputs, ties (small integers), a NaN in some windows and negative zeros, in both layouts. The forward's
    values are ATen's (F.max_pool2d's); inductor's compiled pool agrees but for the sign of a zero maximum."""
    import torch._inductor.inductor_prims  # registers the prims a compile would

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t

    torch.manual_seed(0)
    inputs = {
        "random": lambda shape: torch.randn(shape),
        "ties": lambda shape: torch.randint(-2, 3, shape).float(),
        "a NaN in some windows": lambda shape: torch.randn(shape).masked_fill(one_per_window(shape), float("nan")),
        "negative zeros": lambda shape: torch.randn(shape).clamp(max=0) * 0,  # -0.0 and +0.0
    }
    for layout in (torch.contiguous_format, torch.channels_last):
        for shape in [(3, 5, 24, 24), (64, 24, 24, 24), (64, 32, 10, 10), (2, 6, 28, 28), (1, 9, 34, 18)]:
            for kind, make in inputs.items():
                x = make(shape).contiguous(memory_format=layout)
                values, offsets = pool2x2_forward(x)
                expected = prims._low_memory_max_pool_with_offsets(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
                aten_values, indices = torch.nn.functional.max_pool2d(x, 2, return_indices=True)
                grad = make(values.shape) if kind == "negative zeros" else torch.randn(values.shape)
                backward = aten.max_pool2d_with_indices_backward(
                    grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
                )
                same = [
                    torch.equal(bits(values), bits(aten_values)),
                    torch.equal(offsets, expected[1]),
                    torch.equal(bits(pool2x2_backward(grad, offsets)), bits(backward)),
                ]
                print(f"{shape}, {layout}, {kind}: values, offsets, backward equal: {same}")
                assert all(same)


if __name__ == "__main__":
    main()
