"""offload_gather.py: the GPU reads the pinned offload store itself. On CPU its Triton kernel runs in Triton's
interpreter (TRITON_INTERPRET=1) and must equal a torch gather bit for bit; on a GPU (scripts/gpu_check.sh),
the device read inside a compiled step captured as a CUDA graph must equal the host path."""
import pytest
import torch

import calidrop
import calidrop_pages
from conftest import cfg, random_tokens

pytest.importorskip("numpy", reason="Triton's interpreter and torch's __cuda_array_interface__ reader need numpy")
pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.9.0): no device read to test")
import offload_gather  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (scripts/gpu_check.sh runs it on one)")


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert offload_gather._kernel(torch.device("cpu")) is not None  # the kernel itself, not the torch fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 24, 128])
def test_kernel_equals_torch_gather(interpreter, dtype, D):
    """Odd shapes (rows not a multiple of the block, D not a power of 2), repeated and unsorted indices."""
    g = torch.Generator().manual_seed(D)
    k, v = torch.randn(37, D, generator=g).to(dtype), torch.randn(37, D, generator=g).to(dtype)
    for index in (torch.tensor([[5, 3, 3, 36, 0], [1, 1, 2, 9, 8]]), torch.randint(0, 37, (3, 7, 11), generator=g),
                  torch.tensor([36]), torch.zeros(2, 0, dtype=torch.long)):
        k_out, v_out = offload_gather.gather_rows(k, v, index)
        assert k_out.shape == v_out.shape == (*index.shape, D) and k_out.dtype == dtype
        assert torch.equal(k_out, k[index]) and torch.equal(v_out, v[index])


