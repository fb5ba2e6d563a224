"""Check a prepared model against transformers reading the same GGUF directly (the oracle).

    python -m scripts.check_conversion qwen2.5-coder-0.5b

transformers needs `accelerate` to read a GGUF, which requirements.txt leaves out; to keep it out of the
environment: pip install --no-deps --target DIR accelerate psutil, then PYTHONPATH=DIR python -m ...

Prints: whether our tokenizer gives transformers' GGUF tokenizer's ids on KJV text, on code (model.py)
and on a ChatML prompt (ours through generate.TextCodec, theirs through the GGUF's own chat template); the max abs
difference of the logits on the first 1,024 KJV tokens and both perplexities there; our greedy answer
to a question through our chat format. The GGUF is fetched again (pip's cache makes it quick).
"""
import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from common import kjv_text
from common import TextCodec
from model import FullCache, decode_one_token, load_model, prefill
from scripts import gguf_to_hf, models

QUESTION = "What is the capital of France?"


def greedy_answer(model, codec, question, max_new_tokens=32):
    ids = codec.encode(question, chat=True)
    cache = FullCache(model.args, 1, len(ids) + max_new_tokens)
    out = [int(prefill(model, torch.tensor([ids]), cache).argmax())]
    while out[-1] not in codec.stop_ids and len(out) < max_new_tokens:
        pos = torch.tensor([len(ids) + len(out) - 1])
        out.append(int(decode_one_token(model, torch.tensor([[out[-1]]]), pos, cache).argmax()))
    return codec.decode(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=models.MODELS)
    args = parser.parse_args()
    log = gguf_to_hf.print_to_stderr
    ckpt = models.prepare(args.model)
    codec, ours = TextCodec(ckpt), load_model(ckpt)
    with tempfile.TemporaryDirectory() as work:
        gguf_path = models.MODELS[args.model].fetch_gguf(Path(work), log)
        log("loading the GGUF with transformers")
        tokenizer = transformers.AutoTokenizer.from_pretrained(work, gguf_file=gguf_path.name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_path.name,
                                                                   dtype=torch.float32).eval()

    for name, text in (("the first 1,000,000 KJV characters", kjv_text()[:1_000_000]),
                       ("model.py", (Path(__file__).parents[1] / "model.py").read_text())):
        same = codec.encode(text) == tokenizer(text, add_special_tokens=False).input_ids
        print(f"tokenizer: ids equal on {name}: {same}")
    chat_ids = codec.encode(QUESTION, chat=True)
    template_ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
    print(f"tokenizer: ids equal on the ChatML prompt ({len(chat_ids)} tokens, ours vs the GGUF's chat "
          f"template): {chat_ids == list(template_ids)}")

    ids = torch.tensor([codec.encode(kjv_text())[:1024]])
    with torch.inference_mode():
        our_logits = ours(ids, torch.arange(1024), FullCache(ours.args, 1, 1024))
        their_logits = theirs(ids).logits.float()
        diff = (our_logits - their_logits).abs().max()
        ppl = [math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:])) for logits in (our_logits, their_logits)]
        answer = greedy_answer(ours, codec, QUESTION)
    print(f"logits on the first 1,024 KJV tokens: max abs diff {diff:.2e} "
          f"(logits span {float(their_logits.min()):.1f} .. {float(their_logits.max()):.1f})")
    print(f"perplexity on them: ours {ppl[0]:.3f}, transformers-GGUF {ppl[1]:.3f}")
    print(f"greedy answer to {QUESTION!r} through our chat format: {answer!r}")


if __name__ == "__main__":
    main()
