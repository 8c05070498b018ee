"""featadapt on several processes: train adapters with DistributedDataParallel (or FSDP2).

Launch one process per device with torchrun; it runs on CPUs (gloo) or
GPUs (nccl, one per process):

    torchrun --nproc_per_node=2 examples/train_distributed.py [--method M] [--engine ddp|fsdp2] [--steps N]
             [--output-dir DIR] [--backend NAME]

The task is quickstart.py's: a frozen MLP learns, through its adapters, to
imitate a teacher whose weights were rescaled inside their column space. Each
step every process computes on its own slice of the global batch; the engine
then averages the gradients of the adapters, the only parameters that train,
so only they are communicated (FSDP2 also all-gathers the frozen weights it
shards, to compute with them). Rank 0 saves the adapters, every rank loads
them back, and the script checks that every rank then holds the same, trained
adapters: it exits non-zero if not, or if the loss does not fall.
"""

import argparse
import copy
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import featadapt
from featadapt.distributed import gather_adapter_tensors, save_adapters_distributed

IN_FEATURES, HIDDEN, OUT_FEATURES = 32, 64, 8
GLOBAL_BATCH = 256  # split evenly across the processes
LEARNING_RATE = 1e-2
LOG_EVERY = 25
TEACHER_SPREAD = 0.1  # s_true = 1 + TEACHER_SPREAD · N(0, 1), as in quickstart.py
MIN_LOSS_DROP = 5.0  # the smoke check: held-out loss must fall at least this many times
OPTIONS = {"vefa": {}, "lorfa": {"r": 8, "alpha": 16}, "lora": {"r": 8, "alpha": 16}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(OPTIONS), default="vefa", help="adapter method (default: vefa)")
    parser.add_argument("--engine", choices=("ddp", "fsdp2"), default="ddp", help="DistributedDataParallel or FSDP2")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the teacher and the data")
    parser.add_argument("--output-dir", help="where rank 0 saves the adapters; every rank must see it "
                        "(default: a temporary directory, fine on one machine)")
    parser.add_argument("--backend", help="featadapt backend for the adapters (default: automatic)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def fail(message):
    raise SystemExit(f"train_distributed FAILED on rank {dist.get_rank()}: {message}")


def log(message):
    if dist.get_rank() == 0:
        print(message, flush=True)


def setup():
    """The process group torchrun described in the environment, and this process's device."""
    if "RANK" not in os.environ:
        raise SystemExit("launch with torchrun, e.g.: torchrun --nproc_per_node=2 examples/train_distributed.py")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # Several processes share the CPU cores: one thread each keeps them from fighting.
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    return device


def build_pretrained_and_teacher(seed):
    """The same frozen MLP and teacher on every rank (same seed): no broadcast needed."""
    torch.manual_seed(seed)
    pretrained = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, OUT_FEATURES),
    ).requires_grad_(False)
    teacher = copy.deepcopy(pretrained)
    with torch.no_grad():
        for layer in teacher:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(1 + TEACHER_SPREAD * torch.randn(layer.in_features))  # W·diag(s_true)
    return pretrained, teacher


def adapted(pretrained, args, device):
    """A copy of `pretrained` with adapters on every Linear, wrapped in the engine."""
    model = copy.deepcopy(pretrained)
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    featadapt.inject(model, args.method, target_modules=targets, backend=args.backend, **OPTIONS[args.method])
    model.to(device)
    if args.engine == "ddp":
        # DDP registers only parameters that require grad: the adapters.
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for name in targets:  # one FSDP unit per adapted layer, then the rest
        fully_shard(model.get_submodule(name))
    return fully_shard(model)


