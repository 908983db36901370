"""`python -m etl` is the `etl` command."""

from .cli import main

main()
