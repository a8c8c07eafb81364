"""The MLproject's thin layer: ``python -m entrypoints NAME ...`` runs the ``psydef NAME`` command.

MLflow runs a project's commands in the project's root, where this folder is importable; it is not
installed (the package ``entrypoints`` on PyPI keeps its name). The commands are generated from the
table of entry points in :mod:`psydef.cli`."""
