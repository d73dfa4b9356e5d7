"""Every launch configuration of the fused_lora kernels, in one place.

A configuration is chosen from the problem's size bucket, never from its exact
size, so a training run with varying sequence lengths compiles a handful of
kernels, not one per batch. The buckets:

* ``M`` (tokens): next power of two, capped at 8192 (above that the GEMM is
  compute bound and the tile choice no longer changes).
* ``r``: padded to ``block_r = max(16, next_pow2(r))`` because ``tl.dot``
  needs an inner dimension of at least 16 (fp32 too, on Triton 3.6).

Candidates are pruned by an estimate of their shared memory, which must stay
under the device's limit (:data:`SMEM_LIMIT_SM90` on Hopper, the tuning
target; :data:`SMEM_LIMIT_BY_ARCH` elsewhere); ``python -m
fused_lora.compile_report`` compiles every shipped configuration for a target
and reports the real figure (never above the estimate).

The compile report's registers and spills quoted below: until 2026-12-05 the
report compiled the kernels' sizes (M, N, K, R...) as constants, unlike the
runtime, and most figures below were measured that way. Since then it
compiles them as the runtime specialises them, and every rule below was
checked again that way (the report checks every shipped configuration); the
comments that say "as the runtime specialises" were measured so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: FMA contraction, pinned: Triton 3.9 warns when it is left unset and 3.10
#: flips the default. The tolerance table assumes it (it matches cuBLAS).
FP_FUSION = True
#: Opt-in shared memory per block on H100/H200 (sm_90): 227 KiB.
SMEM_LIMIT_SM90 = 232_448
#: The same limit by compute capability (x10), from the CUDA C++ Programming
#: Guide's technical specifications: A100 and Orin 163 KiB; the GeForce,
#: RTX and L4/L40/A10 parts (sm_86, sm_89, sm_120) 99 KiB. On a device the
#: dispatch reads its own limit (:func:`fused_lora.dispatch.device_target`);
#: this table serves a target named without one (``explain``, the compile report).
SMEM_LIMIT_BY_ARCH = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: SMEM_LIMIT_SM90,
                      100: SMEM_LIMIT_SM90, 103: SMEM_LIMIT_SM90, 120: 101_376, 121: 101_376}
#: The kernels need tensor cores that Triton drives (mma.sync from sm_80):
#: below it Triton lowers the 16-bit dots to FMA loops that spill 10-20 KB
#: (compile report, sm_75 and sm_70, Triton 3.9), and the torch backend runs.
MIN_ARCH = 80
#: Streaming multiprocessors on an H200 / H100 SXM: the grid heuristics' count
#: for a target named without a device (``explain``, the compile report). On a
#: device the dispatch reads its own (:func:`fused_lora.dispatch.device_target`):
#: split-K and the tile choice aim to cover every SM, the skinny kernels at
#: about two programs per SM so that every SM has a second one to switch to.
NUM_SMS_SM90 = 132
#: Largest rank handled as one tile by the kernels. Larger ranks are walked in
#: chunks of this size (the GEMM loops over them; the skinny pass is launched
#: once per chunk), which keeps registers bounded for any r.
MAX_BLOCK_R = 128
#: The skinny backward pass keeps one fp32 (C, r) partial per row block. Past
#: this many bytes of partials the rows are processed in chunks, each reduced
#: into a running fp32 sum, so the temporary stays bounded at any M.
SKINNY_PARTIAL_BYTES = 64 * 2**20


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host integers. (``triton.cdiv`` is a constexpr
    function in Triton 3.6 and 3.9: 2 µs of host time a call, and a launcher
    makes several.)"""
    return -(-a // b)


#: Rank chunk of the GEMM's precomputed low-rank term, by element size: the
#: (BLOCK_M, r) and (r, BLOCK_N) operand tiles must not push the accumulator
#: tile into spills (measured with the compile report: r=128 chunks spill).
GEMM_LR_MAX_BLOCK_R = {2: 64, 4: 32}


def block_r_for(r: int, cap: int = MAX_BLOCK_R) -> int:
    """The padded rank tile: at least 16 (``tl.dot``), at most ``cap``."""
    return min(max(16, next_pow2(r)), cap)


def rank_tiles(cap: int = MAX_BLOCK_R) -> tuple[int, ...]:
    """Every rank tile :func:`block_r_for` gives under ``cap``, ascending
    (each is its own kernel: the compile report compiles them all)."""
    return tuple(sorted({block_r_for(r, cap) for r in range(1, cap + 1)}))


def m_bucket(m: int) -> int:
    return min(next_pow2(max(m, 1)), 8192)


@dataclass(frozen=True)
class GemmConfig:
    """Tiles of :func:`fused_lora.kernels.gemm.lora_gemm_kernel`."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    #: Programs per output tile along K (split-K; 1 = none). Not a kernel
    #: meta-parameter: the launcher sizes the grid and the fp32 workspace.
    split_k: int = 1

    def smem_bytes(self, elt: int, block_r: int, shrink_in_loop: bool, rank_loop: bool = False,
                   nf4_b: bool = False, epilogue_mask: bool = False) -> int:
        """Estimated shared memory: the pipelined operand tiles (plus the
        shrink factor's tile when the shrink runs in the K loop) and the
        low-rank term's two operand tiles; ``rank_loop`` (a precomputed
        term over several rank tiles): its left one (u) in fp32, as that
        loop stages it beside the K loop's stages (compile report, sm_90:
        128x128x64 on 4 stages at a 64 rank tile, 180,224 bytes).

        ``nf4_b`` (B decoded from NF4 bytes in the K loop): B's stages hold
        its bytes (half a byte an element), and beside them three whole fp32
        (BLOCK_K, BLOCK_N) tiles: the looked-up codes (the pipeliner stages
        that gather's results in shared memory), a layout conversion's scratch
        and the decoded tile the dot reads. Its real figure hardly follows the
        stages (compile report, sm_90 and sm_80, Triton 3.6 and 3.9, forward
        and dx, 2 to 4 stages, every NF4 tile and rank tile: 128x128x64 from
        82,432 to 135,680 bytes at 2, 3 or 4 alike), so the pipelined model
        alone was 30 KB under it on 3 stages; this one is above all 168 of them.

        ``epilogue_mask`` (dx's dropout mask on its low-rank term): the mask is
        drawn in a layout of its own and the fp32 accumulator converted
        through a scratch of its size, which reuses the stages' buffers, so
        it counts only where it is the larger (compile report, sm_90 and
        sm_80: hybrid's 64x64 on one stage, 16,384 bytes against 12,288)."""
        b_tile = self.block_k * self.block_n // 2 if nf4_b else self.block_k * self.block_n * elt
        per_stage = self.block_m * self.block_k * elt + b_tile
        if shrink_in_loop:
            per_stage += self.block_k * block_r * elt
        decoded = 3 * self.block_k * self.block_n * 4 if nf4_b else 0
        epilogue = self.block_m * block_r * (4 if rank_loop else elt) + block_r * self.block_n * elt
        total = self.num_stages * per_stage + decoded + epilogue
        return max(total, self.block_m * self.block_n * 4) if epilogue_mask else total

    def elems_per_thread(self) -> int:
        return self.block_m * self.block_n // (32 * self.num_warps)

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m,
                    num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=FP_FUSION)


@dataclass(frozen=True)
class SkinnyConfig:
    """Tiles of :func:`fused_lora.kernels.skinny.lora_skinny_kernel`, the
    memory-bound pass over one wide (M, C) operand."""

    block_m: int
    block_c: int
    num_warps: int = 4
    #: Software-pipeline stages of the loop over a program's row tiles (the
    #: passes without SHRINK; the launch's ``num_stages``).
    num_stages: int = 2
    #: Ranks above this run as several launches of this many columns each.
    max_block_r: int = 64
    #: Stages of SHRINK's loop over its row tile's column tiles. (With 2,
    #: Triton's pipeliner waits for every copy at the top of each trip, the
    #: next tile's copies issued after the trip's compute: nothing overlaps
    #: them within a program. With 3 one tile is in flight while the next
    #: computes. TTGIR on sm_90, Triton 3.6 and 3.9: ``async_wait`` num 0
    #: against 2.) Fewer where :attr:`smem_limit` would not hold them: :meth:`stages_for`.
    shrink_stages: int = 3
    #: Shared memory a program may use on the target (the dispatch sets its GPU's).
    smem_limit: int = SMEM_LIMIT_SM90

    def smem_bytes(self, elt: int, block_r: int, stages: int | None = None) -> int:
        """Estimated shared memory of a SHRINK pass with ``stages`` (default
        :meth:`stages_for`'s), the largest of the kernel's: the pipelined T
        and S tiles, Lᵀ's tile and TN's fp32 tile staged for its store (inside
        the pipelined loop, so not sharing the buffers). An upper bound of the
        compiled kernels' (the compile report checks it); equal to it for a dy
        pass with dB and a 64-column rank tile on sm_90."""
        stages = self.stages_for(elt, block_r) if stages is None else stages
        return (stages * (self.block_m * self.block_c + self.block_c * block_r) * elt
                + block_r * self.block_m * elt + block_r * self.block_c * 4)

    def stages_for(self, elt: int, block_r: int) -> int:
        """SHRINK's stages at rank tile ``block_r``: :attr:`shrink_stages`,
        lowered (to 1 at least) until the estimate fits :attr:`smem_limit`
        (a 64-column rank tile needs 139 KB with three stages, 106 KB with
        two: more than the 99 KB of sm_86/sm_89 parts)."""
        stages = self.shrink_stages
        while stages > 1 and self.smem_bytes(elt, block_r, stages) > self.smem_limit:
            stages -= 1
        return stages

    def launch_kwargs(self, elt: int, block_r: int) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_C=self.block_c, SHRINK_STAGES=self.stages_for(elt, block_r),
                    num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=FP_FUSION)


#: Split-K (a grid with fewer output tiles than SMs: small M, or a small
#: output with a long reduction such as dW): each split walks at least this
#: many K blocks (a pipeline worth filling), at most SPLIT_K_MAX splits, and
#: the fp32 partials stay under SPLIT_K_MAX_WORKSPACE_BYTES.
SPLIT_K_MIN_BLOCKS = 4
SPLIT_K_MAX = 16
SPLIT_K_MAX_WORKSPACE_BYTES = 128 * 2**20
#: The interpreter's stand-in for the SM count when deciding split-K (as few
#: programs as possible, while the small test shapes still take the path).
INTERPRETER_TARGET_PROGRAMS = 4

#: Reduction of split partials: one program sums this many elements over all
#: splits, in split order (deterministic). A program's loop over the partials
#: keeps four 16-byte loads a thread in flight (ptxas unrolls it: sm_90 SASS),
#: so it is the number of threads, numel / 4 at one vector each, that sets how
#: many bytes are in flight; 1024 (two vectors a thread, the same four loads)
#: gave a dy pass's dB at M=8192 (65,536 floats) 64 programs on 132 SMs, 33.6
#: µs on an H200 for 32 MB, four times its bytes' time.
REDUCE_BLOCK = 512
#: Its launch: Triton's CUDA defaults, which it ran with before they were
#: written here. (Its loop over the splits is not software-pipelined: 1 and 3
#: stages give the same PTX on Triton 3.6 and 3.9.)
REDUCE_LAUNCH = dict(num_warps=4, num_stages=3)

# --- The interpreter ---------------------------------------------------------
# Its cost is per program and per loop trip, not per FLOP, so blocks are as
# large as the test shapes allow while still leaving several tiles (and a
# ragged tail) at the awkward sizes the tests use (17, 123, ...).
# Above a few tiles' worth of rows (a training batch rather than a test
# shape) the row tile grows to 128: 4x fewer programs, same code paths.
INTERPRETER_GEMM = GemmConfig(block_m=32, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=1)
INTERPRETER_GEMM_WIDE = GemmConfig(block_m=128, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=1)
INTERPRETER_SKINNY = SkinnyConfig(block_m=32, block_c=32, num_warps=4, num_stages=1, shrink_stages=1)
INTERPRETER_SKINNY_WIDE = SkinnyConfig(block_m=128, block_c=64, num_warps=4, num_stages=1, shrink_stages=1)
INTERPRETER_WIDE_FROM_M = 256

# --- CUDA --------------------------------------------------------------------
# Hopper leads from ../shared/design/KERNELS.md: BM=128, BN=256 (r <= 16) or
# 128, BK=64, 3 stages, 8 warps, GROUP_M=8. Small M is memory bound: a narrow
# BM wastes nothing and more programs cover the SMs.
# BLOCK_M >= 64: one warpgroup's wgmma covers 64 rows, narrower tiles fall
# back to mma.sync (the compile report checks this).
# Warp specialisation (the leads' 7th, ``tl.range(..., warp_specialize=True)``
# on the K loop), compiled for sm_90 with Triton 3.6 and 3.9 on 128x128x64, 4
# warps, 3 stages, 16-bit: Triton's pass takes the loop (setmaxnreg in the
# PTX, 115 KB of shared memory against 98) only in a kernel whose one dot is
# the K loop's, with no loop or branch after it, its tiles loaded through TMA
# with descriptors the kernel makes, on 4 warps (8 leave the loop as it is,
# as the leads say). With pointer loads, descriptors made on
# the host (3.9), a second dot after the loop outside a branch, a loop after
# it, or the in-loop shrink's second dot, the pass fails ("PassManager::run
# failed"); with the term's dot before the loop (as the GEMMs run it) or in a
# branch after it, the loop is left as it is. So as shipped no GEMM is
# warp-specialised. ``lora_gemm(warp_specialize=True)`` compiles what the pass
# takes: the base GEMM, or the precomputed term as fp32 rank-one updates after
# the K loop (a static loop over one rank tile, no split-K, no mask on the
# term). Compiled (``compile_report --warp-specialized``: the probe's kernels,
# a 16 rank tile): Triton 3.6, the GPU machine's, spills 16-32 B in the
# forward with its bias and nothing in dx (nor in the forward without a bias,
# nor at a rank of 1); 3.9 5-8 KB in both (nothing at a rank of 1). No plan runs
# it: bench/gpu_probe.py times it on this tile beside the same tile without,
# for a GPU run to say whether it pays.
WARP_SPECIALIZED_GEMM = GemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3)
_GEMM_CANDIDATES_16BIT = (
    GemmConfig(128, 256, 64, 8, 8, 3),
    GemmConfig(128, 128, 64, 8, 8, 4),
    GemmConfig(128, 128, 64, 8, 8, 3),
    GemmConfig(128, 64, 64, 8, 4, 4),
    GemmConfig(64, 128, 64, 8, 4, 4),
    GemmConfig(64, 64, 64, 8, 4, 4),
    GemmConfig(64, 64, 128, 8, 4, 3),
)
# fp32 with exact ("ieee") dots runs on FMA units, not tensor cores.
# (Compiled with every variant on every tile, sm_90: the 32x64 and 16x64
# tiles spill 8-28 B in the forward's K or rank tail, or without a bias, at
# 72-96 registers, far below the limit: ptxas's own choice, as in the fp32
# skinny passes below; three kernels on each of Triton 3.6 and 3.9, one
# the same on both. In the combinations of variants the dispatch launches,
# 13 and 19 forward kernels, 8-68 B at 72-168 registers (64x128: a K tail
# without a bias). All but the hybrid's rank tail (8 B, 3.6) run only under
# a forced strategy. Left: fp32 is rare on a GPU, where it runs hybrid.)
# 64x128x32 on 4 warps (64 accumulator elements a thread on one warpgroup)
# is no longer one: compiled as the runtime specialises, it reached 254
# registers and spilled 8-52 B (dx at a 16 rank tile and its rank loop, dW;
# Triton 3.9, and 3.6's rank loop), where 128x128x32 on 8 warps did not.
_GEMM_CANDIDATES_FP32 = (
    GemmConfig(128, 128, 32, 8, 8, 3),
    GemmConfig(32, 64, 32, 8, 4, 3),
    GemmConfig(16, 64, 32, 8, 4, 3),
)
#: hybrid's Triton launches (the forward's C = s·xa·Bᵀ + b, dx's masked
#: (g·A)/(1-p); cuBLAS then adds the base GEMM in place) have an empty K loop:
#: all they do is write the (M, N) output, a store-bound kernel. On the tile of
#: a full GEMM (128x256x64, three stages: 147 KB of shared memory for stages
#: that hold nothing, so one program of 8 warps a SM) the fourth H200 run
#: measured that launch at about 410 GB/s, a tenth of the bandwidth
#: (bench/results/2026-12-04-NVIDIA-H200-4/probe.json, fwd_epilogue and
#: dx_epilogue), and it was split along K at small M (an empty K split three
#: ways, with a reduction launch). Its own tile, by element size, one stage,
#: never split: compiled for sm_90 (Triton 3.6 and 3.9; every rank tile, the
#: rank loop, dx's mask, one token, a rank of 1), 16 bits on 64x64 and 4
#: warps take 8-16 KB and 66-120 registers, four to seven programs a SM, no
#: spill (64x128 holds two to four, 128x128 one or two); fp32's exact dots
#: on 32x32 take 46-76 registers, no spill (64x64 spilled 12-48 B on 3.9,
#: 64x128 28 KB at a 16 rank tile). Chosen from those figures. Run 5 (H100,
#: bench/gpu_probe.py at M=8192, 4096², bf16): the forward's launch 0.034 ms
#: (1.96 TB/s) against 0.043 on the full GEMM's tile, dx's 0.030. (The
#: fourth run, on an H200, had timed the full GEMM's tile at 0.163 ms: the
#: runs differ by far more than the tiles do.)
LOW_RANK_ONLY_GEMM = {2: GemmConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=1),
                      4: GemmConfig(block_m=32, block_n=32, block_k=32, group_m=8, num_warps=4, num_stages=1)}

