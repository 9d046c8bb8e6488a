"""Prometheus metrics: what scans produce, per target, read at scrape time.

Targets record what each scan produced in a small `ScanStats` (registry.py
calls `record_scan` / `record_failure`); the collector below reads those and
the registry when Prometheus scrapes, so a detached target's series vanish
with it and nothing goes stale. Every source is read under its own try: one
failing source drops its own series (and is counted in
dirtytrack_scrape_errors_total), never the scrape.

Names are in base units (bytes, seconds), namespace first; targets are
labelled by target id, pid and process name (comm), never by address.

gRPC requests are counted by a grpc.aio ServerInterceptor of our own
(`GrpcMetrics`): started, handled by code, and handling time by method.

The HTTP endpoint is prometheus_client's start_http_server on
`metrics_listen` (HOST:PORT; "" disables). The scrape runs in that server's
thread while the event loop mutates the registry: every dict is copied with
list() (atomic under the GIL) before it is walked.
"""
from __future__ import annotations

import collections
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from dirtytrack._core import PAGE_SIZE
from dirtytrack.daemon.stats import RATE_WINDOW_S, SCAN_BUCKETS, STATS_WINDOW_S

log = logging.getLogger("dirtytrack.daemon")

GRPC_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _target_rows(registry):
    return list(registry.targets.values())


class DaemonCollector:
    """Reads the registry at scrape time (a prometheus_client custom collector)."""

    def __init__(self, registry):
        self.registry = registry
        self.errors = 0

    def describe(self):
        return []        # no describe-time collect: the registry may not be ready

    def _safe(self, name, fn):
        try:
            return fn()
        except Exception:              # noqa: BLE001 - one source never fails the scrape
            self.errors += 1
            log.exception("metrics: reading %s failed", name)
            return None

    def collect(self):
        reg = self.registry
        labels = ["target_id", "pid", "comm"]
        targets = self._safe("targets", lambda: _target_rows(reg)) or []

        count = GaugeMetricFamily("dirtytrack_targets", "Targets known to the daemon, by state",
                                  labels=["state"])
        by_state = collections.Counter(t.state for t in targets)
        for state in ("tracking", "exited", "failed", "detached"):
            count.add_metric([state], by_state.pop(state, 0))
        for state, n in by_state.items():
            count.add_metric([state], n)
        yield count

        fams = {
            "tracked": GaugeMetricFamily(
                "dirtytrack_target_tracked_bytes", "Bytes of the target's tracked mappings",
                labels=labels),
            "pages": CounterMetricFamily(
                "dirtytrack_target_dirty_pages", "Dirty pages reported by the target's scans "
                "(new and lost mappings count whole)", labels=labels),
            "rate": GaugeMetricFamily(
                "dirtytrack_target_dirty_bytes_per_second",
                f"Dirty bytes per second over the scans of the last {RATE_WINDOW_S:g} s",
                labels=labels),
            "mean": GaugeMetricFamily(
                "dirtytrack_target_dirty_rate_mean_bytes_per_second",
                f"Time-weighted mean of the per-scan dirty rate over the last {STATS_WINDOW_S:g} s",
                labels=labels),
            "var": GaugeMetricFamily(
                "dirtytrack_target_dirty_rate_variance_bytes_squared_per_second_squared",
                "Time-weighted variance of the per-scan dirty rate over the last "
                f"{STATS_WINDOW_S:g} s", labels=labels),
            "span": GaugeMetricFamily(
                "dirtytrack_target_dirty_rate_window_seconds",
                "Seconds of scans the mean and variance really cover", labels=labels),
            "scans": CounterMetricFamily(
                "dirtytrack_target_scans", "Scans of the target, failed ones included",
                labels=labels),
            "errors": CounterMetricFamily(
                "dirtytrack_target_scan_errors", "Scans that raised (every cursor was then "
                "sent every tracked page)", labels=labels),
            "duration": HistogramMetricFamily(
                "dirtytrack_target_scan_duration_seconds", "Duration of one scan of the target",
                labels=labels),
            "resyncs": CounterMetricFamily(
                "dirtytrack_target_full_resyncs", "Scans whose report was a full resync, by "
                "reason (lost, exec, exited, error, scan_failed)", labels=labels + ["reason"]),
            "lost": CounterMetricFamily(
                "dirtytrack_target_lost_mappings", "Mappings reported whole because tracking "
                "of them was lost", labels=labels),
            "interval": GaugeMetricFamily(
                "dirtytrack_target_scan_interval_seconds", "Current scan interval of the target",
                labels=labels),
            "cursors": GaugeMetricFamily(
                "dirtytrack_cursors", "Open cursors of the target", labels=labels),
            "owed": GaugeMetricFamily(
                "dirtytrack_cursor_owed_pages", "Pages owed to the target's cursors (pending "
                "and unacknowledged sets), summed over its cursors", labels=labels),
            "unacked": GaugeMetricFamily(
                "dirtytrack_cursor_unacknowledged_sets", "Sets delivered and not yet "
                "acknowledged, summed over the target's cursors", labels=labels),
            "held": GaugeMetricFamily(
                "dirtytrack_cursor_held_bytes", "Bitmap bytes the target's cursors hold",
                labels=labels),
        }
        for t in targets:
            self._safe(f"target {getattr(t, 'id', '?')}", lambda: self._target(t, fams))
        yield from fams.values()

        cursors = GaugeMetricFamily("dirtytrack_cursors_open", "Open cursors, all targets")
        n = self._safe("cursors", lambda: len(reg.cursors))
        if n is not None:
            cursors.add_metric([], n)
        yield cursors
        info = GaugeMetricFamily("dirtytrack_daemon_info", "The running daemon",
                                 labels=["instance_id"])
        info.add_metric([reg.instance], 1)
        yield info
        page = GaugeMetricFamily("dirtytrack_page_size_bytes", "Page size of the counted pages")
        page.add_metric([], PAGE_SIZE)
        yield page
        start = GaugeMetricFamily("dirtytrack_daemon_start_time_seconds",
                                  "Unix time the daemon started")
        start.add_metric([], reg.started_unix)
        yield start
        errs = CounterMetricFamily("dirtytrack_scrape_errors",
                                   "Metric sources that failed while being read")
        errs.add_metric([], self.errors)
        yield errs

    @staticmethod
    def _target(t, fams) -> None:
        s = t.stats
        lv = [t.id, str(t.pid), s.comm]
        # Compute everything first: a failure must not leave half a target's series.
        mean, var, span = s.mean_variance()
        rate = s.rate()
        cursors = list(t.cursors.values())
        owed = unacked = held = 0
        for c in cursors:
            unacked_sets = list(c.unacked)
            owed += c.pending.count + sum(state.count for _, state in unacked_sets)
            unacked += len(unacked_sets)
            held += c.held_bytes()
        hist = s.histogram()
        fams["tracked"].add_metric(lv, s.tracked_bytes)
        fams["pages"].add_metric(lv, s.dirty_pages_total)
        fams["rate"].add_metric(lv, rate)
        fams["mean"].add_metric(lv, mean)
        fams["var"].add_metric(lv, var)
        fams["span"].add_metric(lv, span)
        fams["scans"].add_metric(lv, s.duration_count)
        fams["errors"].add_metric(lv, s.scan_errors_total)
        fams["duration"].add_metric(lv, hist, s.duration_sum)
        for reason, n in list(s.resyncs.items()):
            fams["resyncs"].add_metric(lv + [reason], n)
        fams["lost"].add_metric(lv, s.lost_mappings_total)
        fams["interval"].add_metric(lv, t.interval)
        fams["cursors"].add_metric(lv, len(cursors))
        fams["owed"].add_metric(lv, owed)
        fams["unacked"].add_metric(lv, unacked)
        fams["held"].add_metric(lv, held)


