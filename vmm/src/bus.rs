//! Port-I/O and MMIO dispatch: devices own address ranges; a vCPU exit is
//! routed to the device whose range holds the address.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the start of its range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two devices claim overlapping ranges.
    #[error("bus range {0:#x}+{1:#x} overlaps another device")]
    Overlap(u64, u64),
}

type Entry = (u64, u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r: Vec<_> = self.entries.iter().map(|e| (e.0, e.1)).collect();
        f.debug_struct("Bus").field("ranges", &r).finish()
    }
}

impl Bus {
    /// Adds `dev` at `[start, start + len)`.
    pub fn insert(
        &mut self,
        start: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), Error> {
        if self
            .entries
            .iter()
            .any(|(s, l, _)| start < s + l && *s < start + len)
        {
            return Err(Error::Overlap(start, len));
        }
        self.entries.push((start, len, dev));
        self.entries.sort_by_key(|e| e.0);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.0 <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr < e.0 + e.1).then_some(e)
    }

    /// Dispatches a read; returns false (data untouched) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((start, _, dev)) => {
                lock(dev).read(addr - start, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((start, _, dev)) => {
                lock(dev).write(addr - start, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex, recovering from a poisoned lock (a device that
/// panicked on one vCPU must not take the others down with it).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rec(Vec<(u64, u8)>);
    impl BusDevice for Rec {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::default();
        let a = Arc::new(Mutex::new(Rec(vec![])));
        bus.insert(0x3f8, 8, a.clone()).expect("insert");
        assert!(bus.insert(0x3fc, 8, a.clone()).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(lock(&a).0, vec![(7, 9)]);
    }
}
