//! The virtio-net control virtqueue, served by the VMM itself (as QEMU does for
//! vhost-user NICs: the backend only sees the data queues). Its notify address has no
//! ioeventfd, so a kick is an MMIO exit and the command is done before the vCPU resumes
//! (Linux busy-waits for the answer). Commands: `MQ_VQ_PAIRS_SET` (the device enables the
//! first N queue pairs on the backend with `SET_VRING_ENABLE`), and the RX-mode and MAC
//! commands a Linux guest sends (accepted: the tap delivers everything for the guest's
//! MAC, broadcast and multicast, and the guest filters the rest); anything else is
//! answered `VIRTIO_NET_ERR`.

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use crate::memory::GuestMemory;

/// Control classes and commands (virtio 1.2, 5.1.6.5).
const CLASS_RX: u8 = 0;
const CLASS_MAC: u8 = 1;
const CLASS_MQ: u8 = 4;
const MAC_TABLE_SET: u8 = 0;
const MAC_ADDR_SET: u8 = 1;
const MQ_VQ_PAIRS_SET: u8 = 0;
/// Acknowledgements.
const OK: u8 = 0;
const ERR: u8 = 1;
/// Largest command we read (a MAC table of 2 × 1024 entries and more).
const MAX_COMMAND: usize = 16 << 10;

/// Errors of the control queue (the guest broke it).
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    /// The queue size is not usable.
    #[error("control queue setup: {0:?}")]
    Setup(virtio_queue::Error),
    /// Returning a command failed (a bad used ring address).
    #[error("control queue: {0:?}")]
    Queue(virtio_queue::Error),
}

/// A decoded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Use the first N queue pairs.
    PairsSet(u16),
    /// An RX-mode switch (promiscuous, all-multicast, ...).
    RxMode {
        /// The command number.
        cmd: u8,
        /// On or off.
        on: bool,
    },
    /// The unicast/multicast filter tables.
    MacTable,
    /// The guest's own MAC.
    MacAddr([u8; 6]),
    /// Anything else, or a malformed command.
    Unsupported {
        /// Class.
        class: u8,
        /// Command.
        cmd: u8,
    },
}

/// The control queue of one NIC.
#[derive(Debug)]
pub struct CtrlQueue {
    q: Queue,
    buf: Vec<u8>,
}

impl CtrlQueue {
    /// The queue the driver set up (`size` entries at the given guest addresses;
    /// `event_idx`: VIRTIO_RING_F_EVENT_IDX negotiated, so the driver kicks only when
    /// the used ring's `avail_event` asks for it).
    pub fn new(
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        event_idx: bool,
    ) -> Result<CtrlQueue, CtrlError> {
        let mut q = Queue::new(size).map_err(CtrlError::Setup)?;
        q.set_event_idx(event_idx);
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_ready(true);
        Ok(CtrlQueue { q, buf: Vec::new() })
    }

    /// Serves every available command: `exec` decides each one's answer (`true`: OK).
    /// Returns how many were answered.
    pub fn process(
        &mut self,
        mem: &GuestMemory,
        mut exec: impl FnMut(Command) -> bool,
    ) -> Result<usize, CtrlError> {
        let mut n = 0;
        loop {
            n += self.serve(mem, &mut exec)?;
            // Asks for the next kick (with EVENT_IDX: avail_event); serves what
            // arrived meanwhile.
            if !self.q.enable_notification(mem).map_err(CtrlError::Queue)? {
                return Ok(n);
            }
        }
    }

    fn serve(
        &mut self,
        mem: &GuestMemory,
        exec: &mut impl FnMut(Command) -> bool,
    ) -> Result<usize, CtrlError> {
        let mut n = 0;
        while let Some(chain) = self.q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.buf.clear();
            let mut ack = None;
            let mut bad = false;
            for d in chain {
                if d.is_write_only() {
                    if ack.is_none() && d.len() >= 1 {
                        ack = Some(d.addr());
                    }
                    continue;
                }
                let len = d.len() as usize;
                if self.buf.len() + len > MAX_COMMAND {
                    bad = true;
                    continue;
                }
                let at = self.buf.len();
                self.buf.resize(at + len, 0);
                if mem.read_slice(&mut self.buf[at..], d.addr()).is_err() {
                    bad = true;
                }
            }
            let command = if bad {
                Command::Unsupported {
                    class: 0xff,
                    cmd: 0xff,
                }
            } else {
                decode(&self.buf)
            };
            let status = if exec(command) { OK } else { ERR };
            let written = match ack {
                Some(a) if mem.write_obj(status, a).is_ok() => 1,
                _ => 0,
            };
            self.q
                .add_used(mem, head, written)
                .map_err(CtrlError::Queue)?;
            n += 1;
        }
        Ok(n)
    }
}

