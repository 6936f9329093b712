//! eBPF probes for auraed, as compiled ELF objects ready for aya.
//!
//! The C sources live next to this file; `build.rs` compiles them with clang
//! (or falls back to the committed objects in `prebuilt/`).

/// Forces the alignment of the bytes it wraps; aya parses the ELF in place and
/// needs it 8-byte aligned, which `include_bytes!` alone does not promise.
#[repr(C, align(32))]
struct Aligned<B: ?Sized>(B);

static SIGNAL_PROBE_ALIGNED: &Aligned<[u8]> =
    &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/signal.bpf.o")));

/// ELF object of `src/signal.bpf.c`: program `signal_generate`
/// (`tp_btf/signal_generate`), ring buffer `EVENTS` of [`SIGNAL_EVENT_SIZE`]-byte
/// records, per-CPU array `DROPS` (one `u64` slot).
pub static SIGNAL_PROBE: &[u8] = &SIGNAL_PROBE_ALIGNED.0;

/// Name of the program in [`SIGNAL_PROBE`].
pub const SIGNAL_PROGRAM: &str = "signal_generate";
/// Kernel tracepoint the program attaches to.
pub const SIGNAL_TRACEPOINT: &str = "signal_generate";
/// Ring buffer map of `struct signal_event`.
pub const SIGNAL_EVENTS_MAP: &str = "EVENTS";
/// Per-CPU array (key 0) counting events lost to a full ring buffer.
pub const SIGNAL_DROPS_MAP: &str = "DROPS";
/// Size of one `struct signal_event { u32 sig; u32 tgid; u64 cgroup_id; }`,
/// native byte order.
pub const SIGNAL_EVENT_SIZE: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Fails when `src/signal.bpf.c` was edited without running
    /// `rebuild-prebuilt.sh`, which would leave a stale prebuilt object.
    #[test]
    fn prebuilt_object_matches_source() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let source = std::fs::read(format!("{dir}/src/signal.bpf.c")).expect("read source");
        let recorded = std::fs::read_to_string(format!("{dir}/prebuilt/signal.bpf.c.sha256"))
            .expect("read prebuilt/signal.bpf.c.sha256");
        let recorded = recorded.split_whitespace().next().unwrap_or_default();
        let actual = hex(ring::digest::digest(&ring::digest::SHA256, &source).as_ref());
        assert_eq!(
            actual, recorded,
            "src/signal.bpf.c changed since prebuilt/signal.bpf.o was built: \
             run crates/auraed-ebpf/rebuild-prebuilt.sh and commit both files"
        );
    }

    #[test]
    fn probe_is_an_aligned_bpf_elf() {
        assert_eq!(SIGNAL_PROBE.as_ptr() as usize % 8, 0);
        assert_eq!(&SIGNAL_PROBE[..4], b"\x7fELF");
        // e_machine (offset 18, little endian on x86/arm64 hosts) = EM_BPF (247).
        assert_eq!(
            u16::from_le_bytes([SIGNAL_PROBE[18], SIGNAL_PROBE[19]]),
            247
        );
    }
}
