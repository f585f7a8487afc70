#!/usr/bin/env bash
# Every SIMD intrinsic of the kernels must be inlined into its #[target_feature] function.
#
# The kernels are written once over `Simd` and run inside one `#[target_feature]` function per
# instruction set (`simd.rs`'s `run_avx2`, `run_avx512`, ...), into which every helper is
# `#[inline(always)]`. A closure (or a helper without the attribute) is compiled apart, without
# those features; where LLVM does not inline it, each intrinsic in it becomes a function call
# (`core::core_arch::x86::..::_mm256_fmadd_ps` as a symbol of its own). That happened once in the
# attention backward's weights and cost ~15% of an AVX2 training step with no test failing: the
# bits are the same. The release library must hold no such symbol.
#
# Usage: scripts/check_inlined_intrinsics.sh   (builds `cargo build --release --lib`)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -m)" = x86_64 ] || { echo "check_inlined_intrinsics: not x86_64, nothing to check"; exit 0; }
command -v nm >/dev/null || { echo "check_inlined_intrinsics: needs nm (binutils)" >&2; exit 1; }
built=$(cargo build --release --lib --message-format=json-render-diagnostics)
lib=$(sed -n 's/.*"filenames":\["\([^"]*libnonlocal[^"]*\.rlib\)".*/\1/p' <<<"$built" | tail -n 1)
[ -n "$lib" ] || { echo "check_inlined_intrinsics: cargo named no libnonlocal rlib" >&2; exit 1; }
# CPU detection (xgetbv, cpuid) runs before any feature is known: those may stay calls.
calls=$(nm -C "$lib" 2>/dev/null | grep -E ' [tTwW] core::core_arch::' | grep -vE '_xgetbv|__cpuid' || true)
if [ -n "$calls" ]; then
    echo "check_inlined_intrinsics: intrinsics compiled as calls in $lib:" >&2
    awk '{print "  " $NF}' <<<"$calls" | sort -u >&2
    echo "A closure or a helper without #[inline(always)] inside a kernel's Job::run? (see the header)" >&2
    exit 1
fi
echo "check_inlined_intrinsics: no intrinsic compiled as a call in $(basename "$lib")"
