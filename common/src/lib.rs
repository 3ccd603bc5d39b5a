//! Shared helpers for the Outboard daemons and VMM.
//!
//! # Modules
//! - [`server`]: the vhost-user backend program conventions every daemon
//!   follows: binding `--socket-path` (replacing a stale socket file),
//!   taking over `--fd`, and the serve loop that listens again on the same
//!   socket after each frontend disconnects.
//! - [`cli`]: what both daemons' `main` shares: logging, error chains,
//!   the `ctl` control-socket client.
//! - [`control`]: the JSON-lines control-socket server (tokio); each
//!   daemon supplies its request handler.
//! - [`sandbox`]: the seccomp filter and dropping root (`--seccomp`, `--user`).

pub mod cli;
pub mod control;
pub mod sandbox;
pub mod server;
