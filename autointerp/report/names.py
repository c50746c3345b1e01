"""Names the report's modules share: the score methods and the SAE metrics plotted on the index.

A leaf: it imports nothing, so read.py, views.py and plots.py share these without a cycle
(read.py imports sae.py, which imports plots.py).
"""

from __future__ import annotations

SCORE_NAMES = ("simulation", "detection", "fuzzing")
# SAE metrics plotted on the index, with the metrics.json key spellings we accept.
SAE_METRICS = {
    "FVU": ("fvu", "fraction_variance_unexplained"),
    "L0": ("l0", "mean_l0"),
    "dead fraction": ("dead_fraction", "dead_frac", "frac_dead", "dead_latents_fraction"),
    "delta CE": ("delta_ce", "ce_delta", "ce_loss_delta", "delta_ce_loss", "ce_increase"),
}
