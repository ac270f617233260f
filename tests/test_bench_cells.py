"""The bench's own logic: a preset cell is the defaults plus the preset's entry, as `elsa prune --preset`
builds it, the search-value summary charges the search's compute to the tuned cell only, and the
headline table picks its rows by rule."""

from __future__ import annotations

import argparse
import json
import importlib.util
from pathlib import Path

import pytest
import yaml

from elsa.config import make_config
from elsa.presets import write_preset_file

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(argv: list[str]) -> argparse.Namespace:
    return _load("run_bench")._parse_args(["--model", "smollm2-135m", *argv])


def test_preset_cell_is_the_defaults_plus_the_entry_nearest_in_sparsity(tmp_path):
    run_bench = _load("run_bench")
    found = {"lr": 2.5e-4, "rho": 0.004, "rho_final": 0.04, "rho_schedule": "cosine", "interval": 4}
    path = write_preset_file(
        tmp_path / "p.yaml",
        [
            {"model": "smollm2-135m", "sparsity": 0.8, "config": found},
            {"model": "smollm2-135m", "sparsity": 0.9, "config": {"lr": 1e-5}},
        ],
    )
    args = _args(["--steps", "300", "--preset", str(path)])
    defaults = run_bench.cell_config("elsa", 0.78, args)
    tuned = run_bench.cell_config("elsa-preset", 0.78, args)
    assert {k: v for k, v in tuned.items() if k not in found and k != "preset"} == defaults
    assert {k: tuned[k] for k in found} == found and tuned["preset"] == "p.yaml:smollm2-135m@0.8"
    cfg = make_config(tuned)  # what the cell's process validates and runs
    assert cfg.lr == 2.5e-4 and cfg.rho_schedule == "cosine" and cfg.steps == 300 and cfg.penalty == "decoupled"
    paper = run_bench.cell_config("elsa-preset", 0.7, _args(["--steps", "300", "--preset", "paper"]))
    assert paper["lr"] == 1e-4 and paper["preset"] == "paper:facebook/opt-125m@0.7"  # Table 5's settings ...
    assert (paper["steps"], paper["seqlen"], paper["batch_size"]) == (300, 256, 2)  # ... on the bench's budget
    with pytest.raises(SystemExit, match="needs --preset"):
        run_bench.cell_config("elsa-preset", 0.8, _args(["--steps", "300"]))


def test_search_value_charges_the_search_to_the_tuned_cell_only():
    tune_value = _load("tune_value")
    cell = {"prune_s": 700.0, "init_s": 100.0, "steps": 300, "lr": 6e-4, "ppl_wikitext2-bundled": 160.0}
    assert tune_value.seconds_a_step(cell) == pytest.approx(2.0)
    result = {
        "model": "m",
        "sparsity": 0.8,
        "search": {
            "command": "python -m cli tune",
            "wall_s": 1200.0,
            "init_s": 100.0,
            "trials": {"trials_completed": 3},
            "parent_run_id": "p",
            "seeds": [{"source": "rule:steps=64", "outcome": "completed", "val_loss_projected": 4.9}],
            "best": {"trial_id": "t1", "config": {"lr": 1e-3}, "val_loss_projected": 4.8},
        },
        "cells": {
            "(a) defaults": {**cell, "bench_command": "a"},
            "(b) best": {**cell, "bench_command": "b"},
            "(c) longer": {**cell, "steps": 900, "prune_s": 1900.0, "bench_command": "c"},
        },
    }
    rows = [line for line in tune_value.summary_lines(result) if line.startswith("| (")]
    assert [row.rsplit("|", 2)[-2].strip() for row in rows] == ["700", "1900", "1900"]


