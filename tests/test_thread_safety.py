"""Concurrent requests on one model with named adapters: each thread's adapter
selection (select_adapters, PEFT's adapter_names=) holds for its own calls only.

Every thread runs many rounds with its own adapter names and compares each
output with the single-threaded answer for those names. A short thread switch
interval makes the threads interleave inside a forward pass, where a selection
stored on the shared layers would be swapped between requests.
"""

import asyncio
import sys
import threading

import pytest
import torch
from torch import nn

import featadapt

THREADS = 4
ROUNDS = 60


@pytest.fixture(autouse=True)
def _interleave_threads():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def deep_mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(16, 5)).eval()


def served_model(method):
    """deep_mlp with four named adapters of `method` in every adapted layer (five of them)."""
    model = deep_mlp()
    featadapt.inject(model, method, [str(i) for i in range(0, 9, 2)], **({"r": 3} if method != "vefa" else {}))
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b", "c", "d"):
        with torch.no_grad():
            for _, layer in featadapt.model.adapter_layers(model):
                for param in layer.parameters(recurse=False):
                    param.copy_(torch.randn(param.shape, generator=g) * 0.5 + (1.0 if param.dim() == 1 else 0.0))
        featadapt.add_named_adapter(model, name)
    return model


def run_threads(work):
    """work(thread_index) in THREADS threads started together; re-raises the first failure."""
    errors = []
    start = threading.Barrier(THREADS)

    def run(t):
        try:
            start.wait()
            work(t)
        except BaseException as error:  # noqa: BLE001 - reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# each thread's own names: every thread puts different adapters on the same sequences
THREAD_NAMES = [["a", "b", None], ["b", "c", "d"], ["d", None, "a"], ["c", "a", "b"]]


@pytest.mark.parametrize("method", ["vefa", "lora"])
def test_concurrent_select_adapters_each_request_gets_its_own_adapters(method):
    model = served_model(method)
    x = torch.randn(3, 2, 16)
    with torch.no_grad():
        own = model(x)
    expected = []
    for names in THREAD_NAMES:
        with torch.no_grad(), featadapt.select_adapters(model, names):
            expected.append(model(x))
    assert not any(torch.allclose(expected[0], other) for other in expected[1:])
    wrong = [0] * THREADS

    def serve(t):
        for _ in range(ROUNDS):
            with torch.no_grad(), featadapt.select_adapters(model, THREAD_NAMES[t]):
                out = model(x)
            wrong[t] += not torch.allclose(out, expected[t], rtol=1e-5, atol=1e-6)

    run_threads(serve)
    assert wrong == [0] * THREADS, f"requests answered with another request's adapters: {wrong}"
    with torch.no_grad():  # no selection left behind: outside one, the layers' own adapters run
        assert torch.equal(model(x), own)


def test_a_thread_without_selection_runs_the_models_own_adapters():
    model = served_model("vefa")
    x = torch.randn(3, 16)
    with torch.no_grad():
        own = model(x)
        with featadapt.select_adapters(model, ["a", "b", "c"]):
            selected = model(x)
    assert not torch.allclose(own, selected)
    wrong = [0] * THREADS

    def serve(t):
        for _ in range(ROUNDS):
            with torch.no_grad():
                if t % 2:
                    out, want = model(x), own
                else:
                    with featadapt.select_adapters(model, ["a", "b", "c"]):
                        out, want = model(x), selected
            wrong[t] += not torch.allclose(out, want, rtol=1e-5, atol=1e-6)

    run_threads(serve)
    assert wrong == [0] * THREADS


def test_selection_is_per_asyncio_task():
    model = served_model("lora")
    x = torch.randn(3, 16)
    expected = []
    for names in THREAD_NAMES:
        with torch.no_grad(), featadapt.select_adapters(model, names):
            expected.append(model(x))

    async def request(t):
        # (no torch.no_grad() across the await: grad mode is per thread, not per task)
        with featadapt.select_adapters(model, THREAD_NAMES[t]):
            await asyncio.sleep(0)  # the other tasks select their adapters here
            return model(x).detach()

    async def main():
        return await asyncio.gather(*(request(t) for t in range(len(THREAD_NAMES))))

    for out, want in zip(asyncio.run(main()), expected):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_nested_selections_of_two_models():
    first, second = served_model("vefa"), served_model("lora")
    x = torch.randn(3, 16)
    with torch.no_grad():
        with featadapt.select_adapters(first, ["a", "b", "c"]):
            want_first = first(x)
        with featadapt.select_adapters(second, ["d", None, "a"]):
            want_second = second(x)
        with featadapt.select_adapters(first, ["a", "b", "c"]):
            with featadapt.select_adapters(second, ["d", None, "a"]):
                assert torch.equal(first(x), want_first) and torch.equal(second(x), want_second)
            assert torch.equal(first(x), want_first)


# -- PEFT: model(..., adapter_names=[...]) ---------------------------------------


def test_concurrent_peft_adapter_names_each_request_gets_its_own_adapters():
    pytest.importorskip("peft", minversion="0.21")
    from peft import get_peft_model

    from featadapt.integrations.peft import LoRFAConfig, VeFAConfig

    targets = [str(i) for i in range(0, 9, 2)]
    model = get_peft_model(deep_mlp(), VeFAConfig(target_modules=targets, shift=True, init_weights=False), "one")
    model.add_adapter("two", VeFAConfig(target_modules=targets, init_weights=False))
    model.add_adapter("six", VeFAConfig(target_modules=targets[::2], shift=True, init_weights=False))
    lorfa = get_peft_model(deep_mlp(), LoRFAConfig(target_modules=targets, r=3, init_weights=False), "one")
    lorfa.add_adapter("two", LoRFAConfig(target_modules=targets, r=2, lora_alpha=5, init_weights=False))
    lorfa.add_adapter("six", LoRFAConfig(target_modules=targets[1:], r=4, init_weights=False))
    peft_names = {"a": "one", "b": "two", "c": "six", "d": "__base__", None: "__base__"}
    names = [[peft_names[n] for n in row] for row in THREAD_NAMES]
    x = torch.randn(3, 16)
    for peft_model in (model.eval(), lorfa.eval()):
        with torch.no_grad():
            expected = [peft_model(x, adapter_names=row) for row in names]
        assert not torch.allclose(expected[0], expected[1])
        wrong = [0] * THREADS

        def serve(t):
            for _ in range(ROUNDS):
                with torch.no_grad():
                    out = peft_model(x, adapter_names=names[t])
                wrong[t] += not torch.allclose(out, expected[t], rtol=1e-5, atol=1e-6)

        run_threads(serve)
        assert wrong == [0] * THREADS, f"requests answered with another request's adapters: {wrong}"