def local_slice(x):
    """This rank's rows of a global batch (what a DistributedSampler would give it)."""
    rows = x.shape[0] // dist.get_world_size()
    return x[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


@torch.no_grad()
def eval_loss(model, teacher, x):
    """Held-out loss over the global evaluation set, averaged over the ranks."""
    loss = F.mse_loss(model(local_slice(x)), teacher(local_slice(x)))
    dist.all_reduce(loss)  # a sum: gloo has no average
    return loss.item() / dist.get_world_size()


def train(model, teacher, steps, generator, device):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    for step in range(1, steps + 1):
        # Every rank draws the same global batch and keeps its slice.
        x = local_slice(torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator)).to(device)
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the engine averages the adapters' gradients over the ranks here
        optimizer.step()
        if step == 1 or step % LOG_EVERY == 0 or step == steps:
            log(f"  step {step:4d}  rank 0 train loss {loss.item():.3e}")


def shared_output_dir(requested):
    """`requested`, or a temporary directory made by rank 0 and told to the others."""
    path = [requested or (tempfile.mkdtemp(prefix="featadapt-distributed-") if dist.get_rank() == 0 else None)]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def check_every_rank_holds(expected, actual, what):
    """`actual` equals `expected` here, and `expected` is the same on every rank."""
    for key, value in expected.items():
        if not torch.equal(actual[key], value):
            fail(f"{what}: {key} differs from the trained adapters")
    flat = torch.cat([t.flatten() for t in expected.values()])
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, flat)  # objects, so the same code runs on gloo and nccl
    if not all(torch.equal(other, flat) for other in everyone):
        fail(f"{what}: the ranks hold different adapters")


def main():
    args = parse_args()
    start = time.perf_counter()
    device = setup()
    world = dist.get_world_size()
    if GLOBAL_BATCH % world:
        fail(f"the global batch of {GLOBAL_BATCH} does not split evenly across {world} processes")
    log(f"{world} processes ({dist.get_backend()}, {device.type}), {args.engine}, {args.method} adapters")

    pretrained, teacher = build_pretrained_and_teacher(args.seed)
    teacher.to(device)
    model = adapted(pretrained, args, device)
    if dist.get_rank() == 0:
        featadapt.print_trainable_parameters(model)
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same stream of batches on every rank
    x_eval = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator).to(device)

    loss_before = eval_loss(model, teacher, x_eval)
    log(f"training {args.steps} steps, Adam lr={LEARNING_RATE}, global batch {GLOBAL_BATCH} ({GLOBAL_BATCH // world} a rank):")
    train(model, teacher, args.steps, generator, device)
    loss_after = eval_loss(model, teacher, x_eval)
    drop = loss_before / max(loss_after, 1e-30)
    log(f"held-out loss: {loss_before:.3e} -> {loss_after:.3e} ({drop:,.1f}x lower)")
    if not drop >= MIN_LOSS_DROP:  # written so that a NaN loss fails too
        fail(f"the held-out loss fell only {drop:.1f}x; expected at least {MIN_LOSS_DROP:.0f}x")

    out_dir = shared_output_dir(args.output_dir)
    trained = gather_adapter_tensors(model)  # whole tensors on every rank (gathered under FSDP2)
    if args.engine == "ddp":
        # Every rank holds the whole adapters: rank 0 saves them, the others wait for the file.
        if dist.get_rank() == 0:
            featadapt.save_adapters(model, out_dir)  # the DDP wrapper saves as the model inside
        dist.barrier()
    else:
        save_adapters_distributed(model, out_dir)  # every rank gathers its shards; rank 0 writes
    fresh = adapted(pretrained, args, device)
    featadapt.load_adapters(fresh, out_dir, backend=args.backend)  # on every rank
    check_every_rank_holds(trained, gather_adapter_tensors(fresh), "after loading on every rank")
    log(f"saved on rank 0 and loaded on all {world} ranks: identical, trained adapters ({out_dir})")

    dist.barrier()
    if dist.get_rank() == 0 and not args.output_dir:
        shutil.rmtree(out_dir)
    log(f"\nOK: {args.engine} trained {args.method} adapters on {world} processes and cut the loss {drop:,.1f}x. "
        f"({time.perf_counter() - start:.1f} s)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
