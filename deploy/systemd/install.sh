#!/bin/sh
# Installs nodeagent for systemd: the binary, the service and socket units, and the
# example config (never over an existing one). `make install` runs it:
#
#   deploy/systemd/install.sh DESTDIR PREFIX BINARY
#
#   DESTDIR     staging root for packaging; "" for the real system
#   PREFIX      e.g. /usr/local: the binary goes to PREFIX/bin
#   BINARY      the built nodeagent
# Optional environment:
#   UNITDIR     PREFIX/lib/systemd/system by default (/usr/local/lib/systemd/system and
#               /usr/lib/systemd/system are both on systemd's search path)
#   SYSCONFDIR  /etc by default: the config is SYSCONFDIR/nodeagent/config.yaml
# The units name /usr/local/bin/nodeagent and /etc/nodeagent/; both are rewritten to
# PREFIX and SYSCONFDIR as installed (without DESTDIR, which is only for staging).
set -eu

if [ $# -ne 3 ]; then
	echo "usage: $0 DESTDIR PREFIX BINARY" >&2
	exit 2
fi
DESTDIR=$1
PREFIX=${2:-/usr/local}
bin=$3
here=$(cd "$(dirname "$0")" && pwd)
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc}

if [ ! -x "$bin" ]; then
	echo "$0: $bin is not an executable (run make build first)" >&2
	exit 1
fi

install -d -m 0755 "$DESTDIR$PREFIX/bin" "$DESTDIR$UNITDIR" "$DESTDIR$SYSCONFDIR/nodeagent"
install -m 0755 "$bin" "$DESTDIR$PREFIX/bin/nodeagent"

for unit in "$here"/nodeagent.service "$here"/nodeagent-*.socket; do
	name=$(basename "$unit")
	sed -e "s|/usr/local/bin/nodeagent|$PREFIX/bin/nodeagent|g" \
		-e "s|/etc/nodeagent/|$SYSCONFDIR/nodeagent/|g" \
		"$unit" >"$DESTDIR$UNITDIR/$name.tmp"
	chmod 0644 "$DESTDIR$UNITDIR/$name.tmp"
	mv "$DESTDIR$UNITDIR/$name.tmp" "$DESTDIR$UNITDIR/$name"
done

conf=$DESTDIR$SYSCONFDIR/nodeagent/config.yaml
if [ -e "$conf" ]; then
	echo "kept the existing $conf (the shipped example is $here/config.yaml)"
else
	install -m 0644 "$here/config.yaml" "$conf"
fi

if [ -z "$DESTDIR" ]; then
	echo "installed; now: systemctl daemon-reload && systemctl enable --now nodeagent.service"
fi
