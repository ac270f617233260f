"""Python helpers that the HellaSwag and WinoGrande task templates call through ``!function``.

Why Python and not Jinja: HellaSwag's endings need the same clean-up as its context (a list
transformed element by element), and WinoGrande is scored with one context per option, which
lm-eval only supports when ``doc_to_text`` returns the gold index as an int. Both reproduce the
behaviour of lm-eval's stock tasks so that local scores stay comparable with published ones.
This file is loaded by lm-eval from its path (next to the templates), so it imports nothing from
the project.
"""

from __future__ import annotations

import re

_BRACKETED = re.compile(r"\[.*?\]")


def _clean_hellaswag(text: str) -> str:
    """Strip WikiHow markup: ``[title]`` starts a new sentence, other ``[...]`` tags go."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    context = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()}"
    return {
        "query": _clean_hellaswag(f"{doc['activity_label']}: {context}"),
        "endings_clean": [_clean_hellaswag(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_docs(dataset):
    """Add ``query``, ``endings_clean`` and integer ``gold`` to every HellaSwag document."""
    return dataset.map(_hellaswag_doc)


def _blank(doc: dict) -> int:
    position = doc["sentence"].find("_")
    if position < 0:
        raise ValueError(f"WinoGrande sentence has no blank '_': {doc['sentence']!r}")
    return position


def winogrande_gold(doc: dict) -> int:
    """Index of the right option (the data stores ``"1"`` or ``"2"``)."""
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to the blank, once with each option filled in."""
    head = doc["sentence"][: _blank(doc)]
    return [head + doc["option1"], head + doc["option2"]]


def winogrande_continuation(doc: dict) -> str:
    """The words after the blank: the part whose likelihood decides between the options."""
    return doc["sentence"][_blank(doc) + 1 :].strip()
