#!/usr/bin/env bash
# The three-command tour on this machine (localhost, two ranks, no sshd): up, status, logs, down.
# Whatever happens, the job is taken down again on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=demo
cleanup() { set +x; dslaunch down --name "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
set -x
dslaunch up --hostfile hostfiles/localhost --name "$NAME" --init-method tcp
dslaunch status --name "$NAME"
dslaunch logs --name "$NAME" --lines 5
dslaunch down --name "$NAME"
