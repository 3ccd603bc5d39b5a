//! Shared helpers for the Outboard daemons and VMM.
//!
//! # Modules
//! - [`size`]: the one size grammar (qemu-img's) of every command line.
//! - [`mac`]: random, locally administered, unicast MAC addresses.
//!
//! With the `daemon` feature (on by default):
//! - [`daemon`]: the daemons' shared options (`--socket-path`, `--fd`,
//!   `--control-socket`, `--seccomp`, `--user`, ...) and their prologue:
//!   bind, control socket, signal thread, socket mode, drop root, seccomp,
//!   serve.
//! - [`server`]: the vhost-user backend program conventions every daemon
//!   follows: binding `--socket-path` (replacing a stale socket file),
//!   taking over `--fd`, and the serve loop that listens again on the same
//!   socket after each frontend disconnects.
//! - [`cli`]: what both daemons' `main` shares: logging, error chains,
//!   the `ctl` control-socket client.
//! - [`control`]: the JSON-lines control-socket server (tokio); each
//!   daemon supplies its request handler.
//! - [`metrics`]: the Prometheus endpoint (`--metrics`), a minimal
//!   HTTP/1.0 responder; each daemon supplies the text.
//! - [`sandbox`]: the seccomp filter and dropping root (`--seccomp`, `--user`).

pub mod mac;
pub mod size;

#[cfg(feature = "daemon")]
pub mod cli;
#[cfg(feature = "daemon")]
pub mod control;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod sandbox;
#[cfg(feature = "daemon")]
pub mod server;
