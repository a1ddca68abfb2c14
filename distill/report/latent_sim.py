"""The latent page's toy simulation (`distill latents --simulate`): no model, no run.

A frozen "teacher" representation: 5 classes, 120 points each, in 16-D (class centres
drawn at random, scale 3, unit Gaussian spread around them). Two simulated students over
11 checkpoints (steps 0, 100, ..., 1000), both deterministic (numpy seed 0):

- logit-only (width 12, no projector): it learns its OWN arrangement: the class
  information the outputs need (its own class centres, a far-from-isometric copy) plus a
  squashed (tanh) random view of the teacher's within-class detail; from a random
  start it converges to that, quickly. Its outputs could match the teacher's (the classes
  are separable), its geometry does not: a linear map lines up the class means, not the rest.
- feature KD (with a projector into the teacher's 16-D space): its projected states move
  from a random start onto the teacher's own states, rate 1 - exp(-step / 300).

The page treats them like real runs: the same PCA basis, ridge map and linear CKA.
"""

import numpy as np

from distill.report.run_states import RunStates

CLASSES, PER_CLASS, D_TEACHER, D_STUDENT = 5, 120, 16, 12
STEPS = list(range(0, 1001, 100))


def simulated(seed: int = 0) -> tuple[list[RunStates], np.ndarray, list[str], dict]:
    """(runs, teacher states, class per point, page metadata) of the toy simulation."""
    g = np.random.default_rng(seed)
    n = CLASSES * PER_CLASS
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    teacher = 3.0 * g.normal(size=(CLASSES, D_TEACHER))[labels] + g.normal(size=(n, D_TEACHER))

    # logit-only: its own class geometry (one class pushed far out: a different Gram matrix)
    own = g.normal(size=(CLASSES, D_STUDENT)) * np.array([[1.0], [1.0], [1.0], [1.0], [6.0]])
    detail = np.tanh(2.0 * (teacher - teacher[labels].mean(0)) @ g.normal(size=(D_TEACHER, D_STUDENT)) / 4.0)
    logit_final = 3.0 * own[labels] + 1.5 * detail + 0.3 * g.normal(size=(n, D_STUDENT))
    logit_start = g.normal(size=(n, D_STUDENT)) * 2.0
    # feature KD: projected states, from a random projection of a random student onto the teacher
    feature_start = g.normal(size=(n, D_STUDENT)) @ g.normal(size=(D_STUDENT, D_TEACHER))
    jitter = g.normal(size=(n, D_TEACHER))

    logit, feature = [], []
    for step in STEPS:
        a_fast, a = 1.0 - np.exp(-step / 150.0), 1.0 - np.exp(-step / 300.0)
        logit.append((1.0 - a_fast) * logit_start + a_fast * logit_final)
        feature.append((1.0 - a) * feature_start + a * teacher + 0.15 * (1.0 - a) * jitter)
    runs = [
        RunStates("simulated, width 12", False, STEPS, logit),
        RunStates("simulated, projector", True, STEPS, feature),
    ]
    classes = [f"class {c}" for c in labels]
    meta = {
        "simulated": True,
        "title": "Simulation: logit-only vs feature KD in the teacher's latent space",
        "pair": f"a simulated {D_TEACHER}-D teacher layer (no model was run)",
        "class_rule": f"the simulated class of each point ({CLASSES} classes, {PER_CLASS} points each)",
    }
    return runs, teacher, classes, meta
