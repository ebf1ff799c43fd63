#!/usr/bin/env bash
# The tour on this machine (localhost, two ranks, no sshd): up, status, query, logs, down.
# The model is the built-in tiny one (random weights: its text is gibberish, but it is real
# tensor-parallel generation). Whatever happens, the job is taken down again on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=demo
cleanup() { set +x; dslaunch down --name "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
set -x
dslaunch up --hostfile hostfiles/localhost --name "$NAME" --init-method tcp
dslaunch status --name "$NAME"
dslaunch query --name "$NAME" "The quick brown fox" --max-new-tokens 24
dslaunch query --name "$NAME" --stream "Hello world" --max-new-tokens 24
dslaunch query --name "$NAME" --health --deep
dslaunch logs --name "$NAME" --lines 3
dslaunch down --name "$NAME"
