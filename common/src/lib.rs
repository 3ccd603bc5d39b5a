//! Shared helpers for the Outboard daemons and VMM: command-line conventions
//! (`--socket-path`, `--fd`, `--print-capabilities`), logging and small
//! utilities used by more than one crate.
//!
//! Not yet implemented: this crate is a placeholder until issues #3-#6 land.
//!
//! # Modules
//! - [`sandbox`]: the seccomp filter and dropping root (`--seccomp`, `--user`).

pub mod sandbox;
