"""Left-padded batches of prompts of different lengths: each row is its prompt run alone.

The pads are never attended, kept, scored, offloaded or calibrated with, and each sequence's positions are
its own; so a row's logits, decisions and byte counts equal those of its prompt alone (the logits up to
float rounding: a row attends the same tokens, in other slots)."""
import pytest
import torch

import calidrop
from conftest import cfg, random_tokens
from model import FullCache, decode_one_token, load_model, prefill

LENGTHS = (48, 37, 30, 12)  # the last fits in the budget (16): nothing evicted
N_NEW = 6
PAGES = dict(page_size=4, reload_pages=2)  # ranks pages in every row that evicts more than 2 pages


@pytest.fixture(scope="module")
def model(tiny_ckpt, one_thread):
    return load_model(tiny_ckpt)


def left_padded(prompts):
    """[(L_b,)] -> tokens (B, max L) left-padded with token 0, pads (B,)."""
    L = max(len(p) for p in prompts)
    pads = torch.tensor([L - len(p) for p in prompts])
    return torch.stack([torch.cat([torch.zeros(L - len(p), dtype=torch.long), p]) for p in prompts]), pads


def run(model, tokens, new, config, pads=None):
    """Prefill tokens (B, L) (a CaliDropCache unless config is None), then teacher-force new (B, n) ->
    (logits (B, 1 + n, vocab), cache)."""
    B, L = tokens.shape
    full = FullCache(model.args, B, L if config else L + new.shape[1], pads=pads)
    recorder = calidrop.PrefillRecorder(full, config.window, config.method == "h2o", pads) if config else full
    logits = [prefill(model, tokens, recorder, pads)]
    cache = (calidrop.CaliDropCache.from_prefill(config, full.k, full.v, recorder, new.shape[1],
                                                 inv_freq=model.inv_freq) if config else full)
    for t in range(new.shape[1]):
        logits.append(decode_one_token(model, new[:, t:t + 1], torch.tensor([L + t]), cache, pads))
    return torch.stack(logits, 1), cache


