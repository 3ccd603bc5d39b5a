//! Writing a new, empty qcow2 image.
//!
//! Layout: header in cluster 0, then the refcount table, the refcount
//! blocks covering all of these clusters, then the (empty) L1 table.

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{self, CompressionType, Header};
use crate::meta::{write_table, Geo};
use crate::options::CreateOptions;
use crate::refcount::rc_set;

/// Creates a new empty image at `path` (an existing file is replaced).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "cluster size {cs} must be a power of two between 512 and 2M"
        )));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(Error::InvalidArgument(format!(
            "refcount width {rb} must be a power of two from 1 to 64"
        )));
    }
    if opts.version != 2 && opts.version != 3 {
        return Err(Error::InvalidArgument(format!(
            "qcow2 version {} (2 or 3)",
            opts.version
        )));
    }
    if opts.version == 2 && (rb != 16 || opts.zstd) {
        return Err(Error::InvalidArgument(
            "version 2 images need refcount_bits=16 and zlib compression".into(),
        ));
    }
    let size = opts.size.next_multiple_of(512);
    if size > header::MAX_DISK_SIZE {
        return Err(Error::InvalidArgument(format!("size {size} is too large")));
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(Error::InvalidArgument(
            "backing format given without a backing file".into(),
        ));
    }
    let cluster_bits = cs.trailing_zeros();
    let geo = Geo::new(cluster_bits);
    let order = rb.trailing_zeros();
    let l1_entries = geo.l1_entries_for(size);
    if l1_entries * 8 > header::MAX_L1_BYTES {
        return Err(Error::InvalidArgument(format!(
            "size {size} needs an L1 table larger than 32 MiB; use bigger clusters"
        )));
    }
    let n_l1 = (l1_entries * 8).div_ceil(cs).max(1);
    let per_block = (cs * 8) >> order;
    let (mut n_rb, mut n_rt) = (1u64, 1u64);
    loop {
        let total = 1 + n_rt + n_rb + n_l1;
        let rb_need = total.div_ceil(per_block);
        let rt_need = (rb_need * 8).div_ceil(cs);
        if rb_need == n_rb && rt_need == n_rt {
            break;
        }
        (n_rb, n_rt) = (rb_need.max(n_rb), rt_need.max(n_rt));
    }
    let rt_off = cs;
    let rb_off = rt_off + n_rt * cs;
    let l1_off = rb_off + n_rb * cs;
    let total = 1 + n_rt + n_rb + n_l1;

    let mut extensions = Vec::new();
    if let Some(f) = &opts.backing_format {
        extensions.push((header::EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
    }
    if opts.version == 3 {
        extensions.push((header::EXT_FEATURE_TABLE, header::feature_table()));
    }
    let mut h = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: l1_off,
        refcount_table_offset: rt_off,
        refcount_table_clusters: n_rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: if opts.zstd {
            header::INCOMPAT_COMPRESSION
        } else {
            0
        },
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: order,
        header_length: if opts.version == 3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: if opts.zstd {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        },
        extensions,
        backing_file: opts.backing_file.clone(),
    };
    if opts
        .backing_file
        .as_ref()
        .is_some_and(|b| b.is_empty() || b.len() > 1023)
    {
        return Err(Error::InvalidArgument(
            "backing file name must be 1 to 1023 bytes".into(),
        ));
    }
    let head = h.serialize()?;

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.into(),
            source,
        })?;
    let w = |buf: &[u8], off: u64| {
        file.write_all_at(buf, off)
            .map_err(|e| Error::io("write", e))
    };
    // Refcount blocks: clusters 0..total have refcount 1.
    let mut blocks = vec![0u8; (n_rb * cs) as usize];
    for c in 0..total {
        let b = (c / per_block) as usize;
        let i = (c % per_block) as usize;
        rc_set(
            &mut blocks[b * cs as usize..(b + 1) * cs as usize],
            i,
            order,
            1,
        );
    }
    w(&blocks, rb_off)?;
    let table: Vec<u64> = (0..n_rb).map(|i| rb_off + i * cs).collect();
    write_table(&file, rt_off, &table, n_rt * cs)?;
    write_table(&file, l1_off, &[], n_l1 * cs)?;
    w(&head, 0)?;
    file.sync_all().map_err(|e| Error::io("fsync", e))
}
