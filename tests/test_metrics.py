"""The Prometheus exporter: a direct scrape of one rank's endpoint, and a real Prometheus (Debian's package,
installed by .ci/run) scraping a 2-rank training run, with every PromQL expression of the dashboard run
through its HTTP API."""
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clorae_ds.metrics import MetricsConfig, MetricsError, MetricsExporter

from .test_train import ENV, ROOT, command, recipe

DASHBOARD = os.path.join(ROOT, "dashboards", "clorae.json")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return {f.name: f for f in text_string_to_metric_families(response.read().decode())}


def test_one_rank_endpoint_names_types_labels(tmp_path):
    port = free_port()
    exporter = MetricsExporter(MetricsConfig(port=port), rank=1, local_rank=0)
    try:
        exporter.on_step(samples=8, tokens=300, step_seconds=0.2, wait_seconds=0.01, skipped={"bad_json": 2})
        exporter.on_log({"twitter2015": 1.5}, 0.8, 1e-4, 2, {"encoder.bottom": {"mner": 0.4}})
        exporter.on_weights(["twitter2015"], [1.0])
        exporter.on_eval({"twitter2015": {"f1": 0.5}, "All": 50.0})
        families = scrape(port)
    finally:
        exporter.close()
    expected_types = {"clorae_train_samples": "counter", "clorae_train_tokens": "counter", "clorae_train_steps": "counter",
                      "clorae_train_step_seconds": "histogram", "clorae_data_wait_seconds": "histogram",
                      "clorae_train_loss": "gauge", "clorae_mim_loss": "gauge", "clorae_task_weight": "gauge",
                      "clorae_eval_f1": "gauge", "clorae_eval_all": "gauge", "clorae_gate_task_expert_ratio": "gauge",
                      "clorae_skipped_samples": "counter", "clorae_epoch": "gauge", "clorae_learning_rate": "gauge",
                      "clorae_memory_bytes": "gauge", "clorae_last_step_timestamp_seconds": "gauge"}
    assert {name: families[name].type for name in expected_types} == expected_types
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("clorae_train_samples_total", (("rank", "1"),))] == 8
    assert samples[("clorae_train_tokens_total", (("rank", "1"),))] == 300
    assert samples[("clorae_skipped_samples_total", (("rank", "1"), ("reason", "bad_json")))] == 2
    assert samples[("clorae_gate_task_expert_ratio", (("layer_group", "encoder.bottom"), ("rank", "1"), ("task", "mner")))] == 0.4
    assert samples[("clorae_train_loss", (("dataset", "twitter2015"), ("rank", "1")))] == 1.5
    assert samples[("clorae_memory_bytes", (("kind", "rss"), ("rank", "1")))] > 0
    assert all(name.startswith("clorae_") for name in families)


def test_port_in_use_is_a_clear_error_or_searched(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            MetricsExporter(MetricsConfig(port=port), rank=0, local_rank=0)
        exporter = MetricsExporter(MetricsConfig(port=port, port_search=20), rank=0, local_rank=0)
        try:
            assert exporter.port != port and exporter.address == f"127.0.0.1:{exporter.port}"
            exporter.write_targets(str(tmp_path / "targets.json"), [exporter.address, None])
            assert json.load(open(tmp_path / "targets.json")) == [
                {"targets": [exporter.address], "labels": {"job": "clorae", "rank": "0"}}]
        finally:
            exporter.close()


def dashboard_expressions():
    dashboard = json.load(open(DASHBOARD))
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def query(prometheus_port, expr):
    url = f"http://127.0.0.1:{prometheus_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (.ci/run installs it)")
def test_real_prometheus_scrapes_both_ranks_and_every_dashboard_query_has_data(tmp_path, tokenizer_dir):
    metrics_port, prometheus_port = free_port(), free_port()
    run_dir = tmp_path / "run"
    config = recipe(tmp_path, tokenizer_dir, schedule={"epochs": 2},
                    metrics={"port": metrics_port, "port_search": 10, "linger_seconds": 60})
    training = subprocess.Popen(command("torchrun", "zero0.json") + ["--config", config, "--output-dir", str(run_dir)],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    targets = run_dir / "metrics_targets.json"
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                       "scrape_configs": [{"job_name": "clorae", "file_sd_configs": [
                                           {"files": [str(targets)], "refresh_interval": "1s"}]}]}))
    check = subprocess.run(["promtool", "check", "config", str(prom_config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(tmp_path / "prometheus.log", "w")
    prometheus = subprocess.Popen(["prometheus", f"--config.file={prom_config}",
                                   f"--web.listen-address=127.0.0.1:{prometheus_port}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=log, stderr=log)
    try:
        deadline = time.time() + 150
        ready = False
        while time.time() < deadline:
            assert training.poll() is None or training.returncode == 0, training.stdout.read()[-3000:]
            assert prometheus.poll() is None, open(tmp_path / "prometheus.log").read()[-3000:]
            try:
                up = query(prometheus_port, 'up{job="clorae"} == 1')
                evaluated = query(prometheus_port, "clorae_eval_all")
                ready = len(up) == 2 and len({s["metric"]["rank"] for s in evaluated}) == 2
            except OSError:
                pass  # Prometheus not listening yet
            if ready:
                break
            time.sleep(1)
        assert ready, "Prometheus did not scrape both ranks with evaluation results in time:\n" + \
            open(tmp_path / "prometheus.log").read()[-2000:]
        time.sleep(3)  # a few more scrapes for the rate() windows
        empty = []
        for expr in dashboard_expressions():
            concrete = expr.replace("$job", ".*").replace("$rank", ".*")
            if not query(prometheus_port, concrete):
                empty.append(concrete)
        assert not empty, f"dashboard expressions without data: {empty}"
        ranks = {s["metric"]["rank"] for s in query(prometheus_port, "clorae_train_steps_total")}
        assert ranks == {"0", "1"}
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        training.terminate()
        training.wait(timeout=60)


def test_dashboard_and_provisioning_files():
    dashboard = json.load(open(DASHBOARD))
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"job", "rank"}
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("samples/s", "tokens/s", "step time", "data wait", "loss", "task weights", "f1", "all", "gate",
                   "skipped", "memory"):
        assert needed in titles
    for expr in dashboard_expressions():
        assert re.search(r'job=~"\$job", rank=~"\$rank"', expr), expr
    datasource = open(os.path.join(ROOT, "dashboards", "grafana", "provisioning", "datasources", "prometheus.yaml")).read()
    assert "uid: clorae-prometheus" in datasource
    promtool = shutil.which("promtool")
    if promtool:
        result = subprocess.run([promtool, "check", "config", os.path.join(ROOT, "dashboards", "prometheus.yml")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
