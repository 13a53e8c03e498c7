#!/bin/sh
# `docker run IMAGE` serves; `docker run IMAGE index add ...` or `adapters inspect ...` run the CLI.
# exec: uvicorn becomes PID 1's child-free process and receives SIGTERM directly (graceful drain).
set -e
exec uniadapter "$@"
