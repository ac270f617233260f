"""The layer-by-layer pass the one-shot methods share (elsa/methods/layerwise.py): every layer is fed
exactly the inputs it would see in a plain forward of the model whose earlier blocks are already
pruned, layers reading one tensor share one accumulator, and bad calibration is refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from baseline_helpers import VOCAB
from baseline_helpers import calib_ids as _calib
from baseline_helpers import method_cfg as _cfg

from elsa.methods import get_method
from elsa.methods.layerwise import CHUNK, module_of, prune_layerwise
from elsa.optim.projection import topk_mask
from elsa.targets import config_targets
from elsa.tiny import tiny_model


class _Recorder:
    def __init__(self):
        self.chunks = []

    def add(self, x):
        self.chunks.append(x.clone())


@pytest.mark.parametrize("arch,seqlen", [("llama", 24), ("opt", 24), ("gpt2", 24), ("gemma2", 136)])
def test_layerwise_feeds_each_layer_the_inputs_of_the_pruned_prefix(arch, seqlen):
    """Layers of block i see what a plain forward would show them with blocks < i already pruned.

    Gemma-2 alternates sliding-window (128) and global attention: at 136 tokens a mask recorded
    for one block and reused for the other would give different inputs.
    """
    model = tiny_model(arch, VOCAB, seed=0)
    original = copy.deepcopy(model)
    calib = _calib(2, seqlen)
    targets = config_targets(model, _cfg("magnitude", sparsity=0.5))
    recorded: dict[str, torch.Tensor] = {}

    def prune(target, stats):
        recorded[target.name] = torch.cat(stats.chunks)
        weight = target.param.detach()
        target.param.data.mul_(topk_mask(weight.abs(), target.keep).to(weight.dtype))

    summary = prune_layerwise(model, calib, targets, lambda t: _Recorder(), prune)
    assert summary["calib_tokens"] == calib.numel()

    prefix = "transformer.h" if arch == "gpt2" else ("model.decoder.layers" if arch == "opt" else "model.layers")
    pruned_state = model.state_dict()
    for block in range(model.config.num_hidden_layers):
        reference = copy.deepcopy(original)
        earlier = {k: v for k, v in pruned_state.items() if any(k.startswith(f"{prefix}.{j}.") for j in range(block))}
        reference.load_state_dict(earlier, strict=False)
        seen = {}
        handles = []
        for target in targets:
            if target.name.startswith(f"{prefix}.{block}."):

                def hook(m, i, o, name=target.name):
                    seen[name] = i[0].reshape(-1, i[0].shape[-1])

                handles.append(module_of(reference, target).register_forward_hook(hook))
        with torch.no_grad():
            reference(input_ids=calib, use_cache=False)
        for handle in handles:
            handle.remove()
        assert seen
        for name, x in seen.items():
            assert torch.allclose(recorded[name], x, atol=1e-5, rtol=1e-4), name


def test_layers_on_one_input_share_one_accumulator():
    """q, k, v (and gate, up) read the same tensor: one accumulator each group, fed once per call."""
    model = tiny_model("llama", VOCAB, seed=0)
    calib = _calib(2, 24)
    targets = config_targets(model, _cfg("magnitude", sparsity=0.5))
    used: dict[str, _Recorder] = {}

    def prune(target, stats):
        used[target.name] = stats
        target.param.data.mul_(topk_mask(target.param.detach().abs(), target.keep).to(target.param.dtype))

    prune_layerwise(model, calib, targets, lambda t: _Recorder(), prune)
    layer = "model.layers.0."
    groups = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")]
    for group in groups:
        first = used[layer + group[0] + ".weight"]
        assert all(used[layer + name + ".weight"] is first for name in group), group
    distinct = {id(used[name]) for name in used if name.startswith(layer)}
    assert len(distinct) == 4  # attention input, o_proj's, MLP input, down_proj's
    calls = -(-calib.shape[0] // CHUNK)
    assert all(len(used[name].chunks) == calls for name in used), "an input fed twice"


def test_layerwise_refuses_bad_calibration():
    model = tiny_model("llama", VOCAB, seed=0)
    with pytest.raises(ValueError, match="LongTensor"):
        get_method("wanda").run(model, None, _cfg("wanda"), torch.zeros(4, 8), lambda m, s: None)
