"""Every option of every ``elsa`` command says what it does in ``--help``, not only its default.

The config-derived options take their text from the fields' descriptions in elsa/config.py, so a
field added without one shows up here as an option with an empty help.
"""

from __future__ import annotations

import argparse
import re

import pytest

from cli.main import make_parser
from elsa.config import PruneConfig

COMMANDS = ("prune", "eval", "tune", "compare", "sync")
_DEFAULT = re.compile(r"\(default: [^()]*(\([^()]*\)[^()]*)*\)")


def _subparser(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _what_it_says(help_text: str | None) -> str:
    """The help without its "(default: ...)" parts: what is left must describe the option."""
    return _DEFAULT.sub("", help_text or "").strip(" ;,.")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_a_help_that_is_more_than_its_default(command):
    parser = _subparser(command)
    bare = [
        "/".join(action.option_strings)
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
        if len(_what_it_says(action.help)) < 8
    ]
    assert not bare, f"elsa {command}: options without a description: {bare}"
    assert parser.format_help()  # every help string formats (a stray % would raise here)


def test_a_config_option_shows_its_field_description_and_default():
    text = " ".join(_subparser("prune").format_help().split())
    description = PruneConfig.model_fields["owl_m"].description
    assert f"{description} (default: 3.0)" in text


def test_the_check_catches_a_default_only_help():
    assert _what_it_says("(default: 'x')") == ""
    assert _what_it_says("(default: ['a', 'b'])") == ""
    assert _what_it_says("(default: (0.9, 0.95))") == ""
    assert _what_it_says("Adam's betas (default: (0.9, 0.95))") == "Adam's betas"
