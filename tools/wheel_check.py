#!/usr/bin/env python
"""What an installed featadapt wheel must do under the torch it is installed
with, on a machine without a GPU (tools/wheel-check.sh runs it in a fresh
virtual environment per torch version, from outside the source tree):

  - featadapt imports from site-packages, and its library featadapt._C loads;
  - the CPU op and, in a build with CUDA, every featadapt::cuda_* op register
    with its schema; the fake implementations give shapes (torch.compile);
  - the CPU kernel matches torch on random inputs, every dtype it takes;
  - the CUDA ops' host-side plan (CUTLASS's can_implement) answers without a GPU.

Prints one line per check and exits 1 on the first failure.
"""

import pathlib
import sys


def main():
    import torch

    import featadapt
    from featadapt.kernels import cpu, cuda, extension

    print(f"torch {torch.__version__}, featadapt from {featadapt.__file__}")
    if "site-packages" not in featadapt.__file__:
        raise SystemExit("featadapt was imported from the source tree, not from the installed wheel")
    if extension.LOAD_ERROR is not None:
        raise SystemExit(f"featadapt._C does not load: {extension.LOAD_ERROR}")
    libraries = sorted(p.name for p in pathlib.Path(featadapt.__file__).parent.glob("_C*.so"))
    if len(libraries) != 1:
        raise SystemExit(f"the installed package holds {libraries}, not one library")
    print(f"featadapt._C {extension._C.__file__}: CUDA kernels for {cuda.CUDA_ARCHS or 'none'}")

    if not cpu.BUILT:
        raise SystemExit("the CPU op featadapt::vefa_input_grads_cpu is not registered")
    torch.manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        g, x, scale = torch.randn(97, 40).to(dtype), torch.randn(97, 40).to(dtype), torch.randn(40)
        expected = (g.float() * scale, (g.float() * x.float()).sum(0), g.float().sum(0))
        ds, dt = cpu.vefa_input_grads(g, x, scale, True)  # g becomes dx
        for got, want in zip((g.float(), ds, dt), expected):
            error = ((got - want).norm() / want.norm()).item()
            if not error <= tolerance:
                raise SystemExit(f"the CPU kernel ({dtype}) is off by {error:.2e} (tolerance {tolerance})")
    print(f"CPU kernel ({cpu.capability()} loops): matches torch in float32 and bfloat16")

    if not cuda.CUDA_ARCHS:
        print(f"no CUDA kernels in this build: {cuda.IMPORT_ERROR}")
        return 0
    for name in cuda.OP_NAMES + ("cuda_plan",):
        schema = str(getattr(torch.ops.featadapt, name).default._schema)
        print(f"registered: {schema}")
    meta = dict(device="meta", dtype=torch.bfloat16)
    y = torch.ops.featadapt.cuda_scaled_gemm(torch.empty(5, 16, **meta), torch.empty(8, 16, **meta), None,
                                             torch.empty(16, device="meta"), None)
    if tuple(y.shape) != (5, 8):
        raise SystemExit(f"cuda_scaled_gemm's fake implementation gives shape {tuple(y.shape)}, not (5, 8)")
    for capability in (80, 90):
        ok = cuda.plan("vefa_backward", capability, torch.bfloat16, 2048, 4096, 4096)
        refused = cuda.plan("vefa_forward", capability, torch.bfloat16, 97, 24, 17)
        if ok != "" or "not a multiple of 8" not in refused:
            raise SystemExit(f"the sm_{capability} plan answers {ok!r} and {refused!r}")
    print("CUTLASS plans (sm_80, sm_90a): 2048x4096x4096 accepted, K = 17 refused with its reason")
    return 0


if __name__ == "__main__":
    sys.exit(main())
