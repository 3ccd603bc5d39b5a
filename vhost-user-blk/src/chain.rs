//! Walking a split-ring descriptor chain from a known head index.
//!
//! `virtio-queue` only builds chains from the available ring; resubmitting
//! the heads an inflight region recorded needs the same walk from an
//! arbitrary head. The rules are those of the virtio spec (2.7.5): follow
//! `next` while `F_NEXT` is set, at most `queue size` descriptors; one level
//! of indirect table (`F_INDIRECT`, a multiple of 16 bytes, no nested
//! indirect); at most 4 GiB in all. Anything else ends the chain, and the
//! request parser then sees an incomplete request.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const DESC_SIZE: u64 = 16;

/// Iterator over the descriptors of a chain.
#[derive(Debug)]
pub struct ChainWalker<'a, M: ?Sized> {
    mem: &'a M,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a, M: GuestMemoryBackend + ?Sized> ChainWalker<'a, M> {
    /// The chain starting at `head` of the descriptor table at `table` of a
    /// queue of `queue_size` descriptors.
    pub fn new(mem: &'a M, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        ChainWalker {
            mem,
            table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl<M: GuestMemoryBackend + ?Sized> Iterator for ChainWalker<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let addr = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
            let desc: Descriptor = self.mem.read_obj(addr).ok()?;
            if desc.refers_to_indirect_table() {
                let entries = u64::from(desc.len()) / DESC_SIZE;
                if self.indirect
                    || u64::from(desc.len()) % DESC_SIZE != 0
                    || entries == 0
                    || entries > u64::from(u16::MAX)
                {
                    self.ttl = 0;
                    return None;
                }
                self.table = desc.addr();
                self.table_len = entries as u16;
                self.ttl = self.table_len;
                self.next = 0;
                self.indirect = true;
                continue;
            }
            let Some(total) = self.bytes.checked_add(desc.len()) else {
                self.ttl = 0;
                return None;
            };
            self.bytes = total;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}
