//! A small, test-oriented wrapper over the `blkio` crate (pure Rust libblkio):
//! a real vhost-user-blk *frontend* for the block daemon's tests and for
//! `blk-bench`, plus the `io_uring` driver on a plain file as the native
//! baseline.
//!
//! - [`BlkClient::connect_vhost_user`] connects to a vhost-user-blk socket
//!   (`virtio-blk-vhost-user` driver); [`BlkClient::open_io_uring`] opens a
//!   file with the `io_uring` driver. Both give one [`BlkQueue`] per queue,
//!   each with its own I/O buffer in a memory region allocated with
//!   `alloc_mem_region` and registered with `map_mem_region` (a vhost-user
//!   backend can only reach memory it was given as a shared fd).
//! - Synchronous helpers ([`BlkQueue::read`], [`BlkQueue::write`],
//!   [`BlkQueue::flush`], [`BlkQueue::discard`], [`BlkQueue::write_zeroes`])
//!   for tests; a submit/reap API ([`BlkQueue::submit_read`],
//!   [`BlkQueue::submit_write`], [`BlkQueue::reap`]) for keeping several
//!   requests in flight without allocating per request.
//! - [`BlkClient::run_parallel`] runs a closure on every queue, one thread
//!   per queue.
//! - [`Daemon`] starts a backend (qemu-storage-daemon or ours) as a child
//!   process, waits for its socket and stops it on drop.
//! - [`conformance_suite`] and the `case_*` functions are the block-device
//!   checks, written against a socket path only, so that the same bodies run
//!   against qemu-storage-daemon today (`tests/blkio_qsd.rs`) and against our
//!   `vhost-user-blk` daemon later.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use crate::{assert_bytes_eq, pattern};

/// Sector size of the virtio-blk protocol; offsets and lengths are multiples of it.
pub const SECTOR: u64 = 512;

/// How long a synchronous helper waits for its completion before giving up
/// (a hung backend then fails the test instead of hanging it).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// An error of the client.
#[derive(Debug)]
pub enum BlkError {
    /// A libblkio call failed while setting up (property, connect, start,
    /// memory region) or while waiting for completions.
    Blkio {
        /// What was being done.
        what: String,
        /// The libblkio error.
        source: blkio::Error,
    },
    /// A request completed with an error.
    Request {
        /// Request type (`read`, `write`, `flush`, `discard`, `write-zeroes`).
        op: &'static str,
        /// Byte offset of the request.
        offset: u64,
        /// Byte length of the request.
        len: u64,
        /// Positive errno of the completion (`EIO` for virtio IOERR,
        /// `ENOTSUP` for UNSUPP, ...).
        errno: i32,
    },
    /// A call with arguments the wrapper refuses (buffer range, alignment).
    Invalid(String),
}

impl BlkError {
    fn blkio(what: impl Into<String>, source: blkio::Error) -> Self {
        BlkError::Blkio {
            what: what.into(),
            source,
        }
    }

    /// The positive errno of a failed request or libblkio call, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BlkError::Blkio { source, .. } => Some(source.errno().raw_os_error()),
            BlkError::Request { errno, .. } => Some(*errno),
            BlkError::Invalid(_) => None,
        }
    }
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::Blkio { what, source } => write!(
                f,
                "{what}: {} (errno {})",
                source.message(),
                source.errno().raw_os_error()
            ),
            BlkError::Request {
                op,
                offset,
                len,
                errno,
            } => write!(
                f,
                "{op} of {len} bytes at offset {offset} failed: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            BlkError::Invalid(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for BlkError {}

/// Result of the client calls.
pub type BlkResult<T> = Result<T, BlkError>;

// ---------------------------------------------------------------------------
// Client and queues
// ---------------------------------------------------------------------------

/// How to set up a [`BlkClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Number of (interrupt-driven) queues to start.
    pub num_queues: usize,
    /// Virtqueue size (vhost-user) or ring entries (io_uring); `None` keeps
    /// the driver's default (256 for vhost-user, 128 for io_uring).
    pub queue_size: Option<u32>,
    /// Size of each queue's I/O buffer, rounded up to a page; requests larger
    /// than the buffer are split by the synchronous helpers.
    pub buf_size: usize,
    /// Open read-only (the driver refuses writes itself).
    pub read_only: bool,
    /// io_uring only: open the file with O_DIRECT.
    pub direct: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            queue_size: None,
            buf_size: 1 << 20,
            read_only: false,
            direct: false,
        }
    }
}

impl ClientOptions {
    /// Default options with `n` queues.
    pub fn queues(n: usize) -> Self {
        ClientOptions {
            num_queues: n,
            ..Default::default()
        }
    }
}

/// Limits the device reported, as libblkio properties.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Alignment of offsets and lengths (bytes).
    pub request_alignment: u64,
    /// Largest read/write a request may carry (0 = no limit).
    pub max_transfer: u64,
    /// Largest single buffer segment (0 = no limit).
    pub max_segment_len: u64,
    /// Largest discard (0 = no limit).
    pub max_discard_len: u64,
    /// Largest write-zeroes (0 = no limit).
    pub max_write_zeroes_len: u64,
    /// Discard alignment (bytes).
    pub discard_alignment: u64,
}

/// One completed request as returned by [`BlkQueue::reap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The `user_data` given at submission.
    pub user_data: usize,
    /// 0 on success, a negative errno otherwise.
    pub ret: i32,
}

/// One queue with its own I/O buffer. Owned by one thread at a time.
pub struct BlkQueue {
    // Field order matters for drop: the queue (which keeps the memory region
    // registry alive through an `Arc`) goes last, after nothing else refers
    // to the buffer.
    completions: Vec<MaybeUninit<Completion>>,
    buf: *mut u8,
    buf_len: usize,
    in_flight: usize,
    index: usize,
    limits: Limits,
    capacity: u64,
    q: Blkioq,
}

// SAFETY: the only non-Send field is the raw pointer `buf`, which points into
// a memory region that belongs to this queue alone (allocated for it in
// `BlkClient::setup` and never handed to anything else) and stays mapped for
// as long as `q` lives, because `Blkioq` holds the `Arc` of libblkio's memory
// region registry that frees it. Moving the queue to another thread moves
// that exclusive ownership with it. `Blkioq` itself is `Send`.
unsafe impl Send for BlkQueue {}

