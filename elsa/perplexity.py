"""Perplexity and mean next-token NLL of a causal LM over fixed token windows.

Why not the model's own ``loss``: it averages per batch, so batches of different sizes would be
weighted wrongly, and models differ in how they reduce it. Here every predicted token of every
window counts once (``seqlen - 1`` predictions per window), summed in float64. With windows of
equal length this is the same number as SparseGPT's and Wanda's per-window averaging.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from elsa.head_loss import next_token_nll_sum, plain_head


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (no dropout) and give the model back as it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids)
    return output.logits if hasattr(output, "logits") else output[0]


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError(
            f"windows must be a 2-D LongTensor [n_windows, seqlen], got "
            f"{type(windows).__name__} of shape {tuple(getattr(windows, 'shape', ()))}"
        )
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got shape {tuple(windows.shape)}")


def nll_sum(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Summed next-token NLL over all windows and the number of predicted tokens.

    Exposed so that distributed callers can add sums and counts across workers before dividing.
    """
    _check_windows(windows)
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    total, count = 0.0, 0
    chunked = plain_head(model)  # no full logits (elsa/head_loss.py): 537 MB a Gemma-3 window
    with _eval_mode(model), torch.no_grad():
        for start in starts:
            batch = windows[start : start + batch_size].to(device)
            count += batch.shape[0] * (batch.shape[1] - 1)
            if chunked:
                total += next_token_nll_sum(model, batch)
                continue
            logits = _logits(model, batch)
            # shift the targets, not the logits: a view of the logits avoids copying B*L*V floats
            targets = torch.full_like(batch, -100)
            targets[:, :-1] = batch[:, 1:]
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss.double())
    return total, count


def mean_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """Mean next-token NLL (nats) over every predicted token of every window.

    Raises ValueError if the loss is NaN (a model with NaN weights, or an overflow in low
    precision); an infinite loss is returned as ``inf``.
    """
    total, count = nll_sum(model, windows, batch_size=batch_size, device=device, progress=progress)
    nll = total / count
    if math.isnan(nll):
        raise ValueError(
            "the mean NLL is NaN: the model produced NaN logits (NaN/inf weights, or an overflow "
            "in fp16/bf16); check the weights or evaluate in float32"
        )
    return nll


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> float:
    """``exp(mean_nll)``; ``inf`` when that overflows a float."""
    nll = mean_nll(model, windows, batch_size=batch_size, device=device, progress=progress)
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf
