"""Fused CPU kernels for the step's small ops, with the eager PyTorch ops as the fallback.

At decode sizes a step is mostly dispatch: an RMSNorm is 7 eager ops (81 us in bf16 at batch 16),
RoPE 3, the sampler's finiteness check and argmax two passes over the vocabulary. `native/fused.c`
does each in one call: the residual add fused into the next RMSNorm, RoPE in place, and one pass
over the logits for the argmax and the finiteness check. The C source is compiled once per
machine with the system C compiler (`cc`, `-O3 -march=native -fopenmp`; about a second) into
`<LORASWAP_CACHE>/kernels/`, and loaded with ctypes: no PyTorch headers, no build step at install.

The kernels run only for contiguous CPU float32 / bfloat16 tensors and only while `enabled()`;
everything else (CUDA, float16, no compiler) takes the eager path, which is also the reference
the tests hold the kernels to. `LORASWAP_NATIVE_KERNELS=0` turns them off; `set_enabled` lets a
benchmark compare both in one process.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.base import cache_dir as base_cache_dir

logger = logging.getLogger(__name__)

# fused.c: the step's small ops and the float32 tile kernels; nf4_amx.c: NF4 x bf16 on AMX.
SOURCES = [Path(__file__).with_name("native") / name for name in ("fused.c", "nf4_amx.c")]
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lib: ctypes.PyDLL | None = None
_tried = False
_enabled = os.environ.get("LORASWAP_NATIVE_KERNELS", "1") != "0"


def cache_dir() -> Path:
    """Where built kernels live: beside the converted base (LORASWAP_CACHE overrides)."""
    return base_cache_dir() / "kernels"


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (Linux), or the architecture elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return platform.machine() + "|" + "|".join(wanted)


def _build() -> ctypes.PyDLL | None:
    """Compile (once per source, flags and machine) and load the kernels; None if that fails."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("no C compiler found: the step's small ops run as eager PyTorch ops")
        return None
    # -march=native: a cache shared by machines (a volume, a network home) must not hand one
    # CPU's build to another, so the CPU's identity is part of the key.
    key = b"".join(source.read_bytes() for source in SOURCES) + " ".join([compiler, *CFLAGS, _cpu_signature()]).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    target = cache_dir() / f"fused-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *CFLAGS, "-o", str(built), *map(str, SOURCES), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                logger.warning("building the kernels failed, eager ops instead:\n%s", result.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: a concurrent builder's copy is identical
    # PyDLL keeps the GIL: the kernels take microseconds, and releasing and retaking it on every
    # call would let a busy thread (the event loop) delay each of the step's ~400 calls.
    lib = ctypes.PyDLL(str(target))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for suffix in _DTYPES.values():
        getattr(lib, f"add_rms_norm_{suffix}").argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32]
        getattr(lib, f"rope_{suffix}").argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr]
    lib.argmax_finite_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr]
    lib.lora_sgmv.argtypes = [ptr, i64, ptr, i64, ctypes.c_int, ptr, ptr, ctypes.c_int]
    lib.decode_attention.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, ptr, i64, ptr, i64, i64, i64, i64, i64, f32]
    lib.decode_attention.argtypes += [ctypes.c_int]
    lib.nf4_linear.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.tile_kernels_available.argtypes = []
    lib.dense_linear.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, i64, i64, ctypes.c_int]
    lib.nf4_amx_ready.argtypes = []
    lib.nf4_amx_linear.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    return lib


def library() -> ctypes.PyDLL | None:
    """The loaded kernels, building them on first use; None when unavailable or disabled."""
    global _lib, _tried
    if not _enabled:
        return None
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except OSError as exc:  # an unwritable cache, a library the loader refuses
            logger.warning("native kernels unavailable (%s): eager ops instead", exc)
    return _lib


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return library() is not None


