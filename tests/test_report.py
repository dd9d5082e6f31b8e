"""qat.eval.report over run folders, sweep (multirun) folders and diverged runs."""
import json

from qat.eval.report import load_results, markdown_table


def test_report_reads_a_multirun_folder_and_skips_other_files(tmp_path):
    sweep = tmp_path / "multirun" / "2026-11-24" / "10-00-00"
    ok = {"method": "pbllm_qat", "init": "rtn", "salient_ratio": 0.1, "ppl": {"fp": 24.1, "init": 900.0, "final": 150.0},
          "bits": {"weight": 1.77, "storage": 2.92}, "train_tokens": 512,
          "seconds": {"calibrate": 1, "reconstruct": 0, "train": 2, "eval": 3, "total": 6}, "status": "ok"}
    diverged = {"method": "pbllm_qat", "init": "rtn", "ppl": {"fp": 24.1, "init": 900.0, "final": None},
                "seconds": {"calibrate": 1, "reconstruct": 0, "train": 2, "eval": 3, "total": 6},
                "status": "diverged", "diverged": {"step": 3, "what": "loss=nan"}}
    for name, r in (("0-pbllm_qat", ok), ("1-pbllm_qat", diverged)):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "results.json").write_text(json.dumps(r))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    rows = load_results([str(tmp_path / "multirun"), str(sweep / "multirun.yaml")])
    assert [r["status"] for r in rows] == ["ok", "diverged"]
    table = markdown_table(rows)
    assert "| 150.0 |" in table and "| diverged |" in table
    assert "2026-11-24/10-00-00/0-pbllm_qat" in table


def test_pareto_front_and_plot(tmp_path):
    import pytest

    from qat.eval.report import pareto_front, plot_pareto

    assert pareto_front([(3.0, 40.0), (1.0, 900.0), (2.9, 125.0), (3.1, 35.0), (2.0, 950.0)]) == [
        (1.0, 900.0), (2.9, 125.0), (3.0, 40.0), (3.1, 35.0)]
    pytest.importorskip("matplotlib")
    rows = [{"run": f"r{i}", "method": m, "status": "ok", "ppl": {"fp": 24.1, "final": p}, "bits": {"storage": b}}
            for i, (m, b, p) in enumerate([("pbllm_qat", 2.9, 125.0), ("dyngroup", 3.1, 35.0), ("gptq", 3.3, 189.0)])]
    plot_pareto(rows, str(tmp_path / "pareto.png"))
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_plot_separates_ptq_from_qat_and_labels_only_front_points_without_overlaps(tmp_path):
    """The committed runs: every label is a point of its kind's front, no two labels overlap."""
    import pytest

    pytest.importorskip("matplotlib")
    from pathlib import Path

    from qat.eval.report import load_results, pareto_front, plot_pareto, run_kind

    rows = load_results([str(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "runs")])
    done = [r for r in rows if r.get("status", "ok") == "ok" and r.get("bits") and r["ppl"].get("final")]
    assert {run_kind(r) for r in done} == {"PTQ", "QAT"} and len(done) > 20
    labels = plot_pareto(rows, str(tmp_path / "pareto.png"))
    fronts = {kind: set(pareto_front([(r["bits"]["storage"], r["ppl"]["final"]) for r in done if run_kind(r) == kind]))
              for kind in ("PTQ", "QAT")}
    on_front = {r["run"] for r in done if (r["bits"]["storage"], r["ppl"]["final"]) in fronts[run_kind(r)]}
    names = [name for name, _ in labels]
    assert names and set(names) <= on_front
    boxes = [b for _, b in labels]
    for i, (x0, y0, w0, h0) in enumerate(boxes):
        for x1, y1, w1, h1 in boxes[i + 1:]:
            assert x0 + w0 <= x1 or x1 + w1 <= x0 or y0 + h0 <= y1 or y1 + h1 <= y0  # disjoint
