//! `aurae-shim`: the parent of one executable, which outlives the daemon
//! (see `auraed::host::shim`). A small binary of its own, so that each
//! running executable costs little memory besides itself.

fn main() {
    auraed::host::shim::main()
}
