//! A hostile vhost-user frontend: raw messages with bad sizes, missing fds,
//! overlapping memory regions, vring addresses outside guest memory, queue
//! indices out of range, an inflight region larger than its file, unknown
//! requests and garbage. After each, the connection must answer GET_FEATURES
//! or be closed (never hang), the daemon must stay up, and a real client
//! (libblkio) must then work on the next connection.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use outboard_tests::blkio_client::{create_image, ClientOptions, Daemon, DaemonConfig, Format};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const GET_CONFIG: u32 = 24;
const SET_INFLIGHT_FD: u32 = 32;
const ADD_MEM_REG: u32 = 37;
const VERSION: u32 = 1;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const MEM_SIZE: u64 = 1 << 20;
const GPA: u64 = 0x1_0000_0000;
const HVA: u64 = 0x7f00_0000_0000;

struct Conn(UnixStream);

impl Conn {
    fn open(path: &std::path::Path) -> Conn {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Conn(s)
    }

    /// Sends a message; a send error means the daemon already closed.
    fn send(&self, req: u32, size: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        let mut msg = Vec::with_capacity(12 + payload.len());
        msg.extend_from_slice(&req.to_le_bytes());
        msg.extend_from_slice(&VERSION.to_le_bytes());
        msg.extend_from_slice(&size.to_le_bytes());
        msg.extend_from_slice(payload);
        if fds.is_empty() {
            return (&self.0).write_all(&msg).is_ok();
        }
        self.0.send_with_fds(&[&msg[..]], fds).is_ok()
    }

    fn msg(&self, req: u32, payload: &[u8], fds: &[RawFd]) -> bool {
        self.send(req, payload.len() as u32, payload, fds)
    }

    /// Reads one reply: `Some(payload)`, or `None` when the daemon closed.
    fn reply(&mut self) -> Option<Vec<u8>> {
        let mut hdr = [0u8; 12];
        match self.0.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the daemon neither replied nor closed within 5 s")
            }
            Err(_) => return None,
        }
        let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let mut body = vec![0u8; size];
        self.0.read_exact(&mut body).ok()?;
        Some(body)
    }

    fn get_u64(&mut self, req: u32) -> Option<u64> {
        if !self.msg(req, &[], &[]) {
            return None;
        }
        let b = self.reply()?;
        Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
    }

    /// The connection still answers, or it was closed: never a hang.
    fn answers_or_closed(&mut self) -> &'static str {
        match self.get_u64(GET_FEATURES) {
            Some(_) => "answered",
            None => "closed",
        }
    }

    /// Owner + features + protocol features, as a frontend starts.
    fn handshake(&mut self) {
        assert!(self.msg(SET_OWNER, &[], &[]));
        let f = self.get_u64(GET_FEATURES).expect("features");
        assert!(self.msg(SET_FEATURES, &f.to_le_bytes(), &[]));
        assert!(f & F_PROTOCOL_FEATURES != 0);
        let p = self.get_u64(GET_PROTOCOL_FEATURES).expect("protocol");
        // Without REPLY_ACK (bit 3): errors show as closed connections.
        assert!(self.msg(SET_PROTOCOL_FEATURES, &(p & !8).to_le_bytes(), &[]));
    }
}

