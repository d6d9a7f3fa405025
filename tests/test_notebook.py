"""The notebook runs top to bottom, so that it cannot rot."""

import json
import os
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_trains_loads_samples_plots_and_runs_a_harness_task(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{NOTEBOOK.name} cell {cell['id']}", "exec"),
                 namespace)
    assert namespace["result"]["val_loss"] < namespace["result"]["unigram_baseline"]
    assert len(namespace["records"]) > 0 and (tmp_path / "runs" / "notebook" / "metrics.jsonl").exists()
    assert all(isinstance(t, str) for t in namespace["run"].generate("x", max_new_tokens=3))
    harness = namespace["harness_results"]
    assert harness["n-samples"]["python_choice"]["effective"] == 4
    assert 0 <= harness["results"]["python_choice"]["acc,none"] <= 1
