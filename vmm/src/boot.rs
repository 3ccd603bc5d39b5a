//! Direct kernel boot: loads an ELF `vmlinux` or a bzImage with
//! `linux-loader`, the initramfs and the command line, and fills
//! `boot_params` (with the e820 map and the RSDP address) for a 64-bit entry.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
/// bzImage: the 64-bit entry point is 0x200 bytes past the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// xloadflags bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    /// The initramfs file cannot be opened or read.
    #[error("cannot read initramfs {0}")]
    ReadInitramfs(PathBuf, #[source] std::io::Error),
    /// Neither an ELF nor a bzImage.
    #[error("kernel {0} is neither an ELF vmlinux ({1}) nor a bzImage ({2})")]
    KernelFormat(PathBuf, loader::Error, loader::Error),
    /// bzImage without a 64-bit entry.
    #[error("bzImage {0} has no 64-bit entry point (xloadflags)")]
    No64BitEntry(PathBuf),
    /// The initramfs does not fit below the kernel's limit.
    #[error("initramfs of {0} bytes does not fit in guest memory")]
    InitramfsTooBig(u64),
    /// Bad command line.
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line.
    #[error("writing the kernel command line")]
    LoadCmdline(#[source] loader::Error),
    /// Writing to guest memory.
    #[error("writing boot data to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// Writing boot_params.
    #[error("writing boot_params")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// What the vCPU setup needs to know after loading.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
}

/// Loads the kernel, the initramfs and the command line, and writes boot_params.
pub fn load(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootInfo, Error> {
    let mut f = File::open(kernel).map_err(|e| Error::OpenKernel(kernel.into(), e))?;
    let himem = Some(GuestAddress(memory::HIMEM_START));
    let (result, entry) = match loader::elf::Elf::load(mem, None, &mut f, himem) {
        Ok(r) => {
            let entry = r.kernel_load.0;
            (r, entry)
        }
        Err(elf_err) => match loader::bzimage::BzImage::load(mem, None, &mut f, himem) {
            Ok(r) => {
                let hdr = r.setup_header.ok_or(Error::No64BitEntry(kernel.into()))?;
                if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                    return Err(Error::No64BitEntry(kernel.into()));
                }
                let entry = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
                (r, entry)
            }
            Err(bz_err) => return Err(Error::KernelFormat(kernel.into(), elf_err, bz_err)),
        },
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }

    // Command line.
    let mut cl = Cmdline::new(memory::CMDLINE_MAX).map_err(Error::Cmdline)?;
    cl.insert_str(cmdline).map_err(Error::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(memory::CMDLINE_ADDR), &cl)
        .map_err(Error::LoadCmdline)?;
    params.hdr.cmd_line_ptr = memory::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    // Initramfs at the top of low RAM (below the kernel's limit when it has one).
    if let Some(path) = initramfs {
        let mut f = File::open(path).map_err(|e| Error::ReadInitramfs(path.into(), e))?;
        let size = f
            .metadata()
            .map_err(|e| Error::ReadInitramfs(path.into(), e))?
            .len();
        let mut top = memory::low_ram_end(mem_size);
        if params.hdr.initrd_addr_max != 0 {
            top = top.min(u64::from(params.hdr.initrd_addr_max) + 1);
        }
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= result.kernel_end)
            .ok_or(Error::InitramfsTooBig(size))?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(Error::Memory)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820: low RAM, the BIOS/ACPI area reserved, RAM from 1 MiB.
    let mut e820 = vec![
        (0, memory::EBDA_START, E820_RAM),
        (
            memory::EBDA_START,
            memory::BIOS_END - memory::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (gpa, len, _) in memory::ram_ranges(mem_size) {
        let (start, len) = if gpa == 0 {
            (memory::BIOS_END, len - memory::BIOS_END)
        } else {
            (gpa, len)
        };
        e820.push((start, len, E820_RAM));
    }
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = rsdp;

    let bp = BootParams::new::<boot_params>(&params, GuestAddress(memory::ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem).map_err(Error::BootParams)?;
    let _ = mem.write_obj(0u64, GuestAddress(memory::IDT_ADDR));
    Ok(BootInfo { entry })
}
