"""Many adapters in one batch: forward throughput and memory of one layer and
of a small model when a batch mixes n adapters (one per sequence, round-robin).

Compared in the same run, each timed in alternation with the frozen floor:
featadapt's batched call (adapter_index=; VeFA, LoRA and LoRFA r=16), the
same batch on a single VeFA adapter, PEFT's mixed-batch LoRA forward
(adapter_names=) and a loop over the adapters (one call per adapter on its
sequences). Inference: no autograd. Written to
benchmarks/results/<device>-multi-adapter.json (next to --bench-results'
file when that is given), with the targets:

- VeFA with the most adapters within 1.10x of a single VeFA adapter on the same batch;
- LoRA and LoRFA batched ahead of PEFT's mixed-batch LoRA forward at every n.
"""

import json
import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import featadapt
from featadapt.adapter_bank import _bank
from featadapt.fileio import write_atomically
from featadapt.model import adapter_layers

from bench_cases import bench_device, default_set_name, interleaved_medians, peak_memory_bytes, synchronize
from bench_report import device_name, device_slug, environment

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VEFA_TARGET = 1.10  # batched VeFA with the most adapters / single VeFA adapter


@dataclass(frozen=True)
class MultiSet:
    sequences: int  # S: one adapter per sequence
    tokens: int  # T tokens per sequence: the layer sees M = S·T rows
    features: int  # K = N of the layer
    adapter_counts: tuple
    rank: int
    model_width: int  # the small GPT-2's n_embd
    model_layers: int
    rounds: int


MULTI_SETS = {
    "tiny": MultiSet(sequences=8, tokens=2, features=32, adapter_counts=(1, 4), rank=4, model_width=32, model_layers=1,
                     rounds=1),
    "cpu": MultiSet(sequences=512, tokens=2, features=768, adapter_counts=(1, 8, 64, 512), rank=16,
                    model_width=128, model_layers=2, rounds=5),
    "gpu": MultiSet(sequences=512, tokens=64, features=4096, adapter_counts=(1, 8, 64, 512), rank=16,
                    model_width=1024, model_layers=4, rounds=20),
}
# Every --bench-set has an entry (tests/test_multi_adapter_bench.py checks):
# CPUs with native bfloat16 run the CPU sizes; the GPU check's headline stage
# is the layer benchmarks only, its other stage the GPU sizes.
MULTI_SETS["cpu-bf16"] = MULTI_SETS["cpu"]
MULTI_SETS["gpu-headline"] = None
MULTI_SETS["gpu-rest"] = MULTI_SETS["gpu"]

LAYER_VARIANTS = ("floor", "vefa/single", "vefa/batched", "lora/batched", "lorfa/batched", "peft-lora/mixed",
                  "vefa/loop", "lora/loop", "lorfa/loop")
MODEL_VARIANTS = ("floor", "vefa/single", "vefa/batched", "lora/batched", "lorfa/batched", "peft-lora/mixed",
                  "vefa/loop")


def multi_set(config):
    return MULTI_SETS[config.getoption("--bench-set") or default_set_name()]


def generate_cases(metafunc, bench_set):
    del bench_set  # this module has its own sets (MULTI_SETS), chosen by the same --bench-set
    chosen = multi_set(metafunc.config)
    counts = chosen.adapter_counts if chosen is not None else ()
    if "multi_layer_n" in metafunc.fixturenames:
        metafunc.parametrize("multi_layer_n", counts, ids=[f"layer-n{n}" for n in counts])
    if "multi_model_n" in metafunc.fixturenames:
        metafunc.parametrize("multi_model_n", counts, ids=[f"model-n{n}" for n in counts])


@pytest.fixture(scope="module")
def multi_results(request):
    rows = {"layer": [], "model": []}
    yield rows
    if not rows["layer"] and not rows["model"]:
        return
    config = request.config
    device = bench_device()
    given = config.getoption("--bench-results")
    path = (os.path.splitext(given)[0] + "-multi-adapter.json" if given
            else os.path.join(RESULTS_DIR, device_slug(device_name(device)) + "-multi-adapter.json"))
    env = environment(device, config.getoption("--bench-set") or default_set_name())
    env["case"] = multi_set(config).__dict__
    payload = {"environment": env, "targets": targets(rows), **rows}

    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, dump)


