"""conf/experiment/ holds only what each paper changes from the config groups it selects.

A key that restates a group's value is a second place for one fact: when the group's default moves,
the copy silently pins the old value in one experiment. /work/trim_experiments.py removed them; this
keeps it so (its resolved configs were compared, all 42, before and after the trim)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metarun.config import conf_dir
from support import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(conf_dir()) / "experiment").glob("*.yaml"))


def baseline(defaults) -> dict:
    """The train config of the options an experiment selects, without the experiment's own keys."""
    overrides = []
    for entry in defaults or []:
        if isinstance(entry, str):  # another experiment it extends
            overrides.append(f"experiment={entry}")
        else:
            overrides += [f"{key.removeprefix('override ').lstrip('/')}={option}" for key, option in entry.items()]
    return OmegaConf.to_container(compose_config(overrides), resolve=False)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_states_only_what_differs_from_its_groups(name):
    body = OmegaConf.to_container(OmegaConf.load(Path(conf_dir(), "experiment", f"{name}.yaml")), resolve=False)
    base = baseline(body.pop("defaults"))
    restated = [f"{section}.{key}" for section, keys in body.items() for key, value in keys.items()
                if base.get(section, {}).get(key, KeyError) == value]
    assert not restated, f"{name} restates the groups' values of {restated}: drop them"
