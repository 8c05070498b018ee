"""Tile configurations, the launch-shape choices the launchers make, and the
rule that prunes configurations a GPU target cannot run well. Triton only
(see __init__.py): the launchers and the ahead-of-time check share this.

The pruning rule (`prune_reasons`) drops a configuration for a target when
  - its shared memory (estimated from the tiles it stages) exceeds what one
    block may use there: the autotuner would drop it at load time anyway, and
    the ahead-of-time sweep need not compile it; or
  - the tiles it keeps in registers — its float32 accumulators, and for true
    float32 (tl.dot on FMA units, no tensor cores) the operand tiles too —
    need more than REGISTER_BOUND registers per thread. A thread has at
    most 255; addresses, masks and the pipeline's state need the rest, and
    the 3.8 sweep showed ptxas spilling (or falling back to serialised wgmma,
    C7515, and register-starved code, C7511/C7512) past it. Spilled
    registers go to local memory, which takes bandwidth the tiles need.
With autotuning off, a kernel runs `fixed_config`: of the configurations the
rule keeps, the one with the fewest registers in tiles and then the least
shared memory, far from every limit and the fastest to compile (CI compiles
exactly it, for every case).
The ahead-of-time sweep (tools/triton_aot.py) measures both for every
configuration; its report says where the rule and the measurement disagree.
"""

import triton

# Decided by triton itself when the kernels are decorated: TRITON_INTERPRET=1
# runs them on CPU tensors (the tests, without a GPU).
INTERPRET = bool(triton.knobs.runtime.interpret)

GROUP_M = 8  # output tiles are visited GROUP_M row-tiles at a time, for L2 reuse of the column operand

# (BLOCK_M, BLOCK_C, BLOCK_D, num_warps, num_stages). Large tiles for the
# compute-bound shapes (Hopper and Ampere alike; the pruning rule drops those
# that do not fit a target), small BLOCK_M ones for few tokens. The order is
# the order of preference when autotuning is switched off.
CUDA_TILES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 128, 64, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 128, 128, 4, 3),
    (16, 64, 128, 4, 4),
]
# Small tiles keep the interpreter fast while still giving several tiles and
# several reduction steps on the tests' odd shapes.
INTERPRETER_TILE = (32, 32, 16, 1, 1)
INTERPRETER_GROUP_M = 2

# low_rank_dy_grads: BLOCK_N and the row chunk size the partial buffers, so the
# caller fixes them (dy_grads_blocks); only BLOCK_M and the pipelining are
# tuned. Every BLOCK_M divides the row chunk, so a chunk is whole row tiles.
DY_GRADS_TILES = [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 8, 4)]
DY_GRADS_MAX_BLOCK_M = 128
# Interpreter: two row tiles per chunk and 16-wide column tiles, so the tests'
# small odd shapes get several chunks, tiles and masked tails.
DY_GRADS_INTERPRETER_BLOCK_M = 16

# Shared memory one block may use (the opt-in maximum), by compute capability:
# A100 (8.0) 163 KiB, H100/H200 (9.0) 227 KiB; other 8.x parts 99 KiB.
SHARED_MEMORY_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
REGISTER_BOUND = 128

ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _config(block_m, block_c, block_d, warps, stages, group_m, with_block_m):
    kwargs = {"BLOCK_C": block_c, "BLOCK_D": block_d, "GROUP_M": group_m}
    if with_block_m:
        kwargs["BLOCK_M"] = block_m
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def tile_configs(with_block_m=True, interpret=INTERPRET):
    """The configurations the GEMM kernels are tuned over (a single one under the interpreter).

    with_block_m=False: BLOCK_M is passed by the caller (see partial_block_m)
    and only the other tile sizes are tuned.
    """
    if interpret:
        return [_config(*INTERPRETER_TILE, INTERPRETER_GROUP_M, with_block_m)]
    configs = [_config(*tile, GROUP_M, with_block_m) for tile in CUDA_TILES]
    # without BLOCK_M some tiles coincide: keep one of each
    unique = {config_label(c): c for c in configs}
    return list(unique.values())


# Two-stage tiles for a kernel that pipelines per-row operands besides x and
# W0 (the indexed VeFA forward's gathered scale and shift): in float32 on sm_80
# none of CUDA_TILES leaves it room.
GATHER_CUDA_TILES = [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]


def gather_tile_configs(interpret=INTERPRET):
    """tile_configs() and the GATHER_CUDA_TILES after them."""
    if interpret:
        return tile_configs(interpret=True)
    return tile_configs(interpret=False) + [_config(*tile, GROUP_M, True) for tile in GATHER_CUDA_TILES]


