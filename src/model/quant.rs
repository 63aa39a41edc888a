//! The scorer's reduced-precision candidate pass: the output layer in int8 (one scale per item),
//! multiplied with AMX (`tdpbusd`, 16 users × 16 items × 64 hidden units an instruction) where
//! the CPU and the kernel allow it, AVX-512 VNNI (`vpdpbusd`, 64 multiply-adds an instruction,
//! four times fp32's) or, on a CPU with AVX2 only, `vpmaddubsw` + `vpmaddwd` (64 multiply-adds in six instructions
//! against fp32's eight FMAs, and a quarter of the bytes read), detected at run time. Only
//! candidates come from it: they are re-scored exactly in fp32, so a published score is always
//! exact and a ranking differs from the exact one only when an item of the exact top-k falls
//! outside the candidates.

use std::sync::atomic::{AtomicU8, Ordering};

use super::topk::TopK;

/// How a serving copy scores the catalogue (`serve.scoring`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scoring {
    /// An int8 candidate pass (where the CPU has AVX-512 VNNI; exact elsewhere), then the
    /// candidates re-ranked exactly.
    Int8,
    /// Every item scored in fp32.
    Exact,
}

static SCORING: AtomicU8 = AtomicU8::new(0);

/// Sets how serving copies made from now on score (a process-wide choice, like the thread
/// pool's size).
pub fn set_scoring(s: Scoring) {
    SCORING.store(matches!(s, Scoring::Exact) as u8, Ordering::Relaxed);
}

/// How serving copies made now score.
pub fn scoring() -> Scoring {
    match SCORING.load(Ordering::Relaxed) {
        0 => Scoring::Int8,
        _ => Scoring::Exact,
    }
}

/// The int8 kernel a CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX-INT8 tiles (the sums made 16 users by 16 items at a time), AVX-512 for the rest:
    /// activations in 8 bits.
    Amx,
    /// AVX-512 VNNI: activations in 8 bits.
    Vnni,
    /// AVX2: activations in 7 bits, so that `vpmaddubsw`'s pairs of products never saturate
    /// its 16-bit sums (2 · 127 · 127 < 2¹⁵).
    Avx2,
}

impl Kernel {
    /// The largest quantized activation magnitude.
    fn levels(self) -> f32 {
        match self {
            Kernel::Amx | Kernel::Vnni => 127.0,
            Kernel::Avx2 => 63.0,
        }
    }

    /// What makes a quantized activation unsigned.
    fn act_offset(self) -> i32 {
        self.levels() as i32 + 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx-int8",
            Kernel::Vnni => "avx512-vnni",
            Kernel::Avx2 => "avx2",
        }
    }
}

/// The int8 kernel this CPU runs, if any: the fastest it has.
pub fn int8_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            return Some(if amx::usable() {
                Kernel::Amx
            } else {
                Kernel::Vnni
            });
        }
        if has!("avx2") && has!("fma") {
            return Some(Kernel::Avx2);
        }
    }
    None
}

/// Whether this CPU runs the int8 pass.
pub fn int8_supported() -> bool {
    int8_kernel().is_some()
}

/// Below this many items the exact pass is as fast (at 1,415 items it was faster: the
/// candidates' exact re-rank is a fixed cost the int8 pass does not repay).
pub const INT8_MIN_ITEMS: usize = 4096;

/// Items per packed block: one 512-bit register of int32 sums.
const BLOCK: usize = 16;
/// Users scored together against each block (their sums fill 16 of the 32 registers).
const USERS: usize = 16;
/// Blocks whose packed weights every user of a part meets while they are in cache (~250 KB at
/// 600 hidden units).
const CHUNK_BLOCKS: usize = 26;

/// The output layer `W` [hidden × items] and its bias quantized for the candidate pass: item
/// i's column is `scale[i] · q[·, i]` with q in [−127, 127]; packed for `vpdpbusd` as blocks of
/// 16 items, each `[hidden/4][16 items][4 consecutive hidden units]`. Per-item arrays are padded
/// to whole blocks (scale 0, so a padded item scores its bias, 0).
#[derive(Debug, Clone)]
pub(crate) struct Int8Output {
    kernel: Kernel,
    hidden: usize,
    /// Hidden units padded to a multiple of 4 (of 64 for AMX, a tile's depth), in groups of 4.
    groups: usize,
    items: usize,
    packed: Vec<i8>,
    scale: Vec<f32>,
    /// o·Σ_k q[k, i]: the activations are offset by o (the kernel's) to be unsigned, which
    /// adds this.
    offset: Vec<i32>,
    bias: Vec<f32>,
}

