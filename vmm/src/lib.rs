//! The bundled KVM VMM (`outboard`): boots Linux and attaches its virtio-pci
//! disks and NICs as vhost-user frontends to the Outboard daemons.
//!
//! Not yet implemented (issue #6): no library code and no `outboard` binary
//! yet.
