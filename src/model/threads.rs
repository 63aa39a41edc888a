//! The size of the global compute pool: rayon's, which candle's matmul also uses.

use anyhow::{bail, Context, Result};

/// Sizes the global thread pool; `None` leaves rayon's default (all cores). Call it before any
/// thread starts (candle reads `RAYON_NUM_THREADS` once).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
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