#: fp32's in-loop shrink (forced, or under an int8 base at small M) runs on a
#: tile of its own: compiled as the runtime specialises (sm_90,
#: Triton 3.6 and 3.9: the forward and dx, plain, masked, with a K tail,
#: split-K, a row factor, an int8 B), 32x64 spilled 8-36 B (the K tail, with
#: and without an int8 B) and 16x64 8-40 B (split-K with a row factor or a
#: mask) at 2 or 3 stages, 32x32 16-32 B on 3.6; 16x32 on 4 warps did not
#: (at most 194 registers).
_GEMM_CANDIDATES_FP32_IN_LOOP = (
    GemmConfig(16, 32, 32, 8, 4, 3),
)

# Measured with the compile report on sm_90, with Triton 3.6 and 3.9: no
# spills at every pass, rank tile and column or rank tail (8 warps so that
# each thread draws fewer Philox numbers). fp32 (rare on a GPU, where it
# defaults to the hybrid strategy): of sixteen tilings surveyed (8-32 rows,
# 32-256 columns, 2-8 warps, 1-3 stages, a 16-column rank tile; the dy pass
# reading B (N, r)), only 32 x 32 on 4 warps with 2 stages is spill-free in
# every pass and variant on both versions (at most 167 registers); the rest
# spill 8-60 bytes somewhere, often far below the register limit (Triton
# 3.9 assembles with ``--regAllocOptLevel=2``), 16 x 128 on 8 warps, the
# tile before, 12-24 bytes on 3.9.
SKINNY_16BIT = SkinnyConfig(block_m=64, block_c=128, num_warps=8, num_stages=2, max_block_r=64)
SKINNY_FP32 = SkinnyConfig(block_m=32, block_c=32, num_warps=4, num_stages=2, max_block_r=16)