impl Int8Output {
    /// Quantizes `w` ([hidden × items], row-major) for `kernel` and keeps `bias` [items].
    pub(crate) fn new(
        w: &[f32],
        bias: &[f32],
        hidden: usize,
        items: usize,
        kernel: Kernel,
    ) -> Self {
        let groups = match kernel {
            Kernel::Amx => hidden.div_ceil(amx::DEPTH) * amx::DEPTH / 4,
            Kernel::Vnni | Kernel::Avx2 => hidden.div_ceil(4),
        };
        let padded = items.div_ceil(BLOCK) * BLOCK;
        let mut packed = vec![0i8; padded * groups * 4];
        let mut scale = vec![0f32; padded];
        let mut offset = vec![0i32; padded];
        let mut padded_bias = vec![0f32; padded];
        padded_bias[..items].copy_from_slice(&bias[..items]);
        for i in 0..items {
            let max = (0..hidden).fold(0f32, |m, k| m.max(w[k * items + i].abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            scale[i] = s;
            let (b, lane) = (i / BLOCK, i % BLOCK);
            let mut sum = 0i32;
            for k in 0..hidden {
                let q = (w[k * items + i] / s).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(q);
                packed[((b * groups + k / 4) * BLOCK + lane) * 4 + k % 4] = q;
            }
            offset[i] = kernel.act_offset() * sum;
        }
        Self {
            kernel,
            hidden,
            groups,
            items,
            packed,
            scale,
            offset,
            bias: padded_bias,
        }
    }

    /// The `count` items of highest approximate logit (bias included) of each user of `h`
    /// ([users × hidden], row-major), never one of the user's `seen` (ascending), in no
    /// particular order (the exact re-rank orders them). Only on a CPU where
    /// [`int8_supported`] holds.
    pub(crate) fn candidates(
        &self,
        h: &[f32],
        seen: &[&[u32]],
        count: usize,
    ) -> Vec<Vec<(u32, f32)>> {
        self.candidates_in(h, seen, count, 0..self.blocks())
    }

    /// The packed blocks of 16 items (the last one padded).
    pub(crate) fn blocks(&self) -> usize {
        self.scale.len() / BLOCK
    }

    /// As [`Int8Output::candidates`], among the items of `blocks` only (block `b` holds items
    /// `16b..16b + 16`).
    pub(crate) fn candidates_in(
        &self,
        h: &[f32],
        seen: &[&[u32]],
        count: usize,
        blocks: std::ops::Range<usize>,
    ) -> Vec<Vec<(u32, f32)>> {
        let users = seen.len();
        assert_eq!(h.len(), users * self.hidden);
        let (acts, act_scale) = self.quantize_activations(h, users);
        // SAFETY: a copy is quantized for AMX only where `int8_kernel()` named it, which asked
        // the kernel for the tiles first
        let _tiles = (self.kernel == Kernel::Amx).then(|| unsafe { amx::Tiles::load() });
        let mut best: Vec<Best<'_>> = seen.iter().map(|s| Best::new(s, count)).collect();
        let row = self.groups * 4;
        let block_bytes = self.groups * BLOCK * 4;
        let mut logits = [[0f32; BLOCK]; USERS];
        let mut masks = [0u16; USERS];
        let mut thresholds = [0f32; USERS];
        for chunk in blocks.clone().step_by(CHUNK_BLOCKS) {
            for first in (0..users).step_by(USERS) {
                let n = (users - first).min(USERS);
                let acts = &acts[first * row..(first + USERS) * row];
                let scales = &act_scale[first..first + n];
                let best = &mut best[first..first + n];
                for b in chunk..(chunk + CHUNK_BLOCKS).min(blocks.end) {
                    let items = b * BLOCK..(b + 1) * BLOCK;
                    let block = Block {
                        w: &self.packed[b * block_bytes..(b + 1) * block_bytes],
                        scale: &self.scale[items.clone()],
                        offset: &self.offset[items.clone()],
                        bias: &self.bias[items],
                    };
                    for (t, u) in thresholds.iter_mut().zip(best.iter()) {
                        *t = u.top.bar();
                    }
                    let out = Out {
                        thresholds: &thresholds[..n],
                        logits: &mut logits[..n],
                        masks: &mut masks[..n],
                    };
                    scores_of_block(self.kernel, acts, scales, self.groups, &block, out);
                    for ((u, &mask), logits) in best.iter_mut().zip(&masks).zip(&logits) {
                        if mask != 0 {
                            u.offer(b * BLOCK, mask, logits, self.items);
                        }
                    }
                }
            }
        }
        best.into_iter().map(Best::finish).collect()
    }

    /// Each user's activations as unsigned bytes `round(h/a) + o` (a = max|h|/L, L and o the
    /// kernel's), padded to whole groups of 4, with `a`; the rows padded to a whole part of
    /// users (a tile's 16 rows: the padding's sums are made and never read).
    fn quantize_activations(&self, h: &[f32], users: usize) -> (Vec<u8>, Vec<f32>) {
        let row = self.groups * 4;
        let (levels, o) = (self.kernel.levels(), self.kernel.act_offset());
        let mut acts = vec![o as u8; users.div_ceil(USERS) * USERS * row];
        let mut scales = vec![0f32; users];
        for u in 0..users {
            let x = &h[u * self.hidden..(u + 1) * self.hidden];
            let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let a = if max > 0.0 { max / levels } else { 1.0 };
            scales[u] = a;
            for (dst, v) in acts[u * row..u * row + self.hidden].iter_mut().zip(x) {
                // half away from zero, as `round` does, in arithmetic the loop vectorizes
                // (`round` is a libm call where the baseline has no SSE4.1)
                let t = (v / a).clamp(-levels, levels);
                *dst = ((t + 0.5f32.copysign(t)) as i32 + o) as u8;
            }
        }
        (acts, scales)
    }
}

/// One packed block of 16 items and their per-item terms.
struct Block<'a> {
    w: &'a [i8],
    scale: &'a [f32],
    offset: &'a [i32],
    bias: &'a [f32],
}

/// Where a block's kernel leaves each user's 16 logits: stored, with the mask of those at or
/// above the user's threshold, only when that mask is not empty.
struct Out<'a> {
    thresholds: &'a [f32],
    logits: &'a mut [[f32; BLOCK]],
    masks: &'a mut [u16],
}

