"""The GPU reads the offload store itself: a gather of rows of a pinned host tensor by a Triton kernel.

calidrop.OffloadStore keeps the evicted K/V in pinned host memory when the model runs on a GPU, and a
recompute moves its token indices to the host (the step waits for the GPU queue to drain), gathers there
and copies the rows back: a host sync per layer, so the step cannot be one CUDA graph. `DeviceReadStore`,
the same store, lets the GPU gather the rows over the host link itself (unified addressing: device code
can load pinned host memory), with indices that never leave the device; the step has no host sync and can
be captured.

How the store reaches the kernel: a CUDA-typed view of the pinned tensor (`cuda_view`), not its address
as an int. Pinned memory from `pin_memory()` comes from cudaHostAlloc, whose device address is the host
address under unified addressing; `torch.as_tensor` of an object exposing `__cuda_array_interface__`
with that address wraps it as a CUDA tensor without a copy (vLLM's `get_cuda_view_from_cpu_tensor` does
the same in C++). Why a view: (1) every argument of the op is then a CUDA tensor, which inductor and
CUDA-graph capture accept (a CPU tensor argument makes inductor refuse a user Triton kernel, and
cudagraph trees skip a graph with CPU inputs); (2) an int address would be a constant of the compiled
graph, so a new cache (a new store, new addresses) would recompile the whole step, while a view is one
more cache tensor: marked static (`torch._dynamo.mark_static_address`, unguarded), it is neither copied
into the graph's pool at each replay (which would move the whole store every step) nor guarded on, and
a new address re-records the graph, as the kept cache's buffers do.

Why a Triton kernel behind a custom op, rather than `index_select` on the view (which would also run on
the GPU): the op is opaque to inductor, so no fused kernel reads the host rows twice, and each program
loads whole rows (D contiguous values) with vector loads, many rows in flight: scattered small reads
over the link are latency-bound. The rows a recompute reads come in pages (page_size consecutive
tokens, 16 x D values in a row), so they are not sorted here. Not tuned on a GPU (BLOCK_ROWS, warps).

Tests run the kernel on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, needs numpy), where it
must equal a torch gather bit for bit; on CPU tensors without the interpreter the op is a torch gather.
Needs triton and numpy (torch's `__cuda_array_interface__` reader uses numpy): importing this file
raises ImportError where either is missing (`store(device)` then gives calidrop.OffloadStore).
"""
import os

import numpy  # noqa: F401  (torch.as_tensor reads __cuda_array_interface__ through numpy)
import torch
import triton
import triton.language as tl

import calidrop

BLOCK_ROWS = 8  # rows per program: small, so that many programs (and loads) are in flight


