#!/usr/bin/env bash
# Start a local Ray head that `ckd submit --address 127.0.0.1:6379` can join.
# Token authentication stays on: the token is written to ~/.ray/auth_token, and every client
# (ckd submit, ray job submit, the dashboard API) must run with RAY_AUTH_MODE=token.
set -euo pipefail
export RAY_AUTH_MODE=token
PORT="${RAY_PORT:-6379}"
ray start --head --port "$PORT" --dashboard-host 127.0.0.1 --num-cpus "${RAY_NUM_CPUS:-$(nproc)}" "$@"
echo
echo "Ray head on 127.0.0.1:$PORT, dashboard on http://127.0.0.1:8265 (Authorization: Bearer \$(cat ~/.ray/auth_token))"
echo "run a job:   RAY_AUTH_MODE=token ckd submit jobs/stream.yaml --address 127.0.0.1:$PORT"
echo "stop it:     ray stop"
