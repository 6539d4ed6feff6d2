"""Continual learning, day by day, the way the MoNIM paper runs it (the demo's experiment).

A small LM is trained on day 0 (or a local Hugging Face LM is taken as it is). Then each
day's training text arrives and five arms learn from it:
  frozen              the LM as it was after day 0, no memory
  knnlm               the frozen LM + a kNN-LM memory: reads the day with admission (log p < -0.8);
                      values are not used, p = lambda p_kNN + (1 - lambda) p_LM
  monim               the frozen LM + a MoNIM layer: reads the day with admission and trains the
                      memory (value rows on the store; T, lambda and the adaptive gate here) on it;
                      its output mixes p_kNN of the same neighbours too (values and tokens at once)
  monim_fixed_values  the ablation of monim: the same layer on the same entries (monim's admitted
                      rows), the same batches and steps, with the values fixed at their
                      initialization (the layer's train_values=False); the rest trains as in monim
  finetune            the LM itself fine-tuned on the day's text (the forgetting baseline)
After each day every arm is evaluated on the held-out text of every day seen so far.
Day 0 is read by the memory arms too, so the memory holds what the model found hard there.

Modules: config.py (ContinualConfig, the arms, tokenizers), arms.py (how each arm learns; the
memory arms' lockstep), run.py (a seed's run, several seeds, mean and spread), report.py
(tables and the plot), sweep.py (fast experiments: the memory arms only, in-process, from a cached
day-0 LM). The demo (model_client/demo.py) runs it through the store's service.
"""

from monim.model_client.continual.arms import MemoryArm, MirroredAdds, learn_day, perplexity, train_lm
from monim.model_client.continual.config import (
    ARMS,
    MEMORY_ARMS,
    ByteTokenizer,
    ContinualConfig,
    HFTokenizer,
)
from monim.model_client.continual.report import format_day, plot, summary
from monim.model_client.continual.run import aggregate, run_continual, run_seeds

__all__ = ["ARMS", "MEMORY_ARMS", "ByteTokenizer", "ContinualConfig", "HFTokenizer", "MemoryArm",
           "MirroredAdds", "aggregate", "format_day", "learn_day", "perplexity", "plot", "run_continual", "run_seeds",
           "summary", "train_lm"]