def test_a_search_winner_is_shipped_only_where_it_beats_the_defaults_at_the_budget(tmp_path):
    from elsa.presets import tuned_preset

    tune_value = _load("tune_value")
    table = tmp_path / "tuned.yaml"
    table.write_text("# header kept\npresets: []\n")
    cell = {"steps": 300, "ppl_wikitext2-bundled": 160.0}
    search = {"command": "python -m cli tune", "parent_run_id": "p", "trials": {"trials_completed": 8}}
    search |= {"trial_steps": 64, "wall_s": 1500.0, "seeds": []}
    search["best"] = {"config": {"lr": 1e-3}, "val_loss_projected": 4.8}
    result = {"model": "m", "sparsity": 0.8, "search": search}
    result["cells"] = {}  # --search-only with a sampled winner: nothing measured at the budget yet
    assert "without --search-only" in tune_value.promote(result, tmp_path, table)
    result["cells"] = {"a": cell, "b": {**cell, "ppl_wikitext2-bundled": 170.0}, "c": {**cell, "steps": 900}}
    assert "the rule kept" in tune_value.promote(result, tmp_path, table)  # measured, lost: the rule stands
    (kept,) = yaml.safe_load(table.read_text())["presets"]
    assert kept["config"] == {} and kept["rejected"] == {"lr": 1e-3}
    assert kept["measured"]["wikitext2"]["tuned"] == 170.0
    assert "lost to it at 300 steps" in tuned_preset("m", 0.8, [kept])["preset"]
    assert tuned_preset("m", 0.8, [kept]).keys() == {"preset"}
    result["cells"]["b"] = {**cell, "ppl_wikitext2-bundled": 150.0}
    assert tune_value.promote(result, tmp_path, table).startswith("promoted")
    entries = yaml.safe_load(table.read_text())["presets"]
    assert table.read_text().startswith("# header kept") and len(entries) == 1
    assert entries[0]["measured"]["wikitext2"] == {"defaults": 160.0, "tuned": 150.0, "defaults_longer": 160.0}
    assert "sotu" not in entries[0]["measured"]  # a measure the cells lack is not invented
    result["cells"]["b"] |= {"ppl_sotu": 120.0, "final_val_loss_projected": 4.5}
    result["cells"]["a"] = {**cell, "ppl_sotu": 130.0, "final_val_loss_projected": 4.6}
    tune_value.promote(result, tmp_path, table)
    measured = yaml.safe_load(table.read_text())["presets"][0]["measured"]
    assert measured["sotu"] == {"defaults": 130.0, "tuned": 120.0, "defaults_longer": None}  # (c) lacks sotu
    assert measured["held_out"] == {"defaults": 4.6, "tuned": 4.5, "defaults_longer": None}
    assert tuned_preset("m", 0.8, entries)["lr"] == 1e-3
    del result["cells"]["c"]  # --skip-longer: promoted on (a) and (b), the longer run recorded as not run
    tune_value.promote(result, tmp_path, table)
    measured = yaml.safe_load(table.read_text())["presets"][0]["measured"]
    assert measured["wikitext2"]["defaults_longer"] is None and measured["defaults_longer_steps"] is None
    # the rule's own seed won at 0.9: recorded without overrides, whatever the cells
    rule = {"kind": "rule", "source": "rule:steps=64", "val_loss_projected": 4.8, "outcome": "completed"}
    result |= {"sparsity": 0.9, "search": {**search, "seeds": [rule]}, "cells": {}}
    assert "the budget rule won" in tune_value.promote(result, tmp_path, table)
    entries = yaml.safe_load(table.read_text())["presets"]
    assert [(e["sparsity"], e["config"]) for e in entries] == [(0.8, {"lr": 1e-3}), (0.9, {})]


def test_cells_from_different_starts_are_not_compared(tmp_path):
    tune_value = _load("tune_value")
    config = {"model": "smollm2-135m", "sparsity": 0.9, "steps": 300, "seqlen": 256, "seed": 0}
    defaults = {"config": config, "init_val_loss": 8.78, "steps": 300, "prune_s": 850.0, "bench_command": "a"}
    defaults["ppl_wikitext2-bundled"] = 497.0
    tuned = {**defaults, "config": {**config, "lr": 8e-4, "interval": 2}, "init_val_loss": 9.47}
    tuned["ppl_wikitext2-bundled"] = 450.0  # better, but from another start: not evidence
    assert "different one-shot starts" in tune_value.start_mismatch(defaults, tuned)
    assert tune_value.start_mismatch(defaults, {**tuned, "init_val_loss": 8.78}) is None
    uniform = {**tuned, "config": {**tuned["config"], "allocation": "uniform"}}
    assert tune_value.start_mismatch(defaults, uniform) is None  # a start setting: starts differ by design
    table = tmp_path / "tuned.yaml"
    table.write_text("presets: []\n")
    search = {"command": "c", "parent_run_id": "p", "trials": {}, "trial_steps": 64, "wall_s": 1.0, "seeds": []}
    search["best"] = {"trial_id": "t", "config": {"lr": 8e-4}, "val_loss_projected": 6.0}
    result = {"model": "smollm2-135m", "sparsity": 0.9, "search": search, "cells": {"a": defaults, "b": tuned}}
    assert "different one-shot starts" in tune_value.promote(result, tmp_path, table)
    assert yaml.safe_load(table.read_text())["presets"] == []
    assert any(
        "different one-shot starts" in line
        for line in tune_value.summary_lines({**result, "search": {**search, "init_s": 1.0, "seeds": []}})
    )


