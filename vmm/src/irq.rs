//! KVM interrupt routing: the default IOAPIC/PIC routes for GSIs 0-23 plus
//! one MSI route per allocated GSI (each the target of an irqfd that a
//! vhost-user backend signals directly). `KVM_SET_GSI_ROUTING` replaces the
//! whole table, so every update sends all routes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;

use crate::bus::lock;

/// Number of IOAPIC pins (GSIs 0..24 are wired to them).
pub const IOAPIC_PINS: u32 = 24;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_SET_GSI_ROUTING failed.
    #[error("KVM_SET_GSI_ROUTING")]
    SetRouting(#[source] kvm_ioctls::Error),
    /// Too many routes.
    #[error("building the GSI routing table")]
    Fam(#[source] vmm_sys_util::fam::Error),
}

/// One MSI message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    /// Address (low and high).
    pub addr: u64,
    /// Data.
    pub data: u32,
}

#[derive(Debug)]
struct Inner {
    next_gsi: u32,
    msi: BTreeMap<u32, Option<MsiMessage>>,
}

/// The VM's routing table, shared by all devices.
#[derive(Debug, Clone)]
pub struct IrqRouting {
    vm: Arc<VmFd>,
    inner: Arc<Mutex<Inner>>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl IrqRouting {
    /// A table with only the default routes.
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouting {
            vm,
            inner: Arc::new(Mutex::new(Inner {
                next_gsi: IOAPIC_PINS,
                msi: BTreeMap::new(),
            })),
        }
    }

    /// Reserves a GSI for an MSI route (not routed until [`Self::set_msi`]).
    pub fn allocate(&self) -> u32 {
        let mut g = lock(&self.inner);
        let gsi = g.next_gsi;
        g.next_gsi += 1;
        g.msi.insert(gsi, None);
        gsi
    }

    /// Routes `gsi` to `msg` (or nowhere with `None`) and updates KVM when it changed.
    pub fn set_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), Error> {
        let mut g = lock(&self.inner);
        if g.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        g.msi.insert(gsi, msg);
        self.apply(&g)
    }

    fn apply(&self, g: &Inner) -> Result<(), Error> {
        let mut entries = Vec::new();
        for i in 0..IOAPIC_PINS {
            entries.push(irqchip(i, KVM_IRQCHIP_IOAPIC, i));
            if i < 8 {
                entries.push(irqchip(i, KVM_IRQCHIP_PIC_MASTER, i));
            } else if i < 16 {
                entries.push(irqchip(i, KVM_IRQCHIP_PIC_SLAVE, i - 8));
            }
        }
        for (gsi, msg) in &g.msi {
            if let Some(m) = msg {
                let mut e = kvm_irq_routing_entry {
                    gsi: *gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = m.addr as u32;
                e.u.msi.address_hi = (m.addr >> 32) as u32;
                e.u.msi.data = m.data;
                entries.push(e);
            }
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(Error::Fam)?;
        self.vm.set_gsi_routing(&table).map_err(Error::SetRouting)
    }
}
