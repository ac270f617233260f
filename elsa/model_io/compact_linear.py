"""A pruned linear layer in compact CSR: 16-bit columns and the export's bf16 non-zeros, 4 bytes each.

Why: MKL's CSR product (:class:`elsa.model_io.sparse_infer.SparseLinear`) needs int32 columns and
fp32 values, 8 bytes a non-zero; at 90% sparsity a 1B-shaped model then still needed 0.7x the
memory of the dense bf16 one. Keeping the export's bf16 values as they are and the columns in 16
bits halves that; a small C kernel (``kernels/csr16_matmul.c``, its layout documented there)
multiplies in that form, faster than MKL's product here at every shape and level measured
(``bench/decode_kernels.py``).
Matrices wider than 65,536 columns cannot use it and take the CSR layout.

The kernel is compiled on first use with the system's C compiler (``cc``, OpenMP, ``-O3
-march=native``) into ``$ELSA_CACHE/kernels`` (``ELSA_KERNEL_CACHE`` moves it, ``off`` disables
it), keyed by the source, the compiler and the CPU's flags. Without a compiler, or when the build
fails, :func:`native_kernel` returns None, says why once, and the caller uses the CSR layout.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .cache_dirs import cache_dir


log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "csr16_matmul.c"
CACHE_ENV = "ELSA_KERNEL_CACHE"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
# value dtypes the kernel reads as they are; others (fp16) widen to fp32, which is exact
KERNEL_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}

_LIB: ctypes.CDLL | None | bool = False  # False: not tried yet


def _cpu_identity() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for), or the architecture's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _build(compiler: str, target: Path) -> None:
    """Compile the kernel into ``target`` (written beside it, then renamed: concurrent builds are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)


def native_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None (said once) where it cannot be had."""
    global _LIB
    if _LIB is not False:
        return _LIB
    _LIB = None
    root = cache_dir("kernels", CACHE_ENV)
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if root is None or compiler is None:
        reason = f"{CACHE_ENV}={os.environ.get(CACHE_ENV)}" if compiler else "no C compiler (cc) on PATH"
        log.info("compact kernel not used (%s): sparse matrices use MKL's CSR layout, 8 bytes a non-zero", reason)
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    identity = "|".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_identity()])
    target = root / f"csr16_matmul-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    try:
        if not target.is_file():
            log.info("compiling the compact kernel (once, %s)", target)
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))  # after torch: its OpenMP runtime (libgomp.so.1) is the one used
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        log.warning("compact kernel unavailable (%s): sparse matrices use MKL's CSR layout", detail.strip()[:300])
        return None
    for suffix in KERNEL_DTYPES.values():
        getattr(lib, f"elsa_csr16_matvec_{suffix}").restype = None
        getattr(lib, f"elsa_csr16_matmul_{suffix}").restype = None
    _LIB = lib
    return lib


MAX_COLUMNS = 1 << 16
LANES = 16  # the kernel's tokens per vector: a prompt's activations are padded to whole vectors


def compact_from_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(row_start, col, values)`` for the kernel from CSR arrays (int32 rows and columns).

    Columns are stored as uint16 bit patterns in an int16 tensor (torch has no uint16 arithmetic
    here); values keep the export's dtype where the kernel reads it (bf16, fp32), fp16 widens.
    """
    if values.dtype not in KERNEL_DTYPES:
        values = values.float()
    return crow.to(torch.int64), col.to(torch.int32).to(torch.int16), values.contiguous()


def _pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


class CompactLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` held as row starts, 16-bit columns and values (no dense weight)."""

    def __init__(self, row_start: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape, bias=None):
        super().__init__()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        if self.in_features > MAX_COLUMNS or values.dtype not in KERNEL_DTYPES or col.dtype != torch.int16:
            raise ValueError(f"compact layout does not fit {tuple(shape)} ({col.dtype} columns, {values.dtype})")
        self.register_buffer("row_start", row_start, persistent=False)
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("values", values, persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._lib = native_kernel()
        if self._lib is None:
            raise RuntimeError("the compact kernel is not available here (see the log); use the CSR layout")

    def _apply(self, fn, recurse=True):
        """``model.to(torch.float16)`` must leave values the kernel reads: half widens to fp32 (exact)."""
        out = super()._apply(fn, recurse)
        if self.values.dtype not in KERNEL_DTYPES:
            self.values = self.values.float()
        return out

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One token: a matrix-vector product; several: each non-zero scales that column over all tokens."""
        if not (x.is_cpu and self.values.is_cpu):
            raise RuntimeError(f"CompactLinear runs on CPU only (input on {x.device}, weights on {self.values.device})")
        flat = x.reshape(-1, self.in_features).float()
        tokens = flat.shape[0]
        out = torch.empty(tokens, self.out_features, dtype=torch.float32)
        suffix = KERNEL_DTYPES[self.values.dtype]
        rows = ctypes.c_int64(self.out_features)
        layout = (rows, _pointer(self.row_start), _pointer(self.col), _pointer(self.values))
        if tokens == 1:
            flat = flat.contiguous()
            getattr(self._lib, f"elsa_csr16_matvec_{suffix}")(*layout, _pointer(flat), _pointer(out))
        else:
            xt = torch.nn.functional.pad(flat, (0, 0, 0, -tokens % LANES)).t().contiguous()
            run = getattr(self._lib, f"elsa_csr16_matmul_{suffix}")
            run(*layout, _pointer(xt), ctypes.c_int64(xt.shape[1]), ctypes.c_int64(tokens), _pointer(out))
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.out_features * self.in_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}, csr16"
