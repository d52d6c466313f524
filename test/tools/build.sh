#!/usr/bin/env bash
# Builds the real peer binaries that nodeagent's tests and benchmarks run against
# (SPIRE, Jaeger, otel-cli, telemetrygen, an OpenTelemetry Collector) and the linter,
# from the Go module proxy, once per machine, into a cache outside the clone:
#
#   ${NODEAGENT_TOOLS_CACHE:-/var/cache/nodeagent-tools}/<tool>-<version>/<binary>
#
# A binary already in the cache is kept, so CI on the same machine reuses it and a
# fresh machine builds it. Each binary is built to a temporary name and renamed into
# place, so an interrupted build never leaves a half-written binary behind.
# Tests find the binaries with package test/peers (peers.Path).
#
# Usage: test/tools/build.sh [tool...]   (default: every tool; names from the table below)
#        test/tools/build.sh --list       (print the table)
# Each build's time goes to stderr; each binary's path goes to stdout as "binary<TAB>path".
set -euo pipefail

# The one list of tools and versions. test/peers/peers.go holds the same table, and
# test/peers's tests fail when the two disagree.
# BEGIN TOOLS
# tool           version    binaries (package directory inside the module, after ':')
TOOLS_TABLE='
spire          v1.13.3    spire-server:cmd/spire-server spire-agent:cmd/spire-agent
jaeger         v1.76.0    jaeger:cmd/jaeger
otel-cli       v0.4.5     otel-cli:.
telemetrygen   v0.161.0   telemetrygen:.
golangci-lint  v2.15.0    golangci-lint:cmd/golangci-lint
otelcol        v0.165.0   otelcol:.
'
# END TOOLS

# The module each tool is built from. otelcol is our own small module beside this script.
module_of() {
	case "$1" in
	spire) echo github.com/spiffe/spire ;;
	jaeger) echo github.com/jaegertracing/jaeger ;;
	otel-cli) echo github.com/equinix-labs/otel-cli ;;
	telemetrygen) echo github.com/open-telemetry/opentelemetry-collector-contrib/cmd/telemetrygen ;;
	golangci-lint) echo github.com/golangci/golangci-lint/v2 ;;
	otelcol) echo local ;;
	*) return 1 ;;
	esac
}

# Extra linker flags (version stamps) per tool.
ldflags_of() {
	local tool=$1 version=$2
	case "$tool" in
	# main.date must be set too, or golangci-lint reports "(devel)" from the build info.
	golangci-lint) echo "-X main.version=${version#v} -X main.commit=$version -X main.date=module-proxy" ;;
	otel-cli) echo "-X main.version=${version#v}" ;; # shown in its spans' resource only
	*) echo "" ;;
	esac
}

CACHE=${NODEAGENT_TOOLS_CACHE:-/var/cache/nodeagent-tools}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The machine's own Go; no tool here needs a newer one.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
export GOFLAGS="-trimpath -buildvcs=false"

log() { printf 'build.sh: %s\n' "$*" >&2; }

table() { sed -e '/^[[:space:]]*$/d' <<<"$TOOLS_TABLE"; }

tool_line() {
	local line
	line=$(table | awk -v t="$1" '$1 == t')
	[[ -n $line ]] || { log "unknown tool $1 (known: $(table | awk '{print $1}' | tr '\n' ' '))"; return 1; }
	echo "$line"
}

# build_tool TOOL: builds every missing binary of TOOL into $CACHE/TOOL-VERSION/.
build_tool() {
	local tool=$1 line version specs module dir missing=() spec bin pkg
	line=$(tool_line "$tool")
	read -r _ version specs <<<"$line"
	module=$(module_of "$tool")
	dir="$CACHE/$tool-$version"
	mkdir -p "$dir"

	# One builder per tool at a time (two CI runs, or CI and a developer).
	exec {lock}>"$dir/.lock"
	flock "$lock"

	for spec in $specs; do
		bin=${spec%%:*}
		[[ -x $dir/$bin ]] || missing+=("$spec")
	done
	if ((${#missing[@]} == 0)); then
		log "$tool $version: cached"
		print_paths "$dir" "$specs"
		exec {lock}>&-
		return 0
	fi

	local src start
	start=$(date +%s)
	# Leftovers of a build that was killed (the lock says none is running now).
	rm -rf "$CACHE/.build-$tool-"* "$dir"/.*.tmp.*
	WORK=$(mktemp -d "$CACHE/.build-$tool-XXXXXX")
	if [[ $module == local ]]; then
		src="$HERE/$tool"
		module="test/tools/$tool"
	else
		# The module cache copy is read-only, and some tools (jaeger) carry replace
		# directives that stop `go install`: build inside a writable copy, as the main
		# module, with the tool's own go.mod and go.sum.
		local moddir
		moddir=$(go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
		[[ -n $moddir && -d $moddir ]] || { log "$tool: go mod download $module@$version gave no directory"; return 1; }
		src="$WORK/src"
		cp -r "$moddir" "$src"
		chmod -R u+w "$src"
	fi

	local extra
	extra=$(ldflags_of "$tool" "$version")
	for spec in "${missing[@]}"; do
		bin=${spec%%:*}
		pkg=${spec#*:}
		[[ $pkg == . ]] && pkg= || pkg=/$pkg
		log "$tool $version: building $bin from $module$pkg ..."
		local t0 tmp
		t0=$(date +%s)
		tmp="$dir/.$bin.tmp.$$"
		TMPBIN=$tmp
		(cd "$src" && go build -ldflags="-s -w $extra" -o "$tmp" ".$pkg")
		TMPBIN=
		mv -f "$tmp" "$dir/$bin"
		log "$tool $version: built $bin in $(($(date +%s) - t0))s ($(du -h "$dir/$bin" | cut -f1))"
	done
	rm -rf "$WORK"
	WORK=
	log "$tool $version: done in $(($(date +%s) - start))s"
	print_paths "$dir" "$specs"
	exec {lock}>&-
}

print_paths() {
	local dir=$1 spec
	for spec in $2; do
		printf '%s\t%s\n' "${spec%%:*}" "$dir/${spec%%:*}"
	done
}

WORK=
TMPBIN=
cleanup() {
	local rc=$?
	[[ -z $TMPBIN ]] || rm -f "$TMPBIN"
	[[ -z $WORK ]] || rm -rf "$WORK"
	((rc == 0)) || log "failed (exit $rc)"
}
trap cleanup EXIT

main() {
	if [[ ${1:-} == --list ]]; then
		table
		return 0
	fi
	local tools=("$@") t
	if ((${#tools[@]} == 0)); then
		mapfile -t tools < <(table | awk '{print $1}')
	fi
	for t in "${tools[@]}"; do tool_line "$t" >/dev/null; done
	mkdir -p "$CACHE"
	# Stops at the first failure (set -e), leaving the binaries built so far.
	for t in "${tools[@]}"; do
		build_tool "$t"
	done
}

main "$@"