def _native(*tensors: torch.Tensor) -> ctypes.PyDLL | None:
    """The library when every tensor is a CPU tensor of one supported dtype."""
    dtype = tensors[0].dtype
    if dtype not in _DTYPES:
        return None
    for t in tensors:  # a loop, not any(), and `is_cpu`, not `device.type` (5x dearer): ~400 calls a step
        if t.dtype is not dtype or not t.is_cpu:
            return None
    return _lib if _enabled and _tried else library()


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x = x + delta` (when given), then `(x, rms_norm(x) * weight)`; x, delta (T, n).

    The native kernel adds in place into x (the residual stream, owned by the model's loop)."""
    lib = _native(x, weight) if delta is None else _native(x, delta, weight)
    rowwise = x.dim() == 2 and x.stride(1) == 1 and (delta is None or (delta.dim() == 2 and delta.stride(1) == 1))
    if lib is None or not rowwise or not weight.is_contiguous():
        if delta is not None:
            x = x + delta
        return x, F.rms_norm(x, weight.shape, weight, eps)
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype)
    getattr(lib, f"add_rms_norm_{_DTYPES[x.dtype]}")(
        x.data_ptr(),
        x.stride(0),
        None if delta is None else delta.data_ptr(),
        0 if delta is None else delta.stride(0),
        weight.data_ptr(),
        out.data_ptr(),
        n,
        rows,
        n,
        eps,
    )
    return x, out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, D) rotated by each token's cos / signed sin (T, 1, D): the native kernel
    rotates x in place and returns it, the eager form `x * cos + x.roll(D / 2, -1) * sin` (one
    addcmul) returns a new tensor."""
    lib = _native(x, cos, sin)
    if lib is None or x.stride(2) != 1 or not (cos.is_contiguous() and sin.is_contiguous()) or x.shape[2] > 1024:
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)
    T, H, D = x.shape
    getattr(lib, f"rope_{_DTYPES[x.dtype]}")(
        x.data_ptr(), T, H, D, x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr()
    )
    return x


def argmax_finite(logits: torch.Tensor) -> tuple[list[int], list[bool]]:
    """Per row of (S, vocab) float32 logits: the first index of its maximum, and whether the
    row is all finite. The index of a row that is not finite means nothing."""
    lib = _native(logits) if logits.dtype == torch.float32 else None
    if lib is None or logits.dim() != 2 or logits.stride(1) != 1:
        low, high = torch.aminmax(logits, dim=-1)  # aminmax propagates NaN
        return logits.argmax(dim=-1).tolist(), (torch.isfinite(low) & torch.isfinite(high)).tolist()
    rows, n = logits.shape
    index = torch.empty(rows, dtype=torch.int64)
    finite = torch.empty(rows, dtype=torch.uint8)
    lib.argmax_finite_f32(logits.data_ptr(), rows, n, logits.stride(0), index.data_ptr(), finite.data_ptr())
    return index.tolist(), [bool(f) for f in finite.tolist()]


class _LoraSegmentsArgs(ctypes.Structure):
    """fused.c's `lora_segments`."""

    _fields_ = [
        ("slot", ctypes.c_void_p),
        ("start", ctypes.c_void_p),
        ("count", ctypes.c_void_p),
        ("segments", ctypes.c_int64),
        ("rows", ctypes.c_void_p),
    ]


class _LoraWeightsArgs(ctypes.Structure):
    """fused.c's `lora_weights`."""

    _fields_ = [
        ("A", ctypes.c_void_p),
        ("Bt", ctypes.c_void_p),
        ("w_bf16", ctypes.c_int64),
        ("slot_rank", ctypes.c_void_p),
        ("parts", ctypes.c_int64),
        ("R", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("out_part", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class LoraSegments:
    """A step's adapter tokens grouped by slot, for `lora_sgmv` (built once per step, shared by
    every layer): tokens `rows[start[g] : start[g] + count[g]]` use slot `slot[g]`."""

    slot: torch.Tensor  # (G,) int64
    start: torch.Tensor  # (G,) int64
    count: torch.Tensor  # (G,) int64
    rows: torch.Tensor  # (tokens using an adapter,) int64

    @classmethod
    def of(cls, groups: dict[int, list[int]]) -> LoraSegments:
        """slot -> its token rows (in row order)."""
        slots: list[int] = []
        starts: list[int] = []
        counts: list[int] = []
        rows: list[int] = []
        for slot, members in groups.items():
            slots.append(slot)
            starts.append(len(rows))
            counts.append(len(members))
            rows += members
        t = lambda values: torch.tensor(values, dtype=torch.int64)
        return cls(t(slots), t(starts), t(counts), t(rows))

    @functools.cached_property
    def _struct(self) -> _LoraSegmentsArgs:
        return _LoraSegmentsArgs(
            self.slot.data_ptr(), self.start.data_ptr(), self.count.data_ptr(), len(self.slot), self.rows.data_ptr()
        )

    @functools.cached_property
    def address(self) -> int:
        """Where the kernel reads these segments (valid while this object lives)."""
        return ctypes.addressof(self._struct)


class LoraWeights:
    """One layer's slot tensors as `lora_sgmv` reads them: A (slots, P, R, in) and
    Bt (slots, P, R, out_part), contiguous float32 or bfloat16 on the CPU, and slot_rank (slots,)
    int64. Holds the tensors, so the addresses stay valid while this object lives."""

    def __init__(self, A: torch.Tensor, Bt: torch.Tensor, slot_rank: torch.Tensor):
        self._tensors = (A, Bt, slot_rank)
        _, parts, R, in_features = A.shape
        self._struct = _LoraWeightsArgs(
            A.data_ptr(),
            Bt.data_ptr(),
            A.dtype == torch.bfloat16,
            slot_rank.data_ptr(),
            parts,
            R,
            in_features,
            Bt.shape[3],
        )
        self.address = ctypes.addressof(self._struct)

    @staticmethod
    def of(A: torch.Tensor, Bt: torch.Tensor, slot_rank: torch.Tensor) -> LoraWeights | None:
        """The kernel's view of these tensors, or None when it does not take them."""
        ok = (
            A.dtype == Bt.dtype
            and A.dtype in _DTYPES
            and A.device.type == Bt.device.type == slot_rank.device.type == "cpu"
            and A.is_contiguous()
            and Bt.is_contiguous()
            and slot_rank.dtype == torch.int64
            and A.dim() == Bt.dim() == 4
            and slot_rank.numel() == A.shape[0] == Bt.shape[0]
        )
        return LoraWeights(A, Bt, slot_rank) if ok else None


def lora_sgmv(y: torch.Tensor, x: torch.Tensor, weights: LoraWeights, seg: LoraSegments) -> bool:
    """y (T, P * out_part) += each adapter token's `B_s A_s x` in place, summed in float32: one
    call per projection instead of the ~7 eager ops of MultiLoraLinear's gather / bmm / gather
    path. Returns False, touching nothing, when y and x are not tensors the kernel takes.
    (Runs ~150 times a step: the checks are the cheap tensor properties.)"""
    lib = library()
    dtype = y.dtype
    if lib is None or dtype not in _DTYPES or x.dtype is not dtype or not (y.is_cpu and x.is_cpu):
        return False
    y_strides, x_strides = y.stride(), x.stride()
    if len(x_strides) != 2 or len(y_strides) != 2 or x_strides[1] != 1 or y_strides[1] != 1:
        return False
    status = lib.lora_sgmv(
        y.data_ptr(),
        y_strides[0],
        x.data_ptr(),
        x_strides[0],
        dtype is torch.bfloat16,
        weights.address,
        seg.address,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("lora_sgmv could not allocate its scratch rows")
    return True


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
) -> torch.Tensor | None:
    """Each sequence's single query q (B, H, D) against its first `lengths[b]` cached keys, read
    through `block_table` (B, max_blocks) from the flat caches (blocks * block_size, KV, D):
    softmax(q k / sqrt(D)) v as `scaled_dot_product_attention` (with enable_gqa) computes it on
    the gathered keys, without the gather. None when the kernel does not take these tensors."""
    lib = _native(q, k_cache, v_cache)
    if (
        lib is None
        or not (q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous())
        or block_table.dtype != torch.int64
        or lengths.dtype != torch.int64
        or block_table.device.type != "cpu"
        or lengths.device.type != "cpu"
        or not (block_table.is_contiguous() and lengths.is_contiguous())
        or q.shape[1] % k_cache.shape[1]
    ):
        return None
    B, H, D = q.shape
    out = torch.empty_like(q)
    status = lib.decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        out.data_ptr(),
        q.dtype == torch.bfloat16,
        block_table.data_ptr(),
        block_table.shape[1],
        lengths.data_ptr(),
        B,
        H,
        k_cache.shape[1],
        D,
        block_size,
        D**-0.5,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("decode_attention could not allocate its scratch rows")
    return out


# Token rows per nf4_linear call: x's rows are read once per four output rows, so they should
# stay in L2 (128 x 1536 float32 is 768 KiB); a longer prefill runs in chunks.
NF4_ROWS_PER_CALL = 128


def tile_kernels_available() -> bool:
    """Whether `nf4_linear` and `dense_linear` run here (native kernels on, an AVX-512 CPU)."""
    lib = library()
    return lib is not None and bool(lib.tile_kernels_available())


def nf4_linear(
    x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int, blocksize: int
) -> torch.Tensor | None:
    """x (T, in) float32 @ W^T for an NF4 weight in bitsandbytes' storage (`data` the packed
    nibbles, `absmax` float32 per block, `code` the 16 NF4 values), computed exactly in float32
    (each weight code * absmax, as bitsandbytes' dequantize). None when the kernel does not take
    these tensors (then the caller runs bitsandbytes)."""
    lib = _native(x, absmax, code) if x.dtype is torch.float32 else None
    if lib is None or x.dim() != 2 or x.stride(1) != 1 or data.dtype != torch.uint8 or code.numel() != 16:
        return None
    rows, in_features = x.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    threads = torch.get_num_threads()
    for first in range(0, rows, NF4_ROWS_PER_CALL):
        count = min(NF4_ROWS_PER_CALL, rows - first)
        status = lib.nf4_linear(
            y[first].data_ptr(),
            out_features,
            x[first].data_ptr(),
            x.stride(0),
            count,
            data.data_ptr(),
            absmax.data_ptr(),
            code.data_ptr(),
            out_features,
            in_features,
            blocksize,
            threads,
        )
        if status == -2:
            return None  # a layout the kernel does not cover (checked before any row is written)
        if status != 0:
            raise MemoryError("nf4_linear could not allocate its scratch rows")
    return y


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` for float32 x (T, in) and a contiguous float32 weight (out, in)
    by `native/fused.c`'s tile kernel; None when the kernel does not take these tensors (then the
    caller runs F.linear). A row's result does not depend on T or on the other rows."""
    if x.dtype is not torch.float32 or x.dim() != 2 or x.stride(1) != 1 or not weight.is_contiguous():
        return None
    if weight.requires_grad and torch.is_grad_enabled():
        return None  # no backward here: a trainable layer keeps F.linear
    lib = _native(x, weight) if bias is None else _native(x, weight, bias)
    if lib is None or (bias is not None and not bias.is_contiguous()):
        return None
    rows = x.shape[0]
    out_features, in_features = weight.shape
    y = torch.empty(rows, out_features, dtype=torch.float32)
    status = lib.dense_linear(
        y.data_ptr(),
        out_features,
        x.data_ptr(),
        x.stride(0),
        rows,
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out_features,
        in_features,
        torch.get_num_threads(),
    )
    return y if status == 0 else None


