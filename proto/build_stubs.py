"""Generate the Python gRPC stubs from proto/dirtytrack/v1/*.proto.

The one stub policy: stubs are generated at build time (setup.py runs this
before build_py and build_ext) into service/dirtytrack/v1/, and never
committed (.gitignore). tests/test_daemon_proto.py regenerates them into a
temporary directory and checks the built ones match the .proto.

    python proto/build_stubs.py [OUT_DIR]      # OUT_DIR defaults to service/
"""
from __future__ import annotations

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = sorted(glob.glob(os.path.join(HERE, "dirtytrack", "v1", "*.proto")))


def generate(out_dir: str) -> list[str]:
    """Run grpc_tools.protoc; returns the files written."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError:
        sys.exit("building dirtytrack needs grpcio-tools (pip install grpcio-tools): "
                 "it generates the gRPC stubs from proto/")
    pkg_dir = os.path.join(out_dir, "dirtytrack", "v1")
    os.makedirs(pkg_dir, exist_ok=True)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{HERE}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {PROTOS}")
    init = os.path.join(pkg_dir, "__init__.py")
    with open(init, "w") as f:
        f.write('"""Generated from proto/dirtytrack/v1 at build time (proto/build_stubs.py)."""\n')
    return sorted(glob.glob(os.path.join(pkg_dir, "*.py*")))


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else
                         os.path.join(os.path.dirname(HERE), "service")):
        print(path)