def targets(rows):
    out = []
    for kind in ("layer", "model"):
        by = {(r["variant"], r["adapters"]): r for r in rows[kind]}
        counts = sorted({r["adapters"] for r in rows[kind]})
        if not counts:
            continue
        most = counts[-1]
        # Quotients of ratios to the floor: each was timed in alternation with it, so
        # they resist a drifting (shared) machine better than quotients of medians.
        batched, single = by.get(("vefa/batched", most)), by.get(("vefa/single", most))
        if batched and single:
            ratio = batched["ratio_to_floor"] / single["ratio_to_floor"]
            out.append({"target": f"{kind}: VeFA with {most} adapters within {VEFA_TARGET}x of one VeFA adapter",
                        "ratio": ratio, "met": ratio <= VEFA_TARGET})
        for method in ("lora", "lorfa"):
            for n in counts:
                ours, peft = by.get((f"{method}/batched", n)), by.get(("peft-lora/mixed", n))
                if ours and peft:
                    ratio = ours["ratio_to_floor"] / peft["ratio_to_floor"]
                    out.append({"target": f"{kind}: {method} batched ahead of PEFT's mixed-batch LoRA at n={n}",
                                "ratio": ratio, "met": ratio < 1.0})
    return out


# -- inputs and adapters --------------------------------------------------------


def round_robin(sequences, n):
    return torch.arange(sequences) % n


def stacked_params(n, k, n_out, rank, generator, device):
    def randn(*shape, scale=0.02, around=0.0):
        return (around + scale * torch.randn(*shape, generator=generator)).to(device)

    return {
        "scale": randn(n, k, scale=0.1, around=1.0), "shift": randn(n, k),
        "lora_A": randn(n, rank, k), "lora_B_lora": randn(n, n_out, rank), "lora_B_lorfa": randn(n, k, rank),
        "scaling": 2.0,
    }


def peft_lora_layer(base, n, rank, p):
    """A PEFT LoRA layer with n adapters "a0".."a{n-1}", holding the same values as p."""
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["layer"], lora_dropout=0.0)
    holder = nn.Module()
    holder.layer = base
    model = peft.get_peft_model(holder, config, "a0")
    layer = model.base_model.model.layer
    for i in range(1, n):
        layer.update_layer(f"a{i}", rank, 2 * rank, config)
    with torch.no_grad():
        for i in range(n):
            layer.lora_A[f"a{i}"].weight.copy_(p["lora_A"][i])
            layer.lora_B[f"a{i}"].weight.copy_(p["lora_B_lora"][i])
    return layer.eval()


def layer_variant(name, base, x, ids_rows, ids_seq, p, n):
    """() -> y for one variant on x (S, T, K) with per-row ids_rows (S, T)."""
    w, b = base.weight, base.bias
    ops = {"lora": featadapt.lora_linear, "lorfa": featadapt.lorfa_linear}
    if name == "floor":
        return lambda: base(x)
    if name == "vefa/single":
        return lambda: featadapt.vefa_linear(x, w, p["scale"][0], b, p["shift"][0])
    if name == "vefa/batched":
        return lambda: featadapt.vefa_linear(x, w, p["scale"], b, p["shift"], adapter_index=ids_rows)
    if name in ("lora/batched", "lorfa/batched"):
        method = name.split("/")[0]
        return lambda: ops[method](x, w, p["lora_A"], p[f"lora_B_{method}"], b, scaling=p["scaling"],
                                   adapter_index=ids_rows)
    if name == "peft-lora/mixed":
        layer = peft_lora_layer(base, n, p["lora_A"].shape[1], p)
        names = [f"a{int(i)}" for i in ids_seq]
        return lambda: layer(x, adapter_names=names)
    method = name.split("/")[0]  # a loop over the adapters, one call each on its sequences
    groups = [(a, (ids_seq == a).nonzero().squeeze(1)) for a in range(n)]

    def loop():
        y = x.new_empty((*x.shape[:-1], w.shape[0]))
        for a, rows in groups:
            if method == "vefa":
                y[rows] = featadapt.vefa_linear(x[rows], w, p["scale"][a], b, p["shift"][a])
            else:
                y[rows] = ops[method](x[rows], w, p["lora_A"][a], p[f"lora_B_{method}"][a], b, scaling=p["scaling"])
        return y

    return loop


def timed(run, device):
    def target():
        run()
        synchronize(device)

    return (lambda: ((), {}), target)


def record(rows, kind, variant, n, medians, tokens, device, peak_runs):
    floor_s, case_s = medians
    rows[kind].append({
        "variant": variant, "adapters": n, "median_s": case_s, "ratio_to_floor": case_s / floor_s,
        "tokens_per_s": tokens / case_s, "peak_bytes": peak_memory_bytes(peak_runs, device),
    })


