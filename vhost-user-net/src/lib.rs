//! The vhost-user network backend: a virtio-net device model backed by a Linux
//! tap (optionally attached to a bridge), behind a thin `VhostUserBackend`
//! adapter.
//!
//! Not yet implemented (issue #4): no library code and no `vhost-user-net`
//! binary yet.
