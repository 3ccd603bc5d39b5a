//! Small legacy devices: the ACPI sleep/reset registers (power-off and
//! reboot), the i8042 reset command (0xFE on port 0x64) and a sink for the
//! POST port 0x80.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::acpi;
use crate::bus::BusDevice;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042).
    Reset,
    /// KVM_EXIT_SHUTDOWN (triple fault).
    TripleFault(u8),
    /// The VMM failed.
    Error(String),
}

impl ExitReason {
    /// Process exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::PowerOff => 0,
            ExitReason::Error(_) => 1,
            ExitReason::TripleFault(_) => 2,
            ExitReason::Reset => 3,
        }
    }
}

/// Where vCPUs and devices report that the VM must stop; the main thread waits on it.
#[derive(Debug, Default, Clone)]
pub struct ExitSignal(Arc<(Mutex<Option<ExitReason>>, Condvar, AtomicBool)>);

impl ExitSignal {
    /// Records the first reason and wakes the waiter.
    pub fn exit(&self, reason: ExitReason) {
        let mut g = crate::bus::lock(&self.0 .0);
        if g.is_none() {
            *g = Some(reason);
        }
        self.0 .2.store(true, Ordering::Release);
        self.0 .1.notify_all();
    }

    /// Blocks until a reason is recorded.
    pub fn wait(&self) -> ExitReason {
        let mut g = crate::bus::lock(&self.0 .0);
        loop {
            if let Some(r) = g.clone() {
                return r;
            }
            g = self.0 .1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether an exit was requested.
    pub fn is_set(&self) -> bool {
        self.0 .2.load(Ordering::Acquire)
    }
}

/// ACPI sleep control/status and reset registers (ports 0x3c0..0x3c5).
#[derive(Debug)]
pub struct AcpiPm {
    exit: ExitSignal,
}

impl AcpiPm {
    /// A new register block reporting to `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let port = acpi::SLEEP_CONTROL_PORT + offset as u16;
        let v = data.first().copied().unwrap_or(0);
        if port == acpi::SLEEP_CONTROL_PORT {
            // SLP_EN (bit 5) with SLP_TYP (bits 2..4) of S5.
            if v & 0x20 != 0 && (v >> 2) & 0x7 == acpi::S5_SLP_TYP {
                self.exit.exit(ExitReason::PowerOff);
            }
        } else if port == acpi::RESET_PORT && v == acpi::RESET_VALUE {
            self.exit.exit(ExitReason::Reset);
        }
    }
}

/// Just enough of the i8042 for the reboot path: 0xFE to the command port resets.
#[derive(Debug)]
pub struct I8042 {
    exit: ExitSignal,
}

impl I8042 {
    /// A controller reporting resets to `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Ports 0x60 (offset 0) and 0x64 (offset 4).
        if offset == 4 && data.first() == Some(&0xfe) {
            self.exit.exit(ExitReason::Reset);
        }
    }
}

/// Port 0x80 (POST codes): writes ignored, reads 0. The PVM guest writes it
/// to take pending interrupts, so it must be cheap.
#[derive(Debug)]
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let e = ExitSignal::default();
        let mut pm = AcpiPm::new(e.clone());
        pm.write(0, &[0x10]); // SLP_TYP without SLP_EN: nothing
        assert!(!e.is_set());
        pm.write(0, &[(acpi::S5_SLP_TYP << 2) | 0x20]);
        assert_eq!(e.wait(), ExitReason::PowerOff);

        let e = ExitSignal::default();
        let mut pm = AcpiPm::new(e.clone());
        pm.write(
            u64::from(acpi::RESET_PORT - acpi::SLEEP_CONTROL_PORT),
            &[acpi::RESET_VALUE],
        );
        assert_eq!(e.wait(), ExitReason::Reset);

        let e = ExitSignal::default();
        let mut kbd = I8042::new(e.clone());
        kbd.write(0, &[0xfe]);
        assert!(!e.is_set());
        kbd.write(4, &[0xfe]);
        assert_eq!(e.wait(), ExitReason::Reset);
    }
}
