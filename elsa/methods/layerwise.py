"""Shared machinery of the one-shot layer-wise baselines (magnitude, Wanda, SparseGPT).

Why sequential, block by block: a layer-wise method needs, for every linear layer, statistics of
the inputs that layer sees. Running the whole model once with hooks on every layer would hold the
activations of all blocks, and would measure inputs of a *dense* network while the earlier blocks
are already pruned. As the reference implementations do, the calibration blocks are instead
pushed through the model one decoder block at a time:

1. capture the hidden states entering the first decoder block (a pre-hook that raises, so nothing
   after the embeddings is computed), and, from one full forward of a single sample, the extra
   arguments every block is called with (attention masks, rotary position embeddings, position
   ids...). They are recorded *per block* because some models hand different blocks different
   masks (Gemma-2 alternates sliding-window and global attention);
2. for each block: hooks on its target layers accumulate input statistics while the block runs
   over every sample; the method prunes the block's layers from those statistics; the *pruned*
   block is run again to produce the inputs of the next block.

Memory stays at one block's activations for all samples (inputs and outputs) plus the statistics
of one block's layers. Every sample has the same length and no padding, so the extra arguments
recorded for sample 0 (batch 1: masks and rotary tables broadcast over the batch) are valid for
every sample. Blocks run over ``CHUNK`` samples at a time: one sample per call left a CPU
SparseGPT pass at 80% dominated by per-call overhead (py-spy: 77% of samples in the block calls).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from elsa.methods import OneShotMethod
from elsa.optim.projection import nm_mask, topk_mask
from elsa.targets import Target, config_targets, decoder_blocks, targets_by_block, verify_sparsity


class InputStats(Protocol):
    """Accumulates what a method needs to know about one layer's inputs."""

    def add(self, x: torch.Tensor) -> None:
        """``x``: the layer's inputs for one sample, flattened to [tokens, in_features]."""


CHUNK = 16  # calibration samples per block call

MakeStats = Callable[[Target], InputStats]
PruneLayer = Callable[[Target, InputStats], None]
Log = Callable[[dict, int], None]


# --------------------------------------------------------------------------------------------
# targets and masks


def module_of(model: nn.Module, target: Target) -> nn.Module:
    """The layer that owns ``target``'s weight."""
    return model.get_submodule(target.name.rsplit(".", 1)[0])


def rows_view(weight: torch.Tensor, target: Target) -> torch.Tensor:
    """``weight`` as (out_features, in_features), whatever the layer stores (Conv1D is (in, out))."""
    return weight if target.input_dim == 1 else weight.t()


def score_mask(score: torch.Tensor, target: Target) -> torch.Tensor:
    """Keep mask of one whole matrix from a score in the weight's own layout (top-k or N:M)."""
    if target.nm is not None:
        return nm_mask(score, *target.nm, input_dim=target.input_dim)
    return topk_mask(score, target.keep)


