"""Container health check: ``python /app/deploy/healthcheck.py URL`` (HTTP 200 → exit 0) or ``... tcp HOST PORT``.

The images carry no curl; the services' own /readyz (/healthz) answers 503 with the reason while not ready."""

import socket
import sys
import urllib.request

if sys.argv[1] == "tcp":
    socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=3).close()
else:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:  # raises on 4xx/5xx
        sys.exit(0 if response.status == 200 else 1)
