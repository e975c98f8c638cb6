"""Kernel variants as one frozen value handed to the Triton launchers.

Tests and benchmarks choose a variant by passing ``options=KernelOptions(...)`` to
``select_topk`` / ``sparse_attention``; nothing flips module globals. The defaults are the
production choice (measured numbers below); every other value exists to re-measure or to test.
No field changes results beyond floating-point summation order, except ``poison_outputs``
(tests: fill fresh outputs with NaN so an element a kernel never writes fails the comparison).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

# Tile overrides a launcher accepts, per kernel.
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_TUNE_KINDS = ("fwd", "dq", "dkdv")
_FUSED_KINDS = ("resident", "stream")
# The most scores one resident selection program may hold: 4 bytes of shared memory each, and Hopper
# allows 227 KB per program (16 x 4096 needed 263168 bytes on an H200, 733493e).
RESIDENT_MAX_SCORES = 16 * 2048

TileOverrides = Tuple[Tuple[str, Tuple[Tuple[str, int], ...]], ...]


def _normalize_tune(tune: Any) -> TileOverrides:
    """``{"fwd": {"BLOCK_N": 64}, ...}`` (or its normalized tuple form) -> sorted nested tuples."""
    out = []
    for kind, tiles in dict(tune or {}).items():
        if kind not in _TUNE_KINDS:
            raise ValueError(f"KernelOptions.tune: unknown kernel {kind!r}; use one of {_TUNE_KINDS}.")
        items = []
        for key, value in dict(tiles or {}).items():
            if key not in _TILE_KEYS:
                raise ValueError(f"KernelOptions.tune[{kind!r}]: unknown key {key!r}; use one of {_TILE_KEYS}.")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KernelOptions.tune[{kind!r}][{key!r}] must be a positive int, got {value!r}.")
            items.append((key, value))
        out.append((kind, tuple(sorted(items))))
    return tuple(sorted(out))


@dataclass(frozen=True)
class KernelOptions:
    """Which variant of the Triton kernels runs (the reference backend ignores these).

    Attributes:
        force_atomic_dkdv: block granularity: dk/dv by fp32 atomics from the dq program instead
            of key-major lists. H100 (H=16, S=64k, D=128, bf16, kv_block=64, G=64, 90% sparse):
            backward 71.8 ms with atomics vs 27.2 ms key-major, so key-major is the default.
        fused_dq_atomic: block granularity: one key-major kernel that also scatters dq with fp32
            atomics (FA2-style, 5 matmuls per tile instead of 7). Same setting: 65.4 ms (4 warps)
            vs 27.3 ms for separate dq and dk/dv kernels, so it is off.
        contig_loads: contiguous, mask-free key tiles when a tile fits in a key unit
            (``kv_block % BLOCK_N == 0``); ``False`` forces the per-token gather (8.94 vs 9.34 ms
            forward, H100, S=64k, D=128, 90%).
        tune: tile overrides per kernel, ``{"fwd" | "dq" | "dkdv": {"BLOCK_M" | "BLOCK_N" |
            "num_warps" | "num_stages": int}}`` (stored as sorted tuples; read with :meth:`tiles`).
        transpose_mark_max_bytes: largest byte map ``[B, H_kv, N_units, H/H_kv * Gq]`` the
            backward's key-major transpose builds (16 MiB at H=16, S=64k, G=64, kv_block=64);
            above it a stable sort builds the same lists.
        select_fused_kind: selection kernel where one program per group tile does every pass:
            ``"resident"`` (scores held in registers when they fit) or ``"stream"``.
        select_fused_max_units: key units up to which that one-program selection runs. H100, H=16,
            S=64k, G=64: fused 1.6 ms at N=1024 (blocks of 64) vs 8.7 ms for the split path,
            whose ~10 passes each cost launches, PyTorch glue and a host sync. ``0`` forces the
            split path.
        select_resident_max_scores: largest ``BLOCK_G x next_pow2(N)`` scores (``BLOCK_G`` >= 16)
            one ``resident`` program holds (16 warps: 64 fp32 registers per thread at 16 x 2048,
            and 4 bytes of shared memory per score); above it the ``stream`` kernel recomputes the
            scores every pass. At S=64k that is up to key blocks of 32 (N=2048: 1.28 ms resident vs
            2.79 stream, H200, c21a846); key blocks of 16 (N=4096) stream. At most ``16 * 2048``:
            ``16 * 4096`` needed 263168 bytes of shared memory on an H200 (limit 232448, 733493e),
            so no larger value can run on Hopper.
        poison_outputs: fill freshly allocated outputs with NaN before the kernels write them.
        tma: load the tiles a key loop streams through tensor descriptors (host-side
            ``TensorDescriptor``, i.e. TMA on Hopper): K/V tiles in the forward and dq kernels
            where the contiguous key-tile path runs (``contig_loads``, ``kv_block % BLOCK_N ==
            0``) and the head dim is a power of two <= 256, masked indexes included; Q/dO tiles in
            the key-major dk/dv kernel where the head dim is such. Other cases (token keys, small
            blocks, other head dims) keep the pointer loads. ``None`` (the default): on for CUDA
            tensors of a GPU of compute capability >= 9.0 whose q/k/v/dO start 16-byte aligned,
            off elsewhere (older GPUs, where Triton lowers descriptors to ordinary loads, untimed;
            the CPU interpreter); ``True`` forces it and refuses inputs a descriptor cannot address;
            ``False`` keeps the pointer loads. H200 (``--sweep``, commit 487e6f3, H=16, S=64k,
            90% sparse, 64x64 blocks, bf16): forward 9.11 -> 8.44 ms, backward 25.08 -> 23.15
            ms (D=128; dq 9.36 -> 9.13, dk/dv 13.89 -> 13.55 ms); D=64 forward 4.77 -> 4.35,
            backward 13.82 -> 12.79 ms; the same errors against the fp32 reference. An sm_90a
            compile cut the forward's spill stores from 216 bytes to none (255 -> 203 registers),
            dq's from 896 to 124 and dk/dv's from 1168 to 724. Triton's automatic warp
            specialisation (``tl.range(..., warp_specialize=True)``) was tried on the same three
            loops and dropped: its compiler pass failed on every kernel at the 4-warp tiles, and
            the one variant that compiled (forward, 8 warps, tma) took 12.8 ms against 8.4.
        dkdv_transposed: the key-major dk/dv kernel computes the scores as ``[queries, keys]``
            and accumulates dK^T and dV^T ``[D, keys]``, so no matmul has the key tile as its
            row count (Hopper's warp-group MMA needs 64 rows per 4 warps; narrower tiles fall
            back to mma.sync). ``None`` (the default): on where the key tile is narrower than 64
            keys (key units of 16 or 32) and the query tile has 64 rows, off elsewhere;
            ``True``/``False`` force it. H200, S=64k, D=128, 90%, G=64 (c21a846): dk/dv 22.7 vs
            29.7 ms at kv_block 32, backward 41.1 vs 51.6 ms at 16; slower at G=32 (32-row
            query tiles: backward 73.4 vs 59.8 ms at kv_block 32). With ``num_stages`` 1 it hit
            an illegal memory access on the H200 and is refused.
    """

    force_atomic_dkdv: bool = False
    fused_dq_atomic: bool = False
    contig_loads: bool = True
    tune: TileOverrides = ()
    transpose_mark_max_bytes: int = 1 << 28
    select_fused_kind: str = "resident"
    select_fused_max_units: int = 4096
    select_resident_max_scores: int = RESIDENT_MAX_SCORES
    poison_outputs: bool = False
    tma: Optional[bool] = None
    dkdv_transposed: Optional[bool] = None

    def __post_init__(self):
        object.__setattr__(self, "tune", _normalize_tune(self.tune))
        if self.select_fused_kind not in _FUSED_KINDS:
            raise ValueError(
                f"KernelOptions.select_fused_kind must be one of {_FUSED_KINDS}, got {self.select_fused_kind!r}."
            )
        for name in ("transpose_mark_max_bytes", "select_fused_max_units", "select_resident_max_scores"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"KernelOptions.{name} must be an int >= 0, got {value!r}.")
        for name in ("force_atomic_dkdv", "fused_dq_atomic", "contig_loads", "poison_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelOptions.{name} must be a bool, got {getattr(self, name)!r}.")
        if self.select_resident_max_scores > RESIDENT_MAX_SCORES:
            raise ValueError(
                f"KernelOptions.select_resident_max_scores={self.select_resident_max_scores} is above "
                f"{RESIDENT_MAX_SCORES} (16 x 2048): the resident selection program keeps 4 bytes of shared "
                f"memory per score, and 16 x 4096 scores needed 263168 bytes on an H200, whose limit is "
                f"232448 (733493e). Use a value <= {RESIDENT_MAX_SCORES}; larger key-unit counts take the "
                f"streaming kernel."
            )
        for name in ("tma", "dkdv_transposed"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"KernelOptions.{name} must be None (auto), True or False, got {value!r}.")

    def tiles(self, kind: str) -> Dict[str, int]:
        """Tile overrides of kernel ``kind`` (``"fwd"``, ``"dq"`` or ``"dkdv"``) as a new dict."""
        return dict(dict(self.tune).get(kind, ()))


DEFAULT_OPTIONS = KernelOptions()


def resolve_options(options: Any) -> KernelOptions:
    """``None`` -> the defaults; anything but a :class:`KernelOptions` is a TypeError."""
    if options is None:
        return DEFAULT_OPTIONS
    if not isinstance(options, KernelOptions):
        raise TypeError(
            f"options must be a megatron_dsv.ops.options.KernelOptions, got {type(options).__name__}."
        )
    return options


__all__ = ["KernelOptions", "DEFAULT_OPTIONS", "resolve_options"]
