"""The ``elsa`` command line, on top of the layers it drives (``elsa`` <- ``pipelines`` <- ``tune``).

:mod:`cli.main` builds one parser from the subcommands each layer declares
(:func:`pipelines.cli.add_commands`, :func:`tune.cli.add_command`) and turns any failure into
one line and an exit code.
"""
