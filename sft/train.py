"""The entry point experiment scripts import (`from sft.train import main`). The trainer lives in:

- sft.run: `main`, `run`, the checks before the start, resuming, finishing the run folder;
- sft.setup: `build` and its named stages, from a config to everything the loop needs (`Setup`);
- sft.loop: `train_step`, the loop's state, the stop on a signal, `train_loop`;
- sft.evaluation: the held-out loss and the generation pass.
"""
from .run import main, run

__all__ = ["main", "run"]