def _gather_rows(k_src, v_src, index, k_out, v_out, n_rows, D: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """k_out[i], v_out[i] = k_src[index[i]], v_src[index[i]] for i < n_rows, 0 where index[i] < 0 (not read:
    nothing crosses the link); K and V in one launch, the index loaded once. k_src, v_src (N, D) and k_out,
    v_out (n_rows, D) contiguous, index int64."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    live = rows < n_rows
    where = tl.load(index + rows, mask=live, other=-1)  # int64: the store can hold > 2^31 values
    columns = cols[None, :] < D
    src, read = where[:, None] * D + cols[None, :], (where >= 0)[:, None] & columns
    out, written = rows.to(tl.int64)[:, None] * D + cols[None, :], live[:, None] & columns
    tl.store(k_out + out, tl.load(k_src + src, mask=read, other=0.0), mask=written)
    tl.store(v_out + out, tl.load(v_src + src, mask=read, other=0.0), mask=written)


_compiled = triton.jit(_gather_rows)
_interpreted = None


def _kernel(device):
    """The compiled kernel for CUDA tensors; for CPU tensors the interpreted one under TRITON_INTERPRET=1,
    else None (a torch gather). Chosen per call, so that one process can test both."""
    global _interpreted
    if device.type == "cuda":
        return _compiled
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    if _interpreted is None:
        from triton.runtime.interpreter import InterpretedFunction
        _interpreted = InterpretedFunction(_gather_rows)
    return _interpreted


@torch.library.custom_op("calidrop::gather_rows", mutates_args=())
def gather_rows(k_src: torch.Tensor, v_src: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k_src, v_src (N, D), index (...) int64 on their device -> k_src[index], v_src[index] (..., D) each, read by
    the device itself; rows of index < 0 are not read and come back 0."""
    N, D = k_src.shape
    k_out, v_out = (torch.empty(*index.shape, D, dtype=x.dtype, device=index.device) for x in (k_src, v_src))
    kernel = _kernel(k_src.device)
    if kernel is None:
        for src, out in ((k_src, k_out), (v_src, v_out)):
            rows = src.index_select(0, index.flatten().clamp(min=0)).view_as(out)
            out.copy_(rows.masked_fill(index[..., None] < 0, 0))
    elif index.numel():
        grid = (triton.cdiv(index.numel(), BLOCK_ROWS),)
        kernel[grid](k_src.contiguous(), v_src.contiguous(), index.contiguous(), k_out, v_out, index.numel(), D,
                     BLOCK_ROWS, triton.next_power_of_2(D))
    return k_out, v_out


@gather_rows.register_fake
def _(k_src, v_src, index):
    return tuple(torch.empty(*index.shape, k_src.shape[1], dtype=x.dtype, device=index.device) for x in (k_src, v_src))


def read_tokens(k, v, rows, kv_heads, tokens):
    """calidrop.read_tokens of K and V at once, for a store the device can read (a CUDA view of pinned memory, or
    any tensor on the indices' device): k, v (B, Hkv, E, D) -> k, v[rows[i], kv_heads[i], tokens[i]] (n, S, D);
    a token -1 is not read (its row comes back 0)."""
    B, Hkv, E, D = k.shape
    flat = ((rows * Hkv + kv_heads)[:, None] * E + tokens).masked_fill(tokens < 0, -1)  # (n, S) rows of k (-1, D)
    return gather_rows(k.view(-1, D), v.view(-1, D), flat)


class _HostArray:
    """Pinned host memory announced as CUDA memory (its device address is its host address); holds the
    tensor, so that the view keeps it alive."""

    def __init__(self, pinned):
        self.pinned = pinned
        typestr = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}[pinned.element_size()]  # numpy has no bfloat16
        self.__cuda_array_interface__ = {"shape": tuple(pinned.shape), "typestr": typestr,
                                         "data": (pinned.data_ptr(), False), "strides": None, "version": 2}


def cuda_view(pinned):
    """A CUDA tensor over the same memory as the pinned host tensor (no copy), marked static for CUDA
    graphs. Written through the host tensor only before any read (the store is filled once)."""
    if not (pinned.is_pinned() and pinned.is_contiguous()):
        raise ValueError("cuda_view needs a contiguous pinned tensor")
    view = torch.as_tensor(_HostArray(pinned), device="cuda").view(pinned.dtype)  # older torch: CPU by default
    if not (view.is_cuda and view.data_ptr() == pinned.data_ptr()):
        raise RuntimeError("cuda_view: torch copied the pinned memory instead of viewing it")
    # static: never copied into a CUDA graph's pool; unguarded (older torch guards by default, a recompile per
    # cache): a new store re-records the graph
    torch._dynamo.mark_static_address(view, guard=False)
    return view


class DeviceReadStore(calidrop.OffloadStore):
    """calidrop.OffloadStore whose pinned host tensors the GPU reads itself, through CUDA-typed views of them
    (a store in the compute's memory, as on a CPU, reads as calidrop's does)."""

    def __init__(self, device):
        super().__init__(device)
        self.on_gpu = {}  # layer -> the CUDA views of its pinned k, v

    def put(self, layer, k, v):
        super().put(layer, k, v)
        if self.k[layer].is_pinned():  # (pinning 0 bytes gives no pointer to view: an empty set stays on the host)
            self.on_gpu[layer] = (cuda_view(self.k[layer]), cuda_view(self.v[layer]))

    def read(self, layer, rows, kv_heads, tokens):
        if layer not in self.on_gpu:
            return super().read(layer, rows, kv_heads, tokens)
        return read_tokens(*self.on_gpu[layer], rows, kv_heads, tokens)

    def get(self, layer):
        return self.on_gpu.get(layer) or super().get(layer)
