#!/bin/sh
# Entry point of the Far Mesh images: runs the command it is given (`far-mesh ...`, `far-node ...`), after one
# convenience for a compose deployment: when FAR_MESH_DHT_BOOTSTRAP is not set but FAR_MESH_DHT_BOOTSTRAP_FILE
# names the multiaddrs file the bootstrap writes (`far-mesh dht --maddrs-file`, on a shared volume), it waits for
# that file and points FAR_MESH_DHT_BOOTSTRAP at the bootstrap by its service name:
# /dns4/$FAR_MESH_DHT_BOOTSTRAP_HOST/tcp/$FAR_MESH_DHT_BOOTSTRAP_PORT/p2p/<its peer ID>. The peer ID comes from the
# file (it is fixed by the bootstrap's identity key); the address is the DNS name, so a recreated bootstrap
# container with a new IP is still found.
set -eu
if [ -z "${FAR_MESH_DHT_BOOTSTRAP:-}" ] && [ -n "${FAR_MESH_DHT_BOOTSTRAP_FILE:-}" ]; then
  waited=0
  limit="${FAR_MESH_DHT_BOOTSTRAP_WAIT_S:-120}"
  until [ -s "$FAR_MESH_DHT_BOOTSTRAP_FILE" ]; do
    if [ "$waited" -ge "$limit" ]; then
      echo "entrypoint: $FAR_MESH_DHT_BOOTSTRAP_FILE did not appear within ${limit}s (is the bootstrap running?)" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  peer_id=$(sed -n 's#.*/p2p/\([A-Za-z0-9]*\).*#\1#p' "$FAR_MESH_DHT_BOOTSTRAP_FILE" | head -n 1)
  if [ -z "$peer_id" ]; then
    echo "entrypoint: no /p2p/<peer id> in $FAR_MESH_DHT_BOOTSTRAP_FILE" >&2
    exit 1
  fi
  FAR_MESH_DHT_BOOTSTRAP="/dns4/${FAR_MESH_DHT_BOOTSTRAP_HOST:-bootstrap}/tcp/${FAR_MESH_DHT_BOOTSTRAP_PORT:-31337}/p2p/$peer_id"
  export FAR_MESH_DHT_BOOTSTRAP
fi
exec "$@"
