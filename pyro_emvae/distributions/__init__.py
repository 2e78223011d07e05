"""Structured implicit-latent distributions: exact kernels for chains and trees."""

from pyro_emvae.distributions.hmm import hmm_log_z, hmm_pairwise, log_space_log_z
from pyro_emvae.distributions.pcfg import (
    PCFG,
    pcfg_log_z,
    pcfg_marginals,
    pcfg_sample,
    pcfg_viterbi,
)

__all__ = [
    "PCFG",
    "hmm_log_z",
    "hmm_pairwise",
    "log_space_log_z",
    "pcfg_log_z",
    "pcfg_marginals",
    "pcfg_sample",
    "pcfg_viterbi",
]
