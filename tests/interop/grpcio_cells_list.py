#!/usr/bin/env python3
"""An unrelated gRPC client (Python grpcio, stubs generated from api/*.proto)
calls CellService.List over mutual TLS and decodes the cell tree. Usage:
  grpcio_cells_list.py API_DIR TARGET CA_CRT CLIENT_CRT CLIENT_KEY
TARGET is a unix socket path or HOST:PORT. Prints {"cells": N, "depth": D}
(D: levels of the deepest cell, 1 for a top-level one) as JSON."""
import importlib
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc


def depth(nodes):
    return max((1 + depth(n.children) for n in nodes), default=0)


def count(nodes):
    return sum(1 + count(n.children) for n in nodes)


def main():
    api, target, ca, crt, key = sys.argv[1:6]
    out = tempfile.mkdtemp(prefix="aurae-grpcio-")
    rc = protoc.main(["protoc", f"-I{api}", f"--python_out={out}", f"--grpc_python_out={out}", f"{api}/cells.proto"])
    if rc != 0:
        sys.exit(f"protoc failed: {rc}")
    sys.path.insert(0, out)
    pb = importlib.import_module("cells_pb2")
    stubs = importlib.import_module("cells_pb2_grpc")
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(crt, "rb").read(),
    )
    address = target if ":" in target and not target.startswith("/") else f"unix:{target}"
    opts = [("grpc.ssl_target_name_override", "server.unsafe.aurae.io"), ("grpc.default_authority", "server.unsafe.aurae.io")]
    with grpc.secure_channel(address, creds, options=opts) as channel:
        r = stubs.CellServiceStub(channel).List(pb.CellServiceListRequest(), timeout=10)
    print(json.dumps({"cells": count(r.cells), "depth": depth(r.cells)}))


if __name__ == "__main__":
    main()
