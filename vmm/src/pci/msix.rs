//! MSI-X: the capability, the vector table (in BAR0) and the routing of
//! each vector to a KVM GSI.

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// "No vector" in virtio's vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// One table entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    /// Message address (low, high).
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub ctrl: u32,
}

/// The table and the capability state.
#[derive(Debug, Clone)]
pub struct MsixTable {
    /// Entries.
    pub entries: Vec<Entry>,
    /// MSI-X enable (message control bit 15).
    pub enabled: bool,
    /// Function mask (message control bit 14).
    pub masked: bool,
}

impl MsixTable {
    /// `n` vectors, all masked (as after reset).
    pub fn new(n: usize) -> Self {
        MsixTable {
            entries: vec![
                Entry {
                    ctrl: 1,
                    ..Default::default()
                };
                n
            ],
            enabled: false,
            masked: false,
        }
    }

    /// Capability bytes: id 0x11, next, message control (size - 1), table
    /// and PBA offsets in `bar`. Also returns the write mask.
    pub fn capability(&self, bar: u8, table_off: u32, pba_off: u32) -> (Vec<u8>, Vec<u8>) {
        let mut c = vec![0x11, 0];
        c.extend_from_slice(&((self.entries.len() - 1) as u16).to_le_bytes());
        c.extend_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        c.extend_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        let mut m = vec![0u8; c.len()];
        m[3] = 0xc0;
        (c, m)
    }

    /// Updates enable/mask from the message control high byte.
    pub fn set_control(&mut self, hi: u8) {
        self.enabled = hi & 0x80 != 0;
        self.masked = hi & 0x40 != 0;
    }

    /// Reads from the table at `off`.
    pub fn read(&self, off: u64, data: &mut [u8]) {
        let i = (off / ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(i) else {
            data.fill(0);
            return;
        };
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&e.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&e.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        let o = (off % ENTRY_SIZE) as usize;
        for (k, b) in data.iter_mut().enumerate() {
            *b = raw.get(o + k).copied().unwrap_or(0);
        }
    }

    /// Writes to the table at `off`; returns the vector touched.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Option<usize> {
        let i = (off / ENTRY_SIZE) as usize;
        let e = self.entries.get_mut(i)?;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&e.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&e.data.to_le_bytes());
        raw[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        let o = (off % ENTRY_SIZE) as usize;
        for (k, b) in data.iter().enumerate() {
            if let Some(r) = raw.get_mut(o + k) {
                *r = *b;
            }
        }
        let word = |a: usize| u32::from_le_bytes([raw[a], raw[a + 1], raw[a + 2], raw[a + 3]]);
        e.addr = u64::from(word(0)) | (u64::from(word(4)) << 32);
        e.data = word(8);
        e.ctrl = word(12);
        Some(i)
    }

    /// The message vector `v` delivers now, or `None` when it cannot fire.
    pub fn message(&self, v: usize) -> Option<(u64, u32)> {
        let e = self.entries.get(v)?;
        (self.enabled && !self.masked && e.ctrl & 1 == 0).then_some((e.addr, e.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entries_and_masking() {
        let mut t = MsixTable::new(3);
        assert_eq!(t.message(0), None, "disabled after reset");
        t.set_control(0x80);
        assert_eq!(t.message(0), None, "entries start masked");
        t.write(16, &0xfee0_1000u32.to_le_bytes());
        t.write(20, &0u32.to_le_bytes());
        t.write(24, &0x4041u32.to_le_bytes());
        t.write(28, &0u32.to_le_bytes());
        assert_eq!(t.message(1), Some((0xfee0_1000, 0x4041)));
        let mut b = [0u8; 4];
        t.read(24, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x4041);
        t.set_control(0xc0);
        assert_eq!(t.message(1), None, "function mask");
        assert_eq!(t.write(48, &[0]), None, "past the table");
    }
}
