#!/usr/bin/env bash
# The release build of Ferry's binaries: `cargo build --release` with the committed
# profile-guided-optimisation profile (pgo/ferry.profdata.gz, made by pgo/train.sh).
#
#   pgo/build.sh [CARGO BUILD ARGS...]     e.g. pgo/build.sh -p ferry-relay -p ferry
#
# Binaries go to target/pgo/release/ (a target directory of their own, so that this build and
# a plain `cargo build --release` do not rebuild each other). With no package named it builds
# ferry-relay and ferry. The profile is read by the toolchain's LLVM: when this toolchain is
# older than the one that wrote it (pgo/PROFILE), the build goes on without it and says so.
# On this machine the profile takes 10-20 % off the CPU each request costs (finding 35).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET="$ROOT/target/pgo"
log() { echo "[pgo/build] $*" >&2; }

llvm_major() { sed -n 's/^LLVM version: \([0-9]*\).*/\1/p'; }
made_with=$(llvm_major <"$ROOT/pgo/PROFILE")
have=$(rustc -vV | llvm_major)

args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(-p ferry-relay -p ferry)

flags=${RUSTFLAGS:-}
if [[ -n $have && -n $made_with && $have -ge $made_with ]]; then
  # Named by its content: a new profile changes RUSTFLAGS, which tells cargo to rebuild.
  sum=$(sha256sum "$ROOT/pgo/ferry.profdata.gz" | cut -c1-16)
  PROFILE="$TARGET/ferry-$sum.profdata"
  mkdir -p "$TARGET"
  [[ -s $PROFILE ]] || { gzip -dc "$ROOT/pgo/ferry.profdata.gz" >"$PROFILE.tmp" && mv "$PROFILE.tmp" "$PROFILE"; }
  flags="$flags -Cprofile-use=$PROFILE"
else
  log "this toolchain's LLVM (${have:-unknown}) is older than the profile's ($made_with): building without it"
fi
RUSTFLAGS="${flags# }" CARGO_TARGET_DIR="$TARGET" \
  cargo build --release --locked --manifest-path "$ROOT/Cargo.toml" "${args[@]}"
