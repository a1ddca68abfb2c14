"""loss: divergences, their closed forms, the fused KD loss and the objective's terms.

Importing the package registers the built-in divergences (`distill.loss.divergences`) in
`distill.loss.registry.DIVERGENCES`, so the registry is complete whichever submodule is
imported first.
"""

from distill.loss import divergences as divergences  # registers the built-ins
