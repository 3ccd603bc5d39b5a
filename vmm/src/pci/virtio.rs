//! placeholder
use crate::devices::legacy::ExitSignal;
use crate::irq::IrqRouting;
use crate::memory::GuestMemory;
use kvm_ioctls::VmFd;
use std::sync::Arc;

/// A device to attach.
#[derive(Debug)]
pub struct DeviceSpec;
/// Errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
/// Device.
#[derive(Debug)]
pub struct VirtioPci(super::config::PciConfig);
impl VirtioPci {
    /// New.
    pub fn new(
        _vm: Arc<VmFd>,
        _mem: &GuestMemory,
        _r: IrqRouting,
        _s: DeviceSpec,
        _bar: u64,
        _e: ExitSignal,
    ) -> Result<Self, Error> {
        unimplemented!()
    }
}
impl super::PciDevice for VirtioPci {
    fn config(&self) -> &super::config::PciConfig {
        &self.0
    }
    fn config_write(&mut self, _off: usize, _data: &[u8]) {}
    fn bar_read(&mut self, _bar: usize, _offset: u64, _data: &mut [u8]) {}
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
