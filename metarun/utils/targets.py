"""The classes a config may name: the ``_target_`` of each option of the instantiated groups.

An option's class is its schema's (``metarun.config.TARGETS``, from which the schemas are generated).

A checkpoint, a run directory's ``.hydra`` record or a saved override list comes from disk and is
data, never code: Hydra instantiates any importable callable a ``_target_`` names (``builtins.open``,
``shutil.copyfile``...), so every object metarun builds is checked against this allow-list first.
"""

from functools import cache

from metarun.config import TARGETS
from metarun.errors import MetarunError

GROUPS = ("data", "model", "algo", "optimizer", "scheduler")


@cache
def group_options() -> dict[str, dict[str, str]]:
    """``{group: {target: option}}``: ``config.TARGETS`` read the other way round."""
    return {group: {target: option for option, target in TARGETS[group].items()} for group in GROUPS}


@cache
def allowed_targets() -> frozenset[str]:
    return frozenset(t for targets in group_options().values() for t in targets)


def check_target(target: object, where: str) -> None:
    """Refuse, in one line, any ``_target_`` that is not one of metarun's own classes."""
    if not isinstance(target, str) or target not in allowed_targets():
        raise MetarunError(
            f"{where} names the class {target!r}, which is not one of metarun's "
            f"(a config or checkpoint is data, never code): refusing to build it"
        )


def option_for(group: str, node: object, where: str) -> str:
    """The ``conf/<group>`` option whose class the saved ``node`` names (its schema then checks the keys)."""
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str) or target not in group_options()[group]:
        raise MetarunError(
            f"{where}: its {group} names the class {target!r}, which is not one of metarun's "
            f"({', '.join(sorted(group_options()[group]))}); a checkpoint is data, never code: refusing to build it"
        )
    return group_options()[group][target]
