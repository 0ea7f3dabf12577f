#!/usr/bin/env bash
# Install vipd for systemd: a private virtualenv, the `vipd` command, the unit and the env file.
#
#   sudo packaging/install.sh [WHEEL-OR-SOURCE-DIR]      (default: this checkout)
#
# Steps (docs/systemd.md lists them for doing by hand):
#   1. python3 -m venv $VIPD_PREFIX; pip install the wheel (or the source tree)
#   2. $VIPD_BINDIR/vipd -> $VIPD_PREFIX/bin/vipd
#   3. vipd.service into $VIPD_UNITDIR
#   4. vipd.env into $VIPD_CONFDIR, only if there is none yet (never overwrites your settings)
#   5. the docs (docs/*.md) into $VIPD_DOCDIR, where the unit's Documentation= points
#   6. systemctl daemon-reload (when systemd runs); enabling/starting is left to you
# Every location can be overridden (tests install into a scratch directory):
#   VIPD_PREFIX=/opt/vipd VIPD_BINDIR=/usr/local/bin VIPD_UNITDIR=/etc/systemd/system
#   VIPD_CONFDIR=/etc/vipd VIPD_DOCDIR=/usr/local/share/doc/vipd PYTHON=python3
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
source_arg="${1:-$repo}"
prefix="${VIPD_PREFIX:-/opt/vipd}"
bindir="${VIPD_BINDIR:-/usr/local/bin}"
unitdir="${VIPD_UNITDIR:-/etc/systemd/system}"
confdir="${VIPD_CONFDIR:-/etc/vipd}"
docdir="${VIPD_DOCDIR:-/usr/local/share/doc/vipd}"
python="${PYTHON:-python3}"

say() { printf 'install.sh: %s\n' "$*"; }

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "vipd needs Python >= 3.11 ($python is $("$python" -V 2>&1)); set PYTHON=..." >&2
  exit 2
fi
if [ ! -e "$source_arg" ]; then
  say "no such wheel or directory: $source_arg" >&2
  exit 2
fi

say "virtualenv in $prefix"
[ -x "$prefix/bin/python" ] || "$python" -m venv "$prefix"
"$prefix/bin/python" -m pip install --quiet --upgrade "$source_arg"

say "command $bindir/vipd"
install -d -m 0755 "$bindir"
ln -sfn "$prefix/bin/vipd" "$bindir/vipd"

say "unit $unitdir/vipd.service"
install -d -m 0755 "$unitdir"
sed -e "s#^ExecStart=/usr/local/bin/vipd #ExecStart=$bindir/vipd #" \
    -e "s#file:/usr/local/share/doc/vipd/#file:$docdir/#" \
    "$repo/systemd/vipd.service" > "$unitdir/vipd.service.tmp"
chmod 0644 "$unitdir/vipd.service.tmp"
mv "$unitdir/vipd.service.tmp" "$unitdir/vipd.service"

install -d -m 0755 "$confdir"
if [ -e "$confdir/vipd.env" ]; then
  say "keeping existing $confdir/vipd.env"
else
  say "example configuration $confdir/vipd.env (edit it: VIPD_ADDRESS, backends)"
  install -m 0600 "$repo/systemd/vipd.env" "$confdir/vipd.env"
fi

say "docs in $docdir"
install -d -m 0755 "$docdir"
install -m 0644 "$repo"/docs/*.md "$docdir/"

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload
fi
say "done. Next: edit $confdir/vipd.env, then: systemctl enable --now vipd && vipd status"