#: A dropout mask in the GEMM epilogue (the dx pass) draws Philox numbers for
#: every output element; past this many per thread the registers spill
#: (compile report, sm_90, Triton 3.6 and 3.9, eight columns a Philox call:
#: 128x256 tiles on 8 warps spill 200-640 bytes, 128x128 do not).
EPILOGUE_MASK_MAX_ELEMS_PER_THREAD = {2: 64, 4: 32}


def uses_mma_sync(arch: int) -> bool:
    """Whether Triton's 16-bit dots on compute capability ``arch`` are
    mma.sync, whose operands and accumulator live in registers: Ampere and
    Ada (sm_8x) and the GeForce/RTX Blackwell parts (sm_12x; every 16-bit
    GEMM of the sm_120 report). Hopper's are wgmma, sm_10x's tcgen05."""
    return arch < 90 or arch >= 120


#: With mma.sync a 128x256 accumulator on 8 warps spills (compile report,
#: sm_80): tiles are capped at this many accumulator elements per thread.
MMA_SYNC_MAX_ELEMS_PER_THREAD = 64
#: And the in-loop shrink (whose mma.sync operands are in registers too),
#: above a 32-wide rank tile (16 with dx's epilogue mask), spills on the
#: tiles with 64 accumulator elements a thread (compile report, Triton 3.6
#: and 3.9, bf16 and fp16: sm_80, dx 8-216 B at a 64 rank tile, 16-64 B at
#: 32 with the mask, 128x128x64 at a 128 rank tile up to 24 KB in the
#: forward's K tail; sm_120, 16-232 B in the same places); the 64x64 tiles
#: (32 a thread) do not, up to 128.
MMA_SYNC_IN_LOOP_NARROW_BLOCK_R = {False: 32, True: 16}
MMA_SYNC_IN_LOOP_WIDE_RANK_MAX_ELEMS_PER_THREAD = 32
# (With both rules, Triton 3.9 and 3.6: sm_80's spilling kernels went from
# 72-73, up to 24.6 KB, to 10-17 of at most 72 B; sm_120's (99 KiB, fewer
# stages too) from 52, up to 232 B, to 14-20 of at most 72 B: skinny passes,
# fp32 and a few 16-bit tiles, at 64-128 registers, where ptxas appears to
# cap them for occupancy.)