/// A user's best items so far, skipping the items they have: the bar an item must reach is the
/// lowest kept logit once the buffer was first cut back. Blocks are offered in ascending order,
/// so the user's seen items are walked once, with a cursor, instead of searched per item.
struct Best<'a> {
    seen: &'a [u32],
    /// The first seen item not below the last block offered.
    cursor: usize,
    top: TopK,
}

impl<'a> Best<'a> {
    fn new(seen: &'a [u32], count: usize) -> Self {
        Self {
            seen,
            cursor: 0,
            top: TopK::new(count),
        }
    }

    /// Offers the block of items from `first` whose lanes `mask` marks (of `items` in all).
    fn offer(&mut self, first: usize, mask: u16, logits: &[f32; BLOCK], items: usize) {
        let mut mask = mask & !self.seen_in(first) & real_items(first, items);
        while mask != 0 {
            let lane = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if logits[lane] >= self.top.bar() {
                self.top.push((first + lane) as u32, logits[lane]);
            }
        }
    }

    /// The lanes of the block from `first` that hold a seen item (the seen list may repeat
    /// one).
    fn seen_in(&mut self, first: usize) -> u16 {
        let seen = self.seen;
        while seen.get(self.cursor).is_some_and(|&i| (i as usize) < first) {
            self.cursor += 1;
        }
        seen[self.cursor..]
            .iter()
            .map(|&i| i as usize - first)
            .take_while(|&lane| lane < BLOCK)
            .fold(0u16, |m, lane| m | 1 << lane)
    }

    fn finish(self) -> Vec<(u32, f32)> {
        self.top.finish_unordered()
    }
}