@dataclass(frozen=True)
class NF4Panels:
    """An NF4 weight laid out for `nf4_amx_linear` (native/nf4_amx.c): 16 output rows at a time,
    each input-column pair's 16 packed bytes side by side, and the 64-weight blocks' scales in the
    same order. The same 4 bits a weight, rearranged once per layer."""

    data: torch.Tensor  # (out / 16, in / 2, 16) uint8
    scales: torch.Tensor  # (out / 16, in / blocksize, 16) float32
    out_features: int
    in_features: int
    blocksize: int

    @classmethod
    def of(cls, data: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int, blocksize: int):
        """From bitsandbytes' row-major storage (`data`: out * in / 2 bytes, the high nibble the
        even column; `absmax`: one float32 per block); None when the shape does not panel."""
        if out_features % 16 or in_features % 32 or blocksize % 32 or in_features % blocksize:
            return None
        panels = data.reshape(out_features // 16, 16, in_features // 2).transpose(1, 2).contiguous()
        scales = absmax.reshape(out_features // 16, 16, in_features // blocksize).transpose(1, 2).contiguous()
        return cls(panels, scales.to(torch.float32), out_features, in_features, blocksize)


def amx_available() -> bool:
    """Whether `nf4_amx_linear` runs here: native kernels on, and AMX-BF16 in the build, the CPU
    and the operating system."""
    lib = library()
    return lib is not None and bool(lib.nf4_amx_ready())


def nf4_amx_linear(x: torch.Tensor, weight: NF4Panels, code: torch.Tensor) -> torch.Tensor | None:
    """bf16 x (T, in) @ W^T -> bf16 (T, out) for a paneled NF4 weight, on AMX: each weight
    decoded as bitsandbytes' dequantize gives it in bf16, float32 sums, one bf16 rounding per
    output. None when the kernel does not run here (then the caller keeps bitsandbytes)."""
    lib = _native(x)
    if lib is None or x.dtype is not torch.bfloat16 or x.dim() != 2 or x.stride(1) != 1 or code.numel() != 16:
        return None
    rows = x.shape[0]
    y = torch.empty(rows, weight.out_features, dtype=torch.bfloat16)
    status = lib.nf4_amx_linear(
        y.data_ptr(),
        weight.out_features,
        x.data_ptr(),
        x.stride(0),
        rows,
        weight.data.data_ptr(),
        weight.scales.data_ptr(),
        code.data_ptr(),
        weight.out_features,
        weight.in_features,
        weight.blocksize,
        torch.get_num_threads(),
    )
    if status == -1:
        raise MemoryError("nf4_amx_linear could not allocate its scratch tiles")
    return y if status == 0 else None
