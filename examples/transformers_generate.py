"""generate.py on a Hugging Face transformers model, through the adapter examples/transformers_calidrop.py:
the same flags (those that apply), the same checks, summary and stats fields.

    python examples/transformers_generate.py --method snapkv --budget 64 --window 16 --prompt-file prompts/passkey.txt --chat
    python examples/transformers_generate.py --ckpt DIR --method full --prompt "..."

Part of this repository, not of the adapter: it reuses generate.py (input checks, the decode loop, the
summary) and common.py (TextCodec, byte counts).
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # generate.py, common.py: the repository's root
import generate as cli  # noqa: E402
import transformers_calidrop as tc  # noqa: E402  (this directory)
from common import TextCodec, UsageError, log, resolve_checkpoint, run_cli, synchronize  # noqa: E402
from model import CheckpointError  # noqa: E402


def parse_args(argv=None):
    """generate.py's flags that apply here; the others (sampling, quantization, offload storage, calibration size,
    compile) at generate.py's defaults, so that its checks and stats apply as they are."""
    mine = cli.build_parser(__doc__, everything=False).parse_args(argv)
    return argparse.Namespace(**{**vars(cli.parse_args([])), **vars(mine)})


def context_length(ckpt):
    """The checkpoint's context length, from its config.json, read by transformers (ckpt: a directory, as
    resolve_checkpoint gives it)."""
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"no config.json in {ckpt}")
    try:
        return AutoConfig.from_pretrained(str(ckpt)).get_text_config().max_position_embeddings
    except (OSError, ValueError, KeyError, AttributeError) as e:  # transformers' messages span lines
        raise CheckpointError(f"bad config.json in {ckpt}: {str(e).splitlines()[0]}") from None


def load(ckpt, device, dtype):
    """The checkpoint as a transformers causal LM with calidrop attention, in eval mode on `device`."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype,
                                                    attn_implementation="calidrop").to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt} does not load as a transformers causal LM: {str(e).splitlines()[0]}") from None


def run(args):
    device, dtype = cli.check_args(args)
    ckpt = resolve_checkpoint(args.ckpt)
    max_len = context_length(ckpt)
    codec = TextCodec(ckpt)
    prompts = [codec.encode(prompt, chat=args.chat) for prompt in args.prompts]
    longest = max(len(ids) for ids in prompts)
    if longest > max_len:
        raise UsageError(f"the prompt is {longest} tokens, longer than the model's context ({max_len})")
    max_new = min(args.max_new_tokens, max_len - longest)
    if max_new < args.max_new_tokens:
        log(f"note: the context has room for {max_new} new tokens only")
    config = None if args.method == "full" else cli.make_config(args)  # already checked
    if config is not None and longest <= config.budget:
        log(f"note: the prompt ({longest} tokens) fits in the budget ({config.budget}): not compressed")
    model = load(ckpt, device, dtype)

    with torch.inference_mode():
        tokens, pads = cli.left_pad(prompts, device)  # pads None for one prompt
        synchronize(device)
        t0 = time.perf_counter()
        try:
            logits, cache = tc.prefill_and_compress(model, tokens, config, max_new, pads=pads)
        except ValueError as e:  # a model this adapter does not support
            raise CheckpointError(str(e)) from None
        token = logits.argmax(-1, keepdim=True)
        synchronize(device)
        prefill_s = time.perf_counter() - t0

        def next_token(token, pos):
            return tc.next_logits(model, token, pos, cache, pads).argmax(-1, keepdim=True)
        if pads is not None:
            decoded = cli.decode_batch(next_token, token, tokens.shape[1], max_new, codec, device)
            return cli.finish_batch(args, ckpt, config, model, cache, device, dtype, prompts, prefill_s, *decoded)
        decoded = cli.stream(next_token, token, longest, max_new, codec, device)
    return cli.finish(args, ckpt, config, model, cache, device, dtype, longest, prefill_s, *decoded)


def main(argv=None):
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()  # stderr holds the summary, or one line of error
    transformers.logging.disable_progress_bar()
    run_cli(run, args)


if __name__ == "__main__":
    main()