#: The stage counts are Hopper's: on a device with less shared memory a tile
#: whose stages do not fit runs with as many as do, down to this (one tile
#: loading while the other is read). sm_86 (99 KiB), compile report, Triton
#: 3.6 and 3.9: 774 kernels, all within 69,632 bytes, 13-21 spilling at most
#: 72 B (the same skinny and fp32 kernels, and 128x128's masked in-loop dx at
#: a rank below its 16 tile, 12-28 B at 255 registers).
MIN_STAGES_SMALL_SMEM = 2
#: The persistent grid's flattened tile loop keeps the next tile's state live
#: beside the accumulator: on 128x256 tiles (8 warps) Triton 3.6's code spills
#: 16-92 bytes (forward and dx, pointer loads; compile report, sm_90), so its
#: tiles are capped at this many accumulator elements per thread.
PERSISTENT_MAX_ELEMS_PER_THREAD = 64
#: And dx's masked epilogue on the persistent grid with a rank tile above
#: PERSISTENT_EPILOGUE_MASK_MAX_BLOCK_R (the 64-wide chunk of the precomputed
#: term) spills 48-76 bytes on the 4-warp tiles with 64 accumulator elements a
#: thread (128x64, 64x128; Triton 3.9, pointers and TMA; 3.6 reaches 255
#: registers there) and reaches 255 on 128x128 (8 warps): above it the tiles
#: are capped at this many elements a thread (the 64x64 tiles, at most 176).
PERSISTENT_EPILOGUE_MASK_MAX_BLOCK_R = 32
PERSISTENT_EPILOGUE_MASK_WIDE_RANK_MAX_ELEMS_PER_THREAD = 32


#: The in-loop shrink keeps its fp32 xa (BLOCK_M, BLOCK_R) beside the
#: accumulator for the whole K loop. Measured with the compile report (sm_90,
#: Triton 3.6 and 3.9, forward and dx, every shipped tile and rank tile):
#:
#: * the largest rank tile it runs with, by element size: fp32's FMA dots
#:   spill from a 64-wide one (6 KB on 64x128), and with a 32-wide one in
#:   the K tail on Triton 3.9 (52 B on 32x64, 8 B on 16x64, at 96 registers
#:   or fewer: 3.9 assembles with ``--regAllocOptLevel=2``), so fp32 runs it
#:   up to a 16-wide one; 16-bit ones run up to 128;
#: * on the persistent grid (the next tile's state is live too) 64-wide rank
#:   tiles spill (8-530 B on 128x64 and 64x128, 4 warps): at most 32 there,
#:   and none with an epilogue mask (dx with dropout: its masked term needs a
#:   tile of its own; 16-880 B on every persistent tile at 16 and 32);
#: * accumulator plus xa, fp32 elements per thread, at most this many, by
#:   element size: 16-bit, 128x64 on 4 warps with a 128 rank tile (192)
#:   spills 450-630 B, 128x256 on 8 warps with a 64 one (160) does not; fp32
#:   (FMA dots, whose operands are in registers too), 64x128 on 4 warps with
#:   a 16 rank tile (72) spills 24 B in dx on Triton 3.6, and 128x128 on 8
#:   warps (72-80) reaches 254 registers: the 32x64 and 16x64 tiles (at most
#:   20) stay at or under 168 registers.
IN_LOOP_MAX_BLOCK_R = {2: 128, 4: 16}
PERSISTENT_IN_LOOP_MAX_BLOCK_R = 32
#: And there, with its input masked (the forward with dropout) or an int8 B
#: dequantised beside it, compiled as the runtime specialises, the tiles of
#: 128 rows spilled 280-1,812 B (128x128 on 8 warps, 128x64 on 4; Triton
#: 3.9, pointers and TMA, a 32 rank tile) and 64x64x128 56 B (int8, TMA); the
#: tiles of at most 64 rows and a 64-wide K step did not: those only.
PERSISTENT_IN_LOOP_MASK_OR_INT8_MAX_BLOCK_M = 64
PERSISTENT_IN_LOOP_MASK_OR_INT8_MAX_BLOCK_K = 64
#: And without either, as the runtime specialises: 128x64x64 on 4 warps (128
#: rows a warpgroup) spilled 260-264 B with pointers at a 32 rank tile
#: (Triton 3.9; 255 registers on 3.6, and dx 252-254 on both), where the
#: tiles of at most 64 rows a warpgroup stayed at or under 246.
PERSISTENT_IN_LOOP_MAX_ROWS_PER_WARPGROUP = 64
IN_LOOP_MAX_ELEMS_PER_THREAD = {2: 160, 4: 64}

