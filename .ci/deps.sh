#!/usr/bin/env bash
# Installs what the tests need on a fresh machine of this kind: Debian packages (when
# root and missing) and the peer binaries, built once per machine into a cache
# outside the clone (test/tools/build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# Commands the tests call, and the Debian package each comes from.
need=(ip:iproute2 nsenter:util-linux setpriv:util-linux unshare:util-linux strace:strace clang:clang llc:llvm
	socat:socat haproxy:haproxy systemd-analyze:systemd)
missing=()
for pair in "${need[@]}"; do
	command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# Headers for `make generate` (bpf_helpers.h, linux/bpf.h).
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
[ -f /usr/include/linux/bpf.h ] || missing+=(linux-libc-dev)
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u | grep .)
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing packages: ${missing[*]} (run as root, or apt-get install them)" >&2
		exit 1
	fi
	echo "installing: ${missing[*]}" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

go mod download
(cd deploy/test && go mod download)
(cd deploy/test/apiserver && go mod download)
bash test/tools/build.sh >/dev/null
