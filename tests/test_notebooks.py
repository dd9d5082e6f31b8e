"""The notebooks run, top to bottom, on tiny runs (a sweep folder included), so they never rot."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two tiny runs, one PB-LLM with a CSV log (QuantHealth metrics), one dynamic grouping."""
    from hydra import compose, initialize_config_dir

    from qat.pipeline import run

    root = tmp_path_factory.mktemp("runs") / "multirun" / "2026-11-24" / "10-00-00"
    common = ["model=tiny", "data=tiny", "eval.max_windows=2", "eval.seq_len=64", "init=rtn",
              "trainer.max_steps=4", "quant_health_every=1", "trainer.log_every_n_steps=1"]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        for i, extra in enumerate([["method=pbllm_qat"], ["method=dyngroup", "method.groups=4"]]):
            d = root / f"{i}-run"
            cfg = compose("train", common + extra + ["logger=csv", f"logger.save_dir={d}", f"hydra.run.dir={d}"])
            run(cfg, d)
    return root.parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_runs(name, tiny_runs, monkeypatch):
    monkeypatch.setenv("QAT_RUNS", str(tiny_runs))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(str(ROOT / "notebooks" / name), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name != "results.ipynb":  # the notebooks that read QAT_RUNS saw both runs of the sweep
        assert "2 runs" in printed
    if name == "dynamics.ipynb":
        assert "2 CSV logs" in printed
