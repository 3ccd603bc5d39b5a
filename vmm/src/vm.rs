//! Builds and runs the VM: KVM (in-kernel irqchip and PIT), memfd RAM,
//! kernel loading, ACPI, the legacy devices, the PCI bus with the
//! vhost-user devices, and one thread per vCPU.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::devices::legacy::{AcpiPm, ExitReason, ExitSignal, Sink, I8042};
use crate::devices::serial::{self, SerialDevice};
use crate::memory;
use crate::{acpi, boot, cpu, irq, mptable, pci};

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    /// stdout (and input from stdin).
    Stdio,
    /// A file (no input).
    File(PathBuf),
    /// Nowhere.
    Off,
}

/// Everything needed to start a VM.
#[derive(Debug)]
pub struct VmConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// RAM size in bytes.
    pub memory: u64,
    /// Console destination.
    pub serial: SerialOut,
    /// virtio devices (already connected to their backends).
    pub devices: Vec<pci::virtio::DeviceSpec>,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm missing or not usable.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("KVM: {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// vCPU count out of range.
    #[error("--cpus {0} is out of range (1..={1})")]
    BadCpus(u8, usize),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// vCPU setup.
    #[error(transparent)]
    Cpu(#[from] cpu::Error),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    /// MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// Bus set-up.
    #[error(transparent)]
    Bus(#[from] crate::bus::Error),
    /// PCI / virtio set-up.
    #[error(transparent)]
    Pci(#[from] pci::Error),
    /// The console.
    #[error("serial console")]
    Serial(#[source] std::io::Error),
    /// An eventfd.
    #[error("eventfd")]
    EventFd(#[source] std::io::Error),
    /// Starting a thread.
    #[error("starting a vCPU thread")]
    Thread(#[source] std::io::Error),
}

/// Whether the host KVM is PVM (paravirtual, no VMX/SVM); only used for
/// messages: the VMM behaves the same on both.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A running VM: wait for it with [`Vm::wait`].
#[derive(Debug)]
pub struct Vm {
    exit: ExitSignal,
    _serial_term: Option<serial::RawTerminal>,
}

impl Vm {
    /// Blocks until the guest powers off, resets or fails.
    pub fn wait(mut self) -> ExitReason {
        let r = self.exit.wait();
        if let Some(t) = self._serial_term.as_mut() {
            t.restore();
        }
        r
    }
}

/// Creates the VM and starts its vCPUs.
pub fn start(cfg: VmConfig, t0: Instant) -> Result<Vm, Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let max = kvm.get_max_vcpus();
    if cfg.cpus == 0 || usize::from(cfg.cpus) > max.min(254) {
        return Err(Error::BadCpus(cfg.cpus, max.min(254)));
    }
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?,
    );
    vm.set_tss_address(0xfffb_d000)
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;

    let mem = memory::create(cfg.memory)?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which is kept
        // alive for the whole life of the VM (moved into the vCPU threads).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }

    let rsdp = acpi::write(&mem, cfg.cpus)?;
    mptable::write(&mem, cfg.cpus)?;
    cpu::write_boot_tables(&mem)?;
    let boot = boot::load(
        &mem,
        cfg.memory,
        &cfg.kernel,
        cfg.initramfs.as_deref(),
        &cfg.cmdline,
        rsdp,
    )?;
    log::info!(
        "kernel loaded, entry {:#x} ({} ms)",
        boot.entry,
        t0.elapsed().as_millis()
    );

    let exit = ExitSignal::default();
    let routing = irq::IrqRouting::new(vm.clone());
    let mut pio = Bus::default();
    let mut mmio = Bus::default();

    // Console.
    let mut term = None;
    if cfg.serial != SerialOut::Off {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&irqfd, serial::COM1_GSI)
            .map_err(|e| Error::Kvm("KVM_IRQFD (serial)", e))?;
        let out = match &cfg.serial {
            SerialOut::File(p) => serial::open_output(Some(p)),
            _ => serial::open_output(None),
        }
        .map_err(Error::Serial)?;
        let dev = Arc::new(Mutex::new(SerialDevice::new(irqfd, out)));
        pio.insert(u64::from(serial::COM1_PORT), 8, dev.clone())?;
        if cfg.serial == SerialOut::Stdio {
            term = Some(serial::RawTerminal::enter());
            serial::spawn_stdin_pump(dev).map_err(Error::Serial)?;
        }
    }
    pio.insert(0x80, 1, Arc::new(Mutex::new(Sink)))?;
    pio.insert(0x60, 5, Arc::new(Mutex::new(I8042::new(exit.clone()))))?;
    pio.insert(
        u64::from(acpi::SLEEP_CONTROL_PORT),
        u64::from(acpi::RESET_PORT - acpi::SLEEP_CONTROL_PORT + 1),
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
    )?;

    // PCI: host bridge + virtio devices.
    let root = pci::PciRoot::new(&vm, &mem, &routing, cfg.devices, exit.clone())?;
    let root = Arc::new(Mutex::new(root));
    pio.insert(
        pci::CONFIG_ADDRESS_PORT,
        8,
        Arc::new(Mutex::new(pci::PciConfigIo(root.clone()))),
    )?;
    mmio.insert(
        memory::PCI_MMIO_START,
        memory::PCI_MMIO_SIZE,
        Arc::new(Mutex::new(pci::PciMmio(root))),
    )?;

    // vCPUs.
    let base_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mem = Arc::new(mem);
    let mut vcpus = Vec::new();
    for id in 0..cfg.cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let cpuid = cpu::cpuid_for(&base_cpuid, id, cfg.cpus);
        cpu::configure(&vcpu, id, &cpuid, (id == 0).then_some(boot.entry))?;
        vcpus.push(vcpu);
    }
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (pio, mmio, exit, mem) = (pio.clone(), mmio.clone(), exit.clone(), mem.clone());
        let vm = vm.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _keep = (mem, vm);
                run_vcpu(id as u8, vcpu, &pio, &mmio, &exit)
            })
            .map_err(Error::Thread)?;
    }
    log::info!(
        "{} vCPU(s) started ({} ms){}",
        cfg.cpus,
        t0.elapsed().as_millis(),
        if host_is_pvm() { " on PVM" } else { "" }
    );
    Ok(Vm {
        exit,
        _serial_term: term,
    })
}

