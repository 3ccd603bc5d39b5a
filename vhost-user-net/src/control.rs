//! The control socket: one JSON object per line in, one per line out.
//!
//! - `{"cmd":"stats"}` → `{"ok":true,"tap":NAME,"link_up":BOOL,
//!   "acked_features":N,"queues":[{"queue":0,"direction":"rx","packets":N,
//!   "bytes":N,"drops":N,"errors":N},...]}`.
//!
//! Errors: `{"ok":false,"error":"..."}`.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::device::NetDevice;

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] outboard_common::server::ServeError),
    /// The runtime or thread could not start.
    #[error("control thread")]
    Runtime(#[source] std::io::Error),
}

/// Starts serving the control socket at `path` on its own thread.
pub fn spawn(path: &Path, device: Arc<NetDevice>) -> Result<(), ControlError> {
    let std_listener = outboard_common::server::bind(path)?;
    std_listener
        .set_nonblocking(true)
        .map_err(ControlError::Runtime)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(ControlError::Runtime)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::UnixListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return log::error!("control socket: {e}"),
                };
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let device = device.clone();
                            tokio::spawn(async move {
                                if let Err(e) = serve_client(stream, &device).await {
                                    log::warn!("control client: {e}");
                                }
                            });
                        }
                        Err(e) => log::warn!("control accept: {e}"),
                    }
                }
            })
        })
        .map_err(ControlError::Runtime)?;
    Ok(())
}

async fn serve_client(stream: tokio::net::UnixStream, device: &NetDevice) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req, device),
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
        };
        let mut out = reply.to_string();
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
    }
    Ok(())
}

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
