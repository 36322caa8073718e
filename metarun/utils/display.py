"""What a person sees: the config tree, a progress bar with live metrics, and results tables.

When standard output is not a terminal (a pipe, a cluster's log file) nothing is cut or wrapped
at rich's default 80 columns: the console is made wide, and log lines are not padded to its width.
"""

import io
import logging
import math
import os
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from rich.console import Console, Group, RenderableType
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

GROUP_ORDER = ("data", "model", "algo", "device", "train", "test", "seed")
WIDE = 10_000  # columns for output that no terminal will wrap: long paths stay on one line

log = logging.getLogger("metarun")


def console() -> Console:
    """rich's global console, made wide when it does not write to a terminal (unless COLUMNS says otherwise)."""
    shared = rich.get_console()
    if not shared.is_terminal and "COLUMNS" not in os.environ and shared.width != WIDE:
        shared.width = WIDE
    return shared


def plain_text(renderable) -> str:
    """A renderable as it would print on a wide terminal, without colours or escape codes (for files)."""
    buffer = io.StringIO()
    Console(file=buffer, width=WIDE, color_system=None, force_terminal=False, legacy_windows=False).print(renderable)
    return buffer.getvalue()


class ConsoleLogHandler(RichHandler):
    """Hydra's console log handler (conf/hydra/job_logging/rich.yaml): rich's, on the wide console
    when piped, and without the padding to the console's width that rich adds to every line.
    Records logged with ``extra={"console": False}`` go to the log file only."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("console", console())
        super().__init__(*args, **kwargs)

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True) and super().filter(record)

    def render(self, **kwargs):
        rendered = super().render(**kwargs)
        if not self.console.is_terminal:
            rendered.expand = False
        return rendered


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print the resolved config as a tree, one branch per group, and save the same text, whole."""
    tree = rich.tree.Tree("config", style="bold")
    keys = [k for k in GROUP_ORDER if k in cfg] + [k for k in cfg if k not in GROUP_ORDER]
    for key in keys:
        branch = tree.add(key, style="bold cyan")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text.rstrip("\n"), "yaml", theme="ansi_dark", background_color="default"))
    console().print(tree)
    if save_to is not None:
        Path(save_to).write_text(plain_text(tree))


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
        console=console(),
    )


def transient_progress(*columns) -> Progress:
    """A bar for one-off work (downloads, decoding) on stderr that vanishes when done.

    Off when stderr is not a terminal, where rich would leave blank lines in logs.
    """
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


# Display names by class, so that the title says which algorithm ran (algo=fomaml is MAML's class
# with first_order=true); an algorithm missing here is shown by its class name.
ALGORITHM_NAMES = {
    "MAML": "MAML", "MAMLpp": "MAML++", "ANIL": "ANIL", "MetaSGD": "Meta-SGD", "Reptile": "Reptile",
    "ProtoNet": "Prototypical Networks", "MatchingNet": "Matching Networks",
}


def algorithm_name(algo: DictConfig) -> str:
    """``MAML``, ``FOMAML``, ``first-order Meta-SGD``, ... from an ``algo`` config."""
    cls = str(algo.get("_target_", "")).rsplit(".", 1)[-1]
    name = ALGORITHM_NAMES.get(cls, cls or "unknown algorithm")
    if algo.get("first_order"):
        return "FOMAML" if cls == "MAML" else f"first-order {name}"
    return name


def _dataset_title(target: str) -> str | None:
    """The title an image dataset gives itself (``miniImageNet``, ``CUB-200-2011``), for metarun's own classes."""
    from metarun.config import TARGETS

    if target not in TARGETS["data"].values():  # never import what a config names unless metarun builds it
        return None
    from hydra.utils import get_class

    dataset = getattr(get_class(target), "dataset", None)
    return getattr(dataset, "title", None)


def task_description(data: DictConfig) -> str:
    """``Omniglot 5-way 1-shot`` or ``sinusoid 10-shot``: the test tasks' data, ways and shots."""
    cls = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    name = {"SinusoidTasks": "sinusoid"}.get(cls) or _dataset_title(str(data.get("_target_", ""))) or cls.removesuffix("Tasks")
    ways = f"{data.ways}-way " if data.get("ways") is not None else ""
    return f"{name} {ways}{data.get('shots')}-shot".strip()


def run_title(cfg: DictConfig) -> str:
    """What ran, for a results table's title: ``FOMAML, Omniglot 5-way 1-shot``."""
    return f"{algorithm_name(cfg.algo)}, {task_description(cfg.data)}"


def results_table(title: str, metric: str, test: dict, val: dict | None) -> Group:
    """The title on a line of its own (a table's title would wrap a long run directory to the table's width),
    then a row per split."""
    table = Table()
    for column in ("split", metric, "95% CI", "tasks", "per inner step"):
        table.add_column(column, justify="right" if column != "split" else "left")
    rows = [("val (best)", val)] if val else []
    rows.append(("test", test))
    for name, r in rows:
        steps = " ".join(f"{v:.4g}" for v in r.get("per_step", []))
        ci95 = r["ci95"]
        interval = f"± {ci95:.4f}" if ci95 is not None and math.isfinite(ci95) else "n/a"  # one task: no interval
        table.add_row(name, f"{r[metric]:.4f}", interval, str(r["episodes"]), steps)
    return Group(Text(title, style="bold"), table)


def show_results(table: RenderableType) -> None:
    """Print a results table, and write its plain text to the job's log file (not a second time to the console)."""
    console().print(table)
    log.info("results:\n%s", plain_text(table).rstrip("\n"), extra={"console": False})
