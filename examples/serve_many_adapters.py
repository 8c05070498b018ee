"""Serve many VeFA adapters from one model: one mixed batch, one generate() call.

A small GPT-2 is built from a config (no download). 100 VeFA adapters for it
(random, standing in for 100 fine-tuned tenants) are saved as adapter files,
then loaded into one model under names. A batch of prompts, each asking for
its own adapter (or for the base model), is decoded greedily in one
generate() call inside featadapt.select_adapters: every adapted layer makes
one indexed op call per step for the whole batch. The script checks each
sequence against generating it alone on a fresh model that carries only its
adapter (featadapt.load_adapters), and exits non-zero on any difference.

    python examples/serve_many_adapters.py [--adapters N] [--prompts P] [--new-tokens T] [--seed S]
"""

import argparse
import os
import sys
import tempfile
import time

import torch

import featadapt

try:
    import transformers
except ImportError:  # transformers is optional for featadapt, not for this example
    sys.exit("this example needs transformers: pip install transformers")


def small_gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)  # the same pretrained weights every time it is built
    return transformers.GPT2LMHeadModel(config).eval()


def write_adapters(directory, count, seed):
    """`count` VeFA adapter directories (scale and shift on every Conv1D layer); returns {name: path}."""
    model = small_gpt2()
    featadapt.inject(model, "vefa", shift=True)
    generator = torch.Generator().manual_seed(seed)
    paths = {}
    for i in range(count):
        with torch.no_grad():
            for _, layer in featadapt.model.adapter_layers(model):
                layer.scale.copy_(1.0 + 0.3 * torch.randn(layer.scale.shape, generator=generator))
                layer.shift.copy_(0.1 * torch.randn(layer.shift.shape, generator=generator))
        paths[f"tenant-{i:03d}"] = path = os.path.join(directory, f"tenant-{i:03d}")
        featadapt.save_adapters(model, path)
    return paths


def greedy(model, prompts, new_tokens):
    return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        paths = write_adapters(directory, args.adapters, args.seed)
        served = small_gpt2()
        featadapt.load_named_adapters(served, paths)
        print(f"{len(featadapt.named_adapters(served))} VeFA adapters loaded into one GPT-2")

        generator = torch.Generator().manual_seed(args.seed + 1)
        prompts = torch.randint(1, 256, (args.prompts, 6), generator=generator)
        names = [f"tenant-{int(i):03d}" for i in torch.randint(0, args.adapters, (args.prompts,), generator=generator)]
        names[-1] = "__base__"  # one request for the base model

        start = time.perf_counter()
        with featadapt.select_adapters(served, names):
            batch = greedy(served, prompts, args.new_tokens)
        batched_s = time.perf_counter() - start

        mismatches, alone_s = [], 0.0
        for i, name in enumerate(names):
            alone_model = small_gpt2()
            if name != "__base__":
                featadapt.load_adapters(alone_model, paths[name])
            start = time.perf_counter()
            alone = greedy(alone_model, prompts[i:i + 1], args.new_tokens)
            alone_s += time.perf_counter() - start
            if not torch.equal(alone, batch[i:i + 1]):
                mismatches.append(name)
        distinct = len(set(names) - {"__base__"})
        continuations = {tuple(row[prompts.shape[1]:].tolist()) for row in batch}

    print(f"{args.prompts} prompts on {distinct} adapters + the base model, {args.new_tokens} new tokens each: "
          f"one batched generate() {batched_s:.2f} s, one prompt at a time {alone_s:.2f} s (CPU)")
    if mismatches:
        print(f"FAILED: the batch differs from generating alone for {mismatches}")
        return 1
    if len(continuations) < 2:
        print("FAILED: every sequence generated the same tokens; the adapters made no difference")
        return 1
    print(f"OK: every sequence equals generating it alone with its own adapter "
          f"({len(continuations)} distinct continuations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
