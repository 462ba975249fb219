"""Built-in methods; each is an entry point of the `latentkit.methods` group in latentkit's pyproject.toml."""
