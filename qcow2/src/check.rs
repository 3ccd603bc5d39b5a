//! Consistency check and refcount rebuild (`check`, `check -r`, dirty bit).
//!
//! Report types live here; the walk itself is implemented in `image`.

/// What `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (refcount higher than references).
    Leaks,
    /// Leaks and refcount errors.
    All,
}

/// Result of a consistency check, in qemu-img's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (refcount too low, references outside the file, bad flags ...).
    pub corruptions: u64,
    /// Leaked clusters found (refcount higher than the references).
    pub leaks: u64,
    /// Corruptions fixed by a repair.
    pub corruptions_fixed: u64,
    /// Leaks fixed by a repair.
    pub leaks_fixed: u64,
    /// Problems that stopped the check (I/O errors on metadata).
    pub check_errors: u64,
    /// Guest clusters allocated in the active layer.
    pub allocated_clusters: u64,
    /// Guest clusters of the disk.
    pub total_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active layer.
    pub compressed_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, for the tool's output.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// qemu-img's exit code: 0 clean, 1 check error, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}
