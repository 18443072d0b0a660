"""Comparing base models: top-r subspaces of weights (cached), their chance-normalised similarity, and which
target layers may receive which source layer."""
