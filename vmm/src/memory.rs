//! Guest physical memory: one memfd (so vhost-user backends can map it)
//! split around the 32-bit MMIO hole, and the fixed layout of the boot
//! structures.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// The guest memory type used everywhere in the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Start of the 32-bit MMIO hole (PCI BARs, IOAPIC, LAPIC); RAM above it
/// continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Start of RAM above the hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// 32-bit PCI memory window handed out to BARs.
pub const PCI_MMIO_START: u64 = 0xC000_0000;
/// Size of that window.
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;

/// GDT (boot-time, 64-bit).
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT.
pub const IDT_ADDR: u64 = 0x520;
/// `boot_params` (the "zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4 of the identity page tables; PDPT and PD follow.
pub const PML4_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Maximum command line length (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// End of usable low memory (start of the EBDA by convention).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first), in the BIOS area the kernel scans.
pub const ACPI_ADDR: u64 = 0xE0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Where high memory starts for the kernel loader.
pub const HIMEM_START: u64 = 0x10_0000;

/// Smallest guest accepted (the kernel and an initramfs must fit).
pub const MIN_MEMORY: u64 = 64 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Size out of range.
    #[error("guest memory size {0} MiB is invalid: need at least {min} MiB and a multiple of 2 MiB", min = MIN_MEMORY >> 20)]
    BadSize(u64),
    /// memfd_create failed.
    #[error("memfd_create for guest memory")]
    Memfd(#[source] std::io::Error),
    /// ftruncate failed.
    #[error("sizing guest memory memfd to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// mmap failed.
    #[error("mapping guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// The RAM ranges (guest address, size, offset in the memfd) for `size` bytes.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, MMIO_HOLE_START, 0),
            (HIGH_RAM_START, size - MMIO_HOLE_START, MMIO_HOLE_START),
        ]
    }
}

/// Creates `size` bytes of guest RAM backed by one memfd, mapped shared.
pub fn create(size: u64) -> Result<GuestMemory, Error> {
    if size < MIN_MEMORY || size & ((2 << 20) - 1) != 0 {
        return Err(Error::BadSize(size >> 20));
    }
    // SAFETY: the name is a valid NUL-terminated string; flags are valid.
    let fd = unsafe { libc::memfd_create(c"outboard-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| Error::Truncate(size, e))?;
    let file = std::sync::Arc::new(file);
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(gpa, len, off)| {
            (
                GuestAddress(gpa),
                len as usize,
                Some(FileOffset::from_arc(file.clone(), off)),
            )
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(Error::Map)
}

/// The last RAM byte below 4 GiB plus one.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20, 0)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, 3 << 30, 0), (4 << 30, 1 << 30, 3 << 30)]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(create(1 << 20), Err(Error::BadSize(1))));
        assert!(matches!(create((64 << 20) + 4096), Err(Error::BadSize(_))));
    }
}
