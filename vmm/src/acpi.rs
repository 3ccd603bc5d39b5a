//! ACPI tables (hardware-reduced ACPI, built with the `acpi_tables` crate):
//! RSDP, XSDT, FADT (sleep control/status and reset registers on I/O ports),
//! DSDT (`\_S5_` for power-off, the PCI host bridge `PCI0` with its
//! windows, COM1) and MADT (every vCPU's local APIC and the IOAPIC).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};

/// I/O port of the sleep control register (write SLP_TYP | SLP_EN to power off).
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// I/O port of the sleep status register.
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// I/O port of the reset register.
pub const RESET_PORT: u16 = 0x3c4;
/// Value the guest writes to [`RESET_PORT`] to reset.
pub const RESET_VALUE: u8 = 0x1;
/// SLP_TYP we give S5 in `\_S5_`.
pub const S5_SLP_TYP: u8 = 5;

const OEM_ID: [u8; 6] = *b"OUTBRD";
const OEM_TABLE: [u8; 8] = *b"OUTBOARD";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables do not fit in the BIOS area.
    #[error("ACPI tables are {0} bytes, more than the BIOS area holds")]
    TooBig(u64),
    /// Writing to guest memory.
    #[error("writing ACPI tables to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn dsdt() -> Vec<u8> {
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLP_TYP]));
    let pci_mmio_end = (memory::PCI_MMIO_START + memory::PCI_MMIO_SIZE - 1) as u32;
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cf8 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = aml::AddressSpace::new_io(0u16, 0x0cf7u16, None);
    let io_hi = aml::AddressSpace::new_io(0x0d00u16, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        memory::PCI_MMIO_START as u32,
        pci_mmio_end,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cf8, &io_lo, &io_hi, &mmio]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    );
    // COM1 as an ACPI device: in hardware-reduced mode Linux has no legacy
    // PIC and maps ISA IRQs only for devices ACPI describes.
    let com_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com_crs = aml::Name::new("_CRS".into(), &com_crs);
    let com1 = aml::Device::new("_SB_.COM1".into(), vec![&com_hid, &com_uid, &com_crs]);
    let mut body = Vec::new();
    s5.to_aml_bytes(&mut body);
    pci0.to_aml_bytes(&mut body);
    com1.to_aml_bytes(&mut body);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn madt(ncpus: u8) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, 1);
    sdt.write_u32(36, memory::LAPIC_ADDR as u32);
    sdt.write_u32(40, 1); // PCAT_COMPAT: the in-kernel irqchip has the 8259s
    for id in 0..ncpus {
        // Processor Local APIC: type 0, length 8, uid, APIC id, flags (enabled).
        sdt.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // IOAPIC: type 1, length 12, id, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, ncpus, 0];
    ioapic.extend_from_slice(&(memory::IOAPIC_ADDR as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    sdt.append_slice(&ioapic);
    // Local APIC NMI on LINT1 of every processor: type 4, length 6.
    sdt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt.update_checksum();
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sleep_control_reg = io(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io(SLEEP_STATUS_PORT);
    b.reset_reg = io(RESET_PORT);
    b.reset_value = RESET_VALUE;
    // IAPC_BOOT_ARCH: no VGA (bit 2); no 8042 (bit 1 clear), so the guest
    // does not probe a keyboard controller.
    b.iapc_boot_arch = (1u16 << 2).into();
    bytes_of(&b.finalize())
}

/// Writes all tables at [`memory::ACPI_ADDR`]; returns the RSDP address.
pub fn write(mem: &GuestMemory, ncpus: u8) -> Result<u64, Error> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = memory::ACPI_ADDR;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + 2 entries.
    let dsdt_addr = align(xsdt_addr + 36 + 2 * 8);
    let dsdt = dsdt();
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(ncpus);
    let end = madt_addr + madt.len() as u64;
    if end > memory::BIOS_END {
        return Err(Error::TooBig(end - rsdp_addr));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    for (addr, data) in [
        (rsdp_addr, bytes_of(&rsdp)),
        (xsdt_addr, bytes_of(&xsdt)),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
    ] {
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(Error::Memory)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [dsdt(), madt(4), fadt(0x1000)] {
            assert_eq!(sum(&t), 0, "checksum of {:?}", &t[0..4]);
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len(), "length of {:?}", &t[0..4]);
        }
        // 4 local APICs + IOAPIC + NMI after the 44-byte header.
        assert_eq!(madt(4).len(), 44 + 4 * 8 + 12 + 6);
    }
}
