//! The control socket: one JSON object per line in, one per line out.
//!
//! - `{"cmd":"stats"}` → `{"ok":true,"tap":NAME,"link_up":BOOL,
//!   "acked_features":N,"queues":[{"queue":0,"direction":"rx","packets":N,
//!   "bytes":N,"drops":N,"errors":N},...]}`.
//!
//! Errors: `{"ok":false,"error":"..."}`.
//!
//! The socket itself is served by `outboard_common::control` (started by
//! the prologue, `outboard_common::daemon::run`); this module answers.

use serde_json::{json, Value};

use crate::device::NetDevice;

/// Executes one request.
pub fn handle(req: &Value, device: &NetDevice) -> Value {
    match req.get("cmd").and_then(Value::as_str) {
        Some("stats") => stats(device),
        Some(other) => json!({"ok": false, "error": format!("unknown command {other:?}")}),
        None => json!({"ok": false, "error": "missing \"cmd\""}),
    }
}

fn stats(device: &NetDevice) -> Value {
    let queues: Vec<Value> = device
        .stats
        .iter()
        .enumerate()
        .map(|(i, s)| s.to_json(i))
        .collect();
    json!({
        "ok": true,
        "tap": device.tap().name(),
        "link_up": device.link_up(),
        "acked_features": device.acked(),
        "queues": queues,
    })
}