CONFIGS = {
    "full cache": None,
    **{f"{m} exact": cfg(m, theta1=2.0, reload_pages=None) for m in calidrop.METHODS},
    **{f"{m} dense": cfg(m, theta1=0.3, theta2=0.6, reload_pages=None) for m in calidrop.METHODS},
    **{f"{m} pages": cfg(m, theta1=0.3, theta2=0.6, **PAGES) for m in calidrop.METHODS},
    "snapkv evict": cfg("snapkv", calibration=False),
    "h2o calibration_size": cfg("h2o", theta1=0.3, theta2=0.6, calibration_size=10, reload_pages=None),
    "snapkv first-order": cfg("snapkv", theta1=0.3, theta2=0.6, estimate="first-order", **PAGES),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_padded_rows_equal_lone_runs(model, name, inference_mode):
    """Each row of a left-padded batch: the logits of its prompt alone (atol 1e-5), and for a CaliDrop
    cache the same decisions (every count), tokens read back and byte counts."""
    config = CONFIGS[name]
    prompts = [random_tokens(1, n, seed=n)[0] for n in LENGTHS]
    new = random_tokens(len(LENGTHS), N_NEW, seed=99)
    tokens, pads = left_padded(prompts)
    batch_logits, batch = run(model, tokens, new, config, pads)
    n_tokens = tokens.shape[1] + N_NEW
    for b, prompt in enumerate(prompts):
        lone_logits, lone = run(model, prompt[None], new[b:b + 1], config)
        torch.testing.assert_close(batch_logits[b], lone_logits[0], atol=1e-5, rtol=0)
        if config is None:
            continue
        assert torch.equal(batch.counts[:, b], lone.counts[:, 0])
        assert torch.equal(batch.reloads[:, b], lone.reloads[:, 0])
        assert torch.equal(batch.reload_tokens[:, b], lone.reload_tokens[:, 0])
        mine = batch.stats(n_tokens, slice(b, b + 1))
        alone = lone.stats(len(prompt) + N_NEW)
        for key in ("kv_bytes_kept", "kv_bytes_full", "kv_bytes_offloaded", "reload_bytes_per_token",
                    "reload_fraction", "decisions"):
            assert mine[key] == alone[key], (key, b)


INTERVAL_CONFIGS = {
    "streamingllm exact": cfg("streamingllm", theta1=2.0, interval=4),
    "snapkv pages": cfg("snapkv", theta1=0.3, theta2=0.6, interval=4, **PAGES),
    "h2o dense first-order": cfg("h2o", theta1=0.3, theta2=0.6, interval=4, reload_pages=None, estimate="first-order"),
}


@pytest.mark.parametrize("name", INTERVAL_CONFIGS)
def test_padded_rows_with_decode_time_eviction_equal_lone_runs(model, name, inference_mode):
    """With decode-time eviction (a cut every 4 new tokens, 4 cuts) each row of a left-padded batch of prompts
    longer than the budget is its prompt alone: the logits, decisions, tokens read and byte counts (a prompt
    within the budget keeps pads at the prefill, which would move its first cut)."""
    config, n_new = INTERVAL_CONFIGS[name], 20
    prompts = [random_tokens(1, n, seed=n)[0] for n in (48, 37, 30, 20)]
    new = random_tokens(len(prompts), n_new, seed=98)
    tokens, pads = left_padded(prompts)
    batch_logits, batch = run(model, tokens, new, config, pads)
    assert batch.layers[0].cut_pos == tokens.shape[1] + 4 * 4
    for b, prompt in enumerate(prompts):
        lone_logits, lone = run(model, prompt[None], new[b:b + 1], config)
        torch.testing.assert_close(batch_logits[b], lone_logits[0], atol=1e-5, rtol=0)
        assert torch.equal(batch.counts[:, b], lone.counts[:, 0])
        assert torch.equal(batch.reload_tokens[:, b], lone.reload_tokens[:, 0])
        mine, alone = batch.stats(tokens.shape[1] + n_new, slice(b, b + 1)), lone.stats(len(prompt) + n_new)
        for key in ("kv_bytes_kept", "kv_bytes_full", "kv_bytes_offloaded", "reload_bytes_per_token", "decisions"):
            assert mine[key] == alone[key], (key, b)


def test_pages_are_ranked_in_the_batch(model, inference_mode):
    """The pages config really ranks: in the batch every layer reads pages, and the 48-token row reads
    fewer tokens than it evicted, at each step it recomputes."""
    config = CONFIGS["snapkv pages"]
    prompts = [random_tokens(1, n, seed=n)[0] for n in LENGTHS]
    tokens, pads = left_padded(prompts)
    _, cache = run(model, tokens, random_tokens(len(LENGTHS), N_NEW, seed=99), config, pads)
    assert all(layer.pages.pages == 2 for layer in cache.layers)
    assert [int(n) for n in cache.layers[0].evicted_lens] == [n - 16 for n in LENGTHS[:3]] + [0]
    reloads, read = cache.reloads[:, 0].sum(), cache.reload_tokens[:, 0].sum()
    assert reloads > 0 and read == reloads * 2 * 4  # 2 pages of 4 tokens, each time


def test_unpadded_batch_is_unchanged(model, inference_mode):
    """pads of zeros take the padded code path and give the unpadded batch's logits (atol 1e-5), decisions
    and byte counts."""
    config = CONFIGS["snapkv pages"]
    tokens, new = random_tokens(2, 40, seed=3), random_tokens(2, N_NEW, seed=4)
    plain_logits, plain = run(model, tokens, new, config)
    padded_logits, padded = run(model, tokens, new, config, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(padded_logits, plain_logits, atol=1e-5, rtol=0)
    assert torch.equal(padded.counts, plain.counts)
    assert padded.stats(40 + N_NEW) == plain.stats(40 + N_NEW)
