"""Layer benchmarks: each featadapt method and backend, the frozen floor and the
peers, forward, backward and forward+backward, on the same inputs."""

import time
from dataclasses import dataclass

import torch

from bench_cases import (
    MODES,
    Shape,
    bench_device,
    build_layer,
    flops,
    interleaved_medians,
    layer_names,
    peak_memory_bytes,
    saved_bytes,
    synchronize,
)


@dataclass(frozen=True)
class LayerCase:
    shape: Shape
    dtype: torch.dtype
    rank: int
    mode: str
    layer: str

    @property
    def id(self):
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.shape.label}-{dtype}-r{self.rank}-{self.mode}-{self.layer}"


def generate_cases(metafunc, bench_set):
    if "layer_case" not in metafunc.fixturenames:
        return
    cases = []
    for shape, dtype in bench_set.cases:
        names = layer_names(bench_set, dtype, shape)
        cases += [LayerCase(shape, dtype, bench_set.rank, mode, name) for name in names for mode in MODES]
        if dtype == bench_set.sweep_dtype:
            low_rank = [n for n in names if n.startswith(("lora/", "lorfa/")) and not n.endswith("/reference")]
            low_rank += ["peft-lora", "naive-lorfa"]
            cases += [
                LayerCase(shape, dtype, r, "forward+backward", name)
                for r in bench_set.rank_sweep if r != bench_set.rank
                for name in low_rank
            ]
    metafunc.parametrize("layer_case", cases, ids=[c.id for c in cases])


class _Cache:
    """Layers and inputs of the current (shape, dtype, rank), reused across modes:
    building twice would also compile the torch.compile peers twice."""

    key = None
    layers = {}
    inputs = None


def _layer_and_inputs(case, device):
    key = (case.shape, case.dtype, case.rank)
    if _Cache.key != key:
        _Cache.key, _Cache.layers = key, {}
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(case.shape.tokens, case.shape.k, device=device, generator=generator).to(case.dtype)
        dy = torch.randn(case.shape.tokens, case.shape.n, device=device, generator=generator).to(case.dtype)
        _Cache.inputs = (x.requires_grad_(True), dy)
    if case.layer not in _Cache.layers:
        _Cache.layers[case.layer] = build_layer(case.layer, case.shape, case.dtype, case.rank, device)
    return _Cache.layers[case.layer], _Cache.inputs


def _setup_and_target(layer, x, dy, mode, device):
    """pytest-benchmark's setup (untimed) and target (timed) for a mode."""
    trainable = [p for p in layer.parameters if p.requires_grad]

    def clear_grads():
        x.grad = None
        for p in trainable:
            p.grad = None

    def setup():
        clear_grads()
        y = layer.forward(x) if mode == "backward" else None
        synchronize(device)
        return (y,), {}

    def target(y):
        if mode == "forward":
            layer.forward(x)
        elif mode == "backward":
            y.backward(dy)
        else:
            layer.forward(x).backward(dy)
        synchronize(device)

    return setup, target


def _time_one_call(setup, target):
    args, _ = setup()
    start = time.perf_counter()
    target(*args)
    return time.perf_counter() - start


# ‖fused − torch‖ / ‖torch‖ allowed for the output and dx (DESIGN.md §4's
# tolerances; float32 looser, as two float32 orders of a 4096-long sum differ).
AGREEMENT = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _disagreement_with_torch(case, layer, x, dy, device):
    """The relative difference of a fused backend's output and dx from the torch
    backend's on the same layer and inputs (None for other layers), so the
    benchmark that times a fused kernel also checks what it computes."""
    if layer.kind != "featadapt" or case.layer.endswith(("/torch", "/reference")):
        return None
    twin, _ = _layer_and_inputs(LayerCase(case.shape, case.dtype, case.rank, case.mode,
                                          case.layer.split("/")[0] + "/torch"), device)
    results = []
    for module in (layer, twin):
        x.grad = None
        y = module.forward(x)
        y.backward(dy)
        results.append((y.detach().double(), x.grad.double()))
    x.grad = None
    (y, dx), (y_torch, dx_torch) = results
    return max(((a - b).norm() / b.norm()).item() for a, b in ((y, y_torch), (dx, dx_torch)))


def test_layer(benchmark, bench_set, bench_results, layer_case):
    case = layer_case
    device = bench_device()
    layer, (x, dy) = _layer_and_inputs(case, device)
    setup, target = _setup_and_target(layer, x, dy, case.mode, device)
    benchmark.group = f"{case.shape.label}-{case.dtype}-r{case.rank}-{case.mode}"
    rounds = bench_set.rounds_for(_time_one_call(setup, target))  # also the warm-up
    benchmark.pedantic(target, setup=setup, rounds=rounds)
    median = None if benchmark.disabled else benchmark.stats.stats.median
    # The ratio to the floor comes from the two timed in alternation.
    floor, _ = _layer_and_inputs(LayerCase(case.shape, case.dtype, case.rank, case.mode, "floor"), device)
    floor_runs = _setup_and_target(floor, x, dy, case.mode, device)
    floor_median, case_median = interleaved_medians([floor_runs, (setup, target)], rounds)
    ratio = None if benchmark.disabled else case_median / floor_median

    args, _ = setup()
    compiled_on_cpu = case.layer.startswith("compiled-") and device.type == "cpu"
    peak = None if compiled_on_cpu else peak_memory_bytes(lambda: target(*args), device)
    saved = saved_bytes(layer, x)
    count = flops(layer.method, case.mode, case.shape, case.rank)
    disagreement = _disagreement_with_torch(case, layer, x, dy, device) if case.mode == "forward+backward" else None
    bench_results.layers.append({
        "layer": case.layer,
        "method": layer.method,
        "kind": layer.kind,
        "shape": [case.shape.tokens, case.shape.k, case.shape.n],
        "dtype": str(case.dtype).removeprefix("torch."),
        "rank": case.rank,
        "mode": case.mode,
        "median_s": median,
        "rounds": rounds,
        "ratio_to_floor": ratio,
        "flops": count,
        "tflops": None if median is None else count / median / 1e12,
        "peak_bytes": peak,
        "saved_bytes": saved,
        "x_bytes": x.numel() * x.element_size(),
        "rel_error_vs_torch": disagreement,
    })
    if disagreement is not None:
        assert disagreement <= AGREEMENT[case.dtype], (
            f"{case.layer} differs from the torch backend by {disagreement:.2e} (allowed {AGREEMENT[case.dtype]:g})")
