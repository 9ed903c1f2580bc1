//! Writing a committed image out as a checkpoint directory (the format lives in
//! [`om::image::checkpoint`]).

use std::fs::File;
use std::path::Path;

pub use om::image::checkpoint::*;
use om_transport::wire::Begin;

use crate::image::Image;

/// Writes a committed image to `dir` (created, mode 0700; existing checkpoint files are replaced).
/// Page checksums are computed from the image memory as it is written.
///
/// # Errors
/// The file that could not be written.
pub fn write(image: &Image, dir: &Path) -> Result<u64, CheckpointError> {
    create_dir(dir)?;
    let ps = image.page_size();
    let psz = usize::try_from(ps).unwrap_or(4096);
    let pages_path = dir.join(PAGES);
    let pages = File::create(&pages_path).map_err(io_err(&pages_path))?;
    let mut runs = Vec::new();
    let mut sums = Vec::new();
    let mut written = 0u64;
    for r in image.state_runs() {
        let n = (r.addr.end - r.addr.start) / ps;
        runs.push(Run {
            addr: r.addr.clone(),
            data: r.data,
            offset: if r.data { written } else { 0 },
        });
        if r.data {
            let off = usize::try_from(r.offset).unwrap_or(usize::MAX);
            let len = usize::try_from(n * ps).unwrap_or(usize::MAX);
            for p in (0..len).step_by(psz) {
                let s = image
                    .memory()
                    .page_sum(off + p, psz)
                    .map_err(io_err(&pages_path))?;
                sums.push(s);
            }
            image
                .memory()
                .write_to(&pages, off, len)
                .map_err(io_err(&pages_path))?;
            written += n * ps;
        }
    }
    pages.sync_all().map_err(io_err(&pages_path))?;
    write_manifest(&Checkpoint {
        dir: dir.to_path_buf(),
        page_size: ps,
        version: VERSION,
        begin: Begin {
            info: *image.info(),
            vmas: image.vmas().to_vec(),
        },
        runs,
        sums,
        records: image.records(),
    })?;
    Ok(written)
}
