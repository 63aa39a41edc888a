//! The size of the global compute pool: rayon's, which candle's matmul also uses.

use anyhow::{bail, Context, Result};

/// Sizes the global thread pool; `None` leaves rayon's default (all cores). Call it before any
/// thread starts (candle reads `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` once).
///
/// candle's element-wise ops run on a pool of its own whose workers spin-wait after each op;
/// beside rayon's workers (GEMMs and this crate's kernels) they take cores from the next op
/// (at 2 cores, a training step at 3,600 items took ~20% longer). The element-wise ops left
/// to candle are small ([batch × hidden]), so its pool is kept to the calling thread, unless
/// `CANDLE_NUM_THREADS` says otherwise.
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads: must be at least 1");
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    Ok(())
}
