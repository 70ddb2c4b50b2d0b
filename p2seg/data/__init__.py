"""Point-supervised datasets, semantic pseudo-label sources, mappers and training targets.

Each line below is owned by one module; importing the package registers the built-in datasets.
"""
