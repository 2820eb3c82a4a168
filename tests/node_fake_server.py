"""A stand-in for ``python -m node_server.petals_server`` (supervisor tests): writes the status file like the
real one, starts a grandchild (like Petals' handlers/p2pd), and in ``--mode crash-once`` dies on its first run."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--mode", default="ok")
parser.add_argument("--options", type=Path, required=True)
parser.add_argument("--status-file", type=Path, required=True)
args = parser.parse_args()
options = json.loads(args.options.read_text())
start, end = (int(x) for x in (options["blocks"] or "1:3").split(":"))
marker = args.status_file.with_name("fake-server-runs")
runs = int(marker.read_text()) if marker.exists() else 0
marker.write_text(str(runs + 1))
grandchild = None


def write(state):
    tmp = args.status_file.with_name(args.status_file.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "state": state, "start_block": start, "end_block": end,
                               "device": "cpu", "gpu": None, "vram_total_gb": None}))
    os.replace(tmp, args.status_file)


stopping = []


def on_term(*_):  # only note it: cleaning up inside a signal handler can deadlock on a lock main holds
    stopping.append(True)


def stop_if_asked():
    if stopping:
        write("OFFLINE")
        if grandchild is not None:
            grandchild.kill()
            grandchild.wait()
        os._exit(0)


signal.signal(signal.SIGTERM, on_term)  # before the grandchild exists: a stop never orphans it
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"fake server run {runs + 1} pid {os.getpid()} grandchild {grandchild.pid}", flush=True)
write("JOINING")
time.sleep(0.3)
stop_if_asked()
write("ONLINE")
if args.mode == "crash-once" and runs == 0:
    time.sleep(0.5)
    print("fake server: simulated crash (exit 3)", flush=True)
    os._exit(3)  # leaves the grandchild behind, like a crashed Petals server leaves p2pd
while True:
    time.sleep(0.1)
    stop_if_asked()
    write("ONLINE")
