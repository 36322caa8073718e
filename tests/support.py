"""Helpers shared by the test modules: compose the real configs, tiny settings, file readers."""

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from metarun.config import conf_dir
from metarun.data.episode import Episode

TINY_OMNIGLOT = [
    "data.ways=3", "model.hidden=8", "train.meta_batch_size=2", "train.iterations=4", "train.val_every=2",
    "train.val_episodes=4", "test.episodes=6", "algo.eval_inner_steps=2",
]
TINY_SINUSOID = [
    "data=sinusoid", "model=mlp", "algo.inner_lr=0.01", "train.meta_batch_size=4", "train.iterations=6",
    "train.val_every=3", "train.val_episodes=8", "test.episodes=10", "algo.eval_inner_steps=3",
]


def compose_config(overrides=(), name="train"):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=name):
        return compose(config_name=name, overrides=list(overrides))


def omniglot_location(root: Path, cache: Path) -> list[str]:
    return [f"data.root={root}", f"data.cache_dir={cache}", "data.download=false"]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def random_image_episode(tasks: int, ways: int, shots: int, queries: int, seed: int = 0) -> Episode:
    """Random float64 28x28 images, labels grouped by class: the numerical tests' episode."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(
        support_x=torch.randn(tasks, ways * shots, 1, 28, 28, generator=g, dtype=torch.float64),
        support_y=labels.repeat_interleave(shots).expand(tasks, -1).clone(),
        query_x=torch.randn(tasks, ways * queries, 1, 28, 28, generator=g, dtype=torch.float64),
        query_y=labels.repeat_interleave(queries).expand(tasks, -1).clone(),
        ways=ways, shots=shots, queries=queries,
    )


def group_options(group: str) -> list[str]:
    """The options of a config group, as ``conf/<group>/*.yaml`` holds them: tests cover what is there,
    so a new algorithm, dataset, model or experiment file is tested without editing a test."""
    return sorted(p.stem for p in (Path(conf_dir()) / group).glob("*.yaml"))


def slurm_problem() -> str | None:
    """Why no Slurm cluster can run jobs here, or None when one can (tests of hydra/launcher=slurm skip with it)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm here (sinfo/sbatch not found): start a local cluster with scripts/slurm-local"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "Slurm does not answer (sinfo timed out after 15 s): start a local cluster with scripts/slurm-local"
    if states.returncode != 0:
        return f"Slurm does not answer (sinfo: {' '.join(states.stderr.split())[:160]}): start one with scripts/slurm-local"
    if not re.search(r"^(idle|mixed|allocated|completing)", states.stdout, re.M):
        return f"no Slurm node can run jobs (sinfo says: {' '.join(states.stdout.split()) or 'no nodes'})"
    return None


def float64_algorithms(ways: int, shots: int = 2) -> dict:
    """Factories of every batched algorithm on a tiny float64 Conv4 (4 filters), ``batching="loop"``: the
    numerical tests of the execution paths compare each path with these. SNAIL is sized for ``ways``-way
    ``shots``-shot episodes (the narrow blocks of the paper's layout)."""
    from metarun.algos.anil import ANIL
    from metarun.algos.maml import MAML
    from metarun.algos.mamlpp import MAMLpp
    from metarun.algos.matchingnet import MatchingNet
    from metarun.algos.metasgd import MetaSGD
    from metarun.algos.protonet import ProtoNet
    from metarun.algos.snail import SNAIL
    from metarun.models import Conv4

    def network(out_features=ways):
        torch.manual_seed(0)
        return Conv4(out_features=out_features, hidden=4).double()

    return {
        "maml": lambda: MAML(network(), "classification", inner_lr=0.4, inner_steps=2, batching="loop"),
        "fomaml": lambda: MAML(network(), "classification", inner_lr=0.4, inner_steps=2, first_order=True,
                               batching="loop"),
        "mamlpp": lambda: MAMLpp(network(), "classification", inner_steps=2, msl_iterations=10, batching="loop"),
        "anil": lambda: ANIL(network(), "classification", inner_steps=2, batching="loop"),
        "metasgd": lambda: MetaSGD(network(), "classification", batching="loop"),
        "protonet": lambda: ProtoNet(network(None), "classification", batching="loop"),
        "matchingnet": lambda: MatchingNet(network(None), "classification", fce=True, fce_steps=2,
                                           batching="loop").double(),
        "maml_nontransductive": lambda: MAML(network(), "classification", inner_steps=1, transductive=False,
                                             batching="loop"),
        "snail": lambda: SNAIL(network(None), "classification", ways=ways, shots=shots, attention_keys=(4, 6, 5),
                               attention_values=(3, 5, 4), tc_filters=(5, 6), batching="loop").double(),
    }


def hold_one_iteration(module: str, cls: str) -> str:
    """A ``python -c`` script running the real CLI (``argv[3:]``) with ``cls.meta_loss`` held at call ``argv[2]``
    until a SIGINT or SIGTERM has arrived, touching the file ``argv[1]`` once it holds: the test's signal then
    lands mid-way between checkpoints however fast or loaded the machine is (a sleep before the signal let a
    fast machine finish the run first, and a slow one not reach a checkpoint in time). SIGKILL ends it there."""
    return textwrap.dedent(f"""
        import signal, sys, threading, time
        from pathlib import Path
        from {module} import {cls}
        from metarun.cli import main

        cue, hold_at, calls = Path(sys.argv[1]), int(sys.argv[2]), []
        real_meta_loss = {cls}.meta_loss

        def meta_loss(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == hold_at:
                arrived = threading.Event()
                handlers = {{s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}}

                def seen(signum, frame):
                    signal.signal(signum, handlers[signum])
                    arrived.set()
                    if callable(handlers[signum]):
                        handlers[signum](signum, frame)  # the run's own handler: a stop request

                for s in handlers:
                    signal.signal(s, seen)
                cue.touch()
                while not arrived.is_set():
                    time.sleep(0.01)
            return real_meta_loss(self, *args, **kwargs)

        {cls}.meta_loss = meta_loss
        sys.exit(main(sys.argv[3:]))
    """)