#: The in-loop forward with dropout (forced ``in_loop``) masks each A tile
#: for the shrink's dot: the (BLOCK_M, BLOCK_K) tile, its mask and their
#: Philox words live beside the accumulator and xa. Measured with the
#: compile report (sm_90, Triton 3.6 and 3.9, every shipped tile and rank
#: tile, with pointers, TMA and the persistent grid): the two 4-warp tiles
#: with 64 masked elements a thread (BMxBNxBK 128x64x64 and 64x64x128) reach
#: 255 registers and spill 24-212 B in some variant; the tiles with 32 or
#: fewer do not (at most 252 registers: 128x256x64 with a 64 rank tile, 3.6).
#: (Its rank tiles are the in-loop shrink's own: :data:`IN_LOOP_MAX_BLOCK_R`;
#: fp32's 16x64 tile, masked, spilled 8 B at 32 on Triton 3.9 as well.)
#: Triton 3.5.1 (torch 2.9's), the same report: of 1,296 kernels only 8
#: spill, all of them this pass on 128x256x64 with TMA loads at 32 and 64
#: rank tiles (64-72 B, bf16 and fp16, with and without the K tail; 252
#: registers with pointers). Left as it is: the pass runs only when forced,
#: TMA is opt-in, and neither 3.6 nor 3.9 spills there.
SHRINK_MASK_MAX_ELEMS_PER_THREAD = 32

#: The in-loop dx with dropout keeps xa beside the accumulator through the K
#: loop, then masks its low-rank term in a tile of its own. Measured with the
#: compile report's ``--every-variant`` (sm_90, Triton 3.6 and 3.9, bf16 and
#: fp16, every tile with every variant: a masked K or rank tail, the seed as
#: a value, 64-bit mask counters, split-K's fp32 partials, TMA): on a 4-warp
#: tile of 128 rows (128x64x64, one warpgroup holding 128 rows of xa and of
#: the mask) the seed as a value spills 8-16 B at a 32 rank tile and split-K
#: 16-304 B at 16 to 64; with accumulator plus xa above 96 fp32 elements a
#: thread (128x128 on 8 warps and 64x128 on 4 at a 128 rank tile: 128)
#: split-K spills 8-56 B. The tiles at most 64 rows a warpgroup and at most
#: this many elements stay at or under 249 registers without a spill (64x128
#: and 128x128 up to a 64 rank tile, 64x64 up to 128). With these rules every
#: 16-bit GEMM of the report compiles with every variant without a spill
#: (about 1,870 more kernels than the default report, on either version).
IN_LOOP_EPILOGUE_MASK_MAX_ELEMS_PER_THREAD = {2: 96, 4: 64}
IN_LOOP_EPILOGUE_MASK_MAX_ROWS_PER_WARPGROUP = 64
#: Compiled as the runtime specialises, from a 64 rank tile on the tiles with
#: 64 accumulator elements a thread (128x128 on 8 warps, 64x128 on 4: 96 with
#: xa) reached 253-255 registers, and with several adapters' dropout
#: probabilities spilled 24 B (128x128, Triton 3.6) and 40 B (64x128, 3.9);
#: 64x64 (32) stayed at or under 232 up to a 128 rank tile: from that rank
#: tile on, at most this many accumulator elements a thread.
IN_LOOP_EPILOGUE_MASK_WIDE_RANK_BLOCK_R = 64
IN_LOOP_EPILOGUE_MASK_WIDE_RANK_MAX_ELEMS_PER_THREAD = 32


#: An int8 base (``lora_gemm``'s ``b_scale``): each B tile is dequantised in
#: registers (int8, to fp32, times its scales, to the dot's dtype) before its
#: dot. Measured with the compile report (sm_90, Triton 3.6 and 3.9, with
#: pointers, TMA, the persistent grid, split-K and the K tail): 16-bit, with
#: the in-loop shrink, the dequantised B tile beside xa (and, with dropout,
#: the masked A tile) is what spills: 64 elements a thread (128x256x64 on 8
#: warps, 64x64x128 and 64x128x64 on 4) compiled without a spill up to a 32
#: rank tile, and spilled at 64 (the masked forward on 128x256x64: 8-120 B)
#: or 128 (dx on 64x64x128: 8-16 B), where the tiles of 32 a thread did not;
#: without the shrink 128x256x64's 64 compiled at 254 registers, no spill.
#: fp32 (FMA dots, their operands in registers): 128x128x32 on 8 warps (64
#: accumulator elements a thread) spilled 31-33 KB with the precomputed term
#: (forward and dx, Triton 3.9), where the 32x64 and 16x64 tiles (16 and 8)
#: did not. With the shrink's input masked too (the in-loop forward with
#: dropout), compiled as the runtime specialises, the narrow rank tiles' 64
#: were too many: 128x256x64 reached 250-255 registers at 16 and 32 and
#: spilled 16 B through TMA at 32 (Triton 3.9): there 32 at every rank tile.
INT8_B_IN_LOOP_MAX_DEQUANT_ELEMS_PER_THREAD = 32
INT8_B_IN_LOOP_NARROW_BLOCK_R = 32
INT8_B_IN_LOOP_NARROW_MAX_DEQUANT_ELEMS_PER_THREAD = 64
INT8_B_FP32_MAX_ELEMS_PER_THREAD = 32


def int8_b_fits(c: "GemmConfig", elt: int, shrink_in_loop: bool, block_r: int, shrink_mask: bool = False) -> bool:
    """Whether tile ``c`` may dequantise an int8 B (above), with the in-loop
    shrink at rank tile ``block_r`` (``shrink_mask``: its input masked)."""
    if elt == 4:
        return c.elems_per_thread() <= INT8_B_FP32_MAX_ELEMS_PER_THREAD
    narrow = block_r <= INT8_B_IN_LOOP_NARROW_BLOCK_R and not shrink_mask
    cap = INT8_B_IN_LOOP_NARROW_MAX_DEQUANT_ELEMS_PER_THREAD if narrow else INT8_B_IN_LOOP_MAX_DEQUANT_ELEMS_PER_THREAD
    return not shrink_in_loop or c.block_k * c.block_n // (32 * c.num_warps) <= cap


#: An NF4 base: the GEMMs decode its tiles in the K loop (a byte tile, its
#: nibbles' codes looked up, times the group's absmax) only up to this M;
#: from it on the dispatch makes Ŵ whole once a pass (``dequant``: one read
#: of N·K/2 bytes, one write and one read of N·K·2) and runs the float path
#: on it. A model, not a measurement: decoding costs ALU work in every M
#: tile's K loop, about 20 instructions an element, against the dot's
#: 2·BLOCK_M FLOPs an element on the tensor cores, so it is free where the
#: GEMM is bound by the weight's bytes (small M) and not where it is bound
#: by the tensor cores (M in the thousands); 512 is where a 4096x4096 bf16
#: layer's GEMM turns compute bound on an H200 (its ridge: about 300 FLOPs
#: a byte).
NF4_DECODE_MAX_M = 511

