//! `aurae-holder`: the namespace holder of an isolated cell, as a small
//! binary of its own. `auraed` runs it when it sits next to `auraed`
//! (else it re-executes itself in holder mode); being small, each holder
//! costs far less memory than a copy of the daemon would (hundreds of cells
//! mean hundreds of holders).

fn main() {
    auraed::host::spawn::holder::main()
}