/// Decodes `class, cmd, data...`.
pub fn decode(b: &[u8]) -> Command {
    let (Some(&class), Some(&cmd)) = (b.first(), b.get(1)) else {
        return Command::Unsupported {
            class: 0xff,
            cmd: 0xff,
        };
    };
    let data = &b[2..];
    match (class, cmd) {
        (CLASS_MQ, MQ_VQ_PAIRS_SET) if data.len() >= 2 => {
            Command::PairsSet(u16::from_le_bytes([data[0], data[1]]))
        }
        (CLASS_RX, 0..=5) if !data.is_empty() => Command::RxMode {
            cmd,
            on: data[0] != 0,
        },
        (CLASS_MAC, MAC_TABLE_SET) if mac_tables_ok(data) => Command::MacTable,
        (CLASS_MAC, MAC_ADDR_SET) if data.len() >= 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(&data[..6]);
            Command::MacAddr(m)
        }
        _ => Command::Unsupported { class, cmd },
    }
}

/// Two tables (unicast, multicast), each `entries: le32` followed by that many MACs.
fn mac_tables_ok(mut data: &[u8]) -> bool {
    for _ in 0..2 {
        let Some(n) = data.get(..4) else {
            return false;
        };
        let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
        let Some(rest) = n.checked_mul(6).and_then(|l| data.get(4 + l..)) else {
            return false;
        };
        data = rest;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;

    fn run(cmds: &[Vec<u8>]) -> (Vec<Command>, Vec<u8>) {
        let mem: GuestMemory =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let vq = MockSplitQueue::new(&mem, 16);
        let mut descs = Vec::new();
        for (i, c) in cmds.iter().enumerate() {
            let data = 0x10000 + 0x1000 * i as u64;
            mem.write_slice(c, GuestAddress(data)).expect("cmd");
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data,
                c.len() as u32,
                NEXT,
                2 * i as u16 + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data + 0x800,
                1,
                WRITE,
                0,
            )));
        }
        vq.build_multiple_desc_chains(&descs).expect("chains");
        let mut q = CtrlQueue::new(
            16,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            true,
        )
        .expect("queue");
        let mut seen = Vec::new();
        let n = q
            .process(&mem, |c| {
                seen.push(c);
                !matches!(c, Command::Unsupported { .. })
            })
            .expect("process");
        assert_eq!(n, cmds.len());
        assert_eq!(vq.used().idx().load(), cmds.len() as u16);
        // EVENT_IDX: avail_event (after the 16 used elements) asks for a kick at the
        // next command, or a Linux driver never kicks again.
        let avail_event: u16 = mem
            .read_obj(GuestAddress(vq.used_addr().0 + 4 + 8 * 16))
            .expect("avail_event");
        assert_eq!(avail_event, cmds.len() as u16);
        let acks = (0..cmds.len())
            .map(|i| {
                mem.read_obj::<u8>(GuestAddress(0x10000 + 0x1000 * i as u64 + 0x800))
                    .expect("ack")
            })
            .collect();
        (seen, acks)
    }

    #[test]
    fn linux_commands_are_decoded_and_acked() {
        let mut table = vec![CLASS_MAC, MAC_TABLE_SET];
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        table.extend_from_slice(&0u32.to_le_bytes());
        let (seen, acks) = run(&[
            vec![CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0],
            vec![CLASS_RX, 0, 1],
            table,
            vec![CLASS_MAC, MAC_ADDR_SET, 2, 0, 0, 0, 0, 7],
            vec![9, 9],
            // A table that claims more entries than it carries.
            vec![CLASS_MAC, MAC_TABLE_SET, 5, 0, 0, 0],
        ]);
        assert_eq!(
            seen,
            vec![
                Command::PairsSet(2),
                Command::RxMode { cmd: 0, on: true },
                Command::MacTable,
                Command::MacAddr([2, 0, 0, 0, 0, 7]),
                Command::Unsupported { class: 9, cmd: 9 },
                Command::Unsupported {
                    class: CLASS_MAC,
                    cmd: MAC_TABLE_SET
                },
            ]
        );
        assert_eq!(acks, vec![OK, OK, OK, OK, ERR, ERR]);
    }
}
