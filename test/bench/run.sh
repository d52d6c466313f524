#!/usr/bin/env bash
# `make bench`: every benchmark, each measured against its peer in the same run (never
# asserted by a test). Results go to stdout; BENCHMARKS.md records a run and how to read it.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash test/tools/build.sh telemetrygen otelcol >/dev/null

echo "== steering: cost of the cgroup programs on connect() (root; attached vs detached, one run)"
go test -run '^$' -bench Connect -benchtime 20000x ./ebpf

echo "== uplink: cost of one re-evaluation (root)"
go test -run '^$' -bench Evaluate ./netcfg

echo "== proxy: direct loopback vs HAProxy (TCP, splice) vs nodeagent"
go run ./test/bench/proxy

echo "== OTLP relay (durable queue) vs OpenTelemetry Collector v0.165.0"
go run ./test/bench/otlp
