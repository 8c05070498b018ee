"""Adapters train under torch.distributed exactly as in one process.

For each method and each engine (DistributedDataParallel, FSDP2 `fully_shard`)
two CPU processes on the gloo backend train a small MLP's adapters for a few
SGD steps, each on its half of a global batch. Their gradients and updated
adapters must equal a single-process run on the whole batch; only the adapter
parameters may train and have their gradients reduced; saving from rank 0 and
loading on every rank must give every rank the trained adapters.

One launch of two workers (this file run as a script) serves every test: the
workers write what they saw to files, and the tests compare those with the
single-process run here. float64 throughout, so "equal" means to 1e-12.
"""

import datetime
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featadapt

WORLD_SIZE = 2
METHODS = ("vefa", "lorfa", "lora")
ENGINES = ("ddp", "fsdp2")
OPTIONS = {"vefa": {"shift": True}, "lorfa": {"r": 2, "alpha": 4}, "lora": {"r": 2, "alpha": 4}}
BACKEND = "torch"  # the memory-lean autograd Functions: what automatic selection runs on CPU
DTYPE = torch.float64
RTOL = 1e-12
SEED = 0
STEPS = 2
GLOBAL_BATCH = 8  # 4 rows per rank
LEARNING_RATE = 0.1
# Sizes that do not split evenly in two, so FSDP2 pads its shards.
IN_FEATURES, HIDDEN, OUT_FEATURES = 5, 7, 3
ADAPTED = ("0", "2")  # "all-linear" leaves the head, "4", a plain frozen nn.Linear
COLLECTIVE_TIMEOUT_S = 60  # a collective a rank never joins fails after this
LAUNCH_TIMEOUT_S = 150  # the whole launch; a hang fails the test instead of blocking CI


# -- shared by the workers and the single-process run --------------------------


def build_model(method):
    """The same model on every process: a frozen MLP whose hidden Linears carry
    adapters moved away from their identity initialization (LoRA's and LoRFA's
    B start at zero, which would leave A without gradient)."""
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN - 1), nn.GELU(),
        nn.Linear(HIDDEN - 1, OUT_FEATURES),
    ).to(DTYPE)
    names = featadapt.inject(model, method, backend=BACKEND, **OPTIONS[method])
    assert tuple(names) == ADAPTED, names
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    return model


def global_batches():
    generator = torch.Generator().manual_seed(SEED + 1)
    return [
        (
            torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator, dtype=DTYPE),
            torch.randn(GLOBAL_BATCH, OUT_FEATURES, generator=generator, dtype=DTYPE),
        )
        for _ in range(STEPS)
    ]


def full(tensor):
    """The whole tensor, gathered if it is sharded (a collective then)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def train(model, batches):
    """SGD on the trainable parameters; the gradients of every step, whole and
    named as in the unwrapped model."""
    unwrapped = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(trainable.values(), lr=LEARNING_RATE)
    grads = []
    for x, target in batches:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        grads.append({n: full(p.grad).detach().clone() for n, p in trainable.items()})
        optimizer.step()
    return grads


def adapter_values(model):
    return {n: full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# -- the worker ------------------------------------------------------------------


class CountingReduceScatter:
    """FSDP2's reduce-scatter (an object with allocate and __call__, given to
    `set_custom_reduce_scatter`) that counts the elements it reduces."""

    def __init__(self):
        self.numel = 0

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        import torch.distributed as dist

        self.numel += input_tensor.numel()
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def wrap(model, engine, counters):
    """`model` under `engine`; fills `counters` with what it reduces."""
    if engine == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)
        names = {id(p): n for n, p in model.named_parameters()}

        def counting_allreduce(state, bucket):  # DDP's default all-reduce, counted
            counters["ddp_params"].extend(names[id(p)] for p in bucket.parameters())
            counters["ddp_bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        return ddp
    from torch.distributed.fsdp import fully_shard

    for name in ADAPTED:
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    for module in [model.get_submodule(name) for name in ADAPTED] + [model]:
        comm = CountingReduceScatter()
        module.set_custom_reduce_scatter(comm)
        counters.setdefault("fsdp_comms", []).append(comm)
    return model


def run_case(engine, method, rank, out_dir):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from featadapt.distributed import save_adapters_distributed

    model = build_model(method)
    initial = adapter_values(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    counters = {"ddp_params": [], "ddp_bytes": 0}
    wrapped = wrap(model, engine, counters)
    local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
    grads = train(wrapped, [(x[local], t[local]) for x, t in global_batches()])

    frozen = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            frozen[name] = {
                "unchanged": torch.equal(full(param), frozen_before[name]),
                "has_grad": param.grad is not None,
                "local_numel": param.to_local().numel() if isinstance(param, DTensor) else param.numel(),
            }
    result = {
        "initial": initial, "grads": grads, "trained": adapter_values(model), "frozen": frozen,
        "ddp_params": counters["ddp_params"], "ddp_bytes": counters["ddp_bytes"],
        "fsdp_reduced_numel": sum(c.numel for c in counters.get("fsdp_comms", [])),
        "adapters_sharded": all(isinstance(p, DTensor) for p in model.parameters() if p.requires_grad),
    }

    path = os.path.join(out_dir, f"{engine}-{method}")
    if engine == "ddp":
        if rank == 0:
            featadapt.save_adapters(wrapped, path)  # the DDP wrapper itself: saved as the model inside
        dist.barrier()
    else:
        if rank == 0:  # on one rank only, so it must refuse without starting a collective
            try:
                featadapt.save_adapters(wrapped, path)
            except ValueError as error:
                result["plain_save_error"] = str(error)
        save_adapters_distributed(wrapped, path)
    # Every rank loads into a fresh model under the same engine (for FSDP2: sharded,
    # so each rank keeps its shard), then reports the whole values it holds.
    fresh = wrap(build_model(method), engine, {"ddp_params": [], "ddp_bytes": 0})
    featadapt.load_adapters(fresh, path, backend=BACKEND)
    result["loaded"] = adapter_values(fresh.module if engine == "ddp" else fresh)
    result["loaded_sharded"] = all(isinstance(p, DTensor) for p in fresh.parameters() if p.requires_grad)
    return result


def worker(rank, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        results = {(e, m): run_case(e, m, rank, out_dir) for e in ENGINES for m in METHODS}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# -- the launch ------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir):
    """Run the workers, as torchrun would (environment variables, one process a
    rank); a failing rank stops the other, and the launch has a time limit."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(rank), str(out_dir)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = [p.communicate()[0] for p in procs]
    report = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{log[-3000:]}" for r, (p, log) in enumerate(zip(procs, logs)))
    assert time.monotonic() <= deadline, f"the workers did not finish in {LAUNCH_TIMEOUT_S} s\n{report}"
    assert all(p.returncode == 0 for p in procs), report
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def ranks(out_dir):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    return launch(out_dir)


