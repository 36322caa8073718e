"""A four-method metric logger, so the training loop never calls a backend directly."""

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class MetricLogger:
    def log_scalars(self, metrics: dict[str, float], step: int) -> None: ...

    def log_hparams(self, hparams: dict, metrics: dict[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger(MetricLogger):
    """Event files under ``log_dir``; ``purge_step`` hides events a crashed run wrote past its resume point."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log_scalars(self, metrics, step):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def log_hparams(self, hparams, metrics):
        # TensorBoard takes numbers, strings and bools: a list (the protocol's not_applicable) goes as its JSON.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in hparams.items()}
        # run_name="." keeps the hparams entry in this run's folder, so TensorBoard pairs it with the run.
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()
