"""Built-in methods; each sub-package registers itself with latentkit.registry."""
