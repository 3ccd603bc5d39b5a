//! The PCI bus: configuration mechanism #1 (ports 0xCF8/0xCFC), a host
//! bridge at 00:00.0, and the virtio-pci devices behind it, whose BARs live
//! in the 32-bit window described by the DSDT's `PCI0._CRS`.

pub mod config;
pub mod msix;
pub mod net_ctrl;
pub mod virtio;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use crate::bus::{lock, BusDevice};
use crate::devices::legacy::ExitSignal;
use crate::irq::IrqRouting;
use crate::memory::{self, GuestMemory};
use config::{PciConfig, PciId};

/// First port of CONFIG_ADDRESS / CONFIG_DATA.
pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// Address space given to each device's BAR0.
pub const BAR_STRIDE: u64 = 0x10000;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Too many devices for the bus or the window.
    #[error("too many PCI devices ({0})")]
    TooManyDevices(usize),
    /// A virtio device failed to set up.
    #[error(transparent)]
    Virtio(#[from] virtio::Error),
}

/// A function on bus 0.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// A guest write to its configuration space.
    fn config_write(&mut self, off: usize, data: &[u8]);
    /// A guest read inside one of its BARs.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write inside one of its BARs.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge (00:00.0).
#[derive(Debug)]
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.0.write(off, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Bus 0 with its devices; sits on the port bus (0xCF8..0xD00) and on the
/// MMIO bus (the BAR window).
pub struct PciRoot {
    address: u32,
    devices: Vec<Box<dyn PciDevice>>,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl PciRoot {
    /// The host bridge plus one virtio-pci function per spec (slots 1..).
    pub fn new(
        vm: &Arc<VmFd>,
        mem: &GuestMemory,
        routing: &IrqRouting,
        specs: Vec<virtio::DeviceSpec>,
        exit: ExitSignal,
    ) -> Result<Self, Error> {
        if specs.len() > 31 || (specs.len() as u64 + 1) * BAR_STRIDE > memory::PCI_MMIO_SIZE {
            return Err(Error::TooManyDevices(specs.len()));
        }
        let mut devices: Vec<Box<dyn PciDevice>> =
            vec![Box::new(HostBridge(PciConfig::new(PciId {
                vendor: 0x8086,
                device: 0x0d57,
                revision: 0,
                class: 0x06_00_00,
                subsystem_vendor: 0,
                subsystem: 0,
            })))];
        for (i, spec) in specs.into_iter().enumerate() {
            let bar = memory::PCI_MMIO_START + (i as u64 + 1) * BAR_STRIDE;
            let dev =
                virtio::VirtioPci::new(vm.clone(), mem, routing.clone(), spec, bar, exit.clone())?;
            devices.push(Box::new(dev));
        }
        Ok(PciRoot {
            address: 0,
            devices,
        })
    }

    fn selected(&mut self) -> Option<(&mut Box<dyn PciDevice>, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let dev = (self.address >> 11) & 0x1f;
        let func = (self.address >> 8) & 0x7;
        let reg = (self.address & 0xfc) as usize;
        if bus != 0 || func != 0 {
            return None;
        }
        self.devices.get_mut(dev as usize).map(|d| (d, reg))
    }

    fn mmio_target(&mut self, addr: u64) -> Option<(&mut Box<dyn PciDevice>, usize, u64)> {
        for d in self.devices.iter_mut() {
            if !d.config().mem_enabled() {
                continue;
            }
            for bar in 0..6 {
                let (base, size) = d.config().bar(bar);
                if size != 0 && addr >= base && addr < base + size {
                    return Some((d, bar, addr - base));
                }
            }
        }
        None
    }
}

impl PciRoot {
    fn io_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            let v = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.get(offset as usize + i).copied().unwrap_or(0);
            }
            return;
        }
        let sub = (offset - 4) as usize;
        match self.selected() {
            Some((d, reg)) => d.config().read(reg + sub, data),
            None => data.fill(0xff),
        }
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        let sub = (offset - 4) as usize;
        if let Some((d, reg)) = self.selected() {
            d.config_write(reg + sub, data);
        }
    }
}

/// CONFIG_ADDRESS / CONFIG_DATA on the port bus (offsets 0..4 and 4..8).
#[derive(Debug)]
pub struct PciConfigIo(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).io_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).io_write(offset, data);
    }
}

/// The BAR window on the MMIO bus (offsets from [`memory::PCI_MMIO_START`]).
#[derive(Debug)]
pub struct PciMmio(pub Arc<Mutex<PciRoot>>);

impl BusDevice for PciMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut root = lock(&self.0);
        match root.mmio_target(memory::PCI_MMIO_START + offset) {
            Some((d, bar, off)) => d.bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut root = lock(&self.0);
        if let Some((d, bar, off)) = root.mmio_target(memory::PCI_MMIO_START + offset) {
            d.bar_write(bar, off, data);
        }
    }
}
