//! An opt-in setting of the C allocator for programs that allocate large tensors every step.
//!
//! glibc's `malloc` serves a large request from fresh pages and hands the memory back to the
//! kernel when it is freed: allocations above a threshold (128 KiB at start, raised
//! dynamically up to 32 MiB) are `mmap`ed and `munmap`ed one by one, and the top of the heap is
//! trimmed once more than twice that threshold lies free there. A training loop in candle
//! allocates a fresh tensor for every op and for every gradient, frees them all at the end of
//! the step and allocates them again in the next, so each step pays a page fault per 4 KiB of
//! every such tensor (and `munmap`'s TLB shootdowns across threads). On this crate's bench
//! machine that roughly doubled a candle training step of the non-local block at video-res3
//! (see the README's candle section). This crate's own kernels keep their scratch in a
//! workspace and do not depend on it.

/// The `GLIBC_TUNABLES` value that sets the same as [`keep_freed_memory`] when a process
/// starts, for programs that cannot call it early enough.
pub const KEEP_FREED_MEMORY_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647";

/// Asks the C allocator to keep freed memory in the process for the next allocations instead
/// of returning it to the kernel: on glibc, requests up to 32 MiB (glibc's largest threshold)
/// come from the heap instead of their own `mmap`, and the heap is trimmed only when 2 GiB lie
/// free at its top ([`KEEP_FREED_MEMORY_TUNABLES`] is the same as an environment setting).
/// Returns whether the setting was applied: `false` on other C libraries (musl, macOS,
/// Windows) and under allocators that replace glibc's (AddressSanitizer's), where it does
/// nothing.
///
/// **Process-wide and opt-in.** It changes how the whole process allocates, so this crate
/// never calls it itself; call it once, early in `main`, in programs that free and reallocate
/// large buffers every iteration — candle training on the CPU above all. The trade-off: the
/// resident memory stays at the high-water mark of the loop instead of falling between steps
/// (which a loop reaches again every step anyway).
///
/// ```
/// // First thing in a candle training program:
/// if !nonlocal::keep_freed_memory() {
///     eprintln!("not glibc (or a sanitizer's allocator): freed memory goes back as before");
/// }
/// ```
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes two of glibc's allocation parameters; any value is
        // accepted or refused (returning 0), and it may be called at any time from any thread.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_setting_applies_on_glibc_and_can_be_repeated() {
        let first = super::keep_freed_memory();
        assert_eq!(super::keep_freed_memory(), first);
        // glibc takes both values (AddressSanitizer's allocator refuses every `mallopt`).
        if cfg!(all(target_os = "linux", target_env = "gnu")) && std::env::var_os("ASAN_OPTIONS").is_none() {
            assert!(first, "glibc refused the thresholds");
        }
        // The allocator still serves and frees large buffers.
        let big = vec![1.0f32; 8 << 20];
        assert_eq!(big.iter().sum::<f32>(), (8 << 20) as f32);
    }
}
