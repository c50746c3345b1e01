"""The scorers: how well a latent's description predicts where it fires, each method a `Scorer`
(`base`) working on the latent's held-out examples (`examples`).

- detection, fuzzing (delphi's classifiers, `classify`): balanced accuracy and AUC of the
  simulator's yes/no answers on activating and non-activating windows.
- simulation (OpenAI's all-at-once simulation, `simulation`): the Pearson correlation of predicted
  and true activations over every token.

`SCORERS` maps each method's name to its scorer, in the order the stage sends their requests:
every latent's detection prompts, then fuzzing, then simulation, one template at a time, so a
one-slot llama.cpp server keeps each prompt's few-shot prefix in its cache.
"""

from autointerp.interp.scorers.base import Scorer
from autointerp.interp.scorers.classify import Detection, Fuzzing
from autointerp.interp.scorers.simulation import Simulation

SCORERS: dict[str, Scorer] = {scorer.name: scorer for scorer in (Detection(), Fuzzing(), Simulation())}