/// The lanes of the block from `first` that hold one of the `items` (the last block is padded).
fn real_items(first: usize, items: usize) -> u16 {
    match items.saturating_sub(first) {
        n if n >= BLOCK => u16::MAX,
        n => ((1u32 << n) - 1) as u16,
    }
}

/// Up to 16 users' approximate logits for one block.
fn scores_of_block(
    kernel: Kernel,
    acts: &[u8],
    act_scale: &[f32],
    groups: usize,
    block: &Block<'_>,
    out: Out<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let n = act_scale.len();
        assert!(n <= USERS && acts.len() >= n * groups * 4);
        assert!(block.w.len() >= groups * BLOCK * 4 && block.scale.len() == BLOCK);
        assert!(block.offset.len() == BLOCK && block.bias.len() == BLOCK);
        assert!(out.thresholds.len() == n && out.logits.len() == n && out.masks.len() == n);
        // SAFETY: reached only through `Int8Output::candidates` of a copy quantized for a
        // kernel `int8_kernel()` named on this CPU; every length the kernels rely on is asserted
        // above.
        unsafe {
            match kernel {
                Kernel::Amx => {
                    assert!(
                        groups.is_multiple_of(amx::DEPTH / 4) && acts.len() >= USERS * groups * 4
                    );
                    amx::block(acts, act_scale, groups, block, out)
                }
                Kernel::Vnni => in_parts(USERS, acts, act_scale, groups, out, |a, s, o| {
                    match s.len() {
                        USERS => vnni::block::<USERS>(a, s, groups, block, o),
                        _ => in_parts(1, a, s, groups, o, |a, s, o| {
                            vnni::block::<1>(a, s, groups, block, o)
                        }),
                    }
                }),
                // four users at a time fill 8 of AVX2's 16 registers with sums
                Kernel::Avx2 => {
                    in_parts(4, acts, act_scale, groups, out, |a, s, o| match s.len() {
                        4 => avx2::block::<4>(a, s, groups, block, o),
                        _ => in_parts(1, a, s, groups, o, |a, s, o| {
                            avx2::block::<1>(a, s, groups, block, o)
                        }),
                    })
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (acts, act_scale, groups, block, out);
        unreachable!("the int8 pass runs only where int8_supported() holds");
    }
}

/// A kernel run on the users in parts of `size` (the last part may be smaller).
#[cfg(target_arch = "x86_64")]
fn in_parts(
    size: usize,
    acts: &[u8],
    act_scale: &[f32],
    groups: usize,
    out: Out<'_>,
    mut run: impl FnMut(&[u8], &[f32], Out<'_>),
) {
    let Out {
        thresholds,
        logits,
        masks,
    } = out;
    let mut first = 0;
    for (logits, masks) in logits.chunks_mut(size).zip(masks.chunks_mut(size)) {
        let n = logits.len();
        let part = Out {
            thresholds: &thresholds[first..first + n],
            logits,
            masks,
        };
        run(
            &acts[first * groups * 4..],
            &act_scale[first..first + n],
            part,
        );
        first += n;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Block, Out};

    /// `U` users at once, each block of 16 items as two halves of 8: per group of 4 hidden
    /// units, `vpmaddubsw` (pairs of u8·i8 products in 16 bits) then `vpmaddwd` by ones (each
    /// item's 4 products in 32 bits) into the sums; then the logits as the VNNI kernel makes
    /// them.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block<const U: usize>(
        acts: &[u8],
        act_scale: &[f32],
        groups: usize,
        block: &Block<'_>,
        out: Out<'_>,
    ) {
        let mut acc = [[_mm256_setzero_si256(); 2]; U];
        let ones = _mm256_set1_epi16(1);
        let a = acts.as_ptr() as *const i32;
        let wp = block.w.as_ptr() as *const __m256i;
        for g in 0..groups {
            let w0 = _mm256_loadu_si256(wp.add(2 * g));
            let w1 = _mm256_loadu_si256(wp.add(2 * g + 1));
            for (u, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(a.add(u * groups + g).read_unaligned());
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, w0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(x, w1), ones);
                acc[0] = _mm256_add_epi32(acc[0], p0);
                acc[1] = _mm256_add_epi32(acc[1], p1);
            }
        }
        for (u, acc) in acc.iter().enumerate() {
            let mut mask = 0u16;
            let mut logits = [_mm256_setzero_ps(); 2];
            for (half, sums) in acc.iter().enumerate() {
                let at = half * 8;
                let offset = _mm256_loadu_si256(block.offset.as_ptr().add(at) as *const __m256i);
                let scale = _mm256_loadu_ps(block.scale.as_ptr().add(at));
                let bias = _mm256_loadu_ps(block.bias.as_ptr().add(at));
                let sums = _mm256_cvtepi32_ps(_mm256_sub_epi32(*sums, offset));
                let s = _mm256_mul_ps(_mm256_set1_ps(act_scale[u]), scale);
                logits[half] = _mm256_fmadd_ps(sums, s, bias);
                let bar = _mm256_set1_ps(out.thresholds[u]);
                let ge = _mm256_cmp_ps::<_CMP_GE_OQ>(logits[half], bar);
                mask |= (_mm256_movemask_ps(ge) as u16) << at;
            }
            out.masks[u] = mask;
            if mask != 0 {
                _mm256_storeu_ps(out.logits[u].as_mut_ptr(), logits[0]);
                _mm256_storeu_ps(out.logits[u].as_mut_ptr().add(8), logits[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Block, Out};

    /// `U` users at once: per group of 4 hidden units, one load of the block and `U` broadcast
    /// multiply-adds; then each user's 16 sums to logits, `a·s·(sum − offset) + bias`, kept
    /// when one reaches the user's threshold.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block<const U: usize>(
        acts: &[u8],
        act_scale: &[f32],
        groups: usize,
        block: &Block<'_>,
        out: Out<'_>,
    ) {
        let mut acc = [_mm512_setzero_si512(); U];
        let a = acts.as_ptr() as *const i32;
        let wp = block.w.as_ptr() as *const __m512i;
        for g in 0..groups {
            let wv = _mm512_loadu_si512(wp.add(g));
            for (u, acc) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(a.add(u * groups + g).read_unaligned());
                *acc = _mm512_dpbusd_epi32(*acc, x, wv);
            }
        }
        logits(&acc, act_scale, block, out);
    }

    /// Each user's 16 sums to logits, `a·s·(sum − offset) + bias`, kept when one reaches the
    /// user's threshold.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn logits(
        acc: &[__m512i],
        act_scale: &[f32],
        block: &Block<'_>,
        out: Out<'_>,
    ) {
        let scale = _mm512_loadu_ps(block.scale.as_ptr());
        let offset = _mm512_loadu_si512(block.offset.as_ptr() as *const __m512i);
        let bias = _mm512_loadu_ps(block.bias.as_ptr());
        for (u, &s) in act_scale.iter().enumerate() {
            let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[u], offset));
            let s = _mm512_mul_ps(_mm512_set1_ps(s), scale);
            let logits = _mm512_fmadd_ps(sums, s, bias);
            let bar = _mm512_set1_ps(out.thresholds[u]);
            let mask = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(logits, bar);
            out.masks[u] = mask;
            if mask != 0 {
                _mm512_storeu_ps(out.logits[u].as_mut_ptr(), logits);
            }
        }
    }
}