_single = {}


def single_process(method):
    """The oracle: one process, the whole batch, same model and steps."""
    if method not in _single:
        model = build_model(method)
        grads = train(model, global_batches())
        _single[method] = {"grads": grads, "trained": adapter_values(model)}
    return _single[method]


def assert_close(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for name in expected:
        err = (actual[name] - expected[name]).norm() / expected[name].norm()
        assert err <= RTOL, f"{what} {name}: relative error {err:.2e} > {RTOL:.0e}"


CASES = [pytest.param(e, m, id=f"{e}-{m}") for e in ENGINES for m in METHODS]


@pytest.mark.parametrize("engine, method", CASES)
def test_gradients_and_updates_equal_one_process_on_the_global_batch(ranks, engine, method):
    ref = single_process(method)
    for rank, results in enumerate(ranks):
        got = results[(engine, method)]
        for step in range(STEPS):
            assert all(g.norm() > 0 for g in ref["grads"][step].values())  # every adapter really trains
            assert_close(got["grads"][step], ref["grads"][step], f"rank {rank}, step {step + 1}, grad of")
        assert_close(got["trained"], ref["trained"], f"rank {rank}, trained")
        moved = min((got["trained"][n] - got["initial"][n]).abs().max().item() for n in got["initial"])
        assert moved > 1e-4


@pytest.mark.parametrize("engine, method", CASES)
def test_only_adapters_train_and_have_gradients_reduced(ranks, engine, method):
    adapters = {n: p for n, p in build_model(method).named_parameters() if p.requires_grad}
    frozen_names = {n for n, p in build_model(method).named_parameters() if not p.requires_grad}
    for rank, results in enumerate(ranks):
        got = results[(engine, method)]
        assert got["frozen"].keys() == frozen_names
        for name, frozen in got["frozen"].items():
            assert frozen["unchanged"] and not frozen["has_grad"], (rank, name, frozen)
        if engine == "ddp":
            # DDP's reducer holds only the parameters that require grad: each
            # step all-reduces the adapters once, and nothing else.
            assert sorted(got["ddp_params"]) == sorted(list(adapters) * STEPS)
            adapter_bytes = sum(p.numel() * p.element_size() for p in adapters.values())
            assert got["ddp_bytes"] == STEPS * adapter_bytes
        else:
            # Frozen parameters are sharded too (each rank keeps only part), but
            # only adapter gradients are reduce-scattered, each padded to split in two.
            for name, frozen in got["frozen"].items():
                whole = dict(build_model(method).named_parameters())[name].numel()
                assert frozen["local_numel"] < whole, (name, frozen)
            assert got["adapters_sharded"]
            padded = sum(
                math.ceil(p.shape[0] / WORLD_SIZE) * WORLD_SIZE * p[0].numel() for p in adapters.values()
            )
            assert got["fsdp_reduced_numel"] == STEPS * padded


@pytest.mark.parametrize("engine, method", CASES)
def test_save_on_rank0_then_load_on_every_rank_gives_the_trained_adapters(ranks, out_dir, engine, method):
    ref = single_process(method)
    trained = ranks[0][(engine, method)]["trained"]
    for rank, results in enumerate(ranks):
        got = results[(engine, method)]
        assert got["loaded"].keys() == trained.keys()
        for name in trained:  # files keep float64 bits: exact
            assert torch.equal(got["loaded"][name], trained[name]), (rank, name)
        if engine == "fsdp2":
            assert got["loaded_sharded"]
    # The file written during the run loads into a plain, unwrapped model too.
    plain = build_model(method)
    featadapt.load_adapters(plain, out_dir / f"{engine}-{method}", backend=BACKEND)
    assert_close(adapter_values(plain), ref["trained"], "loaded on one process:")


def test_plain_save_adapters_refuses_sharded_adapters(ranks):
    error = ranks[0][("fsdp2", "vefa")]["plain_save_error"]
    assert "0.scale is sharded" in error and "save_adapters_distributed" in error


def test_example_trains_with_ddp_under_torchrun(tmp_path):
    """examples/train_distributed.py checks itself (loss falls, every rank loads the trained adapters)."""
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_distributed.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
         example, "--steps", "50", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OK: ddp trained vefa adapters on 2 processes" in proc.stdout
    assert (tmp_path / "adapter_config.json").is_file()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(int(sys.argv[2]), sys.argv[3])
