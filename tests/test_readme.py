"""The README's library example (MAML on Omniglot without Hydra) runs as a user copies it.

The snippet is read from README.md by its marker; only its sizes are made tiny (each replaced
literal must be there, so an edited snippet fails here rather than running the full protocol) and
its data location pointed at the test archives.
"""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- readme-snippet: library -->"
TINY = {  # the paper's sizes in the snippet -> tiny ones
    "range(60000)": "range(2)",
    'data.sample("train", 32, tasks)': 'data.sample("train", 2, tasks)',
    "episodes=600, batch_size=32, steps=10": "episodes=4, batch_size=4, steps=2",
}


def readme_snippet() -> str:
    found = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", README.read_text(), re.S)
    assert found, f"README.md has no python block after {MARKER}"
    return found.group(1)


def test_the_readme_snippet_is_short_and_uses_no_hydra():
    code = readme_snippet()
    assert "from metarun import" in code and "hydra" not in code.lower()
    assert len(code.strip().splitlines()) <= 13


def test_the_readme_snippet_trains_maml_on_omniglot_and_meta_tests_it(shared_data_root, omniglot_cache_dir, tmp_path,
                                                                      monkeypatch, capsys):
    code = readme_snippet()
    for full, tiny in TINY.items():
        assert full in code, f"the README snippet no longer has {full!r}: update TINY"
        code = code.replace(full, tiny)
    location = 'root="data"'
    assert location in code
    code = code.replace(location, f"root={str(shared_data_root)!r}, cache_dir={str(omniglot_cache_dir)!r}, "
                                  f"download=False")
    monkeypatch.chdir(tmp_path)  # whatever it writes lands in a temporary folder
    scope = {}
    exec(compile(code, str(README), "exec"), scope)
    # It took two Adam steps on meta-gradients, then meta-tested on 4 fixed tasks after 0..2 steps.
    assert [int(s["step"]) for s in scope["optimizer"].state.values()] == [2] * len(list(scope["algo"].parameters()))
    assert torch.isfinite(scope["loss"])
    result = scope["result"]
    assert result["episodes"] == 4 and len(result["per_step"]) == 3 and 0 <= result["accuracy"] <= 1
    assert re.fullmatch(r"test accuracy \d\.\d{4} ± \d\.\d{4}\n", capsys.readouterr().out)
