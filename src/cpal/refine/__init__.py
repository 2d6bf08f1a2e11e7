"""Refinement of localisation maps into pseudo masks (dense CRF, IRN, random walk)."""
