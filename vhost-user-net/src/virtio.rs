//! virtio-net feature bits, the virtio-net header and the configuration
//! space, and how acked features map to tap offloads.

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of `virtio_net_hdr_v1` (VERSION_1 or MRG_RXBUF): what the tap is told
/// to prepend (TUNSETVNETHDRSZ).
pub const HDR_LEN: usize = 12;
/// Size of the legacy header without MRG_RXBUF.
pub const LEGACY_HDR_LEN: usize = 10;
/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;
/// Size of the configuration space we expose (mac, status,
/// max_virtqueue_pairs, mtu).
pub const CONFIG_SPACE_SIZE: usize = 12;
/// Ethernet header plus one VLAN tag.
pub const ETH_OVERHEAD: usize = 14 + 4;
/// Largest frame a GSO packet can be (64 KiB IP packet plus Ethernet).
pub const MAX_GSO_FRAME: usize = 65535 + ETH_OVERHEAD;

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The per-offload switches of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// Checksum offload both ways (CSUM, GUEST_CSUM).
    pub csum: bool,
    /// TCPv4 segmentation offload both ways (HOST_TSO4, GUEST_TSO4).
    pub tso4: bool,
    /// TCPv6 segmentation offload both ways.
    pub tso6: bool,
    /// UDP fragmentation offload both ways (only if the tap supports it).
    pub ufo: bool,
    /// Mergeable receive buffers.
    pub mrg_rxbuf: bool,
    /// Notification suppression (RING_EVENT_IDX).
    pub event_idx: bool,
}

impl Default for Offloads {
    fn default() -> Self {
        Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ufo: true,
            mrg_rxbuf: true,
            event_idx: true,
        }
    }
}

/// What the device offers, fixed for its lifetime.
#[derive(Debug, Clone)]
pub struct DeviceParams {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU reported to the guest (and set on the tap).
    pub mtu: u16,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Largest queue size the frontend may set.
    pub queue_size: u16,
    /// Offload switches.
    pub offloads: Offloads,
    /// Whether the tap accepted TUN_F_UFO.
    pub tap_ufo: bool,
    /// How the engines do tap I/O.
    pub tap_io: crate::uring::TapIo,
    /// Largest busy-poll window of the TX engines, in microseconds.
    pub poll_us: u32,
}

/// The virtio feature bits the device offers (without the vhost-user bit).
pub fn device_features(p: &DeviceParams) -> u64 {
    let o = &p.offloads;
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_MTU)
        | bit(VIRTIO_NET_F_STATUS);
    if p.queue_pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    if o.event_idx {
        f |= bit(VIRTIO_RING_F_EVENT_IDX);
    }
    if o.mrg_rxbuf {
        f |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    // Segmentation offloads need checksum offload (virtio 1.x 5.1.3.1).
    if o.csum {
        f |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
        if o.tso4 {
            f |= bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO4);
        }
        if o.tso6 {
            f |= bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_GUEST_TSO6);
        }
        if o.ufo && p.tap_ufo {
            f |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
        }
    }
    f
}

/// TUNSETOFFLOAD flags for the features the driver acked: what the tap may
/// hand us (and so the guest) without computing checksums or segmenting.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let has = |b: u32| acked & bit(b) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

/// How the data path behaves for a set of acked features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Header length on both rings (and on the tap).
    pub hdr_len: usize,
    /// Mergeable receive buffers.
    pub mrg_rxbuf: bool,
    /// Largest frame (without header) the tap can hand us.
    pub max_rx_frame: usize,
    /// Largest frame (without header) we write to the tap.
    pub max_tx_frame: usize,
}

impl Negotiated {
    /// The data-path settings for `acked` features and MTU `mtu`.
    pub fn new(acked: u64, mtu: u16) -> Negotiated {
        let has = |b: u32| acked & bit(b) != 0;
        let mrg_rxbuf = has(VIRTIO_NET_F_MRG_RXBUF);
        let hdr_len = if has(VIRTIO_F_VERSION_1) || mrg_rxbuf {
            HDR_LEN
        } else {
            LEGACY_HDR_LEN
        };
        let plain = usize::from(mtu) + ETH_OVERHEAD;
        let guest_gso =
            tap_offload_flags(acked) & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO) != 0;
        let host_gso = [
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
        ]
        .into_iter()
        .any(has);
        Negotiated {
            hdr_len,
            mrg_rxbuf,
            max_rx_frame: if guest_gso { MAX_GSO_FRAME } else { plain },
            max_tx_frame: if host_gso { MAX_GSO_FRAME } else { plain },
        }
    }
}

/// The configuration space (little endian, virtio 1.x `virtio_net_config`).
pub fn config_space(p: &DeviceParams, link_up: bool) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    c[0..6].copy_from_slice(&p.mac);
    let status = if link_up {
        VIRTIO_NET_S_LINK_UP as u16
    } else {
        0
    };
    c[6..8].copy_from_slice(&status.to_le_bytes());
    c[8..10].copy_from_slice(&p.queue_pairs.to_le_bytes());
    c[10..12].copy_from_slice(&p.mtu.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(offloads: Offloads, tap_ufo: bool) -> DeviceParams {
        DeviceParams {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            mtu: 1500,
            queue_pairs: 2,
            queue_size: 256,
            offloads,
            tap_ufo,
            tap_io: crate::uring::TapIo::default(),
            poll_us: 0,
        }
    }

    #[test]
    fn switches_remove_their_bits() {
        let all = device_features(&params(Offloads::default(), true));
        for b in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_F_VERSION_1,
        ] {
            assert_ne!(all & bit(b), 0, "bit {b}");
        }
        let no_csum = device_features(&params(
            Offloads {
                csum: false,
                ..Offloads::default()
            },
            true,
        ));
        for b in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_UFO,
        ] {
            assert_eq!(no_csum & bit(b), 0, "bit {b} without csum");
        }
        let no_ufo_tap = device_features(&params(Offloads::default(), false));
        assert_eq!(no_ufo_tap & bit(VIRTIO_NET_F_GUEST_UFO), 0);
        let no_mrg = device_features(&params(
            Offloads {
                mrg_rxbuf: false,
                event_idx: false,
                ..Offloads::default()
            },
            true,
        ));
        assert_eq!(no_mrg & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
        assert_eq!(no_mrg & bit(VIRTIO_RING_F_EVENT_IDX), 0);
    }

    #[test]
    fn tap_offloads_follow_the_acked_guest_features() {
        assert_eq!(tap_offload_flags(0), 0);
        // TSO without GUEST_CSUM is not a valid combination: nothing.
        assert_eq!(tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let acked = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_UFO)
            | bit(VIRTIO_NET_F_HOST_TSO6);
        assert_eq!(
            tap_offload_flags(acked),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_UFO
        );
        let n = Negotiated::new(acked | bit(VIRTIO_F_VERSION_1), 1500);
        assert_eq!(n.hdr_len, 12);
        assert_eq!(n.max_rx_frame, MAX_GSO_FRAME);
        assert_eq!(n.max_tx_frame, MAX_GSO_FRAME);
        let plain = Negotiated::new(0, 1500);
        assert_eq!(plain.hdr_len, 10);
        assert_eq!(plain.max_rx_frame, 1518);
    }

    #[test]
    fn config_space_layout() {
        let c = config_space(&params(Offloads::default(), true), true);
        assert_eq!(&c[0..6], &[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
    }
}
