"""The run report of the shared demo run: `snakemake --report` over it, opened in headless Chromium (the page
renders, every plot loads, the metrics table is there, a screenshot is taken), and MLflow turned on afterwards
(only the plots stage re-runs, and the run appears in the SQLite store with params, metrics and artifacts)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from support.common import DEMO_SECRET
from support.workflow import planned_jobs, run_workflow

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = ("overview.html", "evaluation.html", "config.html")
FIGURES = ("curves.png", "resources.png", "timings.png", "tokens.png")

# Injected into a copy of the report: loads every image result and every image inside the HTML results, counts
# the tables of each page, then shows the overview page (as a click on it does) and leaves the verdict in
# <body data-check>, which --dump-dom prints.
CHECK = """<script>
window.addEventListener('load', async () => {
  const load = (src) => new Promise(done => { const img = new Image();
    img.onload = () => done({ok: img.naturalWidth > 0, width: img.naturalWidth, height: img.naturalHeight});
    img.onerror = () => done({ok: false}); img.src = src; });
  const out = {images: [], pages: [], error: null};
  try {
    for (const [path, res] of Object.entries(results)) {
      if (res.mime_type.startsWith('image/')) out.images.push({path, ...(await load(res.data_uri))});
      if (res.mime_type === 'text/html') {
        const doc = new DOMParser().parseFromString(await (await fetch(res.data_uri)).text(), 'text/html');
        for (const img of doc.images) out.images.push({path: path + '#' + img.alt, ...(await load(img.src))});
        out.pages.push({path, title: doc.title, tables: doc.querySelectorAll('table').length,
                        text: doc.body.innerText.slice(0, 4000)});
      }
    }
    const overview = Object.entries(results).find(([path]) => path.endsWith('overview.html'));
    app.setView({content: 'html', contentPath: overview[1].data_uri});
  } catch (err) { out.error = String(err); }
  document.body.setAttribute('data-check', JSON.stringify(out));
});
</script>"""


def chromium(page: Path, *args: str) -> str:
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        result = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,1000", "--run-all-compositor-stages-before-draw",
             "--virtual-time-budget=15000", *args, page.as_uri()],
            capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def embedded_results(report: Path) -> dict:
    text = report.read_text()
    return json.loads(re.search(r"var results = (\{.*?\});\n", text, re.S).group(1))


def png_size(data_uri: str) -> tuple[int, int]:
    data = base64.b64decode(data_uri.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report(demo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    run_workflow(demo, "--report", str(path), env={"HF_TOKEN": DEMO_SECRET})
    return path


def test_the_report_holds_every_figure_and_page(report):
    results = embedded_results(report)
    names = {Path(p).name: r for p, r in results.items()}
    assert set(PAGES + FIGURES) <= set(names), sorted(names)
    for name in FIGURES:
        width, height = png_size(names[name]["data_uri"])
        assert width >= 600 and height >= 300, name
        assert names[name]["caption"], name
    assert DEMO_SECRET not in report.read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_the_report_renders_in_chromium_with_its_plots_and_tables(report, tmp_path):
    page = tmp_path / "checked.html"
    head, _, tail = report.read_text().rpartition("</body>")  # the last one: the inline scripts hold others
    page.write_text(head + CHECK + "</body>" + tail)
    dom = chromium(page, "--dump-dom")
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, f"the check did not finish: {dom[-2000:]}"
    verdict = json.loads(html.unescape(found.group(1)))
    assert verdict["error"] is None, verdict["error"]
    images = verdict["images"]
    broken = [i["path"] for i in images if not i["ok"]]
    assert not broken and len(images) >= len(FIGURES) * 2, (broken, images)  # each figure alone and on the overview
    pages = {Path(p["path"]).name: p for p in verdict["pages"]}
    overview = pages["overview.html"]
    assert overview["tables"] >= 5
    for heading in ("Base vs fine-tuned", "Answers side by side", "Training curves", "Resource use over time",
                    "Stage timings", "Effective configuration"):
        assert heading in overview["text"], heading
    assert "eval loss base -> tuned" in overview["text"] or "fine-tuned" in overview["text"]
    assert "Results" in dom and "Statistics" in dom  # the app rendered its navigation
    assert "<iframe" in dom  # and the overview page, as a click on it shows it
    shot = tmp_path / "report.png"
    chromium(page, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("REPORT_KEEP")  # a directory: the screenshot and the DOM, for a person to look at
    if keep:
        shutil.copy(shot, keep)
        Path(keep, "report-dom.html").write_text(dom)


def test_mlflow_turned_on_records_the_finished_run(demo, tmp_path):
    """A copy of the demo project, MLflow on: only the plots stage re-runs, and it records the run (trained with
    tracking off) from its outputs: the effective config, the step and final metrics, the report files."""
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    shutil.copytree(demo, project, symlinks=True)
    env = {"HF_TOKEN": DEMO_SECRET}
    dry = run_workflow(project, "-n", "--config", "tracking__mlflow=true", env=env)
    assert planned_jobs(dry) == {"plots", "all"}
    run_workflow(project, "--config", "tracking__mlflow=true", env=env)
    store = project / "results" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("hpc-finetune").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "demo"
    run = runs[0]
    assert run.data.params["training.learning_rate"] == "0.01" and run.data.params["model.source"] == "demo"
    train = json.loads((project / "results" / "demo" / "metrics" / "train.json").read_text())
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == [e["step"] for e in train["log_history"] if "loss" in e]
    assert run.data.metrics["evaluate.finetuned_eval_loss"] < run.data.metrics["evaluate.base_eval_loss"]
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/curves.png", "report/overview.html"} <= report
    assert (project / "results" / "mlartifacts").is_dir() and not (project / "mlruns").exists()
    log = (project / "results" / "demo" / "logs" / "plots.log").read_text()
    assert str(store) not in log and "sqlite" in log
