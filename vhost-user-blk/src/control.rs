//! The control socket: one JSON object per line in, one per line out.
//!
//! Requests (`"cmd"` selects the command):
//! - `{"cmd":"stats"}` → per-queue counters and disk size.
//! - `{"cmd":"snapshot-create","name":"before-upgrade"}`: stops taking
//!   requests, drains in-flight ones, flushes, snapshots, resumes.
//! - `{"cmd":"snapshot-list"}`, `{"cmd":"snapshot-delete","name":"..."}`.
//! - `{"cmd":"resize","size":BYTES}`: grows the disk and tells the guest
//!   (config-change message on the backend channel).
//!
//! Replies: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

//!
//! The socket itself (accepting, framing) is `outboard_common::control`,
//! started by the shared daemon prologue; this module only answers.

use serde_json::{json, Value};

use crate::device::BlkDevice;

/// Executes one request.
pub fn handle(req: &Value, device: &BlkDevice) -> Value {
    let result = match req.get("cmd").and_then(Value::as_str) {
        Some("stats") => Ok(stats(device)),
        Some("snapshot-create") => name(req).and_then(|n| snapshot_create(device, n)),
        Some("snapshot-list") => qcow2_of(device).map(|q| json!({"snapshots": snapshots(q)})),
        Some("snapshot-delete") => name(req).and_then(|n| {
            let q = qcow2_of(device)?;
            device.quiesced(|| q.snapshot_delete(n).map_err(|e| e.to_string()))?;
            Ok(json!({}))
        }),
        Some("resize") => match req.get("size").and_then(Value::as_u64) {
            Some(size) => resize(device, size),
            None => Err("resize needs \"size\" in bytes".into()),
        },
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("missing \"cmd\"".into()),
    };
    match result {
        Ok(Value::Object(mut m)) => {
            m.insert("ok".into(), Value::Bool(true));
            Value::Object(m)
        }
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn name(req: &Value) -> Result<&str, String> {
    req.get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing \"name\"".to_string())
}

fn qcow2_of(device: &BlkDevice) -> Result<&qcow2::Qcow2, String> {
    device
        .disk
        .qcow2()
        .ok_or_else(|| "internal snapshots need a qcow2 image".to_string())
}

fn stats(device: &BlkDevice) -> Value {
    let queues: Vec<Value> = device
        .stats
        .iter()
        .enumerate()
        .map(|(i, s)| s.to_json(i))
        .collect();
    json!({"disk_size": device.disk.size(), "queues": queues})
}

fn snapshots(q: &qcow2::Qcow2) -> Vec<Value> {
    q.snapshots()
        .iter()
        .map(|s| json!({"id": s.id, "name": s.name, "date_sec": s.date_sec, "disk_size": s.disk_size}))
        .collect()
}

fn snapshot_create(device: &BlkDevice, name: &str) -> Result<Value, String> {
    let q = qcow2_of(device)?;
    let sn = device.quiesced(|| q.snapshot_create(name).map_err(|e| e.to_string()))?;
    Ok(json!({"id": sn.id, "name": sn.name}))
}

fn resize(device: &BlkDevice, size: u64) -> Result<Value, String> {
    let notified = device.resize(size)?;
    Ok(json!({"size": size, "guest_notified": notified}))
}
