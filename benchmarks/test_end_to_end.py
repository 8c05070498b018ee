"""End to end: one training step (forward, loss, backward, optimizer step) of a
transformer with adapters on every linear layer but the head, against full
fine-tuning and PEFT's IA3 and LoRA on the same model."""

import time
from dataclasses import dataclass

import pytest
import torch

import featadapt
from bench_cases import bench_device, interleaved_medians, peak_memory_bytes, synchronize
from featadapt.model import matching_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

METHODS = ("full", "vefa", "lorfa", "lora", "peft-ia3", "peft-lora")
RANK = 16


@dataclass(frozen=True)
class ModelSpec:
    build: callable  # () -> model
    batch: int
    seq: int
    causal: bool
    autocast: bool = False  # float32 weights, the steps run under bfloat16 autocast (on the CPU)


def _bert(hidden, layers, heads, intermediate, vocab=30522):
    config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, num_labels=2,
    )
    return lambda: transformers.BertForSequenceClassification(config)


def _decoder(hidden, layers, heads, ffn, vocab=50272):
    # GPT-2-medium's size in an architecture built of nn.Linear layers (GPT-2's
    # own Conv1D layers are not adaptable yet).
    config = transformers.OPTConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        ffn_dim=ffn, max_position_embeddings=1024, word_embed_proj_dim=hidden,
    )
    return lambda: transformers.OPTForCausalLM(config)


MODELS = {
    "tiny-bert": ModelSpec(_bert(32, 2, 4, 64, vocab=100), batch=2, seq=16, causal=False),
    "minilm-l6": ModelSpec(_bert(384, 6, 12, 1536), batch=16, seq=64, causal=False),
    "minilm-l6-bf16": ModelSpec(_bert(384, 6, 12, 1536), batch=16, seq=64, causal=False, autocast=True),
    "bert-base": ModelSpec(_bert(768, 12, 12, 3072), batch=32, seq=128, causal=False),
    "gpt2-medium-size": ModelSpec(_decoder(1024, 24, 16, 4096), batch=8, seq=512, causal=True),
}


def generate_cases(metafunc, bench_set):
    if "model_method" in metafunc.fixturenames:
        cases = [(model, method) for model in bench_set.end_to_end for method in METHODS]
        metafunc.parametrize("model_method", cases, ids=[f"{m}-{meth}" for m, meth in cases])


def adapt(model, method):
    """Adapters on every linear layer but the head (full: train everything)."""
    if method == "full":
        return model
    if method in ("vefa", "lorfa", "lora"):
        options = {} if method == "vefa" else {"r": RANK, "alpha": 2 * RANK}
        featadapt.inject(model, method, **options)
        return model
    targets = [name for name, _ in matching_modules(model, "all-linear")]
    if method == "peft-ia3":
        config = peft.IA3Config(target_modules=targets, feedforward_modules=targets)
    else:
        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def training_step(model_name, method, device, prepare=None):
    """A closure running one training step of `model_name` adapted by `method`;
    `prepare(model)`, if given, changes the built model before it is adapted."""
    spec = MODELS[model_name]
    dtype = torch.bfloat16 if device.type == "cuda" and not spec.autocast else torch.float32
    torch.manual_seed(0)
    model = spec.build().to(device=device, dtype=dtype)
    model = adapt(model if prepare is None else prepare(model), method)
    model.train()
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (spec.batch, spec.seq), device=device, generator=generator)
    labels = input_ids if spec.causal else torch.randint(0, 2, (spec.batch,), device=device, generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.autocast):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    step.model = model
    step.dtype = "bfloat16-autocast" if spec.autocast else str(dtype).removeprefix("torch.")
    return step


_full_steps = {}  # model name -> full fine-tuning step, the reference every method is timed against


def _no_setup():
    return (), {}


def test_training_step(benchmark, bench_set, bench_results, model_method):
    model_name, method = model_method
    device = bench_device()
    step = training_step(model_name, method, device)

    start = time.perf_counter()
    step()  # the warm-up, and the estimate that sets the rounds
    rounds = bench_set.rounds_for(time.perf_counter() - start)
    benchmark.group = f"end-to-end-{model_name}"
    benchmark.pedantic(step, rounds=rounds)
    median = None if benchmark.disabled else benchmark.stats.stats.median

    # Speed against full fine-tuning, the two timed in alternation.
    if method == "full":
        speed_vs_full = 1.0
    else:
        if model_name not in _full_steps:
            _full_steps[model_name] = training_step(model_name, "full", device)
            _full_steps[model_name]()  # its warm-up
        runs = [(_no_setup, _full_steps[model_name]), (_no_setup, step)]
        full_median, method_median = interleaved_medians(runs, rounds)
        speed_vs_full = full_median / method_median
    row = result_row(model_name, method, step, median, rounds, device)
    row["speed_vs_full"] = None if benchmark.disabled else speed_vs_full
    bench_results.end_to_end.append(row)


def result_row(model_name, method, step, median, rounds, device):
    """The fields of every end-to-end results row (this module's and the quantized bases')."""
    spec = MODELS[model_name]
    trainable, total = featadapt.trainable_parameters(step.model)
    return {
        "model": model_name,
        "method": method,
        "dtype": step.dtype,
        "batch": spec.batch,
        "seq": spec.seq,
        "trainable_params": trainable,
        "total_params": total,
        "median_s": median,
        "rounds": rounds,
        "tokens_per_s": None if median is None else spec.batch * spec.seq / median,
        "peak_bytes": peak_memory_bytes(step, device),
    }
