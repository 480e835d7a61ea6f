"""Execute every teaching notebook in notebooks/ top to bottom, so that a package change that breaks one fails CI.

Each notebook runs in a fresh kernel from a temporary copy (the committed notebook and its outputs are never
touched), with the working directory notebooks/ -- where Jupyter starts a kernel for a notebook opened there.
The notebooks assert their own gradient checks, so a wrong backward fails here too. Notebook 06 trains a small
model; its run folder is redirected to a temporary folder (MINIDIT_NOTEBOOK_RUN), so runs/notebook is left alone.

Needs the `notebooks` extra (nbclient, nbformat, ipykernel, matplotlib); skipped cleanly without it.
Deselect with `pytest -m "not notebooks"`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.notebooks

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # the training cell of notebook 06 is the slowest by far


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 6, f"expected the teaching notebooks in {NOTEBOOK_DIR}, found {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    monkeypatch.setenv("MINIDIT_NOTEBOOK_RUN", str(tmp_path / "run"))
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    finally:
        nbformat.write(nb, copy)  # the executed copy, outputs and all, for a look after a failure