fn run_vcpu(id: u8, mut vcpu: VcpuFd, pio: &Bus, mmio: &Bus, exit: &ExitSignal) {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => {
                exit.exit(ExitReason::TripleFault(id));
                return;
            }
            Ok(VcpuExit::SystemEvent(ty, _)) => {
                let r = if ty == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN {
                    ExitReason::PowerOff
                } else {
                    ExitReason::Reset
                };
                exit.exit(r);
                return;
            }
            Ok(VcpuExit::Hlt) => {
                // Only without an in-kernel LAPIC; ours has one. Stop this vCPU.
                log::warn!("vCPU {id}: HLT exit; stopping it");
                return;
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                exit.exit(ExitReason::Error(format!(
                    "vCPU {id}: KVM_EXIT_FAIL_ENTRY (reason {reason:#x})"
                )));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                exit.exit(ExitReason::Error(format!(
                    "vCPU {id}: KVM_EXIT_INTERNAL_ERROR"
                )));
                return;
            }
            Ok(other) => {
                log::debug!("vCPU {id}: unhandled exit {other:?}");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                exit.exit(ExitReason::Error(format!("vCPU {id}: KVM_RUN: {e}")));
                return;
            }
        }
        if exit.is_set() {
            return;
        }
    }
}

/// Keeps `VmFd` usable from several threads (it is only used through `&self`).
#[allow(dead_code)]
fn _assert_send_sync(v: &VmFd) -> &(dyn Send + Sync) {
    v
}
