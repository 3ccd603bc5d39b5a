//! Decompression of compressed clusters (raw deflate or zstd).

use crate::error::{Error, Result};
use crate::header::CompressionType;

/// Decompresses `input` into exactly `out.len()` bytes. Trailing bytes after
/// the stream (sector padding) are ignored, as QEMU does.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8], host: u64) -> Result<()> {
    let fail = |reason: String| Error::Decompress {
        offset: host,
        reason,
    };
    match kind {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let status = d
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| fail(e.to_string()))?;
            if (d.total_out() as usize) < out.len() {
                return Err(fail(format!(
                    "stream ended after {} of {} bytes ({status:?})",
                    d.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            use std::io::Read;
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| fail(e.to_string()))?
                .single_frame();
            dec.read_exact(out).map_err(|e| fail(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn deflate_with_padding() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data).expect("compress");
        let mut c = e.finish().expect("finish");
        c.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; 65536];
        decompress(CompressionType::Zlib, &c, &mut out, 0).expect("decompress");
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zlib, &c[..20], &mut out, 0).is_err());
    }

    #[test]
    fn zstd_with_padding() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 13) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).expect("compress");
        c.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &c, &mut out, 0).expect("decompress");
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zstd, &c[..5], &mut out, 0).is_err());
    }
}
