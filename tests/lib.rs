//! End-to-end tests of coreblk through its public interfaces (binaries, CLI, API).
//!
//! The tests live in `tests/tests/`; this library only hosts shared helpers.
