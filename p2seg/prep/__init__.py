"""Offline derivations of training inputs (the ``p2seg-*`` data commands in :mod:`p2seg.cli` wrap
them): seeded degradation of true masks into a semantic source of known quality, Otsu foreground
of one-class images, one point per mask or box."""
