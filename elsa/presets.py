"""Presets: the paper's Table 5 and the best configurations found by searches.

``elsa prune --preset paper`` takes the paper's lr / lambda / schedule for the nearest known
model and sparsity; ``--preset tuned`` the entry this project's own searches found for the model
(``tables/tuned.yaml``, each entry with the search that found it), or the budget rule's defaults
where no search covered the model at that sparsity; ``--preset FILE`` takes the entry of a preset
file written by ``elsa tune`` for the model and the nearest sparsity. All are plain data (YAML)
under version control.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

# parameter counts of the paper's models, to pick the nearest one for another model
_PAPER_SIZES = {
    "facebook/opt-125m": 125e6,
    "facebook/opt-1.3b": 1.3e9,
    "google/gemma-2-2b": 2.6e9,
    "meta-llama/Llama-3.2-3B": 3.2e9,
    "meta-llama/Llama-2-7b-hf": 6.7e9,
    "meta-llama/Llama-2-13b-hf": 13e9,
    "google/gemma-2-27b": 27e9,
}
_KNOWN_SIZES = {"smollm2-135m": 135e6}


# a tuned entry serves sparsities this close to its own; further off, the budget rule does
TUNED_SPARSITY_REACH = 0.05


class PresetError(ValueError):
    """No preset entry fits; the message says which ones exist."""


def paper_table() -> dict:
    return yaml.safe_load(resources.files("elsa").joinpath("tables/paper.yaml").read_text())


def nearest_paper_model(model: str, n_params: float | None = None) -> str:
    """The paper's model matching ``model`` by name, else the nearest by parameter count."""
    lowered = model.lower()
    for name in _PAPER_SIZES:
        if name.lower() == lowered or name.split("/")[-1].lower() in lowered:
            return name
    size = n_params or _KNOWN_SIZES.get(lowered)
    if size is None:
        return "facebook/opt-125m"
    return min(_PAPER_SIZES, key=lambda name: abs(_PAPER_SIZES[name] - size) / _PAPER_SIZES[name])


def _nearest_key(keys, sparsity: float) -> float:
    return min(keys, key=lambda s: (abs(float(s) - sparsity), -float(s)))


def paper_preset(model: str, sparsity: float, n_params: float | None = None) -> dict:
    """Config overrides from Table 5 (cosine schedules rise from lambda 0 to the table value)."""
    table = paper_table()
    name = nearest_paper_model(model, n_params)
    entry = table["models"][name]
    level = _nearest_key(entry["settings"], sparsity)
    lr, lmda = entry["settings"][level]
    overrides = dict(table["shared"])
    overrides.update(entry.get("extra", {}))
    overrides["lr"] = float(lr)
    if entry["lmda_schedule"] == "constant":
        overrides.update(lmda=float(lmda), lmda_schedule="constant")
    else:
        overrides.update(lmda=0.0, lmda_final=float(lmda), lmda_schedule=entry["lmda_schedule"])
    overrides["betas"] = tuple(overrides["betas"])
    overrides["preset"] = f"paper:{name}@{level}"
    return overrides


def _entries(text: str) -> list[dict]:
    """The entries of a preset file's text (``presets: [...]``; none for an empty file)."""
    return (yaml.safe_load(text) or {}).get("presets") or []


def _nearest_entry(entries: list[dict], sparsity: float) -> dict:
    return min(entries, key=lambda e: abs(float(e["sparsity"]) - sparsity))


def tuned_entries() -> list[dict]:
    """The bundled searches' winners (``tables/tuned.yaml``), in the preset-file format."""
    return _entries(resources.files("elsa").joinpath("tables/tuned.yaml").read_text())


def tuned_preset(model: str, sparsity: float, entries: list[dict] | None = None) -> dict:
    """Overrides of the tuned entry for ``model`` nearest ``sparsity`` (within
    :data:`TUNED_SPARSITY_REACH`); none (the budget rule) where no search covered it, or where the
    search's winner was the rule's own setting (an entry with an empty config: the rule then
    adapts to the run's steps as it does without a preset). A setting searched at 80% is not
    assumed to carry to 60%: the rule is the honest default."""
    entries = tuned_entries() if entries is None else entries
    mine = [e for e in entries if e.get("model") == model]
    near = [e for e in mine if abs(float(e["sparsity"]) - sparsity) <= TUNED_SPARSITY_REACH + 1e-9]
    if not near:
        covered = ", ".join(f"{e['sparsity']:g}" for e in mine) or "no sparsity"
        return {"preset": f"tuned:none for {model}@{sparsity:g} (searched: {covered}); budget rule"}
    chosen = _nearest_entry(near, sparsity)
    overrides = dict(chosen["config"])  # empty where the rule won the search, or its winner lost at the budget
    won = "" if overrides else " (the budget rule won the search)"
    if "rejected" in chosen:
        measured = chosen["measured"]
        seeds = f", mean of {len(measured['cell_seeds'])} seeds" if "cell_seeds" in measured else ""
        won = f" (the budget rule: the search's best lost to it at {measured['budget']} steps{seeds})"
    overrides["preset"] = f"tuned:{model}@{float(chosen['sparsity']):g}{won}"
    return overrides


def write_preset_file(path: str | Path, entries: list[dict]) -> Path:
    """Write ``[{model, sparsity, config: {...}, metric...}]`` as a preset file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"presets": entries}, sort_keys=False))
    return path


def file_preset(path: str | Path, model: str, sparsity: float | None) -> dict:
    """The entry of a preset file for ``model`` at the nearest sparsity."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"preset {str(path)!r} is neither 'paper', 'tuned' nor an existing preset file")
    entries = _entries(path.read_text())
    mine = [e for e in entries if e.get("model") == model]
    if not mine:
        found = sorted({str(e.get("model")) for e in entries})
        raise PresetError(
            f"preset file {str(path)!r} has no entry for model {model!r} (it holds: {', '.join(found) or 'nothing'})"
        )
    if sparsity is None:
        chosen = mine[0]
    else:
        chosen = _nearest_entry(mine, sparsity)
    overrides = dict(chosen["config"])
    overrides["preset"] = f"{path.name}:{chosen.get('model')}@{chosen.get('sparsity')}"
    return overrides


def preset_overrides(preset: str, model: str, sparsity: float | None) -> dict:
    """Resolve ``--preset`` (``paper``, ``tuned`` or a file) into config overrides."""
    if preset in ("paper", "tuned"):
        if sparsity is None:
            raise PresetError(f"--preset {preset} needs --sparsity to choose the table row")
        return paper_preset(model, sparsity) if preset == "paper" else tuned_preset(model, sparsity)
    return file_preset(preset, model, sparsity)
