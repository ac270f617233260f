"""The model card (README.md) that ships with an exported model.

Why: a pruned checkpoint on its own does not say what it is. The Hugging Face hub and its users
read README.md with YAML front matter (base_model, license, tags); the body says how the model
was made (sparsity, pattern, method, settings, the command), how well it does (results with
their protocol) and how to load it, which matters for the compressed format that only this
project reads. The card is written at export, without results, and rewritten after evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .models import resolve_model

CARD_FILE = "README.md"
# what is known about the bundled aliases' sources (the GGUF files carry no license field we read)
ALIAS_SOURCES = {
    "smollm2-135m": {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"},
    "gemma3-270m": {"base_model": "google/gemma-3-270m", "license": "gemma"},
}
_SETTINGS = (
    "steps",
    "batch_size",
    "seqlen",
    "lr",
    "lmda",
    "lmda_schedule",
    "lmda_final",
    "penalty",
    "rho",
    "rho_final",
    "rho_schedule",
    "interval",
    "init",
    "loss",
    "allocation",
    "projection",
    "optimizer",
    "data",
    "seed",
)


def _front_matter(text: str) -> dict:
    if not text.startswith("---"):
        return {}
    _, _, rest = text.partition("\n")
    block, _, _ = rest.partition("\n---")
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_info(model_name: str) -> dict:
    """``base_model`` and ``license`` of the source model, where they can be known offline.

    An alias: from :data:`ALIAS_SOURCES`; a hub id: the id, plus the license in its cached
    README's front matter; a local directory: its README's front matter (``base_model``,
    ``license``). Unknown values are left out rather than guessed.
    """
    try:
        source = resolve_model(model_name)
    except (ValueError, FileNotFoundError):
        return {}
    if source.kind == "alias":
        return dict(ALIAS_SOURCES.get(model_name.lower(), {}))
    info: dict = {}
    readme: str | None = None
    if source.kind == "hub":
        info["base_model"] = source.path
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source.path, CARD_FILE)
            readme = Path(cached).read_text(encoding="utf-8") if isinstance(cached, str) else None
        except (ImportError, OSError):
            readme = None
    elif source.kind == "local_dir" and (Path(source.path) / CARD_FILE).is_file():
        readme = (Path(source.path) / CARD_FILE).read_text(encoding="utf-8")
    front = _front_matter(readme or "")
    for key in ("base_model", "license"):
        if isinstance(front.get(key), str) and key not in info:
            info[key] = front[key]
    return info


def _format(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


_WINDOWS = {
    "bos-per-window": "each starting with the tokenizer's BOS",
    "bos-at-text-start": "cut from one tokenisation of the whole text, BOS only at its start (classic)",
    "no-bos": "the tokenizer adds no BOS",
}


def _protocol(config: dict, provenance: dict) -> str:
    seqlen = config.get("eval_seqlen") or config.get("seqlen")
    windows = config.get("eval_max_windows")
    bos = provenance.get("windows.protocol")
    text = (
        f"perplexity: non-overlapping windows of {seqlen} tokens, "
        f"{'the first ' + str(windows) if windows else 'all'} windows of each dataset's test text"
        f"{' (' + _WINDOWS.get(bos, bos) + ')' if bos else ''}"
    )
    if config.get("lm_eval_tasks"):
        limit = config.get("lm_eval_limit")
        text += f"; zero-shot accuracy with lm-eval ({'first ' + str(limit) + ' examples' if limit else 'full splits'})"
    return text


def _loading(export_format: str) -> list[str]:
    if export_format == "compressed":
        return [
            "Compressed with ELSA's sparse layout (a packed bitmask plus the non-zeros of each pruned matrix,",
            "`model.sparse.safetensors`, described in `elsa/model_io/sparse_format.py`). Only the `elsa` package reads",
            "it; `transformers` alone cannot. Load it, or densify it once for other tools:",
            "",
            "```python",
            "from elsa.model_io.export import load_checkpoint",
            'model, tokenizer = load_checkpoint("path/to/this/model", dtype=None)  # stored dtype',
            'model.save_pretrained("dense"); tokenizer.save_pretrained("dense")  # standard HF checkpoint',
            "```",
        ]
    return [
        "A standard Hugging Face checkpoint (safetensors):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/model")',
        "```",
    ]


def _provenance(record: dict | None) -> list[str]:
    """The run's record (elsa/provenance.py) as a table: versions, text hashes, windows, machine."""
    if not record:
        return []
    return ["", "## Provenance", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sorted(record.items())]


def render_card(
    metadata: dict, command: str | None = None, results: dict | None = None, source: dict | None = None
) -> str:
    """README.md text for an export described by its ``elsa_metadata.json`` (``metadata``).

    ``results``: evaluation metrics (``ppl_*``, ``acc_*``...), None before evaluation;
    ``source``: :func:`source_info` of the base model.
    """
    config = metadata.get("config", {})
    source = source or {}
    export_format = metadata.get("export_format", "dense")
    front: dict = {}
    if source.get("base_model"):
        front["base_model"] = source["base_model"]
    if source.get("license"):
        front["license"] = source["license"]
    if export_format == "dense":
        front["library_name"] = "transformers"
    front["tags"] = ["sparse", "elsa", "pruned"]
    sparsity = metadata.get("overall_sparsity", config.get("sparsity"))
    title = "pruned model"
    if sparsity is not None:
        title = f"{config.get('model', 'model')} pruned to {float(sparsity):.0%} sparsity"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines += [
        f"Pruned with {'ELSA (ADMM on the training loss)' if config.get('method') == 'elsa' else config.get('method')}"
        f" from `{config.get('model')}`.",
        "",
        "| | |",
        "|---|---|",
        f"| method | {config.get('method')} |",
        f"| sparsity (pruned matrices) | {_format(sparsity)} |",
        f"| pattern | {config.get('pattern', 'unstructured')} |",
        f"| export | {export_format}, {metadata.get('export_dtype', '')} |",
    ]
    if config.get("method") == "elsa":
        lines += [f"| {key} | {_format(config[key])} |" for key in _SETTINGS if config.get(key) is not None]
    else:
        lines += [f"| {key} | {_format(config[key])} |" for key in ("calib_blocks", "seqlen", "data") if key in config]
    lines += ["", "## Evaluation", ""]
    if results:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format(value)} |" for key, value in sorted(results.items())]
        protocol = _protocol(config, metadata.get("provenance", {}))
        lines += ["", f"Protocol: {protocol}; datasets: {', '.join(config.get('eval_datasets', []))}."]
    else:
        lines.append("Not evaluated yet.")
    lines += _provenance(metadata.get("provenance"))
    lines += ["", "## Loading", ""] + _loading(export_format)
    if command:
        lines += ["", "## How it was made", "", "```bash", command, "```"]
    lines += ["", "Settings in full: `elsa_metadata.json`; per-matrix sparsity: `sparsity_report.json`."]
    return "\n".join(lines) + "\n"


def write_card(checkpoint_dir: str | Path, command: str | None = None, results: dict | None = None) -> Path:
    """Render the card of the export in ``checkpoint_dir`` (from its metadata) into its README.md."""
    directory = Path(checkpoint_dir)
    metadata = json.loads((directory / "elsa_metadata.json").read_text(encoding="utf-8"))
    source = source_info(metadata.get("config", {}).get("model", ""))
    path = directory / CARD_FILE
    path.write_text(render_card(metadata, command, results, source), encoding="utf-8")
    return path
