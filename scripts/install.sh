#!/usr/bin/env bash
# Builds and installs ocmd and ocm, the systemd units and the example configuration.
# Run `scripts/install.sh --help` for the options; docs/OPERATIONS.md for what comes next.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/usr/local
unit_dir=/etc/systemd/system
config_dir=/etc/ocmd
build_dir=""
destdir=""
dry_run=0
build=1

usage() {
  cat <<EOF
Usage: scripts/install.sh [OPTIONS]

Builds ocmd and ocm (cargo build --release --locked) and installs:
  PREFIX/bin/ocmd, PREFIX/bin/ocm            mode 0755
  PREFIX/share/doc/ocmd/OPERATIONS.md        mode 0644, with PROTOCOL.md, SECURITY.md,
                                             PERSISTENCE.md, BENCHMARKS.md (with its
                                             chart, bench.svg) and BENCHMARK-RUNS.md,
                                             which it refers to, CLIENT.md,
                                             ocmd-alerts.yml (Prometheus alerting rules)
                                             and ocmd-dashboard.json (a Grafana dashboard)
  PREFIX/share/man/man8/ocmd.8               mode 0644: ocmd(8), ocm(1) and a page for
  PREFIX/share/man/man1/ocm.1, ocm-*.1       each of ocm's commands
  PREFIX/share/bash-completion/completions/ocm, PREFIX/share/zsh/site-functions/_ocm,
  PREFIX/share/fish/vendor_completions.d/ocm.fish
                                             mode 0644: ocm's shell completions
  UNIT_DIR/ocmd.service                      mode 0644 (ExecStart= and Documentation=
                                             follow PREFIX, --config CONFIG_DIR)
  UNIT_DIR/ocmd.socket                       mode 0644, for socket activation; not enabled
  CONFIG_DIR/ocmd.toml                       mode 0644, never overwritten: when a different
                                             one exists, the new one goes to ocmd.toml.new

Options:
  --prefix DIR      installation prefix [default: /usr/local]
  --unit-dir DIR    where the systemd unit goes [default: /etc/systemd/system]
  --config-dir DIR  where ocmd.toml goes [default: /etc/ocmd]
  --build-dir DIR   where the built ocmd and ocm are [default: \$CARGO_TARGET_DIR/release,
                    else target/release]
  --no-build        do not run cargo; install the binaries already built
  --destdir DIR     stage the files under DIR (DIR/PREFIX/bin/ocmd, DIR/UNIT_DIR/...) for a
                    package to take (scripts/package-deb); the paths written into the units
                    stay PREFIX, UNIT_DIR and CONFIG_DIR themselves; DIR must be absolute
  --dry-run         print every action without doing any of it
  -h, --help        this text

The installed ocmd.toml keeps its state in /var/lib/ocmd (the unit's StateDirectory=).
Nothing is started: the next steps are printed at the end.
EOF
}

die() {
  echo "install.sh: $*" >&2
  exit 2
}

# A step that failed after others were carried out: what is installed stays as it was.
fail() {
  echo "install.sh: $*" >&2
  exit 1
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --prefix) [[ $# -ge 2 ]] || die "--prefix needs a directory"; prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --unit-dir) [[ $# -ge 2 ]] || die "--unit-dir needs a directory"; unit_dir="$2"; shift 2 ;;
    --unit-dir=*) unit_dir="${1#*=}"; shift ;;
    --config-dir) [[ $# -ge 2 ]] || die "--config-dir needs a directory"; config_dir="$2"; shift 2 ;;
    --config-dir=*) config_dir="${1#*=}"; shift ;;
    --build-dir) [[ $# -ge 2 ]] || die "--build-dir needs a directory"; build_dir="$2"; shift 2 ;;
    --build-dir=*) build_dir="${1#*=}"; shift ;;
    --destdir) [[ $# -ge 2 ]] || die "--destdir needs a directory"; destdir="$2"; shift 2 ;;
    --destdir=*) destdir="${1#*=}"; shift ;;
    --no-build) build=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done
for d in "$prefix" "$unit_dir" "$config_dir"; do
  [[ "$d" == /* ]] || die "directories must be absolute: $d"
done
if [[ -n "$destdir" ]]; then
  [[ "$destdir" == /* ]] || die "--destdir must be absolute: $destdir"
  destdir="${destdir%/}"
fi
# Where the files are written: the final places, or their copies under --destdir.
to_prefix="$destdir$prefix"
to_unit_dir="$destdir$unit_dir"
to_config_dir="$destdir$config_dir"
# The unit's sandbox hides some places from the service: a unit whose ExecStart= or --config
# points there cannot start (203/EXEC, or a missing configuration file).
for d in "$prefix" "$config_dir"; do
  case "$d/" in
    /home/* | /root/* | /run/user/*)
      echo "note: $d is hidden from the service by the unit's ProtectHome=yes: it would not find ocmd or its configuration there; install elsewhere, or set ProtectHome=read-only in a drop-in (systemctl edit ocmd)" >&2 ;;
    /tmp/* | /var/tmp/*)
      echo "note: $d is hidden from the service by the unit's PrivateTmp=yes (it gets an empty /tmp and /var/tmp of its own): it would not find ocmd or its configuration there; install elsewhere" >&2 ;;
  esac
done
if [[ -z "$build_dir" ]]; then
  build_dir="${CARGO_TARGET_DIR:-$root/target}/release"
fi

# Every action goes through here: printed always, carried out unless --dry-run.
run() {
  if [[ $dry_run -eq 1 ]]; then
    echo "would run: $*"
  else
    echo "+ $*"
    "$@"
  fi
}

# Writes stdin to a file (for generated files: the unit with its ExecStart= and the config
# with its state path adjusted).
write_file() {
  local mode="$1" dest="$2" tmp
  if [[ $dry_run -eq 1 ]]; then
    echo "would write: $dest (mode $mode)"
    cat >/dev/null
    return
  fi
  echo "+ write $dest (mode $mode)"
  tmp="$(mktemp "$dest.XXXXXX")"
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
}

if [[ $build -eq 1 ]]; then
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) or pass --no-build"
  run cargo build --release --locked --manifest-path "$root/Cargo.toml" -p ocm-server -p ocm-client
fi
for bin in ocmd ocm; do
  if [[ ! -x "$build_dir/$bin" ]]; then
    if [[ $dry_run -eq 1 ]]; then
      echo "note: $build_dir/$bin does not exist yet"
    else
      die "$build_dir/$bin is missing: build it (drop --no-build) or pass --build-dir"
    fi
  fi
done

# Binaries, the operations guide and the documents it refers to.
run install -d -m 0755 "$to_prefix/bin" "$to_prefix/share/doc/ocmd"
run install -m 0755 "$build_dir/ocmd" "$to_prefix/bin/ocmd"
run install -m 0755 "$build_dir/ocm" "$to_prefix/bin/ocm"
for doc in OPERATIONS PROTOCOL SECURITY PERSISTENCE BENCHMARKS BENCHMARK-RUNS CLIENT; do
  run install -m 0644 "$root/docs/$doc.md" "$to_prefix/share/doc/ocmd/$doc.md"
done
# The chart BENCHMARKS.md shows, and the alerting rules and dashboard OPERATIONS.md describes.
run install -m 0644 "$root/docs/bench.svg" "$to_prefix/share/doc/ocmd/bench.svg"
for example in ocmd-alerts.yml ocmd-dashboard.json; do
  run install -m 0644 "$root/config/$example" "$to_prefix/share/doc/ocmd/$example"
done

# Manual pages and ocm's shell completions, written by the binaries themselves from the
# definitions behind their --help (so they cannot drift from the flags).
man_dir="$to_prefix/share/man"
bash_dir="$to_prefix/share/bash-completion/completions"
zsh_dir="$to_prefix/share/zsh/site-functions"
fish_dir="$to_prefix/share/fish/vendor_completions.d"
run install -d -m 0755 "$man_dir/man1" "$man_dir/man8" "$bash_dir" "$zsh_dir" "$fish_dir"
# Made in a temporary directory first: a generator that fails replaces nothing.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# generated DEST COMMAND...: COMMAND's standard output becomes DEST (mode 0644), once
# COMMAND has succeeded.
generated() {
  local dest="$1"
  shift
  if [[ $dry_run -eq 1 ]]; then
    echo "would write: $dest (mode 0644), from: $*"
    return
  fi
  "$@" >"$scratch/out" || fail "$* failed (exit status $?); $dest is unchanged"
  write_file 0644 "$dest" <"$scratch/out"
}
generated "$man_dir/man8/ocmd.8" "$build_dir/ocmd" --generate-man
if [[ $dry_run -eq 1 ]]; then
  echo "would write: $man_dir/man1/ocm.1 and ocm-COMMAND.1 for each command (mode 0644), from: $build_dir/ocm generate man DIR"
else
  mkdir "$scratch/man1"
  echo "+ $build_dir/ocm generate man $scratch/man1"
  "$build_dir/ocm" generate man "$scratch/man1" >/dev/null \
    || fail "$build_dir/ocm generate man failed; the pages in $man_dir/man1 are unchanged"
  for page in "$scratch/man1"/*.1; do
    run install -m 0644 "$page" "$man_dir/man1/${page##*/}"
  done
fi
generated "$bash_dir/ocm" "$build_dir/ocm" generate completions bash
generated "$zsh_dir/_ocm" "$build_dir/ocm" generate completions zsh
generated "$fish_dir/ocm.fish" "$build_dir/ocm" generate completions fish

# The unit, pointed at this prefix and config directory. It is ours and is replaced on every install; local
# changes belong in a drop-in (systemctl edit ocmd).
run install -d -m 0755 "$to_unit_dir"
sed -e "s#^\# Installed by scripts/install.sh as /etc/systemd/system/ocmd.service#\# Installed by scripts/install.sh as $unit_dir/ocmd.service#" \
  -e "s#^ExecStart=/usr/local/bin/ocmd #ExecStart=$prefix/bin/ocmd #" \
  -e "s# --config /etc/ocmd/ocmd.toml # --config $config_dir/ocmd.toml #" \
  -e "/^Documentation=/s# file:/usr/local/share/doc/ocmd/# file:$prefix/share/doc/ocmd/#" \
  "$root/config/ocmd.service" | write_file 0644 "$to_unit_dir/ocmd.service"
# The socket unit, for socket activation (docs/OPERATIONS.md): installed, not enabled.
sed -e "s#^\# scripts/install.sh as /etc/systemd/system/ocmd.socket, not enabled#\# scripts/install.sh as $unit_dir/ocmd.socket, not enabled#" \
  -e "/^Documentation=/s# file:/usr/local/share/doc/ocmd/# file:$prefix/share/doc/ocmd/#" \
  "$root/config/ocmd.socket" | write_file 0644 "$to_unit_dir/ocmd.socket"

# The configuration is the operator's: never overwritten. Its [state] path is set to the
# one the unit passes with --state, so that the file tells the truth and a reload does not
# see a difference. Mode 0644: the unit's dynamic user must read it, and it holds no secret.
run install -d -m 0755 "$to_config_dir"
config_text="$(sed 's#^path = "room_manager.json"#path = "/var/lib/ocmd/room_manager.json"#' "$root/config/ocmd.toml")"
config_dest="$to_config_dir/ocmd.toml"
if [[ -e "$config_dest" ]]; then
  if [[ "$(cat "$config_dest")" == "$config_text" ]]; then
    echo "keep: $config_dest (already the shipped example)"
    config_dest=""
  else
    echo "keep: $config_dest (changed locally); the shipped example goes to $config_dest.new"
    config_dest="$config_dest.new"
  fi
fi
if [[ -n "$config_dest" ]]; then
  printf '%s\n' "$config_text" | write_file 0644 "$config_dest"
fi

cat <<EOF

$(if [[ $dry_run -eq 1 ]]; then
  echo "Dry run: nothing was changed. After a real run, the next steps are:"
elif [[ -n "$destdir" ]]; then
  echo "Staged under $destdir. Once installed from there, the next steps are:"
else
  echo "Installed. Next steps:"
fi)
  1. edit $config_dir/ocmd.toml ([listen] addresses, limits), then check it:
       $prefix/bin/ocmd --config $config_dir/ocmd.toml --check-config
  2. start the service now and at every boot:
       systemctl daemon-reload && systemctl enable --now ocmd
  3. watch it:
       systemctl status ocmd; journalctl -u ocmd -f; curl -s http://127.0.0.1:9092/metrics
  optionally, let systemd hold the ports across restarts (its addresses win over [listen]:
  give it the same ones first with systemctl edit ocmd.socket):
       systemctl enable ocmd.socket && systemctl stop ocmd && systemctl start ocmd.socket ocmd
See man ocmd, man ocm and $prefix/share/doc/ocmd/OPERATIONS.md.
EOF
