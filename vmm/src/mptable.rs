//! An Intel MP table at the start of the EBDA (0x9FC00). ACPI's MADT is
//! what Linux uses; the MP table serves kernels booted with `acpi=off` and,
//! above all, ends Linux's MP-table scan at its first probe: the scan maps
//! and unmaps memory 16 bytes at a time over 64 KiB of BIOS area, which
//! costs about 0.5 s under PVM's shadow paging when nothing is found.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too many vCPUs for the space before the BIOS area.
    #[error("MP table for {0} vCPUs does not fit")]
    TooBig(u8),
    /// Writing to guest memory.
    #[error("writing the MP table")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// The floating pointer and configuration table for `ncpus` vCPUs, placed at `base`.
pub fn build(base: u64, ncpus: u8) -> Vec<u8> {
    let ioapic_id = ncpus;
    let mut entries = Vec::new();
    for id in 0..ncpus {
        // Processor: type 0, APIC id, version, flags (enabled, BSP), signature, features.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        entries.extend_from_slice(&[0, id, 0x14, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[2, ioapic_id, 0x11, 1]);
    entries.extend_from_slice(&(memory::IOAPIC_ADDR as u32).to_le_bytes());
    for irq in 0..16u8 {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 (all local APICs).
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    let count = (ncpus as usize + 3 + 16) as u16;

    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum
    table.extend_from_slice(b"OUTBOARD");
    table.extend_from_slice(b"OUTBOARD-VM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(memory::LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length/checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::new();
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table at the start of the EBDA.
pub fn write(mem: &GuestMemory, ncpus: u8) -> Result<(), Error> {
    let bytes = build(memory::EBDA_START, ncpus);
    if memory::EBDA_START + bytes.len() as u64 > memory::ACPI_ADDR {
        return Err(Error::TooBig(ncpus));
    }
    mem.write_slice(&bytes, GuestAddress(memory::EBDA_START))
        .map_err(Error::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_pointer() {
        let b = build(0x9fc00, 4);
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(b[0..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), 0x9fc10);
        let t = &b[16..];
        assert_eq!(&t[0..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(len, t.len());
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 4 + 3 + 16);
    }
}