fn mem_table(regions: &[(u64, u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for &(gpa, size, hva) in regions {
        for v in [gpa, size, hva, 0u64] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

fn memfile() -> File {
    let f = tempfile::tempfile().expect("tempfile");
    f.set_len(MEM_SIZE).expect("size");
    f
}

fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_le_bytes(), num.to_le_bytes()].concat()
}

/// A named malformed exchange.
type Case = (&'static str, Box<dyn Fn(&mut Conn)>);

/// Each case runs on its own connection.
fn cases() -> Vec<Case> {
    let m = memfile();
    let m2 = memfile();
    vec![
        (
            "header claims a huge body",
            Box::new(|c: &mut Conn| {
                c.send(SET_VRING_NUM, 0x1000_0000, &[0; 8], &[]);
            }),
        ),
        (
            "body shorter than the message needs",
            Box::new(|c: &mut Conn| {
                c.msg(SET_VRING_ADDR, &[0; 12], &[]);
            }),
        ),
        (
            "unknown request",
            Box::new(|c: &mut Conn| {
                c.msg(9999, &[1, 2, 3, 4], &[]);
            }),
        ),
        (
            "garbage bytes",
            Box::new(|c: &mut Conn| {
                let _ = (&c.0).write_all(&[0xff; 333]);
            }),
        ),
        (
            "memory table with 2 regions and 1 fd",
            Box::new(move |c: &mut Conn| {
                c.handshake();
                let t = mem_table(&[(GPA, MEM_SIZE, HVA), (GPA * 2, MEM_SIZE, HVA * 2)]);
                c.msg(SET_MEM_TABLE, &t, &[m.as_raw_fd()]);
            }),
        ),
        (
            "memory table without fds",
            Box::new(|c: &mut Conn| {
                c.handshake();
                c.msg(SET_MEM_TABLE, &mem_table(&[(GPA, MEM_SIZE, HVA)]), &[]);
            }),
        ),
        (
            "overlapping memory regions",
            Box::new({
                let (a, b) = (memfile(), memfile());
                move |c: &mut Conn| {
                    c.handshake();
                    let t = mem_table(&[(GPA, MEM_SIZE, HVA), (GPA + 4096, MEM_SIZE, HVA * 2)]);
                    c.msg(SET_MEM_TABLE, &t, &[a.as_raw_fd(), b.as_raw_fd()]);
                }
            }),
        ),
        (
            "region larger than its file, rings past the file's end, a kick",
            Box::new(move |c: &mut Conn| {
                c.handshake();
                let t = mem_table(&[(GPA, MEM_SIZE * 64, HVA)]);
                c.msg(SET_MEM_TABLE, &t, &[m2.as_raw_fd()]);
                // Touching those pages would be SIGBUS in the daemon.
                let past = HVA + MEM_SIZE * 8;
                c.msg(SET_VRING_NUM, &vring_state(0, 16), &[]);
                let mut a = vec![0u8; 8];
                for v in [past, past + 0x2000, past + 0x1000, 0] {
                    a.extend_from_slice(&v.to_le_bytes());
                }
                c.msg(SET_VRING_ADDR, &a, &[]);
                let kick = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
                c.msg(SET_VRING_CALL, &0u64.to_le_bytes(), &[kick.as_raw_fd()]);
                c.msg(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_raw_fd()]);
                c.msg(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
                kick.write(1).expect("kick");
            }),
        ),
        (
            "vring addresses outside guest memory, then a kick",
            Box::new(|c: &mut Conn| {
                c.handshake();
                let mem = memfile();
                let t = mem_table(&[(GPA, MEM_SIZE, HVA)]);
                c.msg(SET_MEM_TABLE, &t, &[mem.as_raw_fd()]);
                c.msg(SET_VRING_NUM, &vring_state(0, 256), &[]);
                c.msg(SET_VRING_BASE, &vring_state(0, 0), &[]);
                // Descriptor table inside, used ring past the end of memory.
                let mut a = Vec::new();
                a.extend_from_slice(&0u32.to_le_bytes());
                a.extend_from_slice(&0u32.to_le_bytes());
                for v in [HVA, HVA + MEM_SIZE - 16, HVA + 0x1000, 0] {
                    a.extend_from_slice(&v.to_le_bytes());
                }
                c.msg(SET_VRING_ADDR, &a, &[]);
                let kick = memfile();
                c.msg(SET_VRING_KICK, &0u64.to_le_bytes(), &[kick.as_raw_fd()]);
                c.msg(SET_VRING_ENABLE, &vring_state(0, 1), &[]);
            }),
        ),
        (
            "vring address not in any region",
            Box::new(|c: &mut Conn| {
                c.handshake();
                let mem = memfile();
                c.msg(
                    SET_MEM_TABLE,
                    &mem_table(&[(GPA, MEM_SIZE, HVA)]),
                    &[mem.as_raw_fd()],
                );
                let mut a = vec![0u8; 8];
                for v in [0x1234u64, HVA, HVA, 0] {
                    a.extend_from_slice(&v.to_le_bytes());
                }
                c.msg(SET_VRING_ADDR, &a, &[]);
            }),
        ),
        (
            "queue index out of range",
            Box::new(|c: &mut Conn| {
                c.handshake();
                c.msg(SET_VRING_NUM, &vring_state(200, 256), &[]);
                c.msg(SET_VRING_BASE, &vring_state(u32::MAX, 0), &[]);
                let f = memfile();
                c.msg(SET_VRING_KICK, &99u64.to_le_bytes(), &[f.as_raw_fd()]);
                c.msg(SET_VRING_CALL, &250u64.to_le_bytes(), &[f.as_raw_fd()]);
                c.msg(SET_VRING_ENABLE, &vring_state(77, 1), &[]);
            }),
        ),
        (
            "queue size 0 and too large",
            Box::new(|c: &mut Conn| {
                c.handshake();
                c.msg(SET_VRING_NUM, &vring_state(0, 0), &[]);
                c.msg(SET_VRING_NUM, &vring_state(0, 65535), &[]);
            }),
        ),
        (
            "inflight region larger than its file, and without fd",
            Box::new(|c: &mut Conn| {
                c.handshake();
                let f = tempfile::tempfile().expect("tempfile");
                f.set_len(4096).expect("size");
                let mut p = Vec::new();
                p.extend_from_slice(&(1u64 << 30).to_le_bytes());
                p.extend_from_slice(&0u64.to_le_bytes());
                p.extend_from_slice(&2u16.to_le_bytes());
                p.extend_from_slice(&256u16.to_le_bytes());
                p.extend_from_slice(&[0; 4]);
                c.msg(SET_INFLIGHT_FD, &p, &[f.as_raw_fd()]);
                c.msg(SET_INFLIGHT_FD, &p, &[]);
            }),
        ),
        (
            "config read far past the config space",
            Box::new(|c: &mut Conn| {
                c.handshake();
                let mut p = Vec::new();
                p.extend_from_slice(&0xffff_0000u32.to_le_bytes());
                p.extend_from_slice(&0x100u32.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&[0; 0x100]);
                c.msg(GET_CONFIG, &p, &[]);
                let _ = c.reply();
            }),
        ),
        (
            "single region added twice",
            Box::new(|c: &mut Conn| {
                c.handshake();
                let f = memfile();
                let mut r = Vec::new();
                r.extend_from_slice(&0u64.to_le_bytes());
                for v in [GPA, MEM_SIZE, HVA, 0] {
                    r.extend_from_slice(&v.to_le_bytes());
                }
                c.msg(ADD_MEM_REG, &r, &[f.as_raw_fd()]);
                c.msg(ADD_MEM_REG, &r, &[f.as_raw_fd()]);
            }),
        ),
    ]
}

#[test]
fn malformed_messages_get_an_error_or_a_closed_connection_and_the_daemon_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    create_image(&image, Format::Raw, 16 << 20);
    let cfg = DaemonConfig {
        image,
        format: Format::Raw,
        socket: dir.path().join("vhost.sock"),
        num_queues: 2,
        direct: false,
    };
    let mut daemon = Daemon::ours(&outboard_tests::workspace_binary("vhost-user-blk"), &cfg)
        .unwrap_or_else(|e| panic!("{e}"));
    // Control: a well-formed start keeps the connection answering, so the
    // cases below really reach their malformed message.
    let mut c = Conn::open(daemon.socket());
    c.handshake();
    let mem = memfile();
    c.msg(
        SET_MEM_TABLE,
        &mem_table(&[(GPA, MEM_SIZE, HVA)]),
        &[mem.as_raw_fd()],
    );
    c.msg(SET_VRING_NUM, &vring_state(0, 16), &[]);
    assert_eq!(c.answers_or_closed(), "answered", "{}", daemon.log_text());
    drop(c);
    for (name, case) in cases() {
        let mut c = Conn::open(daemon.socket());
        case(&mut c);
        let outcome = c.answers_or_closed();
        drop(c);
        eprintln!("{name}: {outcome}");
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            daemon.is_running(),
            "daemon died after {name:?}:\n{}",
            daemon.log_text()
        );
    }
    // The next client is served normally.
    let mut client = daemon
        .connect(&ClientOptions::queues(2))
        .unwrap_or_else(|e| panic!("client after the hostile ones: {e}\n{}", daemon.log_text()));
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
    client.write(4096, &data).expect("write");
    assert!(client.read(4096, data.len()).expect("read") == data);
    drop(client);
    assert!(daemon.is_running(), "{}", daemon.log_text());
    daemon.stop();
}
