"""featadapt quickstart: fine-tune a frozen MLP with VeFA, then save, load, merge and unload.

The task is built so that VeFA can solve it exactly. A "teacher" is the
pretrained model with every weight W replaced by W·diag(s_true), s_true a
random vector near 1: a change inside W's column space, which is exactly what
VeFA's effective weight W·diag(scale) can express. The student is the
pretrained model with VeFA adapters; it learns `scale` to imitate the teacher.

Runs on CPU in seconds and doubles as a smoke check: it exits non-zero if the
loss does not clearly fall or any round trip (save/load, merge/unmerge,
unload) changes what the model computes.

    python examples/quickstart.py [--steps N] [--seed S] [--output-dir DIR] [--backend NAME]
"""

import argparse
import contextlib
import copy
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

import featadapt

IN_FEATURES, HIDDEN, OUT_FEATURES = 32, 64, 8
BATCH = 256
LEARNING_RATE = 1e-2
LOG_EVERY = 50
TEACHER_SPREAD = 0.1  # s_true = 1 + TEACHER_SPREAD · N(0, 1)
MIN_LOSS_DROP = 100.0  # the smoke check: held-out loss must fall at least this many times
MERGE_RTOL = 1e-5  # float32 relative error allowed between merged and unmerged outputs


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model, the teacher and the data")
    parser.add_argument("--output-dir", help="where to save the adapters (default: a temporary directory)")
    parser.add_argument("--backend", help="featadapt backend for the adapters (default: automatic)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def fail(message):
    raise SystemExit(f"quickstart FAILED: {message}")


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def build_pretrained(seed):
    """The stand-in for a pretrained model: a small GELU MLP, frozen."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(IN_FEATURES, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, OUT_FEATURES),
    )
    return model.requires_grad_(False)


def linear_names(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def build_teacher(pretrained, generator):
    """A copy of `pretrained` with each weight W replaced by W·diag(s_true)."""
    teacher = copy.deepcopy(pretrained)
    s_true = {}
    with torch.no_grad():
        for name in linear_names(teacher):
            layer = teacher.get_submodule(name)
            s_true[name] = 1 + TEACHER_SPREAD * torch.randn(layer.in_features, generator=generator)
            layer.weight.mul_(s_true[name])  # broadcasts over columns: W·diag(s)
    return teacher, s_true


@torch.no_grad()
def eval_loss(model, teacher, x):
    return F.mse_loss(model(x), teacher(x)).item()


def train(model, teacher, steps, generator):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, IN_FEATURES, generator=generator)  # a fresh batch every step
        with torch.no_grad():
            target = teacher(x)
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % LOG_EVERY == 0 or step == steps:
            print(f"  step {step:4d}  train loss {loss.item():.3e}")


def scale_error(model, s_true):
    """Largest |scale − s_true| over all adapted layers: how well VeFA recovered the teacher."""
    with torch.no_grad():
        return max((model.get_submodule(n).scale - s).abs().max().item() for n, s in s_true.items())


def adapter_dir(output_dir):
    """`output_dir` as is, or a temporary directory removed when done."""
    if output_dir:
        return contextlib.nullcontext(output_dir)
    return tempfile.TemporaryDirectory(prefix="featadapt-quickstart-")


def check_save_load(model, pretrained, backend, out_dir, x):
    featadapt.save_adapters(model, out_dir)
    fresh = copy.deepcopy(pretrained)
    # load_adapters injects the saved adapters into the plain copy. The backend
    # is a runtime choice, not saved with them: give the same one, so both
    # sides compute with the same code and must agree bit for bit.
    featadapt.load_adapters(fresh, out_dir, backend=backend)
    with torch.no_grad():
        if not torch.equal(fresh(x), model(x)):
            fail(f"a fresh model with the adapters loaded from {out_dir} computes different outputs")


def check_merge_roundtrip(model, pretrained, targets, x, y_adapted):
    featadapt.merge_adapters(model)
    with torch.no_grad():
        merge_err = rel_err(model(x), y_adapted)
    if merge_err > MERGE_RTOL:
        fail(f"merged outputs differ from unmerged ones: rel err {merge_err:.2e} > {MERGE_RTOL:.0e}")

    featadapt.unmerge_adapters(model)
    for name in targets:
        base, original = model.get_submodule(name).base_layer, pretrained.get_submodule(name)
        if not (torch.equal(base.weight, original.weight) and torch.equal(base.bias, original.bias)):
            fail(f"unmerge did not restore layer {name!r}'s pretrained weight and bias bit for bit")
    return merge_err


def check_unload(model, targets, x, y_adapted):
    featadapt.unload(model)  # merges, then puts the plain nn.Linear back
    if any(type(model.get_submodule(name)) is not nn.Linear for name in targets):
        fail("unload left a layer that is not a plain nn.Linear")
    with torch.no_grad():
        unload_err = rel_err(model(x), y_adapted)
    if unload_err > MERGE_RTOL:
        fail(f"the unloaded model's outputs differ: rel err {unload_err:.2e} > {MERGE_RTOL:.0e}")
    return unload_err


def main():
    args = parse_args()
    start = time.perf_counter()
    # One thread: a model this small gains nothing from more (on a busy 2-core
    # machine it loses), and a fixed thread count keeps the floating-point
    # reductions, hence every printed number, the same however many cores.
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed)

    pretrained = build_pretrained(args.seed)
    teacher, s_true = build_teacher(pretrained, generator)
    x_eval = torch.randn(1024, IN_FEATURES, generator=generator)  # held out: never trained on
    model = copy.deepcopy(pretrained)

    # "all-linear" would leave out the output head (the last nn.Linear), the
    # usual choice for language models. Here the teacher also rescales the
    # head's inputs, which no other adapter can stand in for (a GELU sits in
    # between and does not commute with scaling), so we name every Linear.
    targets = linear_names(model)
    featadapt.inject(model, "vefa", target_modules=targets, backend=args.backend)
    print(f"VeFA adapters on layers {targets} (backend: {args.backend or 'auto'})")
    featadapt.print_trainable_parameters(model)
    n_trainable, n_total = featadapt.trainable_parameters(model)

    loss_before = eval_loss(model, teacher, x_eval)
    print(f"training {args.steps} steps, Adam lr={LEARNING_RATE}, batch {BATCH}:")
    train(model, teacher, args.steps, generator)
    loss_after = eval_loss(model, teacher, x_eval)
    drop = loss_before / max(loss_after, 1e-30)
    print(f"held-out loss: {loss_before:.3e} -> {loss_after:.3e} ({drop:,.0f}x lower)")
    print(f"max |scale - s_true| = {scale_error(model, s_true):.2e} (teacher spread {TEACHER_SPREAD})")
    if not drop >= MIN_LOSS_DROP:  # written so that a NaN loss fails too
        fail(f"the held-out loss fell only {drop:.1f}x; expected at least {MIN_LOSS_DROP:.0f}x")

    model.eval()
    with torch.no_grad():
        y_adapted = model(x_eval)

    with adapter_dir(args.output_dir) as out_dir:
        check_save_load(model, pretrained, args.backend, out_dir, x_eval)
    print(f"save/load: a fresh model with the loaded adapters matches exactly ({out_dir}"
          f"{'' if args.output_dir else ', temporary, now removed'})")

    merge_err = check_merge_roundtrip(model, pretrained, targets, x_eval, y_adapted)
    print(f"merge: rel err {merge_err:.1e} vs unmerged; unmerge: pretrained weights restored bit for bit")
    unload_err = check_unload(model, targets, x_eval, y_adapted)
    print(f"unload: plain nn.Linear layers, rel err {unload_err:.1e} vs the adapted model")

    print(f"\nOK: VeFA trained {n_trainable:,} of {n_total:,} parameters and cut the loss {drop:,.0f}x;")
    print(f"save/load, merge/unmerge and unload all preserved the model. ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
