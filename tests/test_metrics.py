"""The metrics endpoint end to end: a real daemon with /metrics, the real C target
writing known pages, the scraped text parsed with prometheus_client's parser; then
a real Prometheus (Debian's 2.42) scraping the daemon with deploy/'s scrape
config and rules, and every Grafana panel's PromQL answered by it."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from daemon_support import Daemon, _die_with_parent
from dirtytrack.daemon.client import Client
from workloads.target import PAGE, Target

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="attaching needs root (ptrace)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
    return hits[0]


def eventually(port: int, ok, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        if ok(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def series(samples: dict, name: str, **labels) -> list:
    want = set(labels.items())
    return [dict(ls) for (n, ls) in samples if n == name and want <= ls]


def test_scraped_counters_match_what_was_written(target_bin):
    port = free_port()
    # 60 s cadence: scans happen only when a Collect asks, so each is accounted for.
    d = Daemon("--metrics-listen", f"127.0.0.1:{port}", "--interval-ms", "60000")
    t = Target(target_bin)
    try:
        with Client(d.address) as c:
            buf = t.map(64)
            tid = c.attach(t.pid).target.target_id
            cursor = c.open_cursor(tid)
            c.collect(cursor)
            before = scrape(port)
            lv = dict(target_id=tid, pid=str(t.pid), comm="target")
            assert value(before, "dirtytrack_targets", state="tracking") == 1
            assert value(before, "dirtytrack_target_tracked_bytes", **lv) >= 64 * PAGE
            assert value(before, "dirtytrack_cursors", **lv) == 1
            assert not any("0x" in v or v.isdigit() and int(v) > 1 << 32
                           for (_, ls) in before for _, v in ls), "a raw address as a label"

            t.write(buf + 5 * PAGE, 7)
            t.write(buf + 40 * PAGE, 3)
            s = c.collect(cursor)
            after = scrape(port)
            written = {buf + i * PAGE for i in [*range(5, 12), *range(40, 43)]}
            assert {a for a in s.pages() if buf <= a < buf + 64 * PAGE} == written
            # One scan, whose report is this set: the counter moved by exactly its pages.
            pages = "dirtytrack_target_dirty_pages_total"
            assert value(after, pages, **lv) - value(before, pages, **lv) == s.count >= 10
            scans = "dirtytrack_target_scans_total"
            assert value(after, scans, **lv) - value(before, scans, **lv) == 1
            assert value(after, "dirtytrack_target_scan_duration_seconds_count", **lv) == \
                value(after, scans, **lv)
            assert value(after, "dirtytrack_target_scan_duration_seconds_bucket", le="+Inf",
                         **lv) == value(after, scans, **lv)
            assert {x["le"] for x in series(after, "dirtytrack_target_scan_duration_seconds_bucket",
                                            **lv)} >= {"1e-05", "0.001", "1.0"}
            assert value(after, "dirtytrack_target_dirty_bytes_per_second", **lv) > 0
            assert value(after, "dirtytrack_target_dirty_rate_mean_bytes_per_second", **lv) > 0
            assert value(after, "dirtytrack_target_dirty_rate_variance_bytes_squared_per_second_"
                         "squared", **lv) >= 0
            # The set is owed until acknowledged, then nothing is.
            assert value(after, "dirtytrack_cursor_owed_pages", **lv) == s.count
            assert value(after, "dirtytrack_cursor_unacknowledged_sets", **lv) == 1
            c.ack(cursor, s.seq)
            assert value(scrape(port), "dirtytrack_cursor_owed_pages", **lv) == 0
            resync = "dirtytrack_target_full_resyncs_total"
            assert {x["reason"] for x in series(after, resync, **lv)} == {
                "lost", "exec", "exited", "error", "scan_failed"}
            assert sum(value(after, resync, reason=r, **lv) for r in ("lost", "exec", "error")) == 0

            # exec: a full resync counted once, by reason
            t.proc.stdin.write("exec\n")
            t.proc.stdin.flush()
            assert t.proc.stdout.readline().split()[0] == "ready"
            assert c.collect(cursor).full_resync
            m = scrape(port)
            assert value(m, resync, reason="exec", **lv) == 1
            assert value(m, "dirtytrack_target_lost_mappings_total", **lv) == 0

            # gRPC: by method and code, errors included
            with pytest.raises(grpc.RpcError) as e:
                c.collect("cur-nope")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            handled = "dirtytrack_grpc_server_handled_total"
            # A streaming RPC is counted when the server's handler returns, which may be just
            # after the client has read the last message.
            codes = lambda m: {x["grpc_code"]: v for (n, ls), v in m.items()  # noqa: E731
                               if n == handled and (x := dict(ls))["grpc_method"] == "Collect"}
            m = eventually(port, lambda m: codes(m) == {"OK": 3, "NOT_FOUND": 1})
            assert codes(m) == {"OK": 3, "NOT_FOUND": 1}
            assert value(m, handled, grpc_method="Attach", grpc_code="OK") == 1
            assert value(m, "dirtytrack_grpc_server_handling_seconds_count",
                         grpc_method="Collect") == 4
            assert value(m, "dirtytrack_scrape_errors_total") == 0

            # exit, then detach: the target's series vanish with it
            t.proc.stdin.write("exit\n")
            t.proc.stdin.flush()
            t.proc.wait()
            assert c.collect(cursor).exited
            m = scrape(port)
            assert value(m, resync, reason="exited", **lv) == 1
            assert value(m, "dirtytrack_targets", state="exited") == 1
            c.stub.Detach(__import__("dirtytrack.v1.dirtytrack_pb2", fromlist=["x"])
                          .DetachRequest(target_id=tid), timeout=10)
            m = scrape(port)
            assert not [k for k in m if dict(k[1]).get("target_id") == tid]
            assert value(m, "dirtytrack_cursors_open") == 0
    finally:
        t.close()
        d.close()


# -- a real Prometheus -----------------------------------------------------------------

def prometheus_bin(name: str) -> str | None:
    for path in (shutil.which(name), os.path.join(REPO, ".ci", "prometheus", "usr", "bin", name)):
        if path and os.access(path, os.X_OK):
            return path
    return None


def need(name: str) -> str:
    path = prometheus_bin(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs Debian's prometheus package into "
                    ".ci/prometheus; `apt-get install prometheus` also works)")
    return path


def promtool(*args, cwd=None) -> str:
    r = subprocess.run([need("promtool"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_promtool_checks_the_deployed_config_and_rules():
    prom = os.path.join(DEPLOY, "prometheus")
    promtool("check", "rules", "dirtytrack.rules.yml", cwd=prom)
    promtool("check", "config", "prometheus.yml", cwd=prom)
    promtool("test", "rules", os.path.join("tests", "dirtytrack.rules.test.yml"), cwd=prom)
    # Debian builds Prometheus without Kubernetes discovery: check everything else of the
    # Kubernetes config (relabelling, rules) with the discovery swapped for a static target.
    with open(os.path.join(prom, "scrape-kubernetes.yml")) as f:
        cfg = yaml.safe_load(f)
    job = cfg["scrape_configs"][0]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    job.pop("kubernetes_sd_configs")
    job["static_configs"] = [{"targets": ["10.0.0.1:9476"]}]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(prom, "dirtytrack.rules.yml"), tmp)
        with open(os.path.join(tmp, "k8s.yml"), "w") as f:
            yaml.safe_dump(cfg, f)
        promtool("check", "config", "k8s.yml", cwd=tmp)


def grafana_queries() -> list[tuple[str, str]]:
    with open(os.path.join(DEPLOY, "grafana", "dirtytrack.json")) as f:
        dash = json.load(f)
    names = {v["name"] for v in dash["templating"]["list"]}
    out = []
    for p in dash["panels"]:
        for tgt in p["targets"]:
            expr = tgt["expr"]
            for k, v in (("$__rate_interval", "5s"), ("$__interval", "1s"), ("$__range", "30s")):
                expr = expr.replace(k, v)
            for n in names:
                expr = expr.replace("${%s}" % n, ".*").replace("$" + n, ".*")
            assert "$" not in expr, f"unsubstituted variable in {p['title']}: {expr}"
            out.append((f"{p['title']} [{tgt['refId']}]", expr))
    return out


def test_real_prometheus_scrapes_and_every_panel_has_data(target_bin, tmp_path):
    prometheus = need("prometheus")
    mport, pport = free_port(), free_port()
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        cfg = yaml.safe_load(f)
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "dirtytrack"]
    job["scrape_interval"] = "1s"
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{mport}"]
    cfg["rule_files"] = [os.path.join(DEPLOY, "prometheus", r) for r in cfg["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    promtool("check", "config", str(tmp_path / "prometheus.yml"))

    d = Daemon("--metrics-listen", f"127.0.0.1:{mport}", "--interval-ms", "200")
    t = Target(target_bin)
    log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{pport}"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    stop = threading.Event()

    def api(path: str, **params):
        url = f"http://127.0.0.1:{pport}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    try:
        with Client(d.address) as c:
            buf = t.map(256)
            tid = c.attach(t.pid).target.target_id
            cursor = c.open_cursor(tid)
            with pytest.raises(grpc.RpcError):
                c.collect("cur-nope")                 # an error for the gRPC error panel

            def work():
                i = 0
                while not stop.is_set():
                    t.write(buf + (i % 200) * PAGE, 16, seed=i)
                    c.collect(cursor)
                    i += 1
                    time.sleep(0.1)
            worker = threading.Thread(target=work, daemon=True)
            worker.start()

            deadline = time.monotonic() + 30
            missing = grafana_queries()
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    missing = [(title, q) for title, q in missing
                               if not api("query", query=q)["result"]]
                except OSError:
                    continue                          # Prometheus still starting
            stop.set()
            worker.join(10)
            assert not missing, f"panels without data: {missing}"

            up = api("query", query='up{job="dirtytrack"}')["result"]
            assert [r["value"][1] for r in up] == ["1"]
            rates = api("query", query="dirtytrack_target_dirty_bytes_per_second")["result"]
            assert rates and float(rates[0]["value"][1]) > 0
            assert rates[0]["metric"]["comm"] == "target"
            groups = api("rules")["groups"]
            rules = [r for g in groups for r in g["rules"]]
            assert len(rules) >= 9
            bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            assert not bad, bad
            for r in rules:
                if r["type"] == "recording" and "migration_bandwidth" not in r["name"] \
                        and "scan_duration" not in r["name"]:
                    assert api("query", query=r["name"])["result"], r["name"]
    finally:
        stop.set()
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
        log.close()
        t.close()
        d.close()
