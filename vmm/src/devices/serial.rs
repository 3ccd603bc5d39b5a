//! COM1: a 16550 UART (`vm-superio`) whose output goes to stdout or a file
//! and whose input comes from stdin; its interrupt is an irqfd on GSI 4.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{lock, BusDevice};

/// I/O port base of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA IRQ (= GSI) of COM1.
pub const COM1_GSI: u32 = 4;

/// Raises the UART interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The console UART on the port bus.
pub struct SerialDevice(Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>);

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART writing to `out` and interrupting through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice(Serial::new(IrqTrigger(irq), out))
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            // A console that cannot be written to must not stop the guest.
            let _ = self.0.write(offset as u8, *b);
        }
    }
}

/// Saved terminal state, restored on drop.
pub struct RawTerminal(Option<libc::termios>);

impl std::fmt::Debug for RawTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawTerminal")
    }
}

impl RawTerminal {
    /// Puts stdin in raw mode (keeping ^C as a signal) when it is a terminal.
    pub fn enter() -> Self {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(fd) } != 1 {
            return RawTerminal(None);
        }
        // SAFETY: termios is plain data; zeroed is a valid initial value.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and t a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return RawTerminal(None);
        }
        let saved = t;
        // SAFETY: t is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_lflag |= libc::ISIG;
        // SAFETY: fd is a terminal and t a valid termios.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        RawTerminal(Some(saved))
    }

    /// Restores the terminal now (also done on drop).
    pub fn restore(&mut self) {
        if let Some(t) = self.0.take() {
            // SAFETY: restoring the attributes read from the same fd.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &t) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Feeds stdin into the UART's receive FIFO on a thread, until EOF.
pub fn spawn_stdin_pump(serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("serial-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let took = lock(&serial).0.enqueue_raw_bytes(rest).unwrap_or(0);
                    rest = &rest[took..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
        .map(|_| ())
}

/// Opens the console output: `None` for stdout, or a file (created/truncated).
pub fn open_output(path: Option<&std::path::Path>) -> std::io::Result<Box<dyn Write + Send>> {
    match path {
        None => Ok(Box::new(std::io::stdout())),
        Some(p) => Ok(Box::new(File::create(p)?)),
    }
}