def test_cells_of_different_machines_are_not_compared(tmp_path):
    tune_value = _load("tune_value")
    config = {"model": "gemma3-270m", "sparsity": 0.8, "steps": 300, "seqlen": 256, "seed": 0}
    defaults = {"config": config, "init_val_loss": 5.78, "steps": 300, "prune_s": 950.0, "bench_command": "a"}
    defaults.update({"ppl_wikitext2-bundled": 138.0, "cpu": "Intel Xeon", "torch_threads": 2})
    tuned = {**defaults, "config": {**config, "allocation": "uniform"}, "init_val_loss": 5.5}
    tuned["ppl_wikitext2-bundled"] = 132.0
    amd = {**tuned, "cpu": "AMD EPYC"}
    assert tune_value.start_mismatch(defaults, tuned) is None  # one machine; the start differs by design
    assert "different machines" in tune_value.start_mismatch(defaults, amd)
    assert "different machines" in tune_value.start_mismatch(defaults, {**tuned, "torch_threads": 1})
    older = {k: v for k, v in amd.items() if k != "cpu"}  # cells from before the machine was recorded
    assert tune_value.machine_mismatch(defaults, older) is None
    search = {"command": "c", "parent_run_id": "p", "trials": {}, "trial_steps": 64, "wall_s": 1.0, "seeds": []}
    search["best"] = {"trial_id": "t", "config": {"allocation": "uniform"}, "val_loss_projected": 4.8}
    longer = {**defaults, "cpu": "AMD EPYC", "steps": 1000, "ppl_wikitext2-bundled": 100.0}
    cells = {"a": defaults, "b": tuned, "c": longer}
    result = {"model": "gemma3-270m", "sparsity": 0.8, "search": search, "cells": cells}
    entry = tune_value.tuned_entry(result, tmp_path)
    assert entry["config"] == {"allocation": "uniform"}  # (a) and (b) agree on the machine
    assert entry["measured"]["wikitext2"]["defaults_longer"] is None  # (c) ran elsewhere: not shown as its rival
    assert any(
        "different machines" in line
        for line in tune_value.summary_lines({**result, "search": {**search, "init_s": 1.0}})
    )
    line = _load("bench_report").machines_line([defaults, tuned, amd, older])
    assert line == "Machines (cells): Intel Xeon, 2 threads (2); AMD EPYC, 2 threads (1); not recorded (1)"


def test_decode_speed_merge_lists_only_the_earlier_runs_that_still_own_a_cell(tmp_path):
    decode_speed = _load("decode_speed")

    def run(command: str, cells: list[tuple]) -> dict:
        measured = [{"model": m, "sparsity": s, "threads": t, "run": command} for m, s, t in cells]
        return {"command": command, "loadavg_before": [0.1], "loadavg_after": [0.2], "cells": measured}

    path = tmp_path / "speed.json"
    first = run("first", [("smollm2", 0.8, 1), ("smollm2", 0.9, 1)])
    path.write_text(json.dumps(first))
    second = decode_speed.merge(run("second", [("smollm2", 0.9, 1)]), path)
    assert [r["command"] for r in second["earlier_runs"]] == ["first"]  # it still owns the 0.8 cell
    path.write_text(json.dumps(second))
    third = decode_speed.merge(run("third", [("smollm2", 0.8, 1), ("smollm2", 0.9, 1)]), path)
    assert third["earlier_runs"] == [] and {c["run"] for c in third["cells"]} == {"third"}
    legacy = {**first, "cells": [{k: v for k, v in c.items() if k != "run"} for c in first["cells"]]}
    path.write_text(json.dumps(legacy))
    kept = decode_speed.merge(run("fourth", [("smollm2", 0.9, 1)]), path)
    assert [r["command"] for r in kept["earlier_runs"]] == ["first"]  # an untagged cell: its run is kept