/// AMX: the sums of 16 users (a tile's rows, the missing ones padding) by a block's 16 items
/// in one tile register, 64 hidden units a `tdpbusd`; the logits from them as VNNI makes them.
/// Rust has no AMX intrinsics yet, so the few instructions are written as assembly; the tile
/// registers are named there and nothing else in the process uses them.
mod amx {
    /// Hidden units one `tdpbusd` multiplies (a tile row of 64 activation bytes).
    pub(super) const DEPTH: usize = 64;

    /// Whether this CPU has AMX-INT8 and the operating system lets this process use it: Linux
    /// hands the tiles' state (8 KB a thread) only to a process that asks.
    pub(super) fn usable() -> bool {
        static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USABLE.get_or_init(|| has_amx_int8() && request_tiles())
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn has_amx_int8() -> bool {
        // CPUID leaf 7: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        leaf.edx & (0b11 << 24) == 0b11 << 24
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    fn has_amx_int8() -> bool {
        false
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn request_tiles() -> bool {
        // arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), from the kernel's uapi headers
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a request for a permission; it touches no memory of ours
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    fn request_tiles() -> bool {
        false
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) use kernel::{block, Tiles};

    /// No tiles off x86-64 (where no copy is quantized for AMX).
    #[cfg(not(target_arch = "x86_64"))]
    pub(super) struct Tiles;

    #[cfg(not(target_arch = "x86_64"))]
    impl Tiles {
        pub(super) unsafe fn load() -> Self {
            Tiles
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod kernel {
        use std::arch::asm;
        use std::arch::x86_64::*;

        use super::super::{vnni, Block, Out, BLOCK, USERS};
        use super::DEPTH;

        /// The shapes of the three tiles used (palette 1): tmm0 the sums (16 rows of 16 int32),
        /// tmm4 the users' activations and tmm6 a block's weights (16 rows of 64 bytes each).
        #[repr(C, align(64))]
        struct Config([u8; 64]);

        /// The tiles configured on this thread until dropped, then released (a thread holding
        /// none saves no tile state when it is switched out).
        pub(in super::super) struct Tiles(());

        impl Tiles {
            /// # Safety
            /// Only where [`super::usable`] holds.
            pub(in super::super) unsafe fn load() -> Self {
                let mut c = Config([0; 64]);
                c.0[0] = 1;
                for t in [0, 4, 6] {
                    c.0[16 + 2 * t] = 64;
                    c.0[48 + t] = 16;
                }
                asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly));
                Tiles(())
            }
        }

        impl Drop for Tiles {
            fn drop(&mut self) {
                // SAFETY: the tiles were configured by `load`
                unsafe { asm!("tilerelease", options(nostack, nomem)) };
            }
        }

        #[repr(C, align(64))]
        struct Sums([[i32; BLOCK]; USERS]);

        /// 16 rows of `acts` (a user's `groups · 4` bytes each) by one block: per 64 hidden
        /// units, a tile of the users' bytes and a tile of the block's (16 groups of 4 hidden
        /// units × 16 items, 64 bytes each, as packed) multiplied into the sums.
        ///
        /// # Safety
        /// Tiles loaded on this thread; `acts` holds 16 rows; `groups` is a multiple of 16.
        #[target_feature(enable = "avx512f,avx512bw")]
        pub(in super::super) unsafe fn block(
            acts: &[u8],
            act_scale: &[f32],
            groups: usize,
            block: &Block<'_>,
            out: Out<'_>,
        ) {
            let row = groups * 4;
            let (a, w) = (acts.as_ptr(), block.w.as_ptr());
            asm!("tilezero tmm0", options(nostack, nomem));
            for step in 0..row / DEPTH {
                asm!(
                    "tileloadd tmm4, [{a} + {row}*1]",
                    "tileloadd tmm6, [{w} + {width}*1]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    a = in(reg) a.add(step * DEPTH),
                    w = in(reg) w.add(step * DEPTH * BLOCK),
                    row = in(reg) row,
                    width = in(reg) BLOCK * 4,
                    options(nostack, readonly),
                );
            }
            let mut sums = Sums([[0; BLOCK]; USERS]);
            asm!(
                "tilestored [{s} + {width}*1], tmm0",
                s = in(reg) sums.0.as_mut_ptr(),
                width = in(reg) BLOCK * 4,
                options(nostack),
            );
            let mut acc = [_mm512_setzero_si512(); USERS];
            for (acc, sums) in acc.iter_mut().zip(&sums.0).take(act_scale.len()) {
                *acc = _mm512_load_si512(sums.as_ptr() as *const __m512i);
            }
            vnni::logits(&acc, act_scale, block, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::topk::better;
    use rand::{Rng, SeedableRng};

    /// The int8 pass's candidates are the exact top items (ties apart, up to its rounding):
    /// every item it returns has an exact logit within rounding of its approximate one, it
    /// skips seen items, and the exact top 10 lies within its 60 candidates.
    #[test]
    fn int8_candidates_hold_the_exact_top_items() {
        let kernels: &[Kernel] = match int8_kernel() {
            Some(Kernel::Amx) => &[Kernel::Amx, Kernel::Vnni, Kernel::Avx2],
            Some(Kernel::Vnni) => &[Kernel::Vnni, Kernel::Avx2],
            Some(Kernel::Avx2) => &[Kernel::Avx2],
            None => {
                eprintln!("no AVX2 on this CPU: the int8 pass is not used here");
                return;
            }
        };
        for &kernel in kernels {
            candidates_hold_the_exact_top_items(kernel);
        }
    }

    /// A random output layer [hidden × items] and its bias.
    fn random_output(rng: &mut impl Rng, hidden: usize, items: usize) -> (Vec<f32>, Vec<f32>) {
        let w = (0..hidden * items)
            .map(|_| rng.gen_range(-0.1..0.1))
            .collect();
        let bias = (0..items).map(|_| rng.gen_range(-0.5..0.5)).collect();
        (w, bias)
    }

    /// AMX makes VNNI's integer sums (its deeper rows padded with zero weights), so both find
    /// the same candidates with the same approximate logits, to the bit.
    #[test]
    fn amx_finds_what_vnni_finds() {
        if int8_kernel() != Some(Kernel::Amx) {
            eprintln!("no AMX on this CPU: the AMX kernel is not used here");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (hidden, items) = (600, 2003);
        let (w, bias) = random_output(&mut rng, hidden, items);
        let amx = Int8Output::new(&w, &bias, hidden, items, Kernel::Amx);
        let vnni = Int8Output::new(&w, &bias, hidden, items, Kernel::Vnni);
        for users in [1, 9, 16, 17, 40] {
            let h: Vec<f32> = (0..users * hidden)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let seen: Vec<Vec<u32>> = (0..users)
                .map(|u| (0..u as u32 * 7).step_by(3).collect())
                .collect();
            let seen: Vec<&[u32]> = seen.iter().map(|s| s.as_slice()).collect();
            let bits = |q: &Int8Output| -> Vec<Vec<(u32, u32)>> {
                q.candidates(&h, &seen, 50)
                    .into_iter()
                    .map(|c| {
                        let mut c: Vec<(u32, u32)> =
                            c.into_iter().map(|(i, l)| (i, l.to_bits())).collect();
                        c.sort_unstable();
                        c
                    })
                    .collect()
            };
            assert_eq!(bits(&amx), bits(&vnni), "{users} users");
        }
    }

    fn candidates_hold_the_exact_top_items(kernel: Kernel) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (hidden, items) = (602, 1001);
        let (w, bias) = random_output(&mut rng, hidden, items);
        let q = Int8Output::new(&w, &bias, hidden, items, kernel);
        for users in [1, 5, 16, 37] {
            let h: Vec<f32> = (0..users * hidden)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let seen: Vec<Vec<u32>> = (0..users)
                .map(|_| {
                    let mut s: Vec<u32> = (0..20).map(|_| rng.gen_range(0..items as u32)).collect();
                    s.sort_unstable();
                    s.dedup();
                    s
                })
                .collect();
            let seen_refs: Vec<&[u32]> = seen.iter().map(|s| s.as_slice()).collect();
            let got = q.candidates(&h, &seen_refs, 60);
            for u in 0..users {
                let exact = |i: usize| -> f32 {
                    bias[i]
                        + (0..hidden)
                            .map(|k| h[u * hidden + k] * w[k * items + i])
                            .sum::<f32>()
                };
                assert_eq!(got[u].len(), 60);
                for &(i, approx) in &got[u] {
                    assert!(seen[u].binary_search(&i).is_err());
                    let e = exact(i as usize);
                    assert!(
                        (approx - e).abs() < 0.03,
                        "{kernel:?} user {u} item {i}: {approx} vs {e}"
                    );
                }
                let mut all: Vec<(u32, f32)> = (0..items)
                    .filter(|i| seen[u].binary_search(&(*i as u32)).is_err())
                    .map(|i| (i as u32, exact(i)))
                    .collect();
                all.sort_by(better);
                for (i, _) in &all[..10] {
                    assert!(
                        got[u].iter().any(|c| c.0 == *i),
                        "{kernel:?} user {u}: exact top item {i} missed"
                    );
                }
            }
        }
    }
}
