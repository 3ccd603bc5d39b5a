//! virtio-blk feature bits and the device configuration space.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::request::{MAX_PAYLOAD, SECTOR_SIZE};

/// Size of the configuration space we expose.
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `writeback` byte (CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;
/// Discard / write-zeroes segments per request.
pub const MAX_DWZ_SEGMENTS: u32 = 32;
/// Largest discard / write-zeroes run in sectors (1 GiB).
pub const MAX_DWZ_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// The virtio features this device offers.
pub fn device_features(read_only: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VIRTIO_BLK_F_SIZE_MAX)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1 << VIRTIO_BLK_F_MQ);
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    } else {
        f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    f
}

/// Inputs of the configuration space.
#[derive(Debug, Clone)]
pub struct ConfigParams {
    /// Disk size in bytes.
    pub capacity_bytes: u64,
    /// Queue size (SEG_MAX is derived from it).
    pub queue_size: u16,
    /// Number of queues.
    pub num_queues: u16,
    /// Writeback cache on.
    pub writeback: bool,
    /// Preferred I/O granularity in bytes (qcow2: the cluster size).
    pub opt_io_bytes: u32,
    /// Discard granularity in bytes.
    pub discard_alignment_bytes: u32,
}

/// Serializes `struct virtio_blk_config` (little endian).
pub fn config_space(p: &ConfigParams) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    let seg_max = u32::from(p.queue_size.saturating_sub(2).max(1));
    // A request must fit MAX_PAYLOAD: SEG_MAX * SIZE_MAX <= MAX_PAYLOAD.
    let size_max = ((MAX_PAYLOAD / u64::from(seg_max)) as u32 & !4095).clamp(4096, 1 << 20);
    c[0..8].copy_from_slice(&(p.capacity_bytes / SECTOR_SIZE).to_le_bytes());
    c[8..12].copy_from_slice(&size_max.to_le_bytes());
    c[12..16].copy_from_slice(&seg_max.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    // Topology: 512-byte logical blocks, 4 KiB minimum I/O.
    c[24] = 0;
    c[25] = 0;
    c[26..28].copy_from_slice(&8u16.to_le_bytes());
    c[28..32].copy_from_slice(&(p.opt_io_bytes / SECTOR_SIZE as u32).to_le_bytes());
    c[WRITEBACK_OFFSET] = u8::from(p.writeback);
    c[34..36].copy_from_slice(&p.num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DWZ_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DWZ_SEGMENTS.to_le_bytes());
    c[44..48].copy_from_slice(&(p.discard_alignment_bytes / SECTOR_SIZE as u32).to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DWZ_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DWZ_SEGMENTS.to_le_bytes());
    c[56] = 1;
    c
}
