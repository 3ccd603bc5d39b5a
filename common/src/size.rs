//! The one size grammar of every Outboard command line: qemu-img's.
//!
//! ```text
//! SIZE   := NUMBER [SUFFIX]          (surrounding whitespace is ignored)
//! NUMBER := DIGITS ["." DIGITS] | "." DIGITS | "0x" HEXDIGITS
//! SUFFIX := b | B                    bytes
//!         | k | K | m | M | g | G | t | T | p | P | e | E
//!                                    KiB, MiB, GiB, TiB, PiB, EiB (1024-based)
//! ```
//!
//! - One suffix letter at most: `1M` and `1m` are MiB; `1MB`, `1MiB` and
//!   `1 M` are rejected, as qemu-img does.
//! - A number without a suffix is in bytes for [`parse_size`]; an option
//!   documented otherwise (the VMM's `--memory`, MiB like qemu's `-m`)
//!   parses with [`parse_size_in`] and a default [`Unit`].
//! - A decimal fraction needs a unit larger than a byte (`1.5G`, `.5M`; not
//!   `1.5` or `1.5b`) and is rounded down to whole bytes; hexadecimal takes
//!   no fraction (`0x1000`, `0x10k`).
//! - No sign: negative sizes are rejected (an outboard-img `resize` takes
//!   its `+`/`-` before the size).
//! - At most [`MAX_SIZE`] = 2^63 - 1 bytes (qemu's `INT64_MAX`); anything
//!   larger (and any overflow) is [`SizeError::TooLarge`].
//!
//! This module needs no dependency beyond `thiserror`: it builds with
//! `outboard-common`'s default features off.

/// Largest size accepted (qemu's `INT64_MAX`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// The grammar, for `--help` texts.
pub const SIZE_HELP: &str = "a number with an optional 1024-based suffix b (bytes), \
    K, M, G, T, P or E (case-insensitive, one letter), e.g. 4096, 512K, 1.5G, 0x1000";

/// Why a size string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional suffix.
    #[error("invalid size {0:?} (expected e.g. 4096, 512K, 1.5G)")]
    Invalid(String),
    /// Larger than [`MAX_SIZE`].
    #[error("size {0:?} is too large (at most {MAX_SIZE} bytes)")]
    TooLarge(String),
}

/// The unit of a number written without a suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes (what [`parse_size`] uses).
    Bytes,
    /// KiB.
    KiB,
    /// MiB (qemu's `-m`, the VMM's `--memory`).
    MiB,
    /// GiB.
    GiB,
}

impl Unit {
    fn bytes(self) -> u64 {
        match self {
            Unit::Bytes => 1,
            Unit::KiB => 1 << 10,
            Unit::MiB => 1 << 20,
            Unit::GiB => 1 << 30,
        }
    }
}

fn suffix_multiplier(c: char) -> Option<u64> {
    Some(match c {
        'b' | 'B' => 1,
        'k' | 'K' => 1 << 10,
        'm' | 'M' => 1 << 20,
        'g' | 'G' => 1 << 30,
        't' | 'T' => 1 << 40,
        'p' | 'P' => 1 << 50,
        'e' | 'E' => 1 << 60,
        _ => return None,
    })
}

/// Parses a size in the [module's grammar](self); plain numbers are bytes:
/// `4096`, `1000b`, `64k`, `1.5G`, `0x1000`, `2T`.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    parse_size_in(input, Unit::Bytes)
}

