//! Guest MAC addresses made up when none is given.
//!
//! [`random_mac`] draws 46 random bits from the kernel (`getrandom`, the
//! same pool as `/dev/urandom`) and sets the two low bits of the first
//! octet to "locally administered, unicast" (`x2:`, `x6:`, `xa:`, `xe:`),
//! so the address can never collide with a vendor's and is never a
//! multicast/broadcast address.
//!
//! This module needs no dependency beyond `libc`: it builds with
//! `outboard-common`'s default features off.

/// Bit 0 of the first octet: group (multicast) address.
pub const MULTICAST_BIT: u8 = 0x01;
/// Bit 1 of the first octet: locally administered address.
pub const LOCAL_BIT: u8 = 0x02;

/// Makes `mac` locally administered and unicast, keeping its other bits.
pub fn make_local_unicast(mut mac: [u8; 6]) -> [u8; 6] {
    mac[0] = (mac[0] & !MULTICAST_BIT) | LOCAL_BIT;
    mac
}

/// A random, locally administered, unicast MAC address.
pub fn random_mac() -> [u8; 6] {
    make_local_unicast(random_bytes())
}

/// Six random bytes from `getrandom`; if that fails (it blocks only
/// before the pool is initialised at boot, and never fails on a kernel
/// that has it), from the clock and the pid so a MAC is still made.
fn random_bytes() -> [u8; 6] {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`, a local array.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if usize::try_from(n).ok() != Some(b.len()) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id()).rotate_left(64);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_macs_are_local_unicast() {
        for _ in 0..64 {
            let m = random_mac();
            assert_eq!(m[0] & MULTICAST_BIT, 0, "unicast: {m:02x?}");
            assert_eq!(
                m[0] & LOCAL_BIT,
                LOCAL_BIT,
                "locally administered: {m:02x?}"
            );
        }
    }

    #[test]
    fn random_macs_differ() {
        // 46 random bits: 8 draws colliding means no randomness at all.
        let first = random_mac();
        assert!((0..8).any(|_| random_mac() != first));
    }

    #[test]
    fn the_two_bits_only() {
        assert_eq!(
            make_local_unicast([0xff; 6]),
            [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(make_local_unicast([0; 6]), [0x02, 0, 0, 0, 0, 0]);
        assert_eq!(
            make_local_unicast([0x53, 0x54, 0, 1, 2, 3]),
            [0x52, 0x54, 0, 1, 2, 3]
        );
    }
}
