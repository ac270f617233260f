"""Decoding from a compressed export without densifying its pruned matrices.

Why: :func:`elsa.model_io.sparse_format.load_sparse_model` densifies every matrix, so a 90%-sparse model
decodes as slowly and in as much memory as the dense one. Batch-1 decoding multiplies every weight
matrix by one vector per token and is bound by the bytes it reads; a sparse layout that reads only
the non-zeros is faster once few enough entries are left.

Kernel, chosen by measurement on a 2-core AMD EPYC (AVX-512), one thread, batch-1 matrix-vector
products at 90% sparsity, relative to dense bf16 ``F.linear`` (``bench/decode_kernels.py``
measures it again): torch sparse CSR with int32 indices and fp32 values (``torch.mv``,
which runs MKL's sparse kernel) 0.17-0.36x the time; the same with int64 indices 0.43-0.71x;
scipy.sparse CSR fp32 0.25-0.84x; BSR 4x4 2.7-7x (unstructured sparsity fills most blocks); a
numba CSR kernel with bf16 values and int16 columns 1-2x; torch CSR has no bf16 matrix-vector
product on CPU. So the fallback layout is MKL's, and the default is the same CSR with 16-bit
columns and the export's bf16 values run by our own C kernel (:mod:`elsa.model_io.compact_linear`,
measured alone on 2026-12-05: 0.21-0.61x dense bf16's time at 90% on one thread against MKL's
0.26-0.64x, faster at every shape and level, half the bytes), used wherever ``cc`` builds it.

Layout of a :class:`SparseLinear` (per pruned decoder-block ``nn.Linear``, weight ``rows x cols``):

* ``crow``: int32, ``rows + 1``; row ``r``'s non-zeros are entries ``crow[r]:crow[r+1]``;
* ``col``: int32, ``nnz``; the column of each non-zero, ascending within a row;
* ``values``: fp32, ``nnz``; the non-zeros in row-major order, exactly the export's ``W.values``
  (bf16 or fp32 widened to fp32, so no value changes);
* ``weight_csr``: the torch sparse CSR tensor over those three (no copy).

8 bytes per non-zero (compact: 4 with bf16 values): at 90% sparsity 0.8 (0.4) bytes per matrix
entry against dense bf16's 2. They are
built straight from the export's bitmask and values, one matrix at a time: the only dense-sized
transient is one matrix's boolean mask. A one-token step (decoding) uses ``torch.mv``; several
tokens (the prompt's prefill) ``torch.sparse.mm``, 1-4x slower than dense bf16 on a 64-token
prompt but run once per prompt. Embeddings, norms, lm_head and any matrix for which the sparse
path does not pay (:func:`sparse_pays`) stay dense in the export's dtype.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import warnings
from pathlib import Path

import torch

from .compact_linear import MAX_COLUMNS, CompactLinear, compact_from_csr, native_kernel
from .sparse_format import CONFIG_KEY, FORMAT_NAME, FORMAT_VERSION, _unpack

log = logging.getLogger(__name__)

# Lowest sparsity at which a layout's matrix-vector product beats dense bf16, by threads and matrix
# size (entries): per layout, rows (threads, min entries, min sparsity), the first whose threads and
# size fit applies; more threads than listed take the last listed. Measured alone on 2026-12-05
# with ``python bench/decode_kernels.py --threads 1 2`` (bench/results/decode_speed.kernels.json),
# time of sparse over dense bf16 (ranges over the shapes of that width):
#
#   sparsity                     50%        60%        70%        80%        90%
#   compact, 1 thr, 576-1536     1.35-1.50  1.22-1.25  1.00-1.07  0.77-0.84  0.49-0.61
#   compact, 1 thr, 2048-5632    0.73-1.32  0.76-1.07  0.56-0.83  0.41-0.60  0.21-0.35
#   compact, 2 thr, all          0.85-0.98  0.67-0.84  0.54-0.72  0.37-0.63  0.20-0.58
#   CSR (MKL), 1 thr, all        1.21-2.18  0.98-1.90  0.71-1.22  0.48-0.89  0.26-0.64
#
# Two threads make dense bf16 relatively slow here (its matrix-vector product scales worse).
PAYS_FROM = {
    "compact": ((1, 2048 * 2048, 0.70), (1, 0, 0.80), (2, 0, 0.60)),
    "csr": ((1, 0, 0.80), (2, 0, 0.80)),
}
# A matrix pruned "to 80%" holds floor(0.8 n) zeros, a hair under 0.8: a level counts as reached
# within this slack (without it, 100 of 112 matrices of an 80% model were kept dense).
LEVEL_SLACK = 0.002


def sparse_pays(rows: int, cols: int, sparsity: float, threads: int | None = None, layout: str = "compact") -> bool:
    """Whether ``layout``'s product of a ``rows x cols`` matrix at ``sparsity`` beats dense bf16 here."""
    threads = threads or torch.get_num_threads()
    rules = PAYS_FROM[layout]
    threads = min(threads, max(t for t, _, _ in rules))
    for row_threads, min_entries, min_sparsity in rules:
        if row_threads == threads and rows * cols >= min_entries:
            return sparsity >= min_sparsity - LEVEL_SLACK
    return False


class SparseLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` held only as CSR (see the module docstring); no dense weight."""

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape, bias=None):
        super().__init__()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        # buffers, not parameters: nothing here trains; non-persistent, as state_dict has no CSR form
        self.register_buffer("crow", crow, persistent=False)
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("values", values, persistent=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self._rebuild()

    def _rebuild(self) -> None:
        """The CSR view over the three buffers; MKL's product wants fp32 values, so half types widen."""
        if self.values.dtype in (torch.bfloat16, torch.float16):
            self.values = self.values.float()
        shape = (self.out_features, self.in_features)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per matrix, to no one's use
            warnings.simplefilter("ignore", UserWarning)
            self.weight_csr = torch.sparse_csr_tensor(self.crow, self.col, self.values, shape, check_invariants=False)

    def _apply(self, fn, recurse=True):
        """``model.to(...)`` moves the buffers; the CSR view must then be made over the moved ones."""
        out = super()._apply(fn, recurse)
        self._rebuild()
        return out

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One token: MKL's CSR matrix-vector product; several: the CSR x dense product."""
        flat = x.reshape(-1, self.in_features).to(self.values.dtype)
        if flat.shape[0] == 1:
            out = torch.mv(self.weight_csr, flat[0]).unsqueeze(0)
        else:
            out = torch.sparse.mm(self.weight_csr, flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.out_features * self.in_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"


def csr_from_export(bits: torch.Tensor, values: torch.Tensor, shape) -> tuple[torch.Tensor, ...]:
    """``(crow, col, values)``, int32 / int32 / the export's dtype, from its ``W.bitmask`` and ``W.values``.

    The export's values are already in CSR order (row-major non-zeros); only the column of each and
    the row starts are derived from the mask. Never builds the dense matrix.
    """
    rows, cols = int(shape[0]), int(shape[1])
    mask = _unpack(bits, rows * cols).view(rows, cols)
    per_row = mask.sum(dim=1, dtype=torch.int32)
    if int(per_row.sum()) != values.numel():
        raise ValueError(f"compressed checkpoint is corrupt: {int(per_row.sum())} mask bits, {values.numel()} values")
    crow = torch.zeros(rows + 1, dtype=torch.int32)
    torch.cumsum(per_row, dim=0, out=crow[1:])
    col = (torch.nonzero(mask.view(-1)).view(-1) % cols).to(torch.int32)
    return crow, col, values.contiguous()


def _densify(bits: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """The dense matrix (for matrices the sparse path does not pay for)."""
    mask = _unpack(bits, math.prod(shape))
    return torch.zeros(mask.numel(), dtype=values.dtype).masked_scatter_(mask, values).view(*shape)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: each matrix's transients (mask, int64 positions) are freed between the CSR arrays that
    stay, and glibc keeps the holes: on the 1B-shaped model at 90% the process held 2.3 GB after
    loading 0.55 GB of CSR arrays, 1.2 GB after a trim. Trimming after every matrix keeps the peak
    near the final size (and where matrices stay dense, near the dense model's).
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - raises AttributeError where libc is not glibc
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _read_block(directory: Path) -> tuple[dict, dict]:
    """``(config dict, elsa_sparse block)``, refusing formats this code does not know."""
    data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    block = data.get(CONFIG_KEY)
    if block is None:
        raise ValueError(f"{directory} is not a compressed export (config.json has no {CONFIG_KEY!r})")
    if block.get("format") != FORMAT_NAME or int(block.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{directory}: sparse format {block.get('format')!r} v{block.get('version')} unknown")
    return data, block


def _empty_model(directory: Path, dtype: torch.dtype, attn_implementation: str | None) -> torch.nn.Module:
    """The model's modules with parameters on the meta device (no memory, no random init).

    Buffers are real (rotary frequencies are computed at construction and not stored).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    kwargs: dict = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model


def _block_linears(model: torch.nn.Module, shapes: dict) -> dict[str, torch.nn.Linear]:
    """Compressed ``nn.Linear`` modules other than the output head, by module name."""
    head = model.get_output_embeddings()
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and f"{name}.weight" in shapes:
            found[name] = module
    return found


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _decide(shape, bits_kept: int, policy: str, threads: int, layout: str) -> bool:
    """Sparse or dense for one matrix under ``policy`` (auto: :func:`sparse_pays` for ``layout``)."""
    if policy in ("always", "never"):
        return policy == "always"
    sparsity = 1.0 - bits_kept / math.prod(shape)
    return sparse_pays(shape[0], shape[1], sparsity, threads, layout)


def _layout_for(shape, layout: str) -> str:
    """``compact`` where ``layout`` and the machine allow it (its kernel builds, the width fits), else ``csr``."""
    if layout != "csr" and shape[1] <= MAX_COLUMNS and (layout == "compact" or native_kernel() is not None):
        return "compact"
    return "csr"


def _sparse_module(bits, values, shape, bias, layout: str) -> torch.nn.Module:
    """A :class:`CompactLinear` or a :class:`SparseLinear` (``layout`` already resolved)."""
    csr = csr_from_export(bits, values, shape)
    if layout == "compact":
        return CompactLinear(*compact_from_csr(*csr), shape, bias)
    return SparseLinear(*csr, shape, bias)


def _fill(model, handle, block: dict, dtype: torch.dtype, policy: str, layout: str) -> dict:
    """Replace each compressed block linear by a SparseLinear (or a dense one where it pays not)."""
    shapes = block["shapes"]
    threads = torch.get_num_threads()
    summary = {"sparse": [], "dense": [], "threads": threads, "policy": policy, "layouts": {}}
    linears = _block_linears(model, shapes)
    for name, linear in linears.items():
        key, shape = f"{name}.weight", shapes[f"{name}.weight"]
        bits, values = handle.get_tensor(f"{key}.bitmask"), handle.get_tensor(f"{key}.values")
        bias = handle.get_tensor(f"{name}.bias").to(dtype) if linear.bias is not None else None
        chosen = _layout_for(shape, layout)
        if _decide(shape, values.numel(), policy, threads, chosen):
            module = _sparse_module(bits, values, shape, bias, chosen)
            _set_module(model, name, module)
            summary["sparse"].append(name)
            summary["layouts"][type(module).__name__] = summary["layouts"].get(type(module).__name__, 0) + 1
            release_freed_memory()
        else:
            dense = torch.nn.Linear(shape[1], shape[0], bias=bias is not None, device="meta", dtype=dtype)
            dense.weight = torch.nn.Parameter(_densify(bits, values, shape).to(dtype), requires_grad=False)
            if bias is not None:
                dense.bias = torch.nn.Parameter(bias, requires_grad=False)
            _set_module(model, name, dense)
            summary["dense"].append(name)
            release_freed_memory()
    done = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    _fill_rest(model, handle, block, dtype, done)
    return summary


def _fill_rest(model, handle, block: dict, dtype: torch.dtype, done: set[str]) -> None:
    """Load every other tensor (embeddings, norms, lm_head) as stored, then restore the ties."""
    shapes = block["shapes"]
    state = {}
    for key in handle.keys():
        name = key.removesuffix(".bitmask").removesuffix(".values")
        if name in done or name in state:
            continue
        if name in shapes:
            tensor = _densify(handle.get_tensor(f"{name}.bitmask"), handle.get_tensor(f"{name}.values"), shapes[name])
        else:
            tensor = handle.get_tensor(name)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    for alias, source in block.get("tied", {}).items():
        state[alias] = state[source]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if unexpected or left:
        raise ValueError(f"weights do not fit the config: unexpected {unexpected[:3]}, not loaded {left[:3]}")


def load_sparse_for_inference(
    directory: str | Path,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    policy: str = "auto",
    layout: str = "auto",
) -> torch.nn.Module:
    """A transformers causal LM from a compressed export, its pruned block linears kept sparse.

    ``dtype``: of everything left dense (default: the export's); ``policy``: ``auto`` (sparse where
    :func:`sparse_pays` says so at the current torch thread count, dense elsewhere, logged),
    ``always`` or ``never``; ``layout`` of the sparse matrices: ``auto`` (compact, 4 bytes a
    non-zero, where its kernel builds here; else CSR, 8), ``compact`` or ``csr``. The summary of what
    went which way is ``model.sparse_summary``.
    """
    from safetensors import safe_open
    from transformers import GenerationConfig

    if policy not in ("auto", "always", "never"):
        raise ValueError(f"policy {policy!r} is not one of auto, always, never")
    if layout not in ("auto", "compact", "csr"):
        raise ValueError(f"layout {layout!r} is not one of auto, compact, csr")
    directory = Path(directory)
    _, block = _read_block(directory)
    dtype = dtype or getattr(torch, block["dtype"])
    model = _empty_model(directory, dtype, attn_implementation)
    with safe_open(str(directory / block["weights"]), framework="pt") as handle:
        summary = _fill(model, handle, block, dtype, policy, layout)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    _log_summary(directory, summary)
    model.sparse_summary = summary
    return model.eval()


def _log_summary(directory: Path, summary: dict) -> None:
    """Say how many matrices run sparse, and that the rest stay dense because sparse would be slower."""
    sparse, dense = len(summary["sparse"]), len(summary["dense"])
    log.info("%s: %d pruned matrices run sparse (%s), %d dense", directory, sparse, summary["layouts"], dense)
    if dense and summary["policy"] == "auto":
        log.warning(
            "%d pruned matrices of %s kept dense: at their sparsity and size the sparse product is slower than "
            "dense with %d thread(s) (elsa.model_io.sparse_infer.PAYS_FROM), e.g. %s",
            dense,
            directory,
            summary["threads"],
            summary["dense"][0],
        )


def sparse_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the sparse layouts of ``model`` (the buffers of every SparseLinear and CompactLinear)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (SparseLinear, CompactLinear)):
            total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total
