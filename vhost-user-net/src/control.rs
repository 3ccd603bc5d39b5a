//! The control socket: one JSON object per line in, one per line out.
//!
//! - `{"cmd":"stats"}` → `{"ok":true,"tap":NAME,"link_up":BOOL,
//!   "acked_features":N,"queues":[{"queue":0,"direction":"rx","packets":N,
//!   "bytes":N,"drops":N,"drop_too_large":N,"drop_runt":N,"drop_tap_full":N,
//!   "drop_tap_down":N,"errors":N,"holes":N},...]}`.
//!
//! - `{"cmd":"link","state":"down"|"up"}` → `{"ok":true,"link":"down",
//!   "notified":BOOL}`: the link administratively down or up (tap carrier
//!   and the config space's link status; `notified`: a config-change
//!   message went to the driver).
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
        Some("link") => link(req, device),
        Some(other) => json!({"ok": false, "error": format!("unknown command {other:?}")}),
        None => json!({"ok": false, "error": "missing \"cmd\""}),
    }
}

fn link(req: &Value, device: &NetDevice) -> Value {
    let up = match req.get("state").and_then(Value::as_str) {
        Some("up") => true,
        Some("down") => false,
        _ => return json!({"ok": false, "error": "\"state\" must be \"up\" or \"down\""}),
    };
    match device.set_link(up) {
        Ok(notified) => json!({
            "ok": true,
            "link": if up { "up" } else { "down" },
            "notified": notified,
        }),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
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
        "admin_up": device.admin_up(),
        "acked_features": device.acked(),
        "queues": queues,
    })
}
