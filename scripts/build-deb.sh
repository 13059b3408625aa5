#!/bin/sh
# Builds the Debian package: target/debian/optout-sync_<version>-1_<arch>.deb (under
# CARGO_TARGET_DIR when that is set). Needs cargo-deb: cargo install cargo-deb --locked
#
#   1. the production binary: release, without default features (no demo, no fakes);
#   2. man pages and shell completions, written by the hidden `optout-sync generate`
#      command of a separate build with the `generate` feature (so the packaged binary
#      carries neither clap_mangen nor clap_complete), into target/generated/;
#   3. `cargo deb --no-build`: packages the binary of step 1 with the unit, the example
#      configuration (a conffile), the generated files and the README, as listed in
#      Cargo.toml's [package.metadata.deb].
set -eu
cd "$(dirname "$0")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-deb: cargo-deb is missing; install it with: cargo install cargo-deb --locked" >&2
    exit 1
fi

cargo build --release --locked --no-default-features

generated=target/generated
rm -rf "$generated"
for what in man completions; do
    cargo run --quiet --locked --no-default-features --features generate -- \
        generate "$what" "$generated/$what"
done

cargo deb --no-build --locked "$@"
