"""Daemon settings: command-line flags > DIRTYTRACK_* environment > TOML file > defaults.

The TOML file is --config, else $DIRTYTRACK_CONFIG, else
/etc/dirtytrack/dirtytrack.toml when it exists. Keys are the field names
below (a `[daemon]` table or the top level); the environment variable of
`max_message_bytes` is DIRTYTRACK_MAX_MESSAGE_BYTES.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, fields

if sys.version_info >= (3, 11):
    import tomllib
else:                                    # pragma: no cover
    import tomli as tomllib

DEFAULT_CONFIG_FILE = "/etc/dirtytrack/dirtytrack.toml"
DEFAULT_SOCKET = "/run/dirtytrack/dirtytrack.sock"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9476"


@dataclass
class Config:
    socket: str = DEFAULT_SOCKET           # Unix socket ("" = none); 0600 in a 0700 directory
    listen: str = ""                       # HOST:PORT for TCP (TLS unless insecure_tcp)
    tls_cert: str = ""                     # PEM certificate chain for TCP
    tls_key: str = ""                      # PEM private key for TCP
    tls_client_ca: str = ""                # PEM CA: clients must present a cert it signed (mTLS)
    insecure_tcp: bool = False             # allow plain-text TCP (tests, trusted networks only)
    default_interval_ms: int = 1000        # scan cadence without subscribers, Subscribe default
    min_interval_ms: int = 10
    max_interval_ms: int = 60_000
    default_window: int = 8                # unacknowledged sets in flight per Subscribe
    max_message_bytes: int = 1 << 20       # chunk budget (gRPC's default receive limit is 4 MiB)
    cursor_idle_timeout_s: float = 3600.0  # cursors nobody reads for this long are dropped
    shutdown_grace_s: float = 2.0
    log_level: str = "INFO"
    metrics_listen: str = DEFAULT_METRICS_LISTEN  # Prometheus /metrics on HOST:PORT ("" = off)
    health_listen: str = ""                # plain-TCP HOST:PORT serving only grpc.health.v1


class ConfigError(ValueError):
    pass


def _convert(name: str, kind, value, source: str):
    try:
        if kind is bool or kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if kind in (int, "int"):
            return int(value)
        if kind in (float, "float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid {kind}") from None


def load(flags: dict | None = None, env: dict | None = None,
         config_file: str | None = None) -> Config:
    """flags: values given on the command line (None = not given)."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or env.get("DIRTYTRACK_CONFIG") or (
        DEFAULT_CONFIG_FILE if os.path.exists(DEFAULT_CONFIG_FILE) else None)
    from_file: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        from_file = dict(data.get("daemon", {}), **{k: v for k, v in data.items()
                                                     if not isinstance(v, dict)})
    known = {f.name: f.type for f in fields(Config)}
    for key in from_file:
        if key not in known:
            raise ConfigError(f"config file {path}: unknown key {key!r} (known: "
                              f"{', '.join(sorted(known))})")
    values = {}
    for name, kind in known.items():
        env_name = f"DIRTYTRACK_{name.upper()}"
        if name in flags:
            values[name] = _convert(name, kind, flags[name], "flag --" + name.replace("_", "-"))
        elif env_name in env:
            values[name] = _convert(name, kind, env[env_name], f"environment {env_name}")
        elif name in from_file:
            values[name] = _convert(name, kind, from_file[name], f"config file {path}")
    cfg = dataclasses.replace(Config(), **values)
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    if not cfg.socket and not cfg.listen:
        raise ConfigError("nothing to listen on: give a socket path or --listen HOST:PORT")
    if cfg.listen and not cfg.insecure_tcp and not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError(f"--listen {cfg.listen} needs TLS: give --tls-cert and --tls-key "
                          "(and --tls-client-ca for mutual TLS), or --insecure-tcp to accept "
                          "plain-text TCP on a trusted network")
    if cfg.tls_client_ca and not cfg.listen:
        raise ConfigError("--tls-client-ca applies to TCP only: give --listen too")
    if not 1 <= cfg.min_interval_ms <= cfg.default_interval_ms <= cfg.max_interval_ms:
        raise ConfigError("intervals must satisfy 1 <= min_interval_ms <= default_interval_ms "
                          "<= max_interval_ms")
    if not cfg.cursor_idle_timeout_s > 0:           # also refuses NaN
        raise ConfigError(f"cursor_idle_timeout_s = {cfg.cursor_idle_timeout_s:g} must be a "
                          "positive number of seconds")
    for name in ("metrics_listen", "health_listen"):
        value = getattr(cfg, name)
        host, sep, port = value.rpartition(":")
        if value and not (sep and port.isdigit() and int(port) < 65536):
            raise ConfigError(f"{name} = {value!r} is not HOST:PORT (e.g. 127.0.0.1:9476; "
                              "\"\" disables it)")
    if not 64 << 10 <= cfg.max_message_bytes <= 4 << 20:
        raise ConfigError("max_message_bytes must be between 64 KiB and 4 MiB (gRPC's default "
                          "receive limit)")
