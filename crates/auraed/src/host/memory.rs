//! The daemon's own memory: what start-up leaves behind.
//!
//! Start-up allocates much that it frees again: parsing the kernel's BTF
//! to load the signal probe alone takes ~18 MiB, the first-start PKI and
//! the re-adoption of cells more. glibc keeps freed memory in its arenas
//! (one per thread that allocated, up to 8 per CPU) rather than giving it
//! back, so it stayed in the idle daemon's RSS. [`trim`] hands it back.

/// Returns the free memory of every malloc arena to the kernel.
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