#: NF4's decoding (a byte tile unpacked, each nibble's code looked up) holds
#: more registers than int8's: measured with the compile report (sm_90,
#: Triton 3.6 and 3.9; the split forward and dx, the K tail, split-K), the
#: 128x256x64 tile on 8 warps (64 decoded elements a thread) spilled 468 to
#: 636 bytes and passed 232,448 bytes of shared memory on both versions,
#: 128x64x64 on 4 warps (128 rows beside the decoding) spilled 24-32 bytes
#: on 3.6, and the persistent grid's 128x128x64 44-48 bytes on 3.6; every
#: other shipped 16-bit tile compiled without a spill. So: at most 32 decoded
#: elements a thread, at most 64 rows a warpgroup, never the persistent grid
#: (:func:`nf4_b_fits`; the dispatch keeps NF4 off it). With mma.sync (sm_80,
#: Triton 3.6) the forward's 128x128x64 on 8 warps spilled 68-156 bytes
#: (its byte tile's pairs run along K: a permute in registers): at most 64
#: rows a tile there.
NF4_B_MAX_DECODED_ELEMS_PER_THREAD = 32
NF4_B_MAX_ROWS_PER_WARPGROUP = 64
NF4_B_MMA_SYNC_MAX_BLOCK_M = 64


def nf4_b_fits(c: "GemmConfig", elt: int, persistent: bool, arch: int = 90) -> bool:
    """Whether tile ``c`` may decode an NF4 B on compute capability ``arch``
    (above; never with the in-loop shrink, which the dispatch does not run
    on NF4)."""
    if persistent or (uses_mma_sync(arch) and c.block_m > NF4_B_MMA_SYNC_MAX_BLOCK_M):
        return False
    if elt == 4:
        return c.elems_per_thread() <= INT8_B_FP32_MAX_ELEMS_PER_THREAD
    return (c.block_k * c.block_n // (32 * c.num_warps) <= NF4_B_MAX_DECODED_ELEMS_PER_THREAD
            and c.block_m * 4 <= NF4_B_MAX_ROWS_PER_WARPGROUP * c.num_warps)


def persistent_grid_fits(smem_limit: int) -> bool:
    """Whether the persistent grid may run with ``smem_limit`` bytes of shared
    memory a program: only with Hopper's. Its flattened tile loop buffers one
    or two stages more than :meth:`GemmConfig.smem_bytes` counts (compile
    report, sm_90, Triton 3.6 and 3.9: 128x128x64 on 4 stages takes 163,840
    to 196,608 bytes where the estimate says 139,264 to 163,840), so the
    estimate cannot prune its tiles for a smaller limit; with Hopper's the
    report checks the real figure of every tile against it."""
    return smem_limit >= SMEM_LIMIT_SM90


def in_loop_max_block_r(elt: int, persistent: bool = False, epilogue_mask: bool = False) -> int:
    """The largest rank tile of the in-loop shrink (so the largest rank it
    runs with: a rank tile is r's next power of two, at least 16); 0: none.
    ``epilogue_mask``: dx's masked term (the forward's masked shrink input
    prunes tiles, not rank tiles: :data:`SHRINK_MASK_MAX_ELEMS_PER_THREAD`)."""
    if not persistent:
        return IN_LOOP_MAX_BLOCK_R[elt]
    return 0 if epilogue_mask else min(IN_LOOP_MAX_BLOCK_R[elt], PERSISTENT_IN_LOOP_MAX_BLOCK_R)


