"""What a person sees: the config tree, a progress bar with live metrics, and results tables."""

import math
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

GROUP_ORDER = ("data", "model", "algo", "device", "train", "test", "seed")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> None:
    """Print the resolved config as a tree, one branch per group, and save the same text."""
    tree = rich.tree.Tree("config", style="bold")
    keys = [k for k in GROUP_ORDER if k in cfg] + [k for k in cfg if k not in GROUP_ORDER]
    for key in keys:
        branch = tree.add(key, style="bold cyan")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)
    if save_to is not None:
        with open(save_to, "w") as f:
            rich.print(tree, file=f)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
        console=rich.get_console(),
    )


def transient_progress(*columns) -> Progress:
    """A bar for one-off work (downloads, decoding) on stderr that vanishes when done.

    Off when stderr is not a terminal, where rich would leave blank lines in logs.
    """
    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *columns, TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def results_table(title: str, metric: str, test: dict, val: dict | None) -> Table:
    table = Table(title=title)
    for column in ("split", metric, "95% CI", "tasks", "per inner step"):
        table.add_column(column, justify="right" if column != "split" else "left")
    rows = [("val (best)", val)] if val else []
    rows.append(("test", test))
    for name, r in rows:
        steps = " ".join(f"{v:.4g}" for v in r.get("per_step", []))
        ci95 = r["ci95"]
        interval = f"± {ci95:.4f}" if ci95 is not None and math.isfinite(ci95) else "n/a"  # one task: no interval
        table.add_row(name, f"{r[metric]:.4f}", interval, str(r["episodes"]), steps)
    return table
