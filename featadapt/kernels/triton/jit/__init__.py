"""The Triton kernels themselves: `@triton.jit` functions and the torch-free
code that turns a call's inputs into their launch arguments.

Every module here imports only triton (and each other, relatively), never
torch or the rest of featadapt, so tools/triton_aot.py can load this folder
on its own and compile the kernels ahead of time for a GPU target under any
triton version — in CI without a GPU, and under the GPU machine's triton.
The torch custom ops that launch them are one level up
(featadapt/kernels/triton/*.py).

A kernel module declares `AOT_KERNELS`: one `KernelSpec` (specs.py) per
kernel, saying which launch-argument builder it uses, which of the launcher's
inputs vary (dtypes, optional tensors, flags) and which configurations it is
tuned over. The ahead-of-time check finds every module here that declares
one, so a new kernel module is covered once it declares its specs.
"""
