"""QLoRA-style fine-tuning with feature-space adapters: a 4-bit base model.

A small BERT is built from a config (random weights, no download), every
linear layer of its encoder is replaced by a bitsandbytes 4-bit (nf4) layer,
and VeFA and LoRFA adapters are trained on it for a few steps on a toy
sequence-classification task. The adapters are saved, loaded into a fresh
4-bit copy of the same base, and must give the same outputs; the 4-bit
weights must not have changed.

Runs on the CPU in about a minute and checks itself: it exits non-zero if
the loss does not fall, a reloaded model computes differently, or a
quantized weight moved.

    python examples/qlora_style.py [--steps N] [--output-dir DIR] [--methods vefa lorfa]
"""

import argparse
import copy
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import featadapt

VOCAB, HIDDEN, LAYERS, CLASSES, LENGTH = 64, 64, 2, 2, 12


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per method (default: 30)")
    parser.add_argument("--output-dir", default=None, help="where the adapters go (default: a temporary folder)")
    parser.add_argument("--methods", nargs="+", default=["vefa", "lorfa"], choices=["vefa", "lorfa", "lora"])
    return parser.parse_args()


def base_model():
    """A randomly initialised BERT classifier whose encoder linears are 4-bit (nf4)."""
    import bitsandbytes as bnb
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=2 * HIDDEN, max_position_embeddings=LENGTH, num_labels=CLASSES)
    model = BertForSequenceClassification(config).eval()
    for name, module in list(model.bert.encoder.named_modules()):
        if type(module) is nn.Linear:
            quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
            quantized.load_state_dict(module.state_dict())
            featadapt.model.replace_module(model.bert.encoder, name, quantized.to("cpu"))  # .to() quantizes
    return model


def toy_task(generator):
    """Sequences labelled by whether token 1 occurs more often than token 2."""
    ids = torch.randint(0, VOCAB, (256, LENGTH), generator=generator)
    labels = ((ids == 1).sum(1) > (ids == 2).sum(1)).long()
    return ids, labels


def quantized_bytes(model):
    """The stored 4-bit weights, in module order (inject renames them to *.base_layer)."""
    return [m.weight.detach().clone() for m in model.modules() if featadapt.nn.bases.base_kind(m) == "quantized"]


def train(method, steps, output_dir):
    model = base_model()
    before = quantized_bytes(model)
    options = {"shift": True} if method == "vefa" else {"r": 8, "alpha": 16}
    names = featadapt.inject(model, method, target_modules=["query", "value", "dense"], **options)
    model.classifier.requires_grad_(True)  # a fresh head trains with the adapters
    ids, labels = toy_task(torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for step in range(steps):
        batch = slice((step * 32) % 256, (step * 32) % 256 + 32)
        loss = F.cross_entropy(model(input_ids=ids[batch]).logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    path = os.path.join(output_dir, method)
    featadapt.save_adapters(model, path)
    torch.save(model.classifier.state_dict(), os.path.join(path, "classifier.pt"))

    fresh = base_model()
    featadapt.load_adapters(fresh, path)
    fresh.classifier.load_state_dict(torch.load(os.path.join(path, "classifier.pt")))
    fresh.eval()
    with torch.no_grad():
        same = torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    after = quantized_bytes(model)
    unchanged = len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    four_bit = sum(1 for _, layer in featadapt.model.adapter_layers(model) if getattr(layer, "kind", None) == "quantized")
    print(f"{method}: {len(names)} adapted layers ({four_bit} of them 4-bit), loss {first:.3f} -> {last:.3f}, "
          f"reloaded outputs equal: {same}, 4-bit weights unchanged: {unchanged}")
    return last < first and same and unchanged


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        results = [train(method, args.steps, output_dir) for method in args.methods]
    if not all(results):
        print("qlora_style: a check failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