impl fmt::Debug for BlkQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkQueue")
            .field("index", &self.index)
            .field("buf_len", &self.buf_len)
            .field("in_flight", &self.in_flight)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn check_aligned(what: &str, v: u64, align: u64) -> BlkResult<()> {
    if align > 1 && !v.is_multiple_of(align) {
        return Err(BlkError::Invalid(format!(
            "{what} {v} is not a multiple of the request alignment {align}"
        )));
    }
    Ok(())
}

impl BlkQueue {
    /// Index of this queue in its client.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Capacity of the device in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Size of this queue's I/O buffer.
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// Requests submitted and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The device limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The I/O buffer, for filling before writes.
    ///
    /// # Panics
    /// If requests are in flight (the device may be writing into it).
    pub fn buf_mut(&mut self) -> &mut [u8] {
        assert_eq!(
            self.in_flight, 0,
            "BlkQueue::buf_mut with requests in flight"
        );
        // SAFETY: `buf` is the start of a readable and writable memory region
        // of `buf_len` bytes that stays mapped while `self.q` lives and that
        // only this queue uses. No request is in flight (checked above), so
        // the device does not access it while the returned borrow of `self`
        // exists, and no other slice of it exists either.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    /// The I/O buffer, for checking data after reads.
    ///
    /// # Panics
    /// If requests are in flight.
    pub fn buf(&self) -> &[u8] {
        assert_eq!(self.in_flight, 0, "BlkQueue::buf with requests in flight");
        // SAFETY: as in `buf_mut`; with no request in flight nothing writes
        // the region while the shared borrow of `self` exists.
        unsafe { std::slice::from_raw_parts(self.buf, self.buf_len) }
    }

    fn buf_ptr(&self, buf_offset: usize, len: usize) -> BlkResult<*mut u8> {
        match buf_offset.checked_add(len) {
            Some(end) if end <= self.buf_len => {
                // SAFETY: `buf_offset <= end <= buf_len`, so the result stays
                // inside (or one past the end of) the region.
                Ok(unsafe { self.buf.add(buf_offset) })
            }
            _ => Err(BlkError::Invalid(format!(
                "buffer range {buf_offset}+{len} exceeds the queue buffer of {} bytes",
                self.buf_len
            ))),
        }
    }

    /// Queues a read of `len` bytes at `offset` into the buffer at
    /// `buf_offset`. The request is sent at the next [`reap`](Self::reap).
    /// Allocation-free.
    pub fn submit_read(
        &mut self,
        offset: u64,
        buf_offset: usize,
        len: usize,
        user_data: usize,
    ) -> BlkResult<()> {
        let p = self.buf_ptr(buf_offset, len)?;
        // The buffer lies in a memory region mapped with `map_mem_region`
        // and stays valid until the completion is reaped (the queue owns it).
        self.q.read(offset, p, len, user_data, ReqFlags::empty());
        self.in_flight += 1;
        Ok(())
    }

    /// Queues a write of `len` bytes at `offset` from the buffer at
    /// `buf_offset` (see [`submit_read`](Self::submit_read)).
    pub fn submit_write(
        &mut self,
        offset: u64,
        buf_offset: usize,
        len: usize,
        user_data: usize,
        fua: bool,
    ) -> BlkResult<()> {
        let p = self.buf_ptr(buf_offset, len)?;
        let flags = if fua {
            ReqFlags::FUA
        } else {
            ReqFlags::empty()
        };
        self.q.write(offset, p, len, user_data, flags);
        self.in_flight += 1;
        Ok(())
    }

    /// Queues a flush.
    pub fn submit_flush(&mut self, user_data: usize) {
        self.q.flush(user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Queues a discard.
    pub fn submit_discard(&mut self, offset: u64, len: u64, user_data: usize) {
        self.q.discard(offset, len, user_data, ReqFlags::empty());
        self.in_flight += 1;
    }

    /// Queues a write-zeroes; `may_unmap` lets the device deallocate.
    pub fn submit_write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        user_data: usize,
        may_unmap: bool,
    ) {
        let flags = if may_unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, user_data, flags);
        self.in_flight += 1;
    }

    /// Sends queued requests and waits until at least `min` complete (0 just
    /// sends and collects what is already done). Completions are appended
    /// to `out` after clearing it; give `out` a capacity of the queue depth
    /// and this allocates nothing. `timeout` bounds the wait.
    pub fn reap(
        &mut self,
        min: usize,
        out: &mut Vec<Done>,
        timeout: Option<Duration>,
    ) -> BlkResult<usize> {
        out.clear();
        let min = min.min(self.in_flight);
        let want = self.in_flight.clamp(1, self.completions.len());
        let mut t = timeout;
        let n = self
            .q
            .do_io(&mut self.completions[..want], min, t.as_mut(), None)
            .map_err(|e| BlkError::blkio(format!("do_io on queue {}", self.index), e))?;
        for c in &self.completions[..n] {
            // SAFETY: `do_io` returned `n`, which means it initialised the
            // first `n` elements of the completion array.
            let c = unsafe { c.assume_init_ref() };
            out.push(Done {
                user_data: c.user_data,
                ret: c.ret,
            });
        }
        self.in_flight -= n;
        Ok(n)
    }

    /// Submits nothing more and waits for every request in flight.
    pub fn drain(&mut self, out: &mut Vec<Done>) -> BlkResult<()> {
        let mut all = Vec::with_capacity(self.in_flight);
        while self.in_flight > 0 {
            self.reap(1, out, Some(SYNC_TIMEOUT))?;
            all.extend_from_slice(out);
        }
        *out = all;
        Ok(())
    }

    /// Waits for the single request in flight and turns its status into a result.
    fn wait_one(&mut self, op: &'static str, offset: u64, len: u64) -> BlkResult<()> {
        let mut out = Vec::with_capacity(1);
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while out.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BlkError::Invalid(format!(
                    "{op} of {len} bytes at {offset}: no completion within {SYNC_TIMEOUT:?}"
                )));
            }
            self.reap(1, &mut out, Some(left))?;
        }
        let ret = out[0].ret;
        if ret < 0 {
            return Err(BlkError::Request {
                op,
                offset,
                len,
                errno: -ret,
            });
        }
        Ok(())
    }

    fn ensure_idle(&self) -> BlkResult<()> {
        if self.in_flight != 0 {
            return Err(BlkError::Invalid(format!(
                "synchronous call on queue {} with {} requests in flight",
                self.index, self.in_flight
            )));
        }
        Ok(())
    }

    /// Largest read/write one synchronous request carries.
    fn chunk(&self) -> usize {
        let mut c = self.buf_len as u64;
        for lim in [self.limits.max_transfer, self.limits.max_segment_len] {
            if lim > 0 {
                c = c.min(lim);
            }
        }
        let a = self.limits.request_alignment.max(1);
        let c = (c / a * a).max(a);
        usize::try_from(c).unwrap_or(usize::MAX)
    }

    /// Reads `len` bytes at `offset` (split into requests the buffer and the
    /// device limits allow).
    pub fn read(&mut self, offset: u64, len: usize) -> BlkResult<Vec<u8>> {
        self.ensure_idle()?;
        check_aligned("read offset", offset, self.limits.request_alignment)?;
        check_aligned("read length", len as u64, self.limits.request_alignment)?;
        let mut out = vec![0u8; len];
        let chunk = self.chunk();
        let mut done = 0usize;
        while done < len {
            let n = chunk.min(len - done);
            let off = offset + done as u64;
            self.submit_read(off, 0, n, 0)?;
            self.wait_one("read", off, n as u64)?;
            out[done..done + n].copy_from_slice(&self.buf()[..n]);
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (split like [`read`](Self::read)).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> BlkResult<()> {
        self.write_flags(offset, data, false)
    }

    /// [`write`](Self::write) with FUA on every request.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> BlkResult<()> {
        self.write_flags(offset, data, true)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], fua: bool) -> BlkResult<()> {
        self.ensure_idle()?;
        check_aligned("write offset", offset, self.limits.request_alignment)?;
        check_aligned(
            "write length",
            data.len() as u64,
            self.limits.request_alignment,
        )?;
        let chunk = self.chunk();
        for (i, piece) in data.chunks(chunk).enumerate() {
            let off = offset + (i * chunk) as u64;
            self.buf_mut()[..piece.len()].copy_from_slice(piece);
            self.submit_write(off, 0, piece.len(), 0, fua)?;
            self.wait_one("write", off, piece.len() as u64)?;
        }
        Ok(())
    }

    /// Flushes the device's volatile cache.
    pub fn flush(&mut self) -> BlkResult<()> {
        self.ensure_idle()?;
        self.submit_flush(0);
        self.wait_one("flush", 0, 0)
    }

    fn ranged(
        &mut self,
        op: &'static str,
        offset: u64,
        len: u64,
        max: u64,
        submit: impl Fn(&mut Self, u64, u64),
    ) -> BlkResult<()> {
        self.ensure_idle()?;
        check_aligned(op, offset, SECTOR)?;
        check_aligned(op, len, SECTOR)?;
        let step = if max == 0 { len.max(1) } else { max };
        let mut done = 0u64;
        while done < len {
            let n = step.min(len - done);
            submit(self, offset + done, n);
            self.wait_one(op, offset + done, n)?;
            done += n;
        }
        Ok(())
    }

    /// Discards `len` bytes at `offset` (split at the device's maximum).
    pub fn discard(&mut self, offset: u64, len: u64) -> BlkResult<()> {
        let max = self.limits.max_discard_len;
        self.ranged("discard", offset, len, max, |q, o, n| {
            q.submit_discard(o, n, 0)
        })
    }

    /// Writes zeroes over `len` bytes at `offset`, letting the device unmap.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> BlkResult<()> {
        let max = self.limits.max_write_zeroes_len;
        self.ranged("write-zeroes", offset, len, max, |q, o, n| {
            q.submit_write_zeroes(o, n, 0, true)
        })
    }

    /// Writes zeroes with `BLKIO_REQ_NO_UNMAP` (the range stays allocated).
    pub fn write_zeroes_no_unmap(&mut self, offset: u64, len: u64) -> BlkResult<()> {
        let max = self.limits.max_write_zeroes_len;
        self.ranged("write-zeroes", offset, len, max, |q, o, n| {
            q.submit_write_zeroes(o, n, 0, false)
        })
    }
}