def test_headline_picks_the_best_one_shot_the_short_run_and_the_best_run_within_the_hour():
    """The README's headline rows: the one-shot method with the lowest WikiText-2 perplexity,
    ELSA at 32 steps, and the best longer ELSA run under an hour, taken from the zero-shot
    directory (which carries accuracies) before the perplexity-only one."""
    headline = _load("headline")
    wiki = headline.WIKI

    def cell(method, ppl, prune_s=100.0, **extra):
        return {"method": method, "sparsity": 0.8, wiki: ppl, "prune_s": prune_s, **extra}

    zero_shot = [cell("sparsegpt", 580.0, zero_shot_avg=0.36), cell("elsa", 300.0, steps=300)]
    perplexity_only = [
        cell("wanda", 630.0),
        cell("sparsegpt", 575.0),
        cell("magnitude", 9e5),
        cell("elsa", 220.0, steps=32),
        cell("elsa", 150.0, steps=600, prune_s=3000.0),  # better, but not in the zero-shot directory
        cell("elsa", 140.0, steps=1800, prune_s=4000.0),  # over the hour
    ]
    cells = [("zs", r) for r in zero_shot] + [("ppl", r) for r in perplexity_only]
    rows = headline.pick_rows(cells, 0.8)
    assert [(label, d, r[wiki]) for label, d, r in rows] == [
        ("sparsegpt", "zs", 580.0),  # SparseGPT is the best one-shot method; its zero-shot cell is shown
        ("ELSA, 32 steps", "ppl", 220.0),
        ("ELSA, 300 steps", "zs", 300.0),
    ]
    rows = headline.pick_rows([c for c in cells if c[0] == "ppl"], 0.8)
    assert rows[-1][0] == "ELSA, 600 steps" and rows[0][2][wiki] == 575.0
    assert headline.pick_rows(cells, 0.5) == []


def test_the_zero_shot_table_says_how_many_examples_each_task_scored():
    """A limit of 1000 scores all 570 of ARC-easy's validation examples: the table gives the counts
    the cells recorded, and the limit only for cells from before those counts."""
    report = _load("bench_report")
    cell = {"method": "elsa", "sparsity": 0.7, "steps": 32, "zero_shot_avg": 0.3, "zero_shot_limit": 1000}
    cell |= {"acc_arc_easy": 0.38, "acc_hellaswag": 0.3, "zero_shot_n": {"arc_easy": 570, "hellaswag": 1000}}
    header = report._zero_shot_lines([cell, {**cell, "method": "sparsegpt"}])[1]
    assert "examples scored: arc_easy 570, hellaswag 1000;" in header
    older = {k: v for k, v in cell.items() if k != "zero_shot_n"} | {"zero_shot_limit": 200}
    assert "examples scored: 200 a task;" in report._zero_shot_lines([older])[1]


def test_the_readme_shows_the_headline_table_of_the_committed_results():
    """The README's "Results at a glance" is bench/headline.py's table over the committed cells
    (without the file column): a new cell that changes a row fails here until the README follows."""
    headline = _load("headline")
    readme = (BENCH.parent / "README.md").read_text(encoding="utf-8")
    rows = ["|".join(line.split("|")[:-2]) + "|" for line in headline.table((0.7, 0.8, 0.9)).splitlines()]
    assert len(rows) > 10
    missing = [row for row in rows if row not in readme]
    assert not missing, f"README's glance table differs from `python bench/headline.py`: {missing}"


def test_the_budget_curve_reads_several_folders_each_cell_once(tmp_path):
    """An hour cell written to another folder joins the curve; a cell both folders hold is the
    first folder's, and the table says where each row came from."""
    curve = _load("budget_curve")
    cell = {"sparsity": 0.8, "prune_s": 100.0, "ppl_wikitext2-bundled": 200.0, "allocation": "owl", "lr": 6e-4}
    first, second = tmp_path / "results", tmp_path / "results-zeroshot"
    for folder, rows in {
        first: [
            {**cell, "method": "elsa", "steps": 32},
            {**cell, "method": "sparsegpt", "ppl_wikitext2-bundled": 999.0},
        ],
        second: [
            {**cell, "method": "elsa", "steps": 32, "ppl_wikitext2-bundled": 201.0},
            {**cell, "method": "elsa", "steps": 1300, "prune_s": 3205.0},
        ],
    }.items():
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"results": rows}))
    merged = curve.merged_results([first, second])
    assert [(r["method"], r.get("steps"), r["ppl_wikitext2-bundled"], r["folder"]) for r in merged] == [
        ("elsa", 32, 200.0, "results"),
        ("sparsegpt", None, 999.0, "results"),
        ("elsa", 1300, 200.0, "results-zeroshot"),
    ]
    rows = curve.curve_rows(merged, 0.8)
    assert [r.get("steps") for r in rows] == [None, 32, 1300]
    assert curve.table(rows, None).splitlines()[-1].endswith("| CPU not recorded | results-zeroshot |")