def test_read_tokens_equals_calidrop(interpreter):
    """The store's layout (B, Hkv, E, D), pairs (rows, kv_heads) and pages of tokens, as a recompute reads them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 53, 16, generator=g).to(torch.bfloat16)
    rows, kv_heads = torch.tensor([1, 0, 1, 0]), torch.tensor([2, 2, 0, 1])
    pages = torch.randint(0, 4, (4, 3), generator=g)  # pages of 16 tokens, the last one partial
    tokens, visible = calidrop_pages.page_tokens(pages, 16, 53)
    k, v = offload_gather.read_tokens(x, -x, rows, kv_heads, tokens * visible)
    assert torch.equal(k, calidrop.read_tokens(x, rows, kv_heads, tokens * visible)) and torch.equal(v, -k)


def test_rows_not_asked_for_are_not_read():
    """Index -1 (a pair that does not recompute, the empty slots of a last page): the kernel's load is masked,
    so nothing crosses the link for it, and the row comes back 0. Counted on a source with no zero: the rows
    that come back non-zero are exactly the rows asked for, with the source's values; the same without the
    interpreter (a torch gather). Through read_tokens a pair whose tokens are all -1 reads nothing."""
    src = torch.randn(40, 24, generator=torch.Generator().manual_seed(2)) + 10
    index = torch.tensor([[3, -1, 7, -1], [-1, -1, -1, -1], [39, 0, -1, 5]])
    for interpreted in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TRITON_INTERPRET", "1") if interpreted else mp.delenv("TRITON_INTERPRET", raising=False)
            assert (offload_gather._kernel(src.device) is None) != interpreted
            k, v = offload_gather.gather_rows(src, -src, index)
        for out, sign in ((k, 1), (v, -1)):
            read = out.ne(0).any(-1)
            assert torch.equal(read, index >= 0) and int(read.sum()) == 5
            assert torch.equal(out[read], sign * src[index[index >= 0]])
    x = src.view(2, 2, 10, 24)
    tokens = torch.tensor([[0, 9, -1], [-1, -1, -1]])  # the second pair is not needed
    k, v = offload_gather.read_tokens(x, x, torch.tensor([1, 0]), torch.tensor([0, 1]), tokens)
    assert torch.equal(k.ne(0).any(-1), tokens >= 0) and torch.equal(k[0, :2], x[1, 0, [0, 9]]) and torch.equal(v, k)


def test_op_traces_whole_under_compile(interpreter):
    """The custom op and its fake: one graph (fullgraph) around it, the same numbers as eager."""
    x = torch.randn(2, 2, 20, 8, generator=torch.Generator().manual_seed(1))

    def step(q, rows, kv_heads, tokens):
        k, v = offload_gather.read_tokens(x, x + 1, rows, kv_heads, tokens)
        return ((q[:, None] * k).sum(-1).softmax(-1)[..., None] * v).sum(1)

    args = (torch.randn(3, 8), torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1]), torch.randint(0, 20, (3, 5)))
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), step(*args))


def test_without_the_interpreter_the_op_is_a_torch_gather(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    src, index = torch.randn(9, 4), torch.tensor([[8, 0, 8]])
    assert offload_gather._kernel(src.device) is None
    k, v = offload_gather.gather_rows(src, src * 2, index)
    assert torch.equal(k, src[index]) and torch.equal(v, 2 * src[index])


def test_a_cpu_store_does_not_read_on_a_gpu():
    """On CPU the store stays as it was: no views, read_tokens' gather."""
    store = offload_gather.DeviceReadStore("cpu")
    store.put(0, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    assert not store.on_gpu and not store.k[0].is_pinned()


def test_the_recomputing_step_traces_whole_through_the_op(tiny_ckpt, interpreter):
    """The CaliDrop step with its store read through the op (as on a GPU; here the op runs the kernel in the
    interpreter on the CPU store), compiled whole (fullgraph, aot_eager: the tracing, the fake, the op in
    the graph) with every step recomputing a few pages: the same logits as the eager host read."""
    from generate import prefill_and_compress
    from model import decode_one_token, load_model

    model = load_model(tiny_ckpt)
    L, n = 48, 5
    tokens = random_tokens(1, L + n, seed=6)
    config = cfg("snapkv", theta1=2.0, theta2=-1.0, reload_pages=2, page_size=4)
    logits = {}
    with torch.inference_mode():
        for mode in ("host", "op"):
            _, cache = prefill_and_compress(model, tokens[:, :L], config, n)
            step = decode_one_token
            if mode == "op":
                store = offload_gather.DeviceReadStore("cpu")
                for i in cache.store.k:
                    store.put(i, cache.store.k[i], cache.store.v[i])
                store.on_gpu = {i: (store.k[i], store.v[i]) for i in store.k}  # as on a GPU: read through the op
                cache.store = store
                step = torch.compile(decode_one_token, backend="aot_eager", fullgraph=True, dynamic=False)
            logits[mode] = torch.stack([step(model, tokens[:, t:t + 1], torch.tensor([t]), cache)
                                        for t in range(L, L + n)], 1)
            assert cache.reloads.sum() > 0
    torch.testing.assert_close(logits["op"], logits["host"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- on a GPU

@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_view_of_pinned_memory(dtype):
    pinned = torch.randn(4, 33, 128).to(dtype).pin_memory()
    view = offload_gather.cuda_view(pinned)
    assert view.is_cuda and view.data_ptr() == pinned.data_ptr() and view.dtype == dtype
    index = torch.randint(0, 4 * 33, (6, 16), device="cuda")
    k, v = offload_gather.gather_rows(view.view(-1, 128), view.view(-1, 128), index)
    assert torch.equal(k.cpu(), pinned.view(-1, 128)[index.cpu()]) and torch.equal(v, k)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_step_reads_the_store_on_the_device(tiny_ckpt, dtype):
    """The recomputing step compiled whole (fullgraph) as bench.py compiles it on CUDA, mode "reduce-overhead"
    (CUDA graphs), its store read by the GPU: the logits equal eager decoding with the host read, step by
    step, while every step recomputes (theta1 > 1) and reads a few pages."""
    from benchmark.rows import Steps, Variant, prepare_for_cuda_graphs, uses_cuda_graphs
    from generate import prefill_and_compress
    from model import decode_one_token, load_model
    from torch._dynamo.utils import counters

    model = load_model(tiny_ckpt, "cuda", dtype)
    L, n = 96, 12
    tokens = random_tokens(1, L + n, seed=4).cuda()
    config = cfg("snapkv", theta1=2.0, theta2=-1.0, reload_pages=2, page_size=8)
    logits = {}
    with torch.inference_mode():
        for mode in ("eager", "compile"):
            store = offload_gather.DeviceReadStore("cpu")
            first, cache = prefill_and_compress(model, tokens[:, :L], config, n, store)
            assert store.k[0].is_pinned() and store.on_gpu  # the device read is on
            if mode == "eager":
                store.on_gpu = {}  # the host read: indices to the host, gather there, copy back
                step = decode_one_token
            else:
                variant = Variant("calidrop", config)
                assert uses_cuda_graphs(torch.device("cuda"), variant, cache)
                prepare_for_cuda_graphs(cache)
                step = Steps(torch.device("cuda")).get("compile", variant, cache)
                skips = counters["inductor"]["cudagraph_skips"]
            out = []
            for t in range(L, L + n - 1):
                if mode == "compile":
                    torch.compiler.cudagraph_mark_step_begin()
                out.append(step(model, tokens[:, t:t + 1], torch.tensor([t], device="cuda"), cache).clone())
            logits[mode] = torch.stack(out, 1)
            assert cache.reloads.sum() > 0
    assert counters["inductor"]["cudagraph_skips"] == skips  # captured, not skipped
    error = (logits["compile"] - logits["eager"]).abs().max()
    assert error <= (1e-4 if dtype == torch.float32 else 0.02 * logits["eager"].abs().max()), error


def test_history_is_refreshed_in_place(tiny_ckpt):
    """A CUDA graph replays into the tensors it was recorded with: a recompute writes the new history into the
    cache's own hist_q / hist_out / hist_lse (the same objects before and after), and the recomputing heads'
    hist_q is their query of that step."""
    from generate import prefill_and_compress
    from model import decode_one_token, load_model

    model = load_model(tiny_ckpt)
    L, n = 48, 6
    tokens = random_tokens(2, L + n, seed=5)
    config = cfg("snapkv", theta1=0.5, theta2=0.9, reload_pages=2, page_size=4)
    with torch.inference_mode():
        _, cache = prefill_and_compress(model, tokens[:, :L], config, n)
        held = [(s.hist_q, s.hist_out, s.hist_lse) for s in cache.layers]
        before = [t.clone() for t in held[0]]
        for t in range(L, L + n):
            decode_one_token(model, tokens[:, t:t + 1], torch.tensor([t]), cache)
    assert all(a is b for s, h in zip(cache.layers, held) for a, b in zip((s.hist_q, s.hist_out, s.hist_lse), h))
    assert cache.counts[..., 1].any() and not torch.equal(cache.layers[0].hist_q, before[0])
