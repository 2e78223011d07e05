"""Structured implicit-latent distributions: exact kernels for chains and alignments."""

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
from pyro_emvae.distributions.hmm import hmm_log_z, hmm_pairwise, log_space_log_z

__all__ = [
    "CTC",
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
]
