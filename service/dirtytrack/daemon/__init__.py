"""The dirtytrack daemon: gRPC front door to process tracking (dirtytrack.v1).

config     flags > DIRTYTRACK_* environment > TOML file > defaults
registry   targets (one ProcessTracker each, one scan task each) and cursors
cursors    per-client pending bitmaps, unacknowledged sets, gapless resume
encoding   sets -> DirtySetChunk messages (runs or bitmap, split below limits)
servicer   the RPCs and their error statuses
server     grpc.aio server, sockets, TLS, health, reflection, SIGTERM
client     a small client for the CLI, tests and bench
"""
