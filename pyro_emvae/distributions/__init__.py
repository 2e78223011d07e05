"""Structured implicit-latent distributions: exact kernels for chains (and, later, trees)."""

from pyro_emvae.distributions.hmm import hmm_log_z, hmm_pairwise, log_space_log_z

__all__ = ["hmm_log_z", "hmm_pairwise", "log_space_log_z"]
