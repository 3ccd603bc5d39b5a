//! The control-socket server both daemons use: a tokio current-thread
//! runtime on its own thread, one JSON object per line in, one per line out.
//! The daemon supplies the request handler; this module owns the socket,
//! framing and the "not JSON" error reply.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be bound.
    #[error(transparent)]
    Bind(#[from] crate::server::ServeError),
    /// The runtime or thread could not start.
    #[error("control thread")]
    Runtime(#[source] std::io::Error),
}

/// Binds `path` (replacing a stale socket file) and serves it on a thread
/// named `control`; every request line goes to `handle`.
pub fn spawn<H>(path: &Path, handle: H) -> Result<(), ControlError>
where
    H: Fn(&Value) -> Value + Send + Sync + 'static,
{
    let std_listener = crate::server::bind(path)?;
    std_listener
        .set_nonblocking(true)
        .map_err(ControlError::Runtime)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(ControlError::Runtime)?;
    let handle = Arc::new(handle);
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
                            let handle = handle.clone();
                            tokio::spawn(async move {
                                if let Err(e) = serve_client(stream, &*handle).await {
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

async fn serve_client(
    stream: tokio::net::UnixStream,
    handle: &(dyn Fn(&Value) -> Value + Send + Sync),
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => handle(&req),
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
        };
        let mut out = reply.to_string();
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
    }
    Ok(())
}