/// A connected and started libblkio instance with its queues.
pub struct BlkClient {
    // Queues before the instance: they are dropped first.
    queues: Vec<BlkQueue>,
    blkio: Blkio,
    driver: &'static str,
    capacity: u64,
    limits: Limits,
}

impl fmt::Debug for BlkClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkClient")
            .field("driver", &self.driver)
            .field("capacity", &self.capacity)
            .field("limits", &self.limits)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

fn get_u64(b: &Blkio, name: &str) -> BlkResult<u64> {
    b.get_u64(name)
        .map_err(|e| BlkError::blkio(format!("get {name}"), e))
}

fn get_i32_u64(b: &Blkio, name: &str) -> BlkResult<u64> {
    let v = b
        .get_i32(name)
        .map_err(|e| BlkError::blkio(format!("get {name}"), e))?;
    Ok(u64::try_from(v).unwrap_or(0))
}

fn set_i32(b: &mut Blkio, name: &str, v: usize) -> BlkResult<()> {
    let v = i32::try_from(v).map_err(|_| BlkError::Invalid(format!("{name} {v} too large")))?;
    b.set_i32(name, v)
        .map_err(|e| BlkError::blkio(format!("set {name}={v}"), e))
}

impl BlkClient {
    /// Connects to the vhost-user-blk backend listening on `socket`.
    pub fn connect_vhost_user(socket: &Path, opts: &ClientOptions) -> BlkResult<BlkClient> {
        let driver = "virtio-blk-vhost-user";
        let mut b = Blkio::new(driver).map_err(|e| BlkError::blkio("blkio::new", e))?;
        let path = socket
            .to_str()
            .ok_or_else(|| BlkError::Invalid(format!("socket path {socket:?} is not UTF-8")))?;
        b.set_str("path", path)
            .map_err(|e| BlkError::blkio("set path", e))?;
        b.set_bool("read-only", opts.read_only)
            .map_err(|e| BlkError::blkio("set read-only", e))?;
        b.connect()
            .map_err(|e| BlkError::blkio(format!("connect to {}", socket.display()), e))?;
        if let Some(qs) = opts.queue_size {
            set_i32(&mut b, "queue-size", qs as usize)?;
        }
        Self::setup(b, driver, opts)
    }

