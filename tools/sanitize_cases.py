#!/usr/bin/env python
"""What compute-sanitizer runs (tools/sanitize-gpu-tests.sh): every fused
backend's ops, plain and indexed, forward and backward, on odd shapes, with
autotuning off (one small configuration each, so memcheck, racecheck and
synccheck finish in seconds). Each result is compared with the torch
backend's; exits 1 on a mismatch. Without a GPU it runs the triton backend
in its interpreter (set TRITON_INTERPRET=1 before Python starts; the dry run).
"""

import os
import sys

os.environ.setdefault("FEATADAPT_AUTOTUNE", "0")

import torch  # noqa: E402

from featadapt import self_check  # noqa: E402
from featadapt.ops.dispatch import get_backend  # noqa: E402

# (M, K, N, r); the last with K and N multiples of 8, which the cuda backend's
# CUTLASS kernels need (it skips the others), two tiles of rows and columns.
SHAPES = ((1, 17, 33, 1), (97, 45, 19, 7), (130, 40, 264, 7))


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = [name for name in ("triton", "cuda") if get_backend(name).unavailable_reason() is None]
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    if not fused:
        print("no fused backend can run here: nothing to sanitize")
        return 1
    report = self_check.check_backends(device, backends_to_check=fused, dtypes=dtypes, shapes=SHAPES,
                                       all_configs=False)
    print(report.table())
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
