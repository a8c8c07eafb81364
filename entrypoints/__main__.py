from psydef.cli import cli

cli()
