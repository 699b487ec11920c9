#!/usr/bin/env bash
# Builds every fuzz target of fuzz/ (cargo-fuzz, libFuzzer, no sanitizer) and runs each for a
# fixed budget, one after the other, then prints executions per target.
#
#   benches/fuzz.sh [SECONDS] [TARGET...]      # 60 s per target by default, every target
#   benches/fuzz.sh 20 control_frames disco    # a short run of two targets
#
# One fuzzer runs at a time, in one process (no -jobs, no -fork): on a 2-core machine shared
# with other work, a second one would only halve both. A target that crashes is started again
# for what is left of its budget, so that its figure covers the whole budget; every crash
# counts, and its input is kept in fuzz/artifacts/TARGET/ (reproduce with
# `fuzz/target/x86_64-unknown-linux-gnu/release/TARGET FILE`). The corpus grows in
# fuzz/corpus/TARGET/ (not in git); fuzz/seeds/TARGET/ is read as a second corpus, and so are
# the directories EXTRA_SEEDS names for a target (`policy` starts from configs/, whose
# policy.example.toml shows every construct of a policy file). The scratch
# directories targets make (/dev/shm/meshlink-fuzz-*) are removed once their process ended.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`, installed here if missing). Stable
# Rust is enough: without a sanitizer, cargo-fuzz passes no unstable flag. The build is a
# release build with debug assertions (overflow checks on), as `cargo fuzz build` makes it.
#
# Exit status: 0 when every target ran its budget without a crash, 1 when some target crashed
# or timed out (the table says which), 2 when the build failed.
set -u -o pipefail

BUDGET=${1:-60}
shift || true
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN="${CARGO_TARGET_DIR:-fuzz/target}/$TRIPLE/release"

# Targets whose inputs are files kept elsewhere in the repository: seed directories besides
# fuzz/seeds/TARGET. Every target of fuzz/Cargo.toml is run; this only adds seeds.
declare -A EXTRA_SEEDS=([policy]="configs")

if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^meshlink-fuzz$')
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it" >&2
    cargo install cargo-fuzz --locked || exit 2
fi

echo "building ${#TARGETS[@]} fuzz targets (cargo fuzz build --sanitizer none)" >&2
cargo fuzz build --sanitizer none >&2 || exit 2

echo "## Fuzz run: ${BUDGET} s per target"
echo
echo "- commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- fuzz proto agent coordinator 2>/dev/null || echo ' (with uncommitted changes)')"
echo "- machine: $(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "- toolchain: $(rustc --version), $(cargo fuzz --version)"
echo "- command: benches/fuzz.sh $BUDGET${*:+ $*}"
echo
echo "| target | executions | execs/s | corpus | crashes | first crash |"
echo "|---|---:|---:|---:|---:|---|"

failed=0
for t in "${TARGETS[@]}"; do
    corpus="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
    for d in ${EXTRA_SEEDS[$t]:-}; do
        [ -d "$d" ] && dirs+=("$d")
    done
    log=$(mktemp)
    execs=0
    crashes=0
    first=""
    start=$(date +%s)
    left=$BUDGET
    while [ "$left" -gt 0 ]; do
        "$BIN/$t" "${dirs[@]}" -max_total_time="$left" -timeout=10 -print_final_stats=1 \
            -artifact_prefix="$artifacts/" >"$log" 2>&1
        rc=$?
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        execs=$((execs + ${n:-0}))
        if [ "$rc" -ne 0 ]; then
            crashes=$((crashes + 1))
            if [ -z "$first" ]; then
                first=$(grep -m1 -A1 -E "panicked at|ERROR: libFuzzer" "$log" | tail -1 | tr '|' '/' | cut -c1-160)
                cp "$log" "$artifacts/first-crash.log"
            fi
            # A target that dies at start-up would spin: give up on it.
            [ "${n:-0}" -eq 0 ] && break
        else
            break
        fi
        left=$((BUDGET - ($(date +%s) - start)))
    done
    elapsed=$(( $(date +%s) - start ))
    [ "$elapsed" -gt 0 ] || elapsed=1
    size=$(find "$corpus" -type f | wc -l)
    echo "| $t | $execs | $((execs / elapsed)) | $size | $crashes | ${first:--} |"
    [ "$crashes" -eq 0 ] || failed=1
    rm -f "$log"
    # The scratch directories of targets' processes that have ended (fuzz/src/lib.rs names
    # them meshlink-fuzz-TARGET-PID); anything else of that prefix is not ours to remove.
    for d in /dev/shm/meshlink-fuzz-* "${TMPDIR:-/tmp}"/meshlink-fuzz-*; do
        pid=${d##*-}
        [ -d "$d" ] && [[ $pid =~ ^[0-9]+$ ]] || continue
        kill -0 "$pid" 2>/dev/null || rm -rf -- "$d"
    done
done
exit "$failed"