    /// Opens `path` (a regular file or block device) with the `io_uring`
    /// driver: the native baseline.
    pub fn open_io_uring(path: &Path, opts: &ClientOptions) -> BlkResult<BlkClient> {
        let driver = "io_uring";
        let mut b = Blkio::new(driver).map_err(|e| BlkError::blkio("blkio::new", e))?;
        let p = path
            .to_str()
            .ok_or_else(|| BlkError::Invalid(format!("path {path:?} is not UTF-8")))?;
        b.set_str("path", p)
            .map_err(|e| BlkError::blkio("set path", e))?;
        b.set_bool("read-only", opts.read_only)
            .map_err(|e| BlkError::blkio("set read-only", e))?;
        b.set_bool("direct", opts.direct)
            .map_err(|e| BlkError::blkio("set direct", e))?;
        b.connect()
            .map_err(|e| BlkError::blkio(format!("open {}", path.display()), e))?;
        if let Some(qs) = opts.queue_size {
            set_i32(&mut b, "num-entries", qs as usize)?;
        }
        Self::setup(b, driver, opts)
    }

    fn setup(mut b: Blkio, driver: &'static str, opts: &ClientOptions) -> BlkResult<BlkClient> {
        if opts.num_queues == 0 {
            return Err(BlkError::Invalid("num_queues must be at least 1".into()));
        }
        set_i32(&mut b, "num-queues", opts.num_queues)?;
        let capacity = get_u64(&b, "capacity")?;
        let limits = Limits {
            request_alignment: get_i32_u64(&b, "request-alignment")?.max(1),
            max_transfer: get_i32_u64(&b, "max-transfer")?,
            max_segment_len: get_i32_u64(&b, "max-segment-len")?,
            max_discard_len: get_u64(&b, "max-discard-len")?,
            max_write_zeroes_len: get_u64(&b, "max-write-zeroes-len")?,
            discard_alignment: get_i32_u64(&b, "discard-alignment")?.max(1),
        };
        let queue_size = match driver {
            "io_uring" => get_i32_u64(&b, "num-entries")?,
            _ => get_i32_u64(&b, "queue-size")?,
        };
        let outcome = b
            .start()
            .map_err(|e| BlkError::blkio(format!("start {driver}"), e))?;
        let align = usize::try_from(get_u64(&b, "mem-region-alignment")?.max(1))
            .map_err(|_| BlkError::Invalid("mem-region-alignment too large".into()))?;
        let buf_len = round_up(opts.buf_size.max(1), 4096usize.max(align));
        let ncompl = usize::try_from(queue_size.max(1)).unwrap_or(256);
        let mut queues = Vec::with_capacity(outcome.queues.len());
        for (index, q) in outcome.queues.into_iter().enumerate() {
            let region: MemoryRegion = b
                .alloc_mem_region(buf_len)
                .map_err(|e| BlkError::blkio(format!("alloc_mem_region({buf_len})"), e))?;
            b.map_mem_region(&region)
                .map_err(|e| BlkError::blkio(format!("map_mem_region({buf_len})"), e))?;
            queues.push(BlkQueue {
                completions: std::iter::repeat_with(MaybeUninit::uninit)
                    .take(ncompl)
                    .collect(),
                buf: region.addr as *mut u8,
                buf_len,
                in_flight: 0,
                index,
                limits,
                capacity,
                q,
            });
        }
        Ok(BlkClient {
            queues,
            blkio: b,
            driver,
            capacity,
            limits,
        })
    }