def smem_limit_for(arch: int) -> int:
    """The shared memory one program may use on compute capability ``arch``
    (x10): :data:`SMEM_LIMIT_BY_ARCH`, else that of the nearest listed
    capability below it of the same major version."""
    if arch < MIN_ARCH:
        raise ValueError(f"the kernels need sm_{MIN_ARCH} or newer, got sm_{arch}")
    known = [a for a in SMEM_LIMIT_BY_ARCH if a <= arch and a // 10 == arch // 10]
    if not known:
        raise ValueError(f"no shared-memory limit is known for sm_{arch} (known: "
                         f"{', '.join(f'sm_{a}' for a in SMEM_LIMIT_BY_ARCH)} and their minor versions)")
    return SMEM_LIMIT_BY_ARCH[max(known)]


def _stages_that_fit(pool, fits) -> list[GemmConfig]:
    """Each tile of ``pool`` with its own stage count, or where that does not
    ``fits``, the most stages that do (at least two), each tile once."""
    out = []
    for config in pool:
        for stages in range(config.num_stages, MIN_STAGES_SMALL_SMEM - 1, -1):
            fewer = replace(config, num_stages=stages)
            if fits(fewer):
                if fewer not in out:
                    out.append(fewer)
                break
    return out


def gemm_candidates(elt: int, block_r: int, shrink_in_loop: bool, epilogue_mask: bool = False,
                    smem_limit: int = SMEM_LIMIT_SM90, arch: int = 90, persistent: bool = False,
                    shrink_mask: bool = False, int8_b: bool = False, nf4_b: bool = False,
                    rank_loop: bool = False) -> list[GemmConfig]:
    """The shipped GEMM configurations for an element size, pruned to those
    whose shared memory fits ``smem_limit`` (below Hopper's, with fewer
    stages where theirs do not fit; and, with an epilogue mask, on the
    persistent grid or with mma.sync (:func:`uses_mma_sync`), whose tile
    leaves few enough elements per thread; with the in-loop shrink, whose
    accumulator and xa do, and with mma.sync, above its narrow rank tiles,
    whose accumulator does; with its input masked, whose A tile does; with
    dx's epilogue mask, whose accumulator and xa do, on at most 64 rows a
    warpgroup, and from a 64 rank tile whose accumulator does; with an int8
    B, :func:`int8_b_fits`; with an NF4 B, :func:`nf4_b_fits`; on the
    persistent grid, with the in-loop shrink, on at most 64 rows a
    warpgroup, and with its input masked or an int8 B, whose rows and K step
    are few enough).
    fp32's in-loop shrink has a tile of its own. ``rank_loop``: a
    precomputed term over several rank tiles (:meth:`GemmConfig.smem_bytes`).
    None where the in-loop shrink cannot hold the rank tile."""
    if shrink_in_loop and block_r > in_loop_max_block_r(elt, persistent, epilogue_mask):
        return []
    if elt == 4:
        pool = _GEMM_CANDIDATES_FP32_IN_LOOP if shrink_in_loop else _GEMM_CANDIDATES_FP32
    else:
        pool = _GEMM_CANDIDATES_16BIT

    def fits(c: GemmConfig) -> bool:
        return c.smem_bytes(elt, block_r, shrink_in_loop, rank_loop, nf4_b, epilogue_mask) <= smem_limit

    if smem_limit < SMEM_LIMIT_SM90:
        pool = _stages_that_fit(pool, fits)
    mma_sync = uses_mma_sync(arch)
    cap = MMA_SYNC_MAX_ELEMS_PER_THREAD if mma_sync else None
    if mma_sync and shrink_in_loop and block_r > MMA_SYNC_IN_LOOP_NARROW_BLOCK_R[epilogue_mask]:
        cap = min(cap, MMA_SYNC_IN_LOOP_WIDE_RANK_MAX_ELEMS_PER_THREAD)
    if epilogue_mask:
        cap = min(cap or 1 << 30, EPILOGUE_MASK_MAX_ELEMS_PER_THREAD[elt])
    if persistent:
        cap = min(cap or 1 << 30, PERSISTENT_MAX_ELEMS_PER_THREAD)
    if persistent and epilogue_mask and block_r > PERSISTENT_EPILOGUE_MASK_MAX_BLOCK_R:
        cap = min(cap, PERSISTENT_EPILOGUE_MASK_WIDE_RANK_MAX_ELEMS_PER_THREAD)
    if shrink_in_loop and epilogue_mask and block_r >= IN_LOOP_EPILOGUE_MASK_WIDE_RANK_BLOCK_R:
        cap = min(cap, IN_LOOP_EPILOGUE_MASK_WIDE_RANK_MAX_ELEMS_PER_THREAD)
    return [c for c in pool
            if fits(c)
            and (cap is None or c.elems_per_thread() <= cap)
            and (not int8_b or int8_b_fits(c, elt, shrink_in_loop, block_r, shrink_mask))
            and (not nf4_b or nf4_b_fits(c, elt, persistent, arch))
            and (not shrink_in_loop
                 or c.block_m * (c.block_n + block_r) // (32 * c.num_warps) <= IN_LOOP_MAX_ELEMS_PER_THREAD[elt])
            and (not (shrink_in_loop and shrink_mask)
                 or c.block_m * c.block_k // (32 * c.num_warps) <= SHRINK_MASK_MAX_ELEMS_PER_THREAD)
            and (not (persistent and shrink_in_loop)
                 or c.block_m * 4 <= PERSISTENT_IN_LOOP_MAX_ROWS_PER_WARPGROUP * c.num_warps)
            and (not (persistent and shrink_in_loop and (shrink_mask or int8_b))
                 or (c.block_m <= PERSISTENT_IN_LOOP_MASK_OR_INT8_MAX_BLOCK_M
                     and c.block_k <= PERSISTENT_IN_LOOP_MASK_OR_INT8_MAX_BLOCK_K))
            and (not (shrink_in_loop and epilogue_mask)
                 or (c.block_m * (c.block_n + block_r) // (32 * c.num_warps)
                     <= IN_LOOP_EPILOGUE_MASK_MAX_ELEMS_PER_THREAD[elt]
                     and c.block_m * 4 <= IN_LOOP_EPILOGUE_MASK_MAX_ROWS_PER_WARPGROUP * c.num_warps))]


def split_k_for(config: GemmConfig, m: int, n: int, k: int, interpreter: bool,
                num_sms: int = NUM_SMS_SM90) -> int:
    """How many programs share each output tile's K range: enough for the grid
    to cover every one of the ``num_sms`` SMs when the output alone gives
    fewer tiles than SMs (small M; or dW, whose K is the token count), bounded
    so that each split still runs a pipeline of several K blocks and the
    workspace stays small. The size bucket of M decides, like the tiles
    (``m`` may be exact)."""
    target = INTERPRETER_TARGET_PROGRAMS if interpreter else num_sms
    min_blocks = 1 if interpreter else SPLIT_K_MIN_BLOCKS
    mb = m_bucket(m)
    tiles = cdiv(mb, config.block_m) * cdiv(n, config.block_n)
    if tiles == 0 or tiles >= target:
        return 1
    k_blocks = cdiv(k, config.block_k)
    split = min(cdiv(target, tiles), k_blocks // min_blocks, SPLIT_K_MAX,
                SPLIT_K_MAX_WORKSPACE_BYTES // max(1, 4 * mb * n))
    return max(1, split)


def gemm_config(m: int, n: int, k: int, r: int, elt: int, shrink_in_loop: bool,
                interpreter: bool, epilogue_mask: bool = False, arch: int = 90,
                persistent: bool = False, shrink_mask: bool = False,
                smem_limit: int = SMEM_LIMIT_SM90, num_sms: int = NUM_SMS_SM90, int8_b: bool = False,
                nf4_b: bool = False) -> GemmConfig:
    """The GEMM tiles (and split-K) for an (m, k) x (k, n) product with a
    rank-r term, on a GPU with ``num_sms`` SMs.

    Heuristic by M bucket: the widest tile that fits at large M (compute
    bound), narrowing BM as M shrinks so that small batches neither pad a
    128-row tile nor leave SMs idle; split-K where even the narrowest tiles
    leave SMs idle. ``int8_b``: B is an int8 base, dequantised in registers
    (:func:`int8_b_fits` prunes the tiles); ``nf4_b``: an NF4 one
    (:func:`nf4_b_fits`).
    """
    tiles = _gemm_tiles(m, n, r, elt, shrink_in_loop, interpreter, epilogue_mask, arch, persistent, shrink_mask,
                        smem_limit, num_sms, int8_b, nf4_b)
    return replace(tiles, split_k=split_k_for(tiles, m, n, k, interpreter, num_sms))


def _gemm_tiles(m: int, n: int, r: int, elt: int, shrink_in_loop: bool, interpreter: bool,
                epilogue_mask: bool, arch: int, persistent: bool, shrink_mask: bool,
                smem_limit: int, num_sms: int, int8_b: bool = False, nf4_b: bool = False) -> GemmConfig:
    if interpreter:
        return INTERPRETER_GEMM_WIDE if m >= INTERPRETER_WIDE_FROM_M else INTERPRETER_GEMM
    block_r = block_r_for(r) if shrink_in_loop else block_r_for(r, GEMM_LR_MAX_BLOCK_R[elt])
    cands = gemm_candidates(elt, block_r, shrink_in_loop, epilogue_mask, smem_limit=smem_limit, arch=arch,
                            persistent=persistent, shrink_mask=shrink_mask, int8_b=int8_b, nf4_b=nf4_b,
                            rank_loop=not shrink_in_loop and r > block_r)
    if not cands:
        raise ValueError(f"no GEMM configuration holds the {'in-loop shrink' if shrink_in_loop else 'low-rank term'}"
                         f"'s rank tile {block_r} ({elt}-byte elements, sm_{arch}, {smem_limit} bytes of shared "
                         f"memory{', persistent' if persistent else ''})")
    mb = m_bucket(m)
    # (rows: the tiles no taller than the bucket; below the shortest tile, the shortest ones, so that
    # 16 tokens never pad a 128-row tile where a 64-row one covers as many SMs)
    shortest = min(c.block_m for c in cands)
    pool = [c for c in cands if c.block_m <= max(shortest, mb)]
    if mb >= 4096 and n >= 256:
        return pool[0]
    # Fewer rows: prefer the config that gives at least one tile per SM.
    for c in pool:
        tiles = cdiv(mb, c.block_m) * cdiv(n, c.block_n)
        if tiles >= num_sms:
            return c
    return pool[-1]


#: A persistent GEMM (opt-in, :func:`fused_lora.dispatch.set_persistent`)
#: runs as many programs per SM as fit at once: by shared memory (the
#: estimate above) and by registers (at most 255 a thread, 64 K a SM).
REGISTERS_PER_SM = 65_536
MAX_REGISTERS_PER_THREAD = 255
#: The interpreter's persistent grid: few programs, an uneven number, so that
#: the test shapes give each program several tiles and some one more than others.
INTERPRETER_PERSISTENT_PROGRAMS = 3


def persistent_programs(config: GemmConfig, elt: int, block_r: int, shrink_in_loop: bool, interpreter: bool,
                        num_sms: int = NUM_SMS_SM90) -> int:
    """How many programs a persistent GEMM launches: every SM full, no more."""
    if interpreter:
        return INTERPRETER_PERSISTENT_PROGRAMS
    by_smem = SMEM_LIMIT_SM90 // max(1, config.smem_bytes(elt, block_r, shrink_in_loop))
    by_registers = REGISTERS_PER_SM // (config.num_warps * 32 * MAX_REGISTERS_PER_THREAD)
    return num_sms * max(1, min(by_smem, by_registers))


def skinny_config(elt: int, interpreter: bool, m: int = 0, smem_limit: int = SMEM_LIMIT_SM90) -> SkinnyConfig:
    """The skinny passes' tiles for M=``m`` rows on a GPU with ``smem_limit``
    bytes of shared memory a program (:meth:`SkinnyConfig.stages_for`)."""
    if interpreter:
        return INTERPRETER_SKINNY_WIDE if m >= INTERPRETER_WIDE_FROM_M else INTERPRETER_SKINNY
    config = SKINNY_FP32 if elt == 4 else SKINNY_16BIT
    return config if config.smem_limit == smem_limit else replace(config, smem_limit=smem_limit)


def skinny_target_programs(interpreter: bool, num_sms: int = NUM_SMS_SM90) -> int:
    """How many programs a skinny pass aims for: two per SM on a GPU with
    ``num_sms``; on the interpreter, where every program costs time, as few as
    possible while still exercising the split-and-reduce path on the test
    shapes."""
    return 4 if interpreter else 2 * num_sms


@dataclass(frozen=True)
class NormConfig:
    """Tiles of :func:`fused_lora.kernels.dora.dora_norm_kernel`: a program
    per ``block_n`` rows of W, walking K in ``block_k`` tiles (16-byte
    vector loads along K), the rank in chunks of at most ``max_block_r``."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    max_block_r: int = 64

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    num_warps=self.num_warps, num_stages=self.num_stages, enable_fp_fusion=FP_FUSION)


#: DoRA's norm, by W's element size: a (32, 128) 16-bit tile is 8 KiB a
#: stage, the (32, block_r) rows of B beside it; 32 rows a program makes 128
#: programs for a 4096-row weight, about one per SM. fp32's exact dots are FMA
#: loops: rank chunks of 32 (at 64 sm_80 spilled 8.8 KB, compile report), two
#: stages (with three, compiled as the runtime specialises, the adapters' K
#: tail spilled 48 B on Triton 3.9).
DORA_NORM_16BIT = NormConfig(block_n=32, block_k=128)
DORA_NORM_FP32 = NormConfig(block_n=32, block_k=64, num_stages=2, max_block_r=32)
#: A quantized W (int8 or NF4; A and B in the compute dtype): half the K
#: step, the dequantisation's registers beside the rank's (compile report,
#: sm_90: NF4's chunked rank at 128 spilled 80 B on Triton 3.9; as the
#: runtime specialises, int8's K tail 136 B with the (32, 128) tile); fp32's
#: tile is that narrow already, with three stages (with two, int8's one rank
#: tile spilled 8 B on 3.9).
DORA_NORM_QUANTIZED_16BIT = NormConfig(block_n=32, block_k=64)
DORA_NORM_QUANTIZED_FP32 = NormConfig(block_n=32, block_k=64, max_block_r=32)


@dataclass(frozen=True)
class TileConfig:
    """Tiles of a kernel without a loop that writes a (rows, columns)
    matrix, a program per ``block_rows`` x ``block_cols`` tile (its
    ``BLOCK_ROWS`` and ``BLOCK_COLS``): the dequantisation kernel's Ŵ, the
    keep-mask pass's mask."""

    block_rows: int
    block_cols: int
    num_warps: int = 4
    num_stages: int = 1

    def launch_kwargs(self) -> dict:
        return dict(BLOCK_ROWS=self.block_rows, BLOCK_COLS=self.block_cols, num_warps=self.num_warps,
                    num_stages=self.num_stages, enable_fp_fusion=FP_FUSION)


#: The dequantisation kernel (``Plan.dequantize_base``: an NF4 base at large
#: M, made whole once a pass): 32 rows of 128 columns on 4 warps, 32
#: elements a thread.
DEQUANT = TileConfig(block_rows=32, block_cols=128)
#: The keep-mask pass (the ``cublas`` strategy with dropout): 16 rows of 256
#: columns on 4 warps, 32 elements (four Philox calls) a thread, a 4 KiB tile
#: of bytes; bound by Philox's integer work, not by its stores.
KEEP_MASK = TileConfig(block_rows=16, block_cols=256)


def shipped_configs() -> dict[str, list]:
    """Every configuration a launcher can choose on CUDA, for the compile report."""
    return {
        "gemm_16bit": list(_GEMM_CANDIDATES_16BIT),
        "gemm_fp32": list(_GEMM_CANDIDATES_FP32) + list(_GEMM_CANDIDATES_FP32_IN_LOOP),
        "gemm_low_rank_only": list(LOW_RANK_ONLY_GEMM.values()),
        "skinny_16bit": [SKINNY_16BIT],
        "skinny_fp32": [SKINNY_FP32],
        "norm_16bit": [DORA_NORM_16BIT],
        "norm_fp32": [DORA_NORM_FP32],
        "norm_quantized_16bit": [DORA_NORM_QUANTIZED_16BIT],
        "norm_quantized_fp32": [DORA_NORM_QUANTIZED_FP32],
        "dequant": [DEQUANT],
        "mask": [KEEP_MASK],
    }
