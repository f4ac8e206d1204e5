"""The Colab quickstart executes top to bottom (smoke settings, CPU) and is stored clean."""

import json
import os
import sys

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "colab_quickstart.ipynb")
KERNEL = "ift_jax_tests"


def _read_notebook():
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOK, as_version=4)


def _kernelspec_for_this_interpreter(root) -> None:
    """A kernelspec that runs this interpreter: the kernel imports the ift_jax under test,
    whatever `python3` kernels the machine has."""
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ift_jax tests", "language": "python"}))


def _outputs_text(cell) -> str:
    return "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "")
                   for out in cell.get("outputs", []))


def test_notebook_is_stored_without_outputs():
    nb = _read_notebook()
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_top_to_bottom_on_cpu_with_smoke_settings(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = _read_notebook()
    _kernelspec_for_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel inherits the environment: CPU with conftest's 8 fake devices, like the
    # 8 cores of a TPU v2-8.
    monkeypatch.setenv("IFT_JAX_NOTEBOOK_SMOKE", "1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                     resources={"metadata": {"path": str(run_dir)}})
    client.execute()  # Raises CellExecutionError naming the failing cell.

    text = "\n".join(_outputs_text(c) for c in nb.cells if c.cell_type == "code")
    assert "ift_jax is already installed" in text  # The install cell did not pip install.
    assert "8 device(s)" in text
    assert "template find_the_animal_" in text
    assert "find_the_animal at step 4: accuracy" in text
    assert "-> '" in text  # predict_rows answered.
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # The matplotlib figure and the report's task and forgetting PNGs.

    lora = run_dir / "ift_jax_quickstart" / "lora"
    assert sorted(os.listdir(lora / "eval")) == ["step_0.json", "step_2.json", "step_4.json"]
    step4 = json.loads((lora / "eval" / "step_4.json").read_text())
    assert set(step4["tasks"]) == {"find_the_animal", "synthetic_sentiment"}
    assert {"accuracy", "rank_accuracy", "loss"} <= set(step4["tasks"]["find_the_animal"])
    assert (lora / "predictions" / "step_4" / "find_the_animal.jsonl").exists()
    assert (lora / "report" / "train_loss.png").exists()
