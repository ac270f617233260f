"""``elsa``: one parser over the pipeline's commands and ``elsa tune``; exit codes 0 / 1 / 2 / 130."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

# argparse reads "-1e-3" or "-inf" after an option as another option ("expected one argument"),
# so the value never reaches the validator that would say what is wrong with it.
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser for which every negative number, exponents included, is a value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NUMBER


def make_parser() -> argparse.ArgumentParser:
    from pipelines.cli import add_commands
    from tune.cli import add_command as add_tune

    parser = _Parser(prog="elsa", description="Prune LLMs to extreme sparsity with ELSA (surrogate-free ADMM) on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_commands(commands)
    add_tune(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a runtime failure, 2 a usage error (argparse's code for bad arguments)."""
    from elsa.config import ConfigError
    from pipelines.run.errors import one_line

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    args.command_line = "elsa " + shlex.join(argv)  # as typed, for the model card
    if args.command in ("prune", "eval", "tune"):  # a search's own progress is Tune's table
        from pipelines.run.quiet import configure

        configure(verbose=args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("elsa: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback is in the logs / MLflow tag
        if os.environ.get("ELSA_DEBUG"):
            raise
        print(f"elsa: error: {one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
