//! A type-0 PCI configuration space: 256 bytes with per-bit write masks,
//! 32-bit memory BARs and a capability list.

/// Offset of the first BAR register.
const BAR0: usize = 0x10;
/// Offset of the capability pointer.
const CAP_PTR: usize = 0x34;
/// First byte available for capabilities.
const CAP_START: usize = 0x40;

/// One device's configuration space.
#[derive(Debug, Clone)]
pub struct PciConfig {
    bytes: [u8; 256],
    wmask: [u8; 256],
    bar_sizes: [u64; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

/// Identity of a function.
#[derive(Debug, Clone, Copy)]
pub struct PciId {
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Revision.
    pub revision: u8,
    /// Class code (class, subclass, prog-if) as 0xCCSSPP.
    pub class: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
}

impl PciConfig {
    /// A header for `id` with no BARs and no capabilities.
    pub fn new(id: PciId) -> Self {
        let mut c = PciConfig {
            bytes: [0; 256],
            wmask: [0; 256],
            bar_sizes: [0; 6],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.set16(0x00, id.vendor);
        c.set16(0x02, id.device);
        c.bytes[0x08] = id.revision;
        c.bytes[0x09] = id.class as u8;
        c.bytes[0x0a] = (id.class >> 8) as u8;
        c.bytes[0x0b] = (id.class >> 16) as u8;
        c.set16(0x2c, id.subsystem_vendor);
        c.set16(0x2e, id.subsystem);
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.wmask[0x04] = 0x07;
        c.wmask[0x05] = 0x04;
        // Interrupt line.
        c.wmask[0x3c] = 0xff;
        c
    }

    fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Adds 32-bit memory BAR `idx` of `size` bytes (a power of two) at `addr`.
    pub fn add_mem_bar(&mut self, idx: usize, addr: u32, size: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16);
        self.bar_sizes[idx] = u64::from(size);
        let off = BAR0 + idx * 4;
        self.bytes[off..off + 4].copy_from_slice(&addr.to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&(!(size - 1)).to_le_bytes());
    }

    /// Current base address of memory BAR `idx` and its size (0 when absent).
    pub fn bar(&self, idx: usize) -> (u64, u64) {
        let off = BAR0 + idx * 4;
        let v = self.read32(off);
        (u64::from(v & !0xf), self.bar_sizes[idx])
    }

    /// Whether memory decoding is on.
    pub fn mem_enabled(&self) -> bool {
        self.bytes[0x04] & 0x2 != 0
    }

    /// Appends a capability; `body` starts with the id byte and a placeholder
    /// next byte. `wmask` (same length, may be empty) marks writable bits.
    /// Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> usize {
        let off = self.next_cap;
        assert!(off + body.len() <= 256, "PCI capabilities overflow");
        self.bytes[off..off + body.len()].copy_from_slice(body);
        self.bytes[off + 1] = 0;
        self.wmask[off..off + wmask.len()].copy_from_slice(wmask);
        match self.last_cap {
            None => self.bytes[CAP_PTR] = off as u8,
            Some(prev) => self.bytes[prev + 1] = off as u8,
        }
        self.bytes[0x06] |= 0x10; // status: capability list
        self.last_cap = Some(off);
        self.next_cap = (off + body.len() + 3) & !3;
        off
    }

    /// Reads the aligned dword at `off`.
    pub fn read32(&self, off: usize) -> u32 {
        let o = off & !3;
        u32::from_le_bytes([
            self.bytes[o],
            self.bytes[o + 1],
            self.bytes[o + 2],
            self.bytes[o + 3],
        ])
    }

    /// Reads bytes at `off` (any size that stays inside the space).
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    /// Applies a guest write through the write mask.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let o = off + i;
            if o >= 256 {
                break;
            }
            let m = self.wmask[o];
            self.bytes[o] = (self.bytes[o] & !m) | (b & m);
        }
    }

    /// Raw access for the device's own registers (e.g. MSI-X control).
    pub fn bytes(&self) -> &[u8; 256] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x018000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn bar_sizing_and_relocation() {
        let mut c = PciConfig::new(id());
        c.add_mem_bar(0, 0xc000_0000, 0x8000);
        assert_eq!(c.bar(0), (0xc000_0000, 0x8000));
        c.write(0x10, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(
            c.read32(0x10),
            0xffff_8000,
            "sizing reads back the size mask"
        );
        c.write(0x10, &0xc001_0000u32.to_le_bytes());
        assert_eq!(c.bar(0).0, 0xc001_0000);
        // Read-only fields stay.
        c.write(0x00, &[0, 0, 0, 0]);
        assert_eq!(c.read32(0), 0x1042_1af4);
    }

    #[test]
    fn capability_chain() {
        let mut c = PciConfig::new(id());
        let a = c.add_capability(&[0x09, 0, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]);
        let b = c.add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0, 0, 0xc0]);
        assert_eq!(c.bytes()[CAP_PTR] as usize, a);
        assert_eq!(c.bytes()[a + 1] as usize, b);
        assert_eq!(c.bytes()[b + 1], 0);
        assert_ne!(c.bytes()[6] & 0x10, 0);
        c.write(b + 2, &[0xff, 0xff]);
        assert_eq!(c.bytes()[b + 3], 0xc0);
        assert_eq!(c.bytes()[b + 2], 0);
    }
}
