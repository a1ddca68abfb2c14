"""What the latent page draws of one run, from disk (`distill.report.latents`) or from the
toy simulation (`distill.report.latent_sim`)."""

from dataclasses import dataclass

import numpy as np


@dataclass
class RunStates:
    """One run's states of the chosen pair at each snapshot step."""

    name: str
    feature: bool  # trained projectors: `states` are projected (N, D_t); else raw student (N, D_s)
    steps: list[int]
    states: list[np.ndarray]
