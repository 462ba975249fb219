"""`python -m latentkit ...` (what `accelerate launch -m latentkit train ...` runs)."""

from latentkit.cli.app import main

main()
