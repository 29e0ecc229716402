"""An example of bertopt passes in a package of their own (see pyproject.toml's entry point)."""
