"""metarun's Optuna sweeper for Hydra (``hydra/sweeper=metarun_optuna``); see ``sweeper.py``."""
