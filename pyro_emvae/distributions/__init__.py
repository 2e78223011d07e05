"""Structured implicit-latent distributions: exact kernels for chains (and, later, trees)."""

from pyro_emvae.distributions.hmm import (
    ChainParts,
    ChainPosterior,
    HomogeneousHMM,
    chain_log_z,
    chain_posterior,
    hmm_log_z,
    hmm_pairwise,
    log_space_log_z,
)

__all__ = [
    "ChainParts",
    "ChainPosterior",
    "HomogeneousHMM",
    "chain_log_z",
    "chain_posterior",
    "hmm_log_z",
    "hmm_pairwise",
    "log_space_log_z",
]
