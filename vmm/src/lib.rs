//! The bundled KVM VMM (`outboard`): boots Linux and attaches its virtio-pci
//! disks and NICs as vhost-user frontends to the Outboard daemons (or any
//! other vhost-user backend). The VMM is not on the I/O path: queue kicks
//! are ioeventfds and interrupts irqfds handed straight to the backends.
//!
//! Modules:
//! - [`cli`]: command line -> [`vm::VmConfig`] and backend specs.
//! - [`vm`]: KVM set-up, vCPU threads, the exit loop.
//! - [`memory`]: memfd-backed guest RAM and the fixed boot layout.
//! - [`boot`]: kernel (ELF vmlinux / bzImage), initramfs, command line, boot_params.
//! - [`cpu`]: vCPU registers, CPUID, MSRs, LAPIC for the 64-bit entry.
//! - [`acpi`]: RSDP/XSDT/FADT/DSDT/MADT (hardware-reduced ACPI).
//! - [`mptable`]: an MP table (for `acpi=off`, and to end Linux's slow MP scan).
//! - [`bus`]: port-I/O and MMIO dispatch.
//! - [`irq`]: the KVM GSI routing table (MSI routes for irqfds).
//! - [`devices`]: serial console, ACPI power registers, i8042 reset, port 0x80.
//! - [`pci`]: config mechanism #1, host bridge, MSI-X, the virtio-pci transport.
//! - [`vhost_user`]: the vhost-user frontend of one device (negotiation, rings, config,
//!   the inflight region kept across backend restarts).
//! - [`backend_channel`]: the backend channel (BACKEND_REQ): config-change notifications.
//! - [`backends`]: starting our daemons as children for `--disk path=` / `--net tap=`.
//!
//! PVM (`/sys/module/kvm_pvm`, a paravirtual KVM without VMX/SVM) needs no
//! different code path: the 64-bit direct entry, CPUID passed through from
//! `KVM_GET_SUPPORTED_CPUID`, no PVM MSRs written and port 0x80 writes
//! ignored are what both PVM and hardware KVM want. It is only reported in
//! the log.

pub mod acpi;
pub mod backend_channel;
pub mod backends;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod cpu;
pub mod devices;
pub mod irq;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod vhost_user;
pub mod vm;