# -- gRPC ----------------------------------------------------------------------------

def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or method


class GrpcMetrics(grpc.aio.ServerInterceptor):
    """Counts every RPC: started, handled (by status code) and handling time."""

    def __init__(self, registry: CollectorRegistry):
        names = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter("dirtytrack_grpc_server_started", "RPCs started",
                               names, registry=registry)
        self.handled = Counter("dirtytrack_grpc_server_handled", "RPCs completed, by code",
                               names + ["grpc_code"], registry=registry)
        self.seconds = Histogram("dirtytrack_grpc_server_handling_seconds",
                                 "Time to complete an RPC (a stream: its whole life)",
                                 names, buckets=GRPC_BUCKETS, registry=registry)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, service, method, "unary"),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, service, method, "server_stream"),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, service, method, "client_stream"),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, service, method, "bidi_stream"),
                handler.request_deserializer, handler.response_serializer)
        return handler

    def _done(self, labels, context, exc, t0) -> None:
        try:
            self.seconds.labels(*labels).observe(time.perf_counter() - t0)
            self.handled.labels(*labels, _code(context, exc)).inc()
        except Exception:               # noqa: BLE001 - metrics never fail an RPC
            log.exception("metrics: recording an RPC failed")

    def _unary(self, behavior, service, method, kind):
        labels = (service, method, kind)

        async def wrapper(request, context):
            self.started.labels(*labels).inc()
            t0 = time.perf_counter()
            exc = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._done(labels, context, exc, t0)
        return wrapper

    def _stream(self, behavior, service, method, kind):
        labels = (service, method, kind)

        async def wrapper(request, context):
            self.started.labels(*labels).inc()
            t0 = time.perf_counter()
            exc = None
            try:
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:                    # a handler that writes with context.write()
                    await result
            except BaseException as e:
                exc = e
                raise
            finally:
                self._done(labels, context, exc, t0)
        return wrapper


def _code(context, exc) -> str:
    code = None
    try:
        code = context.code()
    except Exception:                    # noqa: BLE001 - older grpc: no code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
    if exc is None:
        return "OK"
    import asyncio
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "UNKNOWN"


# -- the endpoint ---------------------------------------------------------------------

def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or :PORT (every address)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics_listen {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9476; "
                         "\"\" disables the endpoint)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Metrics:
    """Everything the daemon exports; `start()` opens the HTTP endpoint."""

    def __init__(self, registry):
        self.prom = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.prom)
        PlatformCollector(registry=self.prom)
        GCCollector(registry=self.prom)
        self.prom.register(DaemonCollector(registry))
        self.grpc = GrpcMetrics(self.prom)
        self._server = None
        self._thread = None

    def interceptors(self) -> list:
        return [self.grpc]

    def start(self, listen: str) -> None:
        if not listen:
            return
        host, port = parse_listen(listen)
        try:
            self._server, self._thread = start_http_server(port, host, registry=self.prom)
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {listen}: {exc.strerror} (another daemon? "
                             "set --metrics-listen to another HOST:PORT, or \"\" to disable)")
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
