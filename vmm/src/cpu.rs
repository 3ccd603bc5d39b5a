//! vCPU set-up for a 64-bit direct kernel entry (Firecracker-style): CPUID
//! from `KVM_GET_SUPPORTED_CPUID` with per-vCPU APIC ids, a few MSRs, the FPU,
//! LAPIC LINT0/LINT1, and for the boot vCPU long mode with identity page
//! tables, a flat GDT (CS 0x10, DS 0x18) and `boot_params` in RSI.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{self, GuestMemory};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {0}: {1}")]
    Kvm(u8, &'static str, #[source] kvm_ioctls::Error),
    /// Building the MSR list.
    #[error("building the MSR list")]
    Fam(#[source] vmm_sys_util::fam::Error),
    /// Writing the GDT or page tables.
    #[error("writing boot page tables or GDT")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
/// CR0 at entry: PE MP ET NE WP AM PG.
const BOOT_CR0: u64 = 0x8005_0033;
const X86_CR4_PAE: u64 = 0x20;
const EFER_SCE: u64 = 0x1;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
const EFER_NXE: u64 = 0x800;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// GDT: null, null, code (0x10), data (0x18), TSS (0x20).
const GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
const CODE_SEL: u16 = 0x10;
const DATA_SEL: u16 = 0x18;
const TSS_SEL: u16 = 0x20;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << 32)
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << 32)
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: 0,
    }
}

/// Writes the GDT and the identity page tables (first 4 GiB, 2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), Error> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(memory::GDT_ADDR + i as u64 * 8))
            .map_err(Error::Memory)?;
    }
    let pml4 = memory::PML4_ADDR;
    let pdpt = pml4 + 0x1000;
    let pd = pdpt + 0x1000; // four PD pages follow
    mem.write_obj(pdpt | 3, GuestAddress(pml4))
        .map_err(Error::Memory)?;
    for g in 0..4u64 {
        mem.write_obj((pd + g * 0x1000) | 3, GuestAddress(pdpt + g * 8))
            .map_err(Error::Memory)?;
        for i in 0..512u64 {
            let addr = (g << 30) | (i << 21);
            mem.write_obj(addr | 0x83, GuestAddress(pd + g * 0x1000 + i * 8))
                .map_err(Error::Memory)?;
        }
    }
    Ok(())
}

/// CPUID for vCPU `id` (the supported table with its APIC id patched in).
pub fn cpuid_for(base: &CpuId, id: u8, ncpus: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(ncpus) << 16);
                // HTT: more than one logical processor.
                if ncpus > 1 {
                    e.edx |= 1 << 28;
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

/// Configures vCPU `id`; the boot vCPU (0) also gets the entry state.
pub fn configure(vcpu: &VcpuFd, id: u8, cpuid: &CpuId, entry: Option<u64>) -> Result<(), Error> {
    vcpu.set_cpuid2(cpuid)
        .map_err(|e| Error::Kvm(id, "KVM_SET_CPUID2", e))?;

    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MSR_IA32_MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ])
    .map_err(Error::Fam)?;
    // Best effort: a host that refuses one of these still boots Linux.
    let _ = vcpu.set_msrs(&msrs);

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| Error::Kvm(id, "KVM_SET_FPU", e))?;

    // LAPIC: LINT0 = ExtINT, LINT1 = NMI.
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm(id, "KVM_GET_LAPIC", e))?;
    set_lapic_reg(&mut lapic.regs, 0x350, |v| (v & !0x700) | (0x7 << 8));
    set_lapic_reg(&mut lapic.regs, 0x360, |v| (v & !0x700) | (0x4 << 8));
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm(id, "KVM_SET_LAPIC", e))?;

    let Some(entry) = entry else { return Ok(()) };

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm(id, "KVM_GET_SREGS", e))?;
    let code = segment(GDT[2], CODE_SEL);
    let data = segment(GDT[3], DATA_SEL);
    let tss = segment(GDT[4], TSS_SEL);
    sregs.gdt.base = memory::GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = memory::IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = BOOT_CR0 | X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = memory::PML4_ADDR;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm(id, "KVM_SET_SREGS", e))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: memory::BOOT_STACK,
        rbp: memory::BOOT_STACK,
        rsi: memory::ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm(id, "KVM_SET_REGS", e))?;
    Ok(())
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, f: impl Fn(u32) -> u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[off + i] as u8;
    }
    let v = f(u32::from_le_bytes(b)).to_le_bytes();
    for (i, x) in v.iter().enumerate() {
        regs[off + i] = *x as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let c = segment(GDT[2], CODE_SEL);
        assert_eq!(
            (c.type_, c.l, c.db, c.g, c.present, c.s),
            (0xb, 1, 0, 1, 1, 1)
        );
        assert_eq!(c.limit, 0xffff_ffff);
        let d = segment(GDT[3], DATA_SEL);
        assert_eq!((d.type_, d.l, d.db, d.g), (0x3, 0, 1, 1));
    }
}