def test_the_budget_curve_draws_each_machine_on_its_own_line():
    """Wall seconds of two CPUs are not one curve: the same settings on another machine are
    another line, and the table names each cell's CPU."""
    curve = _load("budget_curve")
    cell = {"method": "elsa", "sparsity": 0.8, "allocation": "owl", "train_embeddings": False, "lr": 6e-4}
    amd, intel = {**cell, "steps": 1300}, {**cell, "steps": 1700, "cpu": "Intel(R) Xeon(R) Processor"}
    assert curve._curve(amd) != curve._curve(intel)
    assert curve._curve(amd) == curve._curve({**cell, "steps": 32})
    table = curve.table([{**r, "prune_s": 1.0, "ppl_wikitext2-bundled": 2.0} for r in (amd, intel)], 1.0)
    assert "| Intel(R) Xeon(R) Processor |" in table.splitlines()[-1]


def test_a_cell_records_the_rules_warm_up_and_the_curve_keeps_both_runs_of_one_length(tmp_path):
    """The rule's lr warm-up (c9ad3c9) changes a long run's result: the cell says how many steps it
    warmed up, and a run with it and one without, at the same steps, are two points on two lines."""
    fields = _load("run_one")._elsa_fields
    config = {"model": "smollm2-135m", "method": "elsa", "sparsity": 0.8}
    assert fields(make_config(config, {"steps": 1700}), {})["warmup_steps"] == 170
    assert fields(make_config(config, {"steps": 32}), {})["warmup_steps"] == 0
    curve = _load("budget_curve")
    cell = {"method": "elsa", "sparsity": 0.8, "steps": 1700, "prune_s": 1.0, "ppl_wikitext2-bundled": 2.0}
    for name, row in {"new": {**cell, "warmup_steps": 170}, "old": cell}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"results": [row]}))
    merged = curve.merged_results([tmp_path / "new", tmp_path / "old"])
    assert [r["folder"] for r in merged] == ["new", "old"]
    assert curve._curve(merged[0]) != curve._curve(merged[1])
    assert [line.split(" | ")[5] for line in curve.table(merged, None).splitlines()[2:]] == ["10%", "0%"]


def test_promotion_over_several_seeds_reads_the_means():
    """A setting that wins at seed 0 and loses on average over three seeds is not shipped."""
    tune_value = _load("tune_value")
    search = {"command": "c", "parent_run_id": "p", "trials": {}, "trial_steps": 300, "wall_s": 1.0, "seeds": []}
    search |= {"init_s": 1.0, "best": {"trial_id": "t", "config": {"lr": 1.2e-3}, "val_loss_projected": 4.5}}

    def pair(seed, defaults, tuned):
        config = {"model": "smollm2-135m", "sparsity": 0.8, "seed": seed}
        base = {"steps": 300, "config": config, "init_val_loss": 6.8 + seed, "final_val_loss_projected": 4.7}
        base |= {"prune_s": 600.0, "bench_command": f"seed {seed}"}
        return {**base, "ppl_wikitext2-bundled": defaults}, {**base, "ppl_wikitext2-bundled": tuned}

    cells, seed_pairs = {}, {}
    for seed, values in [(0, (166.0, 160.0)), (1, (156.0, 171.0)), (2, (160.0, 162.0))]:
        names = (f"a{seed}", f"b{seed}")
        cells.update(zip(names, pair(seed, *values)))
        seed_pairs[seed] = names
    result = {"model": "m", "sparsity": 0.8, "search": search, "cells": cells, "seed_pairs": seed_pairs}
    assert tune_value.longer_cells(result) == []
    entry = tune_value.tuned_entry(result, Path("/tmp"))
    assert entry["config"] == {} and entry["rejected"] == {"lr": 1.2e-3}  # seed 0 alone would have shipped it
    wikitext2 = entry["measured"]["wikitext2"]
    assert wikitext2["defaults"] == pytest.approx(482 / 3) and wikitext2["tuned"] == pytest.approx(493 / 3)
    assert wikitext2["per_seed"] == {"defaults": [166.0, 156.0, 160.0], "tuned": [160.0, 171.0, 162.0]}
    assert entry["measured"]["cell_seeds"] == [0, 1, 2]
    cells["b1"]["ppl_wikitext2-bundled"] = 150.0
    assert tune_value.tuned_entry(result, Path("/tmp"))["config"] == {"lr": 1.2e-3}
    assert any(line.startswith("Means over the 3 seeds") for line in tune_value.summary_lines(result))


