#!/usr/bin/env bash
# Refreshes .ci/advisory-db.tar.gz, the RustSec advisory database snapshot that
# `cargo xtask test` (step "deny") uses when github.com cannot be reached: the files of
# https://github.com/rustsec/advisory-db (CC0-1.0) and, in SNAPSHOT, the commit and its time;
# xtask makes it a one-commit git repository dated so (cargo-deny reads the commit time). Usage: .ci/advisory-db-snapshot.sh [SRC]
# where SRC is a clone or mirror of advisory-db (default: clone from GitHub).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-https://github.com/rustsec/advisory-db}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q --depth 1 "$src" "$work/full"
date=$(git -C "$work/full" log -1 --format=%cI)
commit=$(git -C "$work/full" rev-parse HEAD)
# cargo-deny's directory name for the default database URL.
db="$work/advisory-db-3157b0e258782691"
mkdir "$db"
git -C "$work/full" archive HEAD crates rust LICENSE.txt | tar -x -C "$db"
printf '%s %s\n' "$commit" "$date" > "$db/SNAPSHOT"
tar -C "$work" --sort=name --owner=0 --group=0 --mtime="$date" -czf .ci/advisory-db.tar.gz advisory-db-3157b0e258782691
echo "snapshot of $commit ($date): $(du -h .ci/advisory-db.tar.gz | cut -f1)"