@pytest.mark.parametrize("variant", LAYER_VARIANTS)
def test_layer_mixed_batch(multi_results, multi_layer_n, variant, request):
    s = multi_set(request.config)
    device = bench_device()
    n = multi_layer_n
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(s.features, s.features).to(device).requires_grad_(False)
    x = torch.randn(s.sequences, s.tokens, s.features, generator=g).to(device)
    ids_seq = round_robin(s.sequences, n).to(device)
    ids_rows = ids_seq[:, None].expand(s.sequences, s.tokens)
    p = stacked_params(n, s.features, s.features, s.rank, g, device)
    with torch.no_grad():
        run = layer_variant(variant, base, x, ids_rows, ids_seq, p, n)
        floor = layer_variant("floor", base, x, ids_rows, ids_seq, p, n)
        run()  # warm-up
        medians = interleaved_medians([timed(floor, device), timed(run, device)], s.rounds)
        record(multi_results, "layer", variant, n, medians, s.sequences * s.tokens, device, run)


# -- a small model: GPT-2 from a config ------------------------------------------


def small_gpt2(s, device):
    import transformers

    config = transformers.GPT2Config(n_layer=s.model_layers, n_embd=s.model_width, n_head=max(1, s.model_width // 64),
                                     vocab_size=1000, n_positions=max(64, s.tokens), resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device).eval()


def featadapt_model(s, method, n, device):
    """GPT-2 with featadapt adapter layers and n named adapters a0..a{n-1} in every layer's bank."""
    model = small_gpt2(s, device)
    options = {"shift": True} if method == "vefa" else {"r": s.rank, "alpha": 2 * s.rank}
    featadapt.inject(model, method, **options)
    g = torch.Generator().manual_seed(1)
    for _, layer in adapter_layers(model):
        entries = []
        for i in range(n):
            if method == "vefa":
                k = layer.in_features
                entry = {"scale": (1.0 + 0.1 * torch.randn(k, generator=g)).to(device),
                         "shift": (0.02 * torch.randn(k, generator=g)).to(device)}
            else:
                entry = {"lora_A": (0.02 * torch.randn(layer.lora_A.shape, generator=g)).to(device),
                         "lora_B": (0.02 * torch.randn(layer.lora_B.shape, generator=g)).to(device),
                         "scaling": layer.scaling}
            entries.append((f"a{i}", entry))
        _bank(layer).add_many(entries)
    return model


def peft_model(s, n, device):
    import peft

    config = peft.LoraConfig(r=s.rank, lora_alpha=2 * s.rank, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True, lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(small_gpt2(s, device), config, "a0")
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "update_layer"):
            for i in range(1, n):
                module.update_layer(f"a{i}", s.rank, 2 * s.rank, config)
    return model.eval()


def model_variant(name, s, n, ids, names, device):
    if name == "floor":
        model = small_gpt2(s, device)
        return lambda: model(input_ids=ids).logits
    if name == "peft-lora/mixed":
        model = peft_model(s, n, device)
        return lambda: model(input_ids=ids, adapter_names=names).logits
    method, how = name.split("/")
    model = featadapt_model(s, method, n, device)
    if how == "single":  # the layers' own adapter, the same for every sequence
        return lambda: model(input_ids=ids).logits
    if how == "batched":
        def batched():
            with featadapt.select_adapters(model, names):
                return model(input_ids=ids).logits

        return batched
    groups = [(f"a{a}", [i for i, name in enumerate(names) if name == f"a{a}"]) for a in range(n)]

    def loop():
        out = []
        for name, rows in groups:
            with featadapt.select_adapters(model, [name] * len(rows)):
                out.append(model(input_ids=ids[rows]).logits)
        return out

    return loop


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_model_mixed_batch(multi_results, multi_model_n, variant, request):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    s = multi_set(request.config)
    device = bench_device()
    n = multi_model_n
    ids = torch.randint(0, 1000, (s.sequences, s.tokens), generator=torch.Generator().manual_seed(0)).to(device)
    names = [f"a{int(i)}" for i in round_robin(s.sequences, n)]
    with torch.no_grad():
        run = model_variant(variant, s, n, ids, names, device)
        floor = model_variant("floor", s, n, ids, names, device)
        run()  # warm-up
        medians = interleaved_medians([timed(floor, device), timed(run, device)], s.rounds)
        record(multi_results, "model", variant, n, medians, s.sequences * s.tokens, device, run)
