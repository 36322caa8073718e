"""What a run tells a person: titles, run directory names, whole lines off a terminal, the log file."""

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from metarun.config import checkpoint_name, conf_dir
from metarun.utils.display import ConsoleLogHandler, results_table, run_title, show_results
from support import compose_config

ALGORITHMS = {
    "maml": "MAML", "fomaml": "FOMAML", "mamlpp": "MAML++", "anil": "ANIL", "metasgd": "Meta-SGD",
    "reptile": "Reptile", "protonet": "Prototypical Networks", "matchingnet": "Matching Networks",
}


def test_every_algorithm_option_is_named_in_the_title():
    # Every option of conf/algo gets a title of its own (a new algorithm needs no edit here); the
    # published names of the known ones are checked as written.
    options = sorted(p.stem for p in (Path(conf_dir()) / "algo").glob("*.yaml"))
    titles = {algo: run_title(compose_config([f"algo={algo}"])) for algo in options}
    assert len(set(titles.values())) == len(options) and all(t.endswith(", Omniglot 5-way 1-shot") for t in titles.values())
    assert {a: titles[a] for a in ALGORITHMS} == {a: f"{name}, Omniglot 5-way 1-shot" for a, name in ALGORITHMS.items()}


@pytest.mark.parametrize("overrides, title", [
    (["experiment=fomaml_omniglot_20w5s"], "FOMAML, Omniglot 20-way 5-shot"),
    (["experiment=metasgd_sinusoid_k5"], "Meta-SGD, sinusoid 5-shot"),
    (["data=sinusoid", "model=mlp", "algo=maml"], "MAML, sinusoid 10-shot"),
    (["algo=metasgd", "algo.first_order=true"], "first-order Meta-SGD, Omniglot 5-way 1-shot"),
])
def test_title_follows_the_config_not_the_class(overrides, title):
    assert run_title(compose_config(overrides)) == title


def run_dir_name(overrides, name="train") -> str:
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3", job_name=name):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} reads it, as in a real run
    try:
        return Path(OmegaConf.select(cfg, "hydra.run.dir")).name
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("overrides, suffix", [
    ([], "maml_omniglot_5w1s"),
    (["experiment=fomaml_omniglot_20w5s"], "fomaml_omniglot_20w5s"),
    (["experiment=reptile_transductive_omniglot_5w1s"], "reptile_omniglot_5w1s"),
    (["experiment=protonet_omniglot_20w1s"], "protonet_omniglot_20w1s"),  # the test ways, not its 60 training ways
    (["experiment=maml_sinusoid_k5"], "maml_sinusoid_5s"),
    (["data=sinusoid", "model=mlp", "algo=anil", "data.shots=7"], "anil_sinusoid_7s"),
])
def test_run_directory_names_what_ran_after_the_date(overrides, suffix):
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{suffix}", run_dir_name(overrides))


def test_eval_directory_names_the_checkpoint():
    assert checkpoint_name("outputs/train/runs/2026-11-30_05-41-02_maml_omniglot_5w1s/checkpoints/best.pt") \
        == "maml_omniglot_5w1s_best"
    assert checkpoint_name("/x/my run/checkpoints/last.pt") == "my_run_last"
    assert checkpoint_name("elsewhere/model.pt") == "model"
    assert re.fullmatch(r"[\d_-]+_maml_sinusoid_10s_best",
                        run_dir_name(["ckpt=/r/2026-11-30_05-41-02_maml_sinusoid_10s/checkpoints/best.pt"], "eval"))
    assert run_dir_name([], "eval").endswith("_checkpoint")  # ckpt missing: the task says so, not the directory name


def test_piped_output_and_config_tree_keep_long_values_whole(tmp_path):
    root = str(tmp_path / ("a_very_long_folder_name_" * 12) / "data")
    tree_file = tmp_path / "config_tree.txt"
    script = textwrap.dedent(f"""
        import logging
        from support import compose_config
        from metarun.utils.display import ConsoleLogHandler, print_config_tree
        print_config_tree(compose_config(["data.root={root}"]), save_to={str(tree_file)!r})
        logging.getLogger().addHandler(ConsoleLogHandler(show_path=False))
        logging.getLogger().setLevel("INFO")
        logging.getLogger("metarun").info("run directory: {root}  device: cpu")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,  # stdout is a pipe
                            cwd=Path(__file__).parent, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stderr
    assert f"root: {root}" in result.stdout, result.stdout
    assert f"run directory: {root}  device: cpu" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) < len(root) + 100, "lines padded to the console width"
    saved = tree_file.read_text()
    assert f"root: {root}\n" in saved and "\x1b[" not in saved
    assert "ways: 5" in saved and "eval_seed: 0" in saved


@pytest.fixture
def job_logging(tmp_path):
    """The handlers of conf/hydra/job_logging/rich.yaml: the console one and the job's log file."""
    file = logging.FileHandler(tmp_path / "train.log")
    file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handlers = [ConsoleLogHandler(show_path=False), file]
    root = logging.getLogger()
    level = root.level
    root.setLevel("INFO")
    for handler in handlers:
        root.addHandler(handler)
    yield tmp_path / "train.log"
    for handler in handlers:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)


def test_results_table_goes_to_the_log_file_and_once_to_the_console(job_logging, capsys):
    test = {"accuracy": 0.9512, "ci95": 0.0123, "episodes": 600, "per_step": [0.2, 0.9512]}
    val = {"accuracy": 0.9377, "ci95": 0.0201, "episodes": 100, "per_step": [0.2, 0.9377]}
    show_results(results_table("FOMAML, Omniglot 5-way 1-shot: outputs/run", "accuracy", test, val))
    out = capsys.readouterr().out
    assert out.count("FOMAML, Omniglot 5-way 1-shot: outputs/run") == 1
    log = job_logging.read_text()
    assert "FOMAML, Omniglot 5-way 1-shot: outputs/run" in log and "\x1b[" not in log
    assert re.search(r"test\s+│\s+0\.9512\s+│\s+± 0\.0123\s+│\s+600", log), log
    assert re.search(r"val \(best\)\s+│\s+0\.9377", log), log


def test_experiment_headers_use_singular_and_plural_words():
    bad = re.compile(r"\(s\)|\b1 (steps|queries|shots|tasks|ways|iterations|episodes|classes)\b")
    for path in sorted((Path(conf_dir()) / "experiment").glob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not (line.startswith("#") and bad.search(line)), f"{path.name}:{number}: {line}"