    /// The libblkio driver name.
    pub fn driver(&self) -> &'static str {
        self.driver
    }

    /// Capacity of the device in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The device limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Reads a libblkio `bool` property (e.g. `read-only`).
    pub fn get_bool(&self, name: &str) -> BlkResult<bool> {
        self.blkio
            .get_bool(name)
            .map_err(|e| BlkError::blkio(format!("get {name}"), e))
    }

    /// Reads a libblkio `u64` property (e.g. `max-discard-len`).
    pub fn get_u64(&self, name: &str) -> BlkResult<u64> {
        get_u64(&self.blkio, name)
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i`.
    ///
    /// # Panics
    /// If there is no such queue.
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        &mut self.queues[i]
    }

    /// All queues, e.g. to hand them to threads.
    pub fn queues_mut(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// Runs `f(queue)` for every queue at once, one thread per queue, and
    /// returns the results in queue order. A panic in a thread is re-raised.
    pub fn run_parallel<R, F>(&mut self, f: F) -> Vec<R>
    where
        R: Send,
        F: Fn(&mut BlkQueue) -> R + Sync,
    {
        let f = &f;
        thread::scope(|s| {
            let handles: Vec<_> = self
                .queues
                .iter_mut()
                .map(|q| s.spawn(move || f(q)))
                .collect();
            handles
                .into_iter()
                .map(|h| match h.join() {
                    Ok(r) => r,
                    Err(p) => std::panic::resume_unwind(p),
                })
                .collect()
        })
    }

    /// [`BlkQueue::read`] on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> BlkResult<Vec<u8>> {
        self.queues[0].read(offset, len)
    }

    /// [`BlkQueue::write`] on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> BlkResult<()> {
        self.queues[0].write(offset, data)
    }

    /// [`BlkQueue::write_fua`] on queue 0.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> BlkResult<()> {
        self.queues[0].write_fua(offset, data)
    }

    /// [`BlkQueue::flush`] on queue 0.
    pub fn flush(&mut self) -> BlkResult<()> {
        self.queues[0].flush()
    }

    /// [`BlkQueue::discard`] on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> BlkResult<()> {
        self.queues[0].discard(offset, len)
    }

    /// [`BlkQueue::write_zeroes`] on queue 0.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> BlkResult<()> {
        self.queues[0].write_zeroes(offset, len)
    }

    /// [`BlkQueue::write_zeroes_no_unmap`] on queue 0.
    pub fn write_zeroes_no_unmap(&mut self, offset: u64, len: u64) -> BlkResult<()> {
        self.queues[0].write_zeroes_no_unmap(offset, len)
    }
}

// ---------------------------------------------------------------------------
// Images and daemons
// ---------------------------------------------------------------------------

/// Image format served by a daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A raw file.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl Format {
    /// `raw` / `qcow2`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses `raw` / `qcow2`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Creates an empty image of `size` bytes: a sparse raw file, or a qcow2
/// image (64 KiB clusters) made by the workspace's qcow2 library, so the
/// tests need no qemu-img.
pub fn create_image(path: &Path, format: Format, size: u64) {
    match format {
        Format::Raw => {
            let f = File::create(path)
                .unwrap_or_else(|e| panic!("create raw image {}: {e}", path.display()));
            f.set_len(size)
                .unwrap_or_else(|e| panic!("size raw image {}: {e}", path.display()));
        }
        Format::Qcow2 => {
            let opts = qcow2::CreateOptions {
                size,
                ..Default::default()
            };
            qcow2::Qcow2::create(path, &opts)
                .unwrap_or_else(|e| panic!("create qcow2 image {}: {e}", path.display()));
        }
    }
}

/// Reads `len` bytes of the *guest-visible* content of an image file at
/// `offset`, straight from the file (raw) or through the qcow2 library opened
/// read-only. Used to check that flushed data reached the file.
pub fn read_image(path: &Path, format: Format, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    match format {
        Format::Raw => {
            use std::os::unix::fs::FileExt;
            let f = File::open(path)
                .unwrap_or_else(|e| panic!("open raw image {}: {e}", path.display()));
            f.read_exact_at(&mut buf, offset)
                .unwrap_or_else(|e| panic!("read raw image {} at {offset}: {e}", path.display()));
        }
        Format::Qcow2 => {
            let img = crate::open_ro(path);
            img.read_at(&mut buf, offset).unwrap_or_else(|e| {
                panic!("qcow2 library read of {} at {offset}: {e}", path.display())
            });
        }
    }
    buf
}

/// The qemu-storage-daemon binary (Debian: `qemu-system-common` up to QEMU
/// 7.2, the version in Debian 12; `qemu-utils` from QEMU 8 on, e.g. the
/// bookworm-backports build).
pub const QSD: &str = "qemu-storage-daemon";

/// `Ok(version line)` if qemu-storage-daemon runs, else why not.
pub fn qsd_available() -> Result<String, String> {
    static CHECK: OnceLock<Result<String, String>> = OnceLock::new();
    CHECK
        .get_or_init(|| match Command::new(QSD).arg("--version").output() {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()),
            Ok(o) => Err(format!("`{QSD} --version` failed: {}", o.status)),
            Err(e) => Err(format!(
                "cannot run `{QSD}` ({e}); on Debian 12 it comes with qemu-system-common \
                 (apt-get install qemu-system-x86), with qemu-utils from QEMU 8 on"
            )),
        })
        .clone()
}

/// How a daemon opens its image file.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Image file.
    pub image: PathBuf,
    /// Its format.
    pub format: Format,
    /// Socket to listen on (created by the daemon).
    pub socket: PathBuf,
    /// Number of virtqueues offered.
    pub num_queues: usize,
    /// O_DIRECT on the image (`cache.direct=on` / `--direct`).
    pub direct: bool,
}

/// A backend daemon running as a child process; stopped (SIGTERM, then
/// SIGKILL after 3 s) on drop. Its stdout and stderr go to `<socket>.log`.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    name: String,
    socket: PathBuf,
    log: PathBuf,
}

/// The qemu-storage-daemon command serving `cfg` (`aio=io_uring`, page cache
/// unless `direct`).
pub fn qsd_command(cfg: &DaemonConfig) -> Command {
    qsd_command_with(cfg, false)
}

/// [`qsd_command`], exporting read-only (`writable=off`) when `read_only`.
pub fn qsd_command_with(cfg: &DaemonConfig, read_only: bool) -> Command {
    let mut c = Command::new(QSD);
    let direct = if cfg.direct { "on" } else { "off" };
    c.arg("--blockdev").arg(format!(
        "driver=file,node-name=file0,filename={},aio=io_uring,cache.direct={direct}",
        cfg.image.display()
    ));
    let node = match cfg.format {
        Format::Raw => "file0",
        Format::Qcow2 => {
            c.arg("--blockdev")
                .arg("driver=qcow2,node-name=fmt0,file=file0");
            "fmt0"
        }
    };
    c.arg("--export").arg(format!(
        "type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={},\
         writable={},num-queues={}",
        cfg.socket.display(),
        if read_only { "off" } else { "on" },
        cfg.num_queues
    ));
    c
}

/// The command line of our `vhost-user-blk` daemon serving `cfg`.
pub fn ours_command(binary: &Path, cfg: &DaemonConfig) -> Command {
    let mut c = Command::new(binary);
    c.arg("--socket-path")
        .arg(&cfg.socket)
        .arg("--blk-file")
        .arg(&cfg.image)
        .arg("--format")
        .arg(cfg.format.as_str())
        .arg("--num-queues")
        .arg(cfg.num_queues.to_string());
    if cfg.direct {
        c.arg("--direct");
    }
    c
}

impl Daemon {
    /// Starts `cmd` and waits (up to `timeout`) until `socket` exists as a
    /// Unix socket. Fails with the daemon's log if it exits first.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        socket: &Path,
        timeout: Duration,
    ) -> Result<Daemon, String> {
        let _ = fs::remove_file(socket);
        let log = socket.with_extension("log");
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        let mut d = Daemon {
            child: Some(child),
            name: name.to_string(),
            socket: socket.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
                return Ok(d);
            }
            if let Some(st) = d.try_wait() {
                return Err(format!(
                    "{name} exited ({st}) before creating {}:\n{}",
                    socket.display(),
                    d.log_text()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{name} did not create {} within {timeout:?}:\n{}",
                    socket.display(),
                    d.log_text()
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts qemu-storage-daemon for `cfg`.
    pub fn qsd(cfg: &DaemonConfig) -> Result<Daemon, String> {
        Daemon::spawn(QSD, qsd_command(cfg), &cfg.socket, Duration::from_secs(10))
    }

    /// Starts qemu-storage-daemon for `cfg`, exporting read-only.
    pub fn qsd_read_only(cfg: &DaemonConfig) -> Result<Daemon, String> {
        Daemon::spawn(
            QSD,
            qsd_command_with(cfg, true),
            &cfg.socket,
            Duration::from_secs(10),
        )
    }

    /// Starts our `vhost-user-blk` binary for `cfg` with `--read-only`.
    pub fn ours_read_only(binary: &Path, cfg: &DaemonConfig) -> Result<Daemon, String> {
        let mut c = ours_command(binary, cfg);
        c.arg("--read-only");
        Daemon::spawn("vhost-user-blk", c, &cfg.socket, Duration::from_secs(10))
    }

    /// Starts our `vhost-user-blk` binary for `cfg`.
    pub fn ours(binary: &Path, cfg: &DaemonConfig) -> Result<Daemon, String> {
        Daemon::spawn(
            "vhost-user-blk",
            ours_command(binary, cfg),
            &cfg.socket,
            Duration::from_secs(10),
        )
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The name given at spawn (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the daemon printed so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Connects a client, retrying for up to 5 s while the socket refuses
    /// (bound but not listening yet).
    pub fn connect(&mut self, opts: &ClientOptions) -> BlkResult<BlkClient> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match BlkClient::connect_vhost_user(&self.socket, opts) {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline && self.is_running() => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the daemon: SIGTERM, then SIGKILL if it has not exited after 3 s.
    /// Returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is
            // our own child, which has not been reaped yet (we still hold
            // it), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

// ---------------------------------------------------------------------------
// The conformance suite
// ---------------------------------------------------------------------------

/// What the backend behind a socket is expected to look like.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Number of queues the backend offers (the parallel case needs 2).
    pub num_queues: usize,
    /// The image file and format behind the socket, when known: the flush
    /// case then checks that flushed data is in the file. The image must be
    /// fresh (all zeroes) when the suite starts.
    pub image: Option<(PathBuf, Format)>,
}

/// A conformance case: a body that connects to `socket` itself.
pub type Case = fn(&Path, &Expect);

/// Every case, by name, in the order [`conformance_suite`] runs them.
pub const CASES: &[(&str, Case)] = &[
    ("capacity", case_capacity),
    ("write_read_patterns", case_write_read_patterns),
    ("flush", case_flush),
    ("discard", case_discard),
    ("write_zeroes", case_write_zeroes),
    ("deep_queue", case_deep_queue),
    ("parallel_queues", case_parallel_queues),
    ("out_of_range", case_out_of_range),
];

/// Runs every case of [`CASES`] against the backend on `socket`. The cases
/// write to disjoint areas, so one fresh image serves them all.
pub fn conformance_suite(socket: &Path, expect: &Expect) {
    for (name, case) in CASES {
        let t = Instant::now();
        case(socket, expect);
        eprintln!("conformance case {name}: ok ({:?})", t.elapsed());
    }
}

/// Each case works in its own 8 MiB area so that they can share one image.
const AREA: u64 = 8 << 20;

fn area(i: u64) -> u64 {
    i * AREA
}

fn connect(socket: &Path, opts: &ClientOptions) -> BlkClient {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match BlkClient::connect_vhost_user(socket, opts) {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect to {}: {e}", socket.display()),
        }
    }
}

fn read_ok(c: &mut BlkClient, off: u64, len: usize, ctx: &str) -> Vec<u8> {
    c.read(off, len)
        .unwrap_or_else(|e| panic!("{ctx}: read {len} at {off}: {e}"))
}

fn write_ok(c: &mut BlkClient, off: u64, data: &[u8], ctx: &str) {
    c.write(off, data)
        .unwrap_or_else(|e| panic!("{ctx}: write {} at {off}: {e}", data.len()));
}

/// The device reports the expected capacity and at least one queue works.
pub fn case_capacity(socket: &Path, expect: &Expect) {
    let c = connect(socket, &ClientOptions::default());
    assert_eq!(
        c.capacity(),
        expect.capacity,
        "capacity reported over vhost-user"
    );
    assert!(
        c.limits().request_alignment <= 4096,
        "odd request alignment {:?}",
        c.limits()
    );
}

/// Writes patterns of many sizes and alignments (sector, page, unaligned to
/// clusters, larger than one request, the last sector), reads each back, and
/// again from a second connection.
pub fn case_write_read_patterns(socket: &Path, expect: &Expect) {
    let base = area(1);
    // (offset in the area, length)
    let pieces: &[(u64, usize)] = &[
        (0, 512),
        (4096, 4096),
        (3 * 512, 3 * 512),
        (65536 - 512, 1024),   // straddles a 64 KiB cluster boundary
        (128 << 10, 64 << 10), // exactly one cluster
        (300 << 10, 200 << 10),
        (1 << 20, 3 << 20), // larger than one request of the client (1 MiB buffer)
    ];
    let mut c = connect(socket, &ClientOptions::default());
    let mut expected = Vec::new();
    for (i, &(off, len)) in pieces.iter().enumerate() {
        let data = pattern(11, i as u64, len);
        write_ok(&mut c, base + off, &data, "write_read_patterns");
        let got = read_ok(&mut c, base + off, len, "write_read_patterns");
        assert_bytes_eq(&data, &got, &format!("piece {i} read right after writing"));
        expected.push((base + off, data));
    }
    // The last sector of the disk.
    let last = expect.capacity - SECTOR;
    let data = pattern(11, 99, SECTOR as usize);
    write_ok(&mut c, last, &data, "last sector");
    expected.push((last, data));
    // Untouched bytes between pieces read as zeroes on a fresh image.
    let gap = read_ok(&mut c, base + 8192, 512, "gap");
    assert_bytes_eq(&[0u8; 512], &gap, "unwritten sector between pieces");
    drop(c);

    let mut c = connect(socket, &ClientOptions::default());
    for (i, (off, data)) in expected.iter().enumerate() {
        let got = read_ok(&mut c, *off, data.len(), "reconnect");
        assert_bytes_eq(data, &got, &format!("piece {i} read from a new connection"));
    }
}

/// FLUSH succeeds (also with nothing to flush) and, when the image file is
/// known, the data written before it is in the file afterwards.
pub fn case_flush(socket: &Path, expect: &Expect) {
    let base = area(2);
    let mut c = connect(socket, &ClientOptions::default());
    c.flush()
        .unwrap_or_else(|e| panic!("flush with nothing written: {e}"));
    let data = pattern(12, 0, 256 << 10);
    write_ok(&mut c, base, &data, "flush");
    c.flush()
        .unwrap_or_else(|e| panic!("flush after a write: {e}"));
    let fua = pattern(12, 1, 8192);
    c.write_fua(base + (512 << 10), &fua)
        .unwrap_or_else(|e| panic!("FUA write: {e}"));
    if let Some((path, format)) = &expect.image {
        let got = read_image(path, *format, base, data.len());
        assert_bytes_eq(&data, &got, "image file content after FLUSH");
        let got = read_image(path, *format, base + (512 << 10), fua.len());
        assert_bytes_eq(&fua, &got, "image file content after a FUA write");
    }
    let got = read_ok(&mut c, base, data.len(), "flush");
    assert_bytes_eq(&data, &got, "read after flush");
}

/// DISCARD succeeds and leaves the data around the range alone.
pub fn case_discard(socket: &Path, _expect: &Expect) {
    let base = area(3);
    let mut c = connect(socket, &ClientOptions::default());
    let align = c.limits().discard_alignment.max(65536);
    let len = 3 * align;
    let data = pattern(13, 0, usize::try_from(len).expect("len fits"));
    write_ok(&mut c, base, &data, "discard setup");
    c.discard(base + align, align)
        .unwrap_or_else(|e| panic!("discard {align} at {}: {e}", base + align));
    // The discarded range reads back as something (unspecified content).
    let _ = read_ok(&mut c, base + align, 4096, "read of a discarded range");
    let a = usize::try_from(align).expect("align fits");
    let got = read_ok(&mut c, base, a, "before the discarded range");
    assert_bytes_eq(&data[..a], &got, "data before the discarded range");
    let got = read_ok(&mut c, base + 2 * align, a, "after the discarded range");
    assert_bytes_eq(&data[2 * a..], &got, "data after the discarded range");
    // A sector-sized, unaligned discard is accepted too (or at least not
    // fatal to the connection).
    let _ = c.discard(base + 512, 512);
    let got = read_ok(&mut c, base + 4096, 4096, "after a small discard");
    assert_bytes_eq(&data[4096..8192], &got, "data next to a small discard");
}

/// WRITE ZEROES (with and without unmap, cluster-aligned and not) reads back
/// as zeroes and leaves the neighbours alone.
pub fn case_write_zeroes(socket: &Path, _expect: &Expect) {
    let base = area(4);
    let mut c = connect(socket, &ClientOptions::default());
    let len = 1usize << 20;
    let data = pattern(14, 0, len);
    write_ok(&mut c, base, &data, "write_zeroes setup");
    let mut expected = data.clone();
    // (offset in the area, length, allow unmap)
    let ranges: &[(u64, u64, bool)] = &[
        (65536, 65536, true),           // one whole cluster
        (3 * 65536, 2 * 65536, false),  // two clusters, keep allocated
        (512 * 1024 + 512, 1024, true), // inside a cluster, unaligned
        (700 * 1024, 4096, false),
    ];
    for &(off, n, unmap) in ranges {
        let r = if unmap {
            c.write_zeroes(base + off, n)
        } else {
            c.write_zeroes_no_unmap(base + off, n)
        };
        r.unwrap_or_else(|e| panic!("write-zeroes {n} at {} (unmap {unmap}): {e}", base + off));
        let (o, e) = (off as usize, (off + n) as usize);
        expected[o..e].fill(0);
        let got = read_ok(&mut c, base + off, n as usize, "zeroed range");
        assert_bytes_eq(
            &expected[o..e],
            &got,
            &format!("range {off}+{n} after write-zeroes"),
        );
    }
    let got = read_ok(&mut c, base, len, "whole area");
    assert_bytes_eq(&expected, &got, "area after write-zeroes");
    // A 4 MiB write-zeroes over data on another part of the area.
    let big = 4u64 << 20;
    write_ok(
        &mut c,
        base + (2 << 20),
        &pattern(14, 1, 64 << 10),
        "big setup",
    );
    c.write_zeroes(base + (2 << 20), big)
        .unwrap_or_else(|e| panic!("big write-zeroes: {e}"));
    let got = read_ok(&mut c, base + (2 << 20), 128 << 10, "big zeroed range");
    assert!(got.iter().all(|&b| b == 0), "big write-zeroes left data");
}

/// Many requests in flight on one queue (QD 64, mixed sizes), then read back.
pub fn case_deep_queue(socket: &Path, _expect: &Expect) {
    let base = area(5);
    let opts = ClientOptions {
        buf_size: 4 << 20,
        ..Default::default()
    };
    let mut c = connect(socket, &opts);
    let q = c.queue(0);
    let n = 64usize;
    let sz = 16usize << 10;
    let data = pattern(15, 0, n * sz);
    q.buf_mut()[..data.len()].copy_from_slice(&data);
    // Submit in reverse order so that the device sees a non-sequential batch.
    for i in (0..n).rev() {
        q.submit_write(base + (i * sz) as u64, i * sz, sz, i, false)
            .expect("queue a write");
    }
    let mut out = Vec::with_capacity(n);
    q.drain(&mut out).expect("wait for the writes");
    assert_eq!(out.len(), n, "completions of {n} writes");
    let mut seen = vec![false; n];
    for d in &out {
        assert_eq!(d.ret, 0, "write {} failed: {}", d.user_data, d.ret);
        assert!(
            !seen[d.user_data],
            "request {} completed twice",
            d.user_data
        );
        seen[d.user_data] = true;
    }
    q.buf_mut().fill(0xee);
    for i in 0..n {
        q.submit_read(base + (i * sz) as u64, i * sz, sz, i)
            .expect("queue a read");
    }
    q.drain(&mut out).expect("wait for the reads");
    assert!(out.iter().all(|d| d.ret == 0), "a read failed: {out:?}");
    assert_eq!(out.len(), n, "completions of {n} reads");
    assert_bytes_eq(&data, &q.buf()[..data.len()], "deep-queue read back");
}

/// Two queues in two threads, each writing and reading its own range with
/// several requests in flight; then each reads the other's range.
pub fn case_parallel_queues(socket: &Path, expect: &Expect) {
    assert!(
        expect.num_queues >= 2,
        "the parallel case needs a backend with at least 2 queues (has {})",
        expect.num_queues
    );
    let base = area(6);
    let nq = 2usize;
    let per = AREA / nq as u64; // 4 MiB each
    let sz = 16usize << 10;
    let nreq = usize::try_from(per).expect("fits") / sz;
    let opts = ClientOptions {
        num_queues: nq,
        buf_size: usize::try_from(per).expect("fits"),
        ..Default::default()
    };
    let mut c = connect(socket, &opts);
    assert_eq!(c.num_queues(), nq);
    let barrier = Barrier::new(nq);
    let results = c.run_parallel(|q| {
        let i = q.index();
        let start = base + i as u64 * per;
        let data = pattern(16, i as u64, nreq * sz);
        q.buf_mut()[..data.len()].copy_from_slice(&data);
        let depth = 8;
        let mut next = 0usize;
        let mut out = Vec::with_capacity(depth);
        while next < nreq || q.in_flight() > 0 {
            while next < nreq && q.in_flight() < depth {
                q.submit_write(start + (next * sz) as u64, next * sz, sz, next, false)
                    .expect("queue a write");
                next += 1;
            }
            q.reap(1, &mut out, Some(SYNC_TIMEOUT))
                .unwrap_or_else(|e| panic!("queue {i}: {e}"));
            for d in &out {
                assert_eq!(
                    d.ret, 0,
                    "queue {i}: write {} failed ({})",
                    d.user_data, d.ret
                );
            }
        }
        let got = q
            .read(start, data.len())
            .unwrap_or_else(|e| panic!("queue {i} reads its range: {e}"));
        assert_bytes_eq(&data, &got, &format!("queue {i} own range"));
        barrier.wait();
        let j = (i + 1) % nq;
        let other = q
            .read(base + j as u64 * per, data.len())
            .unwrap_or_else(|e| panic!("queue {i} reads queue {j}'s range: {e}"));
        (i, other)
    });
    for (i, other) in results {
        let j = (i + 1) % nq;
        let want = pattern(16, j as u64, nreq * sz);
        assert_bytes_eq(
            &want,
            &other,
            &format!("queue {i} reading queue {j}'s range"),
        );
    }
}

/// Requests beyond the end fail with an error (EIO for virtio IOERR), do not
/// modify the last sector, and the connection keeps working.
pub fn case_out_of_range(socket: &Path, expect: &Expect) {
    let cap = expect.capacity;
    let mut c = connect(socket, &ClientOptions::default());
    let last = pattern(17, 0, SECTOR as usize);
    write_ok(&mut c, cap - SECTOR, &last, "out_of_range setup");
    let fails: Vec<(&str, BlkResult<()>)> = vec![
        ("read at capacity", c.read(cap, 512).map(|_| ())),
        ("read far beyond", c.read(cap + (1 << 30), 4096).map(|_| ())),
        (
            "read straddling the end",
            c.read(cap - 512, 1024).map(|_| ()),
        ),
        ("write at capacity", c.write(cap, &[0x5a; 512])),
        (
            "write straddling the end",
            c.write(cap - 512, &[0x5a; 1024]),
        ),
        ("write-zeroes beyond", c.write_zeroes(cap, 4096)),
        ("discard beyond", c.discard(cap, 65536)),
    ];
    for (what, r) in fails {
        match r {
            Err(e @ BlkError::Request { .. }) => {
                assert_eq!(e.errno(), Some(libc::EIO), "{what}: expected EIO, got {e}")
            }
            Err(e) => panic!("{what}: expected a request error, got {e}"),
            Ok(()) => panic!("{what}: succeeded beyond the capacity {cap}"),
        }
    }
    let got = read_ok(&mut c, cap - SECTOR, SECTOR as usize, "last sector");
    assert_bytes_eq(
        &last,
        &got,
        "last sector after rejected out-of-range requests",
    );
    let got = read_ok(&mut c, 0, 4096, "first page");
    assert_eq!(got.len(), 4096);
}

/// For a backend started **read-only** (not part of [`CASES`]): the device
/// advertises VIRTIO_BLK_F_RO, so a read-write connection is refused by the
/// client (EROFS at start), a read-only one reads fine, and the client
/// refuses writes before they reach the device. `expect.image`, when set,
/// must hold `pattern(18, 0, 64 KiB)` at offset 0 (see [`read_only_image`]).
pub fn case_read_only(socket: &Path, expect: &Expect) {
    match BlkClient::connect_vhost_user(socket, &ClientOptions::default()) {
        Ok(_) => panic!("a read-write connection to a read-only device was accepted"),
        Err(e) => assert_eq!(
            e.errno(),
            Some(libc::EROFS),
            "read-write connection to a read-only device: {e}"
        ),
    }
    let opts = ClientOptions {
        read_only: true,
        ..Default::default()
    };
    let mut c = connect(socket, &opts);
    assert_eq!(
        c.capacity(),
        expect.capacity,
        "capacity of the read-only device"
    );
    let got = read_ok(&mut c, 0, 64 << 10, "read-only device");
    if expect.image.is_some() {
        assert_bytes_eq(&pattern(18, 0, 64 << 10), &got, "read-only device content");
    }
    assert!(
        c.write(0, &[1; 512]).is_err(),
        "write on a read-only device"
    );
    let got = read_ok(&mut c, 0, 512, "read-only device after a refused write");
    assert_ne!(got, vec![1u8; 512], "a refused write changed the device");
}

/// Creates an image for [`case_read_only`]: `pattern(18, 0, 64 KiB)` at 0.
pub fn read_only_image(path: &Path, format: Format, size: u64) {
    create_image(path, format, size);
    let data = pattern(18, 0, 64 << 10);
    match format {
        Format::Raw => {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            f.write_all_at(&data, 0)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        Format::Qcow2 => {
            let img = crate::open_rw(path);
            img.write_at(&data, 0)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            img.flush()
                .unwrap_or_else(|e| panic!("flush {}: {e}", path.display()));
        }
    }
}