def apply_mask(target: Target, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Write ``weight`` (default: the current weight) with the entries outside ``mask`` zeroed."""
    source = target.param.detach() if weight is None else weight
    with torch.no_grad():
        target.param.copy_(torch.where(mask, source.to(target.param.dtype), torch.zeros((), dtype=target.param.dtype)))


def spread(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal integers summing exactly to ``total``.

    The remainder goes to the first parts, so the split is deterministic.
    """
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# --------------------------------------------------------------------------------------------
# capturing the inputs of the first block


class _Stop(Exception):
    """Raised by the capture hook so that the model's forward ends at the first block."""


@dataclass
class BlockCall:
    """How a decoder block is called, minus its hidden states."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    hidden_as_kwarg: bool = False

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), False)
    kwargs = dict(kwargs)
    if "hidden_states" not in kwargs:
        raise RuntimeError("a decoder block was called without hidden states as first argument or 'hidden_states='")
    hidden = kwargs.pop("hidden_states")
    return hidden, BlockCall((), kwargs, True)


def _forward(model: nn.Module, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False)


def record_block_calls(model: nn.Module, blocks: nn.ModuleList, sample: torch.Tensor) -> list[BlockCall]:
    """The call (extra args and kwargs) every block receives, from one full forward of ``sample``."""
    calls: list[BlockCall | None] = [None] * len(blocks)

    def recorder(index: int):
        def hook(module, args, kwargs):
            calls[index] = _split_call(args, kwargs)[1]

        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        _forward(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, call in enumerate(calls) if call is None]
    if missing:
        raise RuntimeError(f"decoder blocks {missing} were never called by {type(model).__name__}.forward")
    return calls  # type: ignore[return-value]


def capture_first_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor) -> torch.Tensor:
    """Hidden states entering block 0 for every calibration sample: [n, seqlen, hidden]."""
    captured: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        captured.append(_split_call(args, kwargs)[0].detach())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in calib:
            try:
                _forward(model, row[None])
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != calib.shape[0]:
        raise RuntimeError("the first decoder block did not see every calibration sample")
    return torch.cat(captured, dim=0)


# --------------------------------------------------------------------------------------------
# the sequential loop


def _check_calib(calib: torch.Tensor) -> None:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype != torch.long or calib.shape[0] < 1:
        raise ValueError(
            f"calib must be a LongTensor [n_blocks, seqlen] with n_blocks >= 1, got "
            f"{type(calib).__name__} {getattr(calib, 'dtype', '')} of shape {tuple(getattr(calib, 'shape', ()))}"
        )


class _AllFed(Exception):
    """Raised by the last target's hook: the rest of the block's call computes nothing needed."""


def _prune_block(model, block, call, hidden, targets, make_stats: MakeStats, prune_layer: PruneLayer) -> None:
    """Feed the block's inputs through it once, accumulating each target's statistics, then prune.

    Layers called on the same tensor (q, k and v; gate and up) share one accumulator: their
    statistics are equal, and SparseGPT's Hessians (x^T x over every calibration token) are most
    of its time. Shared by identity of the input tensor within a call (held until the next call,
    so no other tensor can take its id), never by equal values. Once every target has its inputs
    the call stops: the last layer's own product (down_proj's) and what follows it are not needed.
    """
    stats = {id(t): make_stats(t) for t in targets}
    fed: dict[int, tuple[torch.Tensor, InputStats]] = {}  # this call's inputs -> the accumulator fed
    fired: set[int] = set()  # targets whose inputs this call has seen
    handles = []
    for target in targets:

        def hook(module, inputs, key=id(target)):
            x = inputs[0]
            fired.add(key)
            if id(x) in fed:
                stats[key] = fed[id(x)][1]
            elif any(acc is stats[key] for _, acc in fed.values()):
                raise RuntimeError("a layer sharing another's inputs got different ones in a later call")
            else:
                stats[key].add(x.detach().reshape(-1, x.shape[-1]))
                fed[id(x)] = (x, stats[key])
            if len(fired) == len(stats):
                raise _AllFed

        handles.append(module_of(model, target).register_forward_pre_hook(hook))
    try:
        for chunk in hidden.split(CHUNK):
            fed.clear()
            fired.clear()
            with contextlib.suppress(_AllFed):
                call(block, chunk)
    finally:
        fed.clear()
        for handle in handles:
            handle.remove()
    for target in targets:
        prune_layer(target, stats[id(target)])


def prune_layerwise(
    model: nn.Module,
    calib: torch.Tensor,
    targets: list[Target],
    make_stats: MakeStats,
    prune_layer: PruneLayer,
    log: Log | None = None,
) -> dict[str, Any]:
    """Prune ``targets`` block by block from the statistics of their calibration inputs.

    ``make_stats(target)`` creates an accumulator fed each sample's inputs of the target's layer
    (shape [tokens, in_features], in the model's dtype); after the block ran over every sample,
    ``prune_layer(target, stats)`` must leave the target's weight pruned. Returns summary numbers
    (wall time, samples, tokens) and verifies the exact sparsity of every target at the end.
    """
    _check_calib(calib)
    start = time.perf_counter()
    prefix, blocks = decoder_blocks(model)
    grouped = targets_by_block(targets, prefix, len(blocks))
    device = next(model.parameters()).device
    calib = calib.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calls = record_block_calls(model, blocks, calib[:1])
            hidden = capture_first_inputs(model, blocks, calib)
            for index, (block, call) in enumerate(zip(blocks, calls)):
                block_start = time.perf_counter()
                _prune_block(model, block, call, hidden, grouped[index], make_stats, prune_layer)
                if index + 1 < len(blocks):  # the last block's outputs feed nothing
                    hidden = torch.cat([call(block, chunk) for chunk in hidden.split(CHUNK)], dim=0)
                if log is not None:
                    log({"block": index, "blocks": len(blocks), "block_s": time.perf_counter() - block_start}, index)
    finally:
        model.train(was_training)
    report = verify_sparsity(targets)
    return {
        "wall_s": time.perf_counter() - start,
        "calib_samples": int(calib.shape[0]),
        "calib_tokens": int(calib.numel()),
        "sparsity": report["overall_sparsity"],
    }


class LayerwiseMethod(OneShotMethod):
    """The skeleton the calibrated one-shot methods share: the config's targets, one sequential pass.

    A subclass names its ``Settings`` (elsa/methods/settings.py) and says what a layer's inputs
    accumulate (:meth:`stats`) and how one matrix is pruned from that (:meth:`prune`).
    """

    def stats(self, target: Target) -> InputStats:
        raise NotImplementedError

    def prune(self, target: Target, stats: InputStats) -> None:
        raise NotImplementedError

    def run(self, model: nn.Module, tokenizer, cfg, calib: torch.Tensor, log: Log | None) -> dict:
        return prune_layerwise(model, calib, config_targets(model, cfg), self.stats, self.prune, log)


def in_features(target: Target) -> int:
    """Input features of ``target``'s layer, whatever its weight layout."""
    return rows_view(target.param, target).shape[1]
