"""`python -m bertopt` is the `bertopt` command."""

from bertopt.cli import main

main()
