//! The vhost-user block backend: a virtio-blk device model serving raw files,
//! block devices and qcow2 images (through the `qcow2` crate), behind a thin
//! `VhostUserBackend` adapter.
//!
//! Not yet implemented (issue #3): no library code and no `vhost-user-blk`
//! binary yet.
