"""The typer command-line app (thin: parses, loads config, calls the library)."""