def test_a_bench_folder_holds_one_seeds_and_one_calibration_texts_cells():
    """A rerun with another --seed or --data must not take the finished cell of seed 0 or of the
    default calibration text for its own; --data defaults to elsa's own default."""
    run_bench = _load("run_bench")
    finished = [{"method": "elsa", "config": {"seed": 0}}]
    assert run_bench.other_setting(finished, "elsa", "seed", 1, 0) == 0
    assert run_bench.other_setting(finished, "elsa", "seed", 0, 0) is None
    assert run_bench.other_setting([{"method": "elsa", "config": {}}], "elsa", "seed", 2, 0) == 0  # older cells: seed 0
    assert run_bench.other_setting([{"method": "dense", "config": {"seed": 0}}], "dense", "seed", 1, 0) is None
    older = [{"method": "sparsegpt", "config": {"seed": 0}}]  # before --data: the default text
    assert run_bench.other_setting(older, "sparsegpt", "data", "sotu", "enwiki-sample") == "enwiki-sample"
    assert run_bench.other_setting(older, "sparsegpt", "data", "enwiki-sample", "enwiki-sample") is None
    assert run_bench.cell_config("sparsegpt", 0.8, _args([]))["data"] == "enwiki-sample"
    assert run_bench.cell_config("elsa", 0.8, _args(["--data", "sotu"]))["data"] == "sotu"


@pytest.mark.parametrize(("sparsity", "steps"), [(0.7, 1100), (0.8, 1100), (0.9, 1500)])
def test_the_distillation_hour_cells_are_the_rules_cells(sparsity, steps):
    """The one-hour distillation cells of 2026-12-07 ran as presets (the rule plus ``loss: ntp+kd``);
    since the rule distils from 1,000 steps on, each resolves to what ``elsa prune --sparsity S
    --steps N`` runs, so the README reports them as the defaults' cells."""
    run_bench = _load("run_bench")
    preset = BENCH / "results-hour" / "smollm2-135m-intel-kd" / "presets-kd.yaml"
    args = _args(["--steps", str(steps), "--preset", str(preset)])
    as_preset = make_config(run_bench.cell_config("elsa-preset", sparsity, args))
    as_rule = make_config(run_bench.cell_config("elsa", sparsity, args))
    assert as_preset.loss == "ntp+kd" and as_preset.preset.startswith("presets-kd.yaml")  # its label ...
    assert as_preset.model_dump(exclude={"preset"}) == as_rule.model_dump(exclude={"preset"})  # ... alone differs
    short = make_config(run_bench.cell_config("elsa", sparsity, _args(["--steps", "300"])))
    assert short.loss == "ntp"  # below KD_STEPS the rule trains on next-token


def test_the_budget_curve_draws_each_loss_on_its_own_line(tmp_path):
    """A distilled cell and a next-token cell of the same length are two points on two lines;
    cells from before the ``loss`` field trained on next-token."""
    curve = _load("budget_curve")
    cell = {"method": "elsa", "sparsity": 0.8, "steps": 1100, "prune_s": 1.0, "ppl_wikitext2-bundled": 2.0}
    kd, old = {**cell, "loss": "ntp+kd"}, cell
    assert curve._curve(kd) != curve._curve(old) == curve._curve({**cell, "loss": "ntp"})
    for name, row in {"kd": kd, "old": old}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"results": [row]}))
    merged = curve.merged_results([tmp_path / "kd", tmp_path / "old"])
    assert [r["folder"] for r in merged] == ["kd", "old"]
    assert "| ntp+kd |" in curve.table(merged, 1.0).splitlines()[2]
    preset = {**kd, "method": "elsa-preset"}  # on the curve, on a line of its own
    assert curve.curve_rows([preset, kd], 0.8) == [preset, kd] and curve._curve(preset) != curve._curve(kd)
