"""``dpo``: real DPO fine-tuning with TRL's ``DPOTrainer``, the candidate replacing the loss.

Modules: :mod:`~fitness.dpo.plugin` (the plug-in), :mod:`~fitness.dpo.settings` (options and
presets), :mod:`~fitness.dpo.data` (preference data), :mod:`~fitness.dpo.trainer` (the TRL
subclass), :mod:`~fitness.dpo.reference_cache`, :mod:`~fitness.dpo.scorers`,
:mod:`~fitness.dpo.mtbench`, :mod:`~fitness.dpo.tiny`, and the multi-process path:
:mod:`~fitness.dpo.launcher` (runs ``accelerate launch`` from the evaluation worker) and
:mod:`~fitness.dpo.rank` (the per-rank entry point). Importing this package does not
import TRL or transformers; evaluating does.
"""
from fitness.dpo.plugin import DPOFitness
from fitness.dpo.settings import PRESETS, DPOSettings

__all__ = ["DPOFitness", "DPOSettings", "PRESETS"]
