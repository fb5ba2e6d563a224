"""benchmark/decoding_peer.py, kvpress's DecodingPress on our teacher-forced task: the teacher forcing is exact (no
press: KL 0) and the cache stays within what DecodingPress promises. Runs only where kvpress 0.5.5 is importable
(its own virtual environment, .venv-kvpress: see the module's docstring); skipped elsewhere."""
import argparse

import pytest
import torch

pytest.importorskip("kvpress")
transformers = pytest.importorskip("transformers")

from benchmark import decoding_peer as dp  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2)
PROMPT, NEW, TARGET, INTERVAL = 64, 40, 24, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Llama saved by transformers and loaded back as the script loads a checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).save_pretrained(path)
    return dp.load_model(path)


@pytest.fixture(scope="module")
def rows():
    return torch.randint(0, SMALL["vocab_size"], (2, PROMPT + NEW + 1), generator=torch.Generator().manual_seed(1))


def args(**overrides):
    return argparse.Namespace(**{**dict(target_size=TARGET, interval=INTERVAL, window=4, kernel=5, sink=4),
                                 **overrides})


def test_no_press_gives_the_references_logits(model, rows):
    """Without a press, and with a press that never has more tokens than its target, the stepped logits are the
    reference's bit for bit (KL exactly 0); the reference's NLL is that of one forward over the whole row."""
    a = args()
    never = dp.PrefillDecodingPress(prefilling_press=dp.SCORERS["snapkv"](a, 0.0), decoding_press=dp.DecodingPress(
        base_press=dp.SCORERS["snapkv"](a, 0.0), compression_interval=INTERVAL, target_size=PROMPT + NEW + 1))
    nll_ref, nll, kl, ref, streams = dp.teacher_force(model, rows, PROMPT, NEW, {"none": None, "never": never})
    for name in ("none", "never"):
        assert torch.equal(kl[name], torch.zeros_like(kl[name]))
        assert torch.equal(nll[name], nll_ref)
        assert streams[name].sizes_after_step[-1] == (PROMPT + NEW, PROMPT + NEW)
    with torch.inference_mode():
        logp = torch.log_softmax(model(rows[:, :-1]).logits[:, PROMPT:].double(), -1)
    one_pass = -logp.gather(2, rows[:, PROMPT + 1:, None])[..., 0]
    torch.testing.assert_close(nll_ref, one_pass, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scorer", sorted(dp.SCORERS))
def test_decoding_press_holds_the_target_plus_at_most_an_interval(model, rows, scorer):
    """Observed: the prompt is cut to TARGET at prefill; each decoding step appends one token, and on every
    INTERVAL-th step DecodingPress cuts the cache back to exactly TARGET after the layer has attended. So a layer
    attends over at most TARGET + INTERVAL tokens and holds TARGET + (steps since the last cut) between steps;
    every layer and KV head holds the same number. The bytes are those tokens' K and V."""
    press = dp.make_press(scorer, args(), PROMPT)
    nll_ref, nll, kl, ref, streams = dp.teacher_force(model, rows, PROMPT, NEW, {scorer: press})
    s = streams[scorer]
    assert s.prefill_peak_tokens == PROMPT
    assert s.sizes_after_step == [(TARGET + (t + 1) % INTERVAL,) * 2 for t in range(NEW)]
    assert s.peak_attend_tokens == TARGET + INTERVAL and s.peak_step_tokens == TARGET + INTERVAL - 1
    per_token = SMALL["num_hidden_layers"] * SMALL["num_key_value_heads"] * SMALL["head_dim"] * 2 * 4
    report = dp.cache_report(s, rows.shape[0])
    assert report["bytes_end"] == (TARGET + NEW % INTERVAL) * per_token
    assert report["bytes_peak_attending"] == (TARGET + INTERVAL) * per_token
    assert (kl[scorer] > 0).all() and torch.isfinite(nll[scorer]).all()


def test_kvpress_keeps_tokens_in_top_k_order(model, rows):
    """Observed in kvpress 0.5.5 on CPU: ScorerPress.compress gathers the kept tokens in top-k order, not position
    order, and StreamingLLMPress (which scores ties: 1 kept, 0 evicted) reads sinks and the recent window off the
    cache's order. So after the first decoding compression its cache is not the sinks plus the newest tokens."""
    press = dp.make_press("streamingllm", args(), PROMPT)
    _, _, _, ref, streams = dp.teacher_force(model, rows, PROMPT, NEW, {"streamingllm": press})
    pos, dist = dp.kept_positions(ref, streams["streamingllm"])
    assert dist < 0.05
    ideal = set(range(4)) | set(range(PROMPT + NEW - (TARGET + NEW % INTERVAL - 4), PROMPT + NEW))
    assert len(ideal) == TARGET + NEW % INTERVAL
    held = [set(pos[b, h].tolist()) for b in range(pos.shape[0]) for h in range(pos.shape[1])]
    assert all(len(h) == TARGET + NEW % INTERVAL for h in held)  # distinct positions: the match is one to one
    assert any(h != ideal for h in held)


def test_snapkv_window_must_be_shorter_than_the_interval(model, rows):
    """DecodingPress buffers exactly `interval` hidden states per compression, and SnapKVPress.score asserts that
    they outnumber its window: kvpress's default window (64) cannot run with a 64-step interval."""
    press = dp.make_press("snapkv", args(window=INTERVAL), PROMPT)
    with pytest.raises(AssertionError, match="greater than the window size"):
        dp.teacher_force(model, rows, PROMPT, NEW, {"snapkv": press})


def test_keep_order_makes_streaming_llm_the_sinks_and_the_recent_window(model, rows, monkeypatch):
    """With --keep-order (kvpress's ScorerPress.compress plus a sort of the kept indices) StreamingLLM holds
    exactly its sinks and the newest tokens, in position order."""
    from kvpress.presses.scorer_press import ScorerPress
    monkeypatch.setattr(ScorerPress, "compress", ScorerPress.compress)  # restored after the test
    dp.keep_position_order()
    press = dp.make_press("streamingllm", args(), PROMPT)
    _, _, _, ref, streams = dp.teacher_force(model, rows, PROMPT, NEW, {"streamingllm": press})
    pos, _ = dp.kept_positions(ref, streams["streamingllm"])
    n = TARGET + NEW % INTERVAL
    ideal = torch.tensor(list(range(4)) + list(range(PROMPT + NEW - (n - 4), PROMPT + NEW)))
    assert torch.equal(pos, ideal.expand_as(pos))
