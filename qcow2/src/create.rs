//! Writing a new, empty qcow2 image.
use std::path::Path;

use crate::error::Result;
use crate::options::CreateOptions;

/// Creates a new empty image at `path` (the file must not exist).
pub fn create(_path: &Path, _opts: &CreateOptions) -> Result<()> {
    unimplemented!("in progress")
}