def dy_grads_configs(interpret=INTERPRET):
    """The configurations low_rank_dy_grads is tuned over."""
    if interpret:
        return [triton.Config({"BLOCK_M": DY_GRADS_INTERPRETER_BLOCK_M}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in DY_GRADS_TILES]


def config_label(config):
    """A configuration as text, e.g. 'BLOCK_C=256,BLOCK_D=64,BLOCK_M=128,GROUP_M=8,w8,s3'."""
    tiles = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{tiles},w{config.num_warps},s{config.num_stages}"


# -- launch-shape choices ---------------------------------------------------------


def m_bucket(m):
    """The autotuning key for the token count: retuning for every distinct M
    (every sequence length) would be too slow, so M is rounded up to a power of two."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def rank_block(r, interpret=INTERPRET):
    """BLOCK_R for rank r: r rounded up to a power of two, at least 16 (tl.dot's minimum)."""
    return 16 if interpret else min(max(triton.next_power_of_2(r), 16), 64)


def partial_block_m(m, interpret=INTERPRET):
    """BLOCK_M of a kernel that writes one partial sum per row tile: fixed by the
    caller (it sizes the partials buffer), so it is not autotuned."""
    return 32 if interpret else min(max(triton.next_power_of_2(m), 16), 128)


def dy_grads_blocks(m, n, r, sm_count, interpret=INTERPRET):
    """(BLOCK_N, BLOCK_R, rows per program, programs along M) of low_rank_dy_grads
    for dy (m, n) and rank r on a device with sm_count multiprocessors."""
    block_r = max(triton.next_power_of_2(r), 16)
    if interpret:
        block_n, chunk = 16, 2 * DY_GRADS_INTERPRETER_BLOCK_M
    else:
        # the dC and Cγ tiles stay at most 128×64; split M until there are a
        # few programs per SM (the column tiles alone are too few when N is small)
        block_n = max(16, min(128, 8192 // block_r))
        n_tiles = triton.cdiv(n, block_n)
        wanted = triton.cdiv(4 * sm_count, n_tiles)
        chunk = max(triton.cdiv(triton.cdiv(m, wanted), DY_GRADS_MAX_BLOCK_M), 1) * DY_GRADS_MAX_BLOCK_M
    return block_n, block_r, chunk, triton.cdiv(m, chunk)


def input_precision(dtype_name, allow_tf32):
    """tl.dot's precision: true float32 for float32 operands unless TF32 is
    allowed (ignored by tl.dot for half-precision operands). dtype_name as
    torch prints it, e.g. 'torch.float32'."""
    if dtype_name.endswith("float32") and not allow_tf32:
        return "ieee"
    return "tf32"


def prune_for_few_tokens(configs, named_args, **kwargs):
    """Row tiles much taller than M waste the tile; keep those that fit (or all, if none does)."""
    m = named_args["M_BUCKET"]
    fitting = [c for c in configs if c.kwargs["BLOCK_M"] <= max(m, 16)]
    return fitting or configs


# -- the pruning rule -------------------------------------------------------------

# Every launch argument the rule (and prune_for_few_tokens) reads besides the
# configuration's own tile sizes: the autotune key must hold each one a kernel
# has, so that what was tuned for one variant is not reused for another
# (tests/test_triton_dispatch.py derives the set from the rule itself).
RULE_INPUTS = ("M_BUCKET", "BLOCK_M", "BLOCK_N", "BLOCK_R", "HAS_SHIFT", "HAS_DROPOUT", "WRITE_DSCALE",
               "INPUT_PRECISION")


def staged_tiles(kernel_name, meta):
    """(rows, cols) of every operand tile the kernel's pipelined loop stages in
    shared memory, and of the float32 tiles it holds in registers (its
    accumulators, and tiles its epilogue loads), from its constexprs `meta`
    (configuration and launch-shape ones)."""
    bm = meta["BLOCK_M"]
    if kernel_name == "indexed_shrink":  # x and the gathered A rows, a (BLOCK_M,) float32 accumulator
        bd = meta["BLOCK_D"]
        return [(bm, bd), (bm, bd)], [(bm, 1)]
    if kernel_name == "low_rank_dy_grads":
        bn, br = meta["BLOCK_N"], meta["BLOCK_R"]
        return [(bm, bn), (bm, br)], [(bn, br), (bm, br)]
    bc, bd = meta["BLOCK_C"], meta["BLOCK_D"]
    operands = [(bm, bd), (bd, bc)]
    if "BLOCK_R" in meta:  # the low-rank loop pipelines its own u (or du) and Cγ (or A) tiles
        operands += [(bm, meta["BLOCK_R"]), (meta["BLOCK_R"], bc)]
    if kernel_name == "indexed_vefa_forward":  # each row's gathered scale (and shift) tile is pipelined too
        operands += [(bm, bd)] * (2 if meta.get("HAS_SHIFT") else 1)
    registers = [(bm, bc)]
    if meta.get("HAS_DROPOUT"):
        # the low-rank part has its own until the keep mask scales it, and the
        # mask's tile, loaded beside both, takes a register per element once converted
        registers += [(bm, bc), (bm, bc)]
    if meta.get("WRITE_DSCALE"):
        registers.append((bm, bc))  # the x tile that ds = Σ x ⊙ g multiplies
    return operands, registers


def resident_shared_bytes(kernel_name, meta, element_bytes):
    """Shared memory outside the pipeline: low_rank_dy_grads keeps its Cγ tile
    there for the whole loop, and converts each float32 du tile's layout
    through it (the triton 3.6 sweep measured exactly this sum on sm_90)."""
    if kernel_name != "low_rank_dy_grads":
        return 0
    return meta["BLOCK_N"] * meta["BLOCK_R"] * element_bytes + meta["BLOCK_M"] * meta["BLOCK_R"] * 4


def shared_memory_estimate(kernel_name, meta, num_stages, element_bytes):
    """Bytes of shared memory: num_stages copies of the staged operand tiles
    plus what stays resident, or a float32 register tile when the epilogue's
    layout change needs more. Never below what triton allocates (it keeps
    num_stages - 1 copies in some pipelines, num_stages in others), so the
    rule never keeps what cannot fit."""
    operands, accumulators = staged_tiles(kernel_name, meta)
    staged = num_stages * sum(r * c for r, c in operands) * element_bytes
    staged += resident_shared_bytes(kernel_name, meta, element_bytes)
    epilogue = max(r * c for r, c in accumulators) * 4
    return max(staged, epilogue)


def tile_registers(kernel_name, meta, num_warps):
    """32-bit registers per thread that the float32 accumulators take, plus the
    operand tiles when tl.dot runs in true float32 (on FMA units)."""
    operands, accumulators = staged_tiles(kernel_name, meta)
    tiles = accumulators + (operands if meta.get("INPUT_PRECISION") == "ieee" else [])
    return sum(r * c for r, c in tiles) // (32 * num_warps)


def prune_reasons(kernel_name, meta, num_warps, num_stages, dtype, arch):
    """Why the pruning rule drops this configuration for compute capability
    `arch` (e.g. 90) and operand dtype `dtype` ('fp16', 'bf16', 'fp32'); [] keeps it."""
    reasons = []
    limit = SHARED_MEMORY_BYTES.get(arch, min(SHARED_MEMORY_BYTES.values()))
    shared = shared_memory_estimate(kernel_name, meta, num_stages, ELEMENT_BYTES[dtype])
    if shared > limit:
        reasons.append(f"needs ~{shared} bytes of shared memory, sm_{arch} allows {limit}")
    registers = tile_registers(kernel_name, meta, num_warps)
    if registers > REGISTER_BOUND:
        reasons.append(f"its register tiles need {registers} registers per thread, bound {REGISTER_BOUND}")
    return reasons


def usable_configs(kernel_name, configs, fixed_meta, dtype, arch):
    """The configurations the rule keeps (in their order of preference); if it
    keeps none, the one with the least shared memory, so a kernel always runs."""
    def meta(config):
        return {**fixed_meta, **config.kwargs}

    kept = [c for c in configs if not prune_reasons(kernel_name, meta(c), c.num_warps, c.num_stages, dtype, arch)]
    if kept:
        return kept
    smallest = min(configs, key=lambda c: shared_memory_estimate(kernel_name, meta(c), c.num_stages,
                                                                  ELEMENT_BYTES[dtype]))
    return [smallest]


def fixed_config(kernel_name, configs, fixed_meta, dtype, arch):
    """The configuration a kernel runs with autotuning off: of those the rule
    keeps, the one with the fewest registers in tiles, then the least shared
    memory (the first such): far from every limit, and the fastest to compile."""
    element_bytes = ELEMENT_BYTES[dtype]

    def cost(c):
        meta = {**fixed_meta, **c.kwargs}
        return (tile_registers(kernel_name, meta, c.num_warps),
                shared_memory_estimate(kernel_name, meta, c.num_stages, element_bytes))

    return min(usable_configs(kernel_name, configs, fixed_meta, dtype, arch), key=cost)
