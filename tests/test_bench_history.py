"""The bench's tables hold cells measured the same way: cells without the out-of-domain
perplexity move to a history folder (bench/retire_cells.py), and no committed table keeps one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(path: Path, records: list[dict]) -> Path:
    """A results folder as run_bench writes it: results.json with its settings, one file a cell."""
    settings = {"model": "smollm2-135m", "eval_windows": 32, "eval_seqlen": 512}
    (path / "cells").mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"command": "c", "settings": settings, "results": records}))
    names = _load("run_bench").cell_name
    for r in records:
        if "error" not in r:
            (path / "cells" / f"{names(r['method'], r['sparsity'], r.get('steps'))}.json").write_text("{}")
    return path


def test_cells_without_the_out_of_domain_perplexity_move_to_the_history_folder(tmp_path):
    """The cells lacking sotu move with their files and commands; measured and failed cells stay;
    both folders get reports; a second run moves nothing."""
    retire = _load("retire_cells")
    wiki = {"ppl_wikitext2-bundled": 30.0, "prune_s": 1.0, "peak_rss_mb": 9.0, "command": "python bench/run_bench.py"}
    source = _folder(
        tmp_path / "results",
        [
            {**wiki, "method": "dense", "sparsity": 0.0, "ppl_sotu": 27.0},
            {**wiki, "method": "elsa", "sparsity": 0.8, "steps": 32},
            {**wiki, "method": "elsa-coupled", "sparsity": 0.5, "steps": 150},
            {**wiki, "method": "sparsegpt", "sparsity": 0.8, "ppl_sotu": 900.0},
            {"method": "wanda", "sparsity": 0.9, "error": "killed"},
        ],
    )
    history = tmp_path / "results-history"
    moved = retire.retire(source, history, "ppl_sotu")

    assert [(r["method"], r["sparsity"]) for r in moved] == [("elsa", 0.8), ("elsa-coupled", 0.5)]
    stayed = json.loads((source / "results.json").read_text())["results"]
    assert [r["method"] for r in stayed] == ["dense", "sparsegpt", "wanda"]
    kept = json.loads((history / "results.json").read_text())["results"]
    assert [r["command"] for r in kept] == [wiki["command"]] * 2
    assert sorted(p.name for p in (history / "cells").iterdir()) == ["elsa-0.8-32.json", "elsa-coupled-0.5.json"]
    assert sorted(p.name for p in (source / "cells").iterdir()) == ["dense-0.0.json", "sparsegpt-0.8.json"]
    assert "| elsa |" in (history / "results.md").read_text()
    assert "| elsa |" not in (source / "results.md").read_text()
    assert retire.retire(source, history, "ppl_sotu") == []
    assert len(json.loads((history / "results.json").read_text())["results"]) == 2


def test_every_committed_bench_cell_names_its_model_and_has_an_out_of_domain_perplexity():
    """Each table of bench results pairs WikiText-2 with State of the Union perplexity: a cell
    measured on one text only belongs in bench/results-history, not beside the others; and each
    row says which model it pruned (folders mix models)."""
    folders = [p.parent for p in (REPO / "bench").glob("results*/**/results.json") if "results-history" not in str(p)]
    assert folders, "no committed bench results found"
    lacking = [
        f"{folder.relative_to(REPO)}: {r['method']} @ {r['sparsity']} ({r.get('steps', '-')} steps)"
        for folder in folders
        for r in json.loads((folder / "results.json").read_text())["results"]
        if "error" not in r and ("ppl_sotu" not in r or "model" not in r)
    ]
    assert not lacking, "cells without ppl_sotu or model (rerun or bench/retire_cells.py them):\n" + "\n".join(lacking)
