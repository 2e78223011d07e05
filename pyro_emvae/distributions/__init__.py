"""Structured implicit-latent distributions: exact kernels for chains, alignments and trees."""

from pyro_emvae.distributions.ctc import (
    CTC,
    collapse,
    ctc_lattice,
    ctc_log_z,
    ctc_occupancy,
    ctc_sample,
    ctc_viterbi,
    frame_posterior,
)
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
from pyro_emvae.distributions.pcfg import (
    PCFG,
    pcfg_log_z,
    pcfg_marginals,
    pcfg_sample,
    pcfg_viterbi,
)

__all__ = [
    "CTC",
    "PCFG",
    "ChainParts",
    "ChainPosterior",
    "HomogeneousHMM",
    "chain_log_z",
    "chain_posterior",
    "collapse",
    "ctc_lattice",
    "ctc_log_z",
    "ctc_occupancy",
    "ctc_sample",
    "ctc_viterbi",
    "frame_posterior",
    "hmm_log_z",
    "hmm_pairwise",
    "log_space_log_z",
    "pcfg_log_z",
    "pcfg_marginals",
    "pcfg_sample",
    "pcfg_viterbi",
]