/// [`parse_size`] with plain numbers in `default` (`parse_size_in("2048",
/// Unit::MiB)` is 2 GiB); a suffix, `b` included, overrides it.
pub fn parse_size_in(input: &str, default: Unit) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(input.to_string());
    let too_large = || SizeError::TooLarge(input.to_string());
    let s = input.trim();
    let (int_part, frac_part, had_dot, rest, radix) =
        if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            let end = hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            (&hex[..end], "", false, &hex[end..], 16)
        } else {
            let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (int_part, rest) = s.split_at(end);
            match rest.strip_prefix('.') {
                Some(after) => {
                    let fend = after
                        .find(|c: char| !c.is_ascii_digit())
                        .unwrap_or(after.len());
                    (int_part, &after[..fend], true, &after[fend..], 10)
                }
                None => (int_part, "", false, rest, 10),
            }
        };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid());
    }
    let mut chars = rest.chars();
    let mul = match chars.next() {
        None => default.bytes(),
        Some(c) => suffix_multiplier(c).ok_or_else(invalid)?,
    };
    if chars.next().is_some() {
        return Err(invalid());
    }
    // qemu: a fraction needs a unit bigger than bytes.
    if had_dot && mul == 1 {
        return Err(invalid());
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        // Only digits here: an error is a number beyond u128, too large anyway.
        u128::from_str_radix(int_part, radix).map_err(|_| too_large())?
    };
    let mut total = int.checked_mul(u128::from(mul)).ok_or_else(too_large)?;
    if !frac_part.is_empty() {
        // floor(0.frac * mul); 19 digits keep the product within u128.
        let digits = &frac_part[..frac_part.len().min(19)];
        let num: u128 = digits.parse().map_err(|_| invalid())?;
        let den = 10u128.pow(digits.len() as u32);
        total += num * u128::from(mul) / den;
    }
    u64::try_from(total)
        .ok()
        .filter(|&t| t <= MAX_SIZE)
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_suffixed_sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1000b"), Ok(1000));
        assert_eq!(parse_size("1000B"), Ok(1000));
        assert_eq!(parse_size("3k"), Ok(3072));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("40G"), Ok(40 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert_eq!(parse_size("3P"), Ok(3 << 50));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert_eq!(parse_size(" 1M"), Ok(1 << 20));
        assert_eq!(parse_size("1M \n"), Ok(1 << 20));
    }

    #[test]
    fn fractions_and_hex() {
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("0.3k"), Ok(307), "rounded down");
        assert_eq!(parse_size("1.5G"), Ok(1_610_612_736));
        assert_eq!(parse_size(".5M"), Ok(512 << 10));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0X1f"), Ok(31));
        assert_eq!(parse_size("0x10k"), Ok(16 << 10));
    }

    #[test]
    fn rejected() {
        for s in [
            "", " ", "x", "G", "k", "1X", "12X", "1.5", "1.5b", "1e3", "1Mi", "1MB", "1MiB", "-5",
            "-1M", "+1M", "1.5x", "0x", "0x1.5k", "1 M", "1,5G", "1..5G", "١",
        ] {
            assert!(
                matches!(parse_size(s), Err(SizeError::Invalid(_))),
                "{s:?} accepted"
            );
        }
    }

    #[test]
    fn limits() {
        assert_eq!(parse_size("9223372036854775807"), Ok(MAX_SIZE));
        assert_eq!(parse_size("0x7fffffffffffffff"), Ok(MAX_SIZE));
        for s in [
            "9223372036854775808",
            "8E",
            "16E",
            "8192P",
            "99999999999T",
            "0x8000000000000000",
            "99999999999999999999999999999999999999999999",
            "99999999999999999999999999999999999999999999E",
        ] {
            assert!(
                matches!(parse_size(s), Err(SizeError::TooLarge(_))),
                "{s:?} accepted"
            );
        }
        assert_eq!(
            parse_size("7.99999E"),
            Ok(7 * (1 << 60) + 1_152_909_975_391_800_907)
        );
    }

    #[test]
    fn default_units() {
        assert_eq!(parse_size_in("256", Unit::MiB), Ok(256 << 20));
        assert_eq!(parse_size_in("2048", Unit::MiB), Ok(2 << 30));
        assert_eq!(parse_size_in("1.5", Unit::MiB), Ok(3 << 19));
        assert_eq!(parse_size_in("512M", Unit::MiB), Ok(512 << 20));
        assert_eq!(parse_size_in("65536K", Unit::MiB), Ok(64 << 20));
        assert_eq!(parse_size_in("4096b", Unit::MiB), Ok(4096));
        assert_eq!(parse_size_in("1", Unit::KiB), Ok(1024));
        assert_eq!(parse_size_in("1", Unit::GiB), Ok(1 << 30));
        assert!(parse_size_in("M", Unit::MiB).is_err());
        assert!(parse_size_in("12X", Unit::MiB).is_err());
        assert!(matches!(
            parse_size_in("8796093022208", Unit::MiB),
            Err(SizeError::TooLarge(_))
        ));
    }

    #[test]
    fn messages_name_the_input() {
        let e = parse_size("12X").expect_err("bad");
        assert_eq!(
            e.to_string(),
            "invalid size \"12X\" (expected e.g. 4096, 512K, 1.5G)"
        );
        let e = parse_size("8E").expect_err("big");
        assert!(e.to_string().starts_with("size \"8E\" is too large"));
    }
}
