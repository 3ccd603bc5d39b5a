//! Emulated platform devices: the 16550 serial console, the ACPI power
//! registers, the i8042 reset line and the port-0x80 sink.

pub mod legacy;
pub mod serial;
