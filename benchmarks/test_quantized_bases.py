"""Adapters on a quantized base (QLoRA-style): one training step of the set's
first end-to-end model with its linear layers (all but the head) in
bitsandbytes 4-bit (nf4) or 8-bit (LLM.int8), for VeFA, LoRFA, LoRA and PEFT's
LoRA on the same quantized base. Each is timed in alternation with the same
method on the full-precision base, so `time_vs_full_precision` is how much
the quantized base costs (or saves) per step; peak memory is per step."""

import time

import pytest

from bench_cases import bench_device, interleaved_medians, peak_memory_bytes
from featadapt.model import matching_modules, replace_module
from test_end_to_end import _no_setup, result_row, training_step

bnb = pytest.importorskip("bitsandbytes")

BASES = ("nf4", "int8")
METHODS = ("vefa", "lorfa", "lora", "peft-lora")


def generate_cases(metafunc, bench_set):
    if "quantized_case" in metafunc.fixturenames:
        cases = [(model, base, method) for model in bench_set.end_to_end[:1] for base in BASES for method in METHODS]
        metafunc.parametrize("quantized_case", cases, ids=["-".join(c) for c in cases])


def quantize_linears(model, base, device):
    """Every linear layer but the head replaced by its bitsandbytes version (quantized on .to)."""
    for name, linear in matching_modules(model, "all-linear"):
        if base == "nf4":
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=linear.weight.dtype, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        replace_module(model, name, layer.to(device))
    return model


def test_quantized_base_training_step(benchmark, bench_set, bench_results, quantized_case):
    model_name, base, method = quantized_case
    device = bench_device()
    step = training_step(model_name, method, device, prepare=lambda model: quantize_linears(model, base, device))
    start = time.perf_counter()
    step()  # warm-up, and the estimate that sets the rounds
    rounds = bench_set.rounds_for(time.perf_counter() - start)
    benchmark.group = f"quantized-{model_name}"
    benchmark.pedantic(step, rounds=rounds)
    median = None if benchmark.disabled else benchmark.stats.stats.median

    full_precision = training_step(model_name, method, device)
    full_precision()
    full_median, quantized_median = interleaved_medians([(_no_setup, full_precision), (_no_setup, step)], rounds)
    row = result_row(model_name, method, step, median, rounds, device)
    row.update({
        "model": f"{model_name} ({base} base)",
        "speed_vs_full": None,  # the comparison here is with the full-precision base:
        "time_vs_full_precision": None if benchmark.disabled else quantized_median / full_median,
        "peak_bytes_full_precision": peak_memory_bytes(full_precision, device),
    })
    bench_results.end_to_end.append(row)
