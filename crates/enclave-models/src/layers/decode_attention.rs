//! Attention of one new token per sequence (a decode step) over its cached context, read in
//! place from the paged pools through the block table.
//!
//! The general path gathers a sequence's whole context out of the pools, transposes it per
//! head and runs candle's matmuls on it: at a 640-token context that copies 1.3 MB per layer
//! per token for a 1.5B model, more than the attention reads. Here each (sequence, KV head)
//! pair is one work unit that reads every cached key and value row once for all the query
//! heads sharing it (grouped-query attention), on candle's worker pool.

use super::quantized::OutPtr;

/// The attention's head geometry.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// One sequence's decode token: its query (`[num_heads * head_dim]`, rotary applied) and the
/// cache slots of the positions it sees, oldest first (its own last).
pub struct DecodeQuery<'a> {
    pub q: &'a [f32],
    pub slots: Vec<u32>,
}

/// `softmax(q·Kᵀ · scale) · V` for each query, head by head; returns `[queries, num_heads *
/// head_dim]`. `k_pool` and `v_pool` are `[slots, num_kv_heads * head_dim]`.
pub fn decode_attention(
    shape: HeadShape,
    queries: &[DecodeQuery],
    k_pool: &[f32],
    v_pool: &[f32],
) -> candle_core::Result<Vec<f32>> {
    let HeadShape {
        num_heads,
        num_kv_heads,
        head_dim,
        ..
    } = shape;
    let width = num_kv_heads * head_dim;
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 || head_dim == 0 {
        candle_core::bail!("decode attention: {num_heads} heads over {num_kv_heads} KV heads");
    }
    for query in queries {
        if query.q.len() != num_heads * head_dim {
            candle_core::bail!(
                "decode attention: query of {} values, expected {}",
                query.q.len(),
                num_heads * head_dim
            );
        }
        if let Some(&slot) = query
            .slots
            .iter()
            .find(|&&s| (s as usize + 1) * width > k_pool.len().min(v_pool.len()))
        {
            candle_core::bail!("decode attention: slot {slot} is outside the cache");
        }
    }
    let row = num_heads * head_dim;
    let mut out = vec![0f32; queries.len() * row];
    let group = num_heads / num_kv_heads;
    let unit_len = group * head_dim;
    // Unit u = (query u / kv heads, kv head u % kv heads) writes the group's heads of that
    // query: `out[query * row + kv_head * unit_len ..][..unit_len]`, disjoint from other units.
    let units = queries.len() * num_kv_heads;
    let out_ptr = OutPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(units, |range| {
        for unit in range {
            let (query, kv_head) = (&queries[unit / num_kv_heads], unit % num_kv_heads);
            // SAFETY: the range belongs to this unit alone (see above) and `out` outlives the
            // pool call, which returns when every unit is done.
            let out = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add(unit * unit_len), unit_len)
            };
            attend(shape, query, kv_head, k_pool, v_pool, out);
        }
    });
    Ok(out)
}

/// Dispatches one unit to the widest vector unit this CPU has (checked at run time).
fn attend(
    shape: HeadShape,
    query: &DecodeQuery,
    kv_head: usize,
    k_pool: &[f32],
    v_pool: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX-512F (and with it AVX2) and FMA, checked just above.
            return unsafe { attend_avx512(shape, query, kv_head, k_pool, v_pool, out) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { attend_avx2(shape, query, kv_head, k_pool, v_pool, out) };
        }
    }
    attend_generic(shape, query, kv_head, k_pool, v_pool, out)
}

/// [`attend_generic`] in AVX-512 registers for heads of 64, 128 or 256 values (others take the
/// generic code): each score's 16 lanes reduced as a tree (the generic code's in-order sum of lanes is a chain of
/// 16 dependent adds per score, which bound decoding at long contexts), the exponentials
/// vectorized, and each head's output kept in registers across the positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512(
    shape: HeadShape,
    query: &DecodeQuery,
    kv_head: usize,
    k_pool: &[f32],
    v_pool: &[f32],
    out: &mut [f32],
) {
    // SAFETY: the caller checked the features.
    unsafe {
        match shape.head_dim {
            64 => attend_avx512_chunks::<4>(shape, query, kv_head, k_pool, v_pool, out),
            128 => attend_avx512_chunks::<8>(shape, query, kv_head, k_pool, v_pool, out),
            256 => attend_avx512_chunks::<16>(shape, query, kv_head, k_pool, v_pool, out),
            _ => attend_generic(shape, query, kv_head, k_pool, v_pool, out),
        }
    }
}

/// [`attend_avx512`] for heads of `16 CHUNKS` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512_chunks<const CHUNKS: usize>(
    shape: HeadShape,
    query: &DecodeQuery,
    kv_head: usize,
    k_pool: &[f32],
    v_pool: &[f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let HeadShape {
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
    } = shape;
    let chunks = CHUNKS;
    let group = num_heads / num_kv_heads;
    let width = num_kv_heads * head_dim;
    let positions = query.slots.len();
    let q = &query.q[kv_head * group * head_dim..(kv_head + 1) * group * head_dim];
    let column = kv_head * head_dim;
    // SAFETY: `decode_attention` checked every slot's row lies inside both pools, so
    // `slot * width + column + head_dim` does; `q` holds `group` heads of `head_dim`; `scores`
    // and `out` are sized below and by the caller.
    unsafe {
        // scores[g * positions + p]
        let mut scores = vec![0f32; group * positions];
        for (p, &slot) in query.slots.iter().enumerate() {
            let key = k_pool.as_ptr().add(slot as usize * width + column);
            for g in 0..group {
                let q_head = q.as_ptr().add(g * head_dim);
                let mut even = _mm512_setzero_ps();
                let mut odd = _mm512_setzero_ps();
                for c in (0..chunks).step_by(2) {
                    let at = 16 * c;
                    even = _mm512_fmadd_ps(
                        _mm512_loadu_ps(q_head.add(at)),
                        _mm512_loadu_ps(key.add(at)),
                        even,
                    );
                    if c + 1 < chunks {
                        odd = _mm512_fmadd_ps(
                            _mm512_loadu_ps(q_head.add(at + 16)),
                            _mm512_loadu_ps(key.add(at + 16)),
                            odd,
                        );
                    }
                }
                *scores.get_unchecked_mut(g * positions + p) =
                    _mm512_reduce_add_ps(_mm512_add_ps(even, odd)) * scale;
            }
        }
        for head_scores in scores.chunks_exact_mut(positions.max(1)) {
            let max = head_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let shift = _mm256_set1_ps(max);
            let mut sums = _mm256_setzero_ps();
            let mut lanes = head_scores.chunks_exact_mut(8);
            for lane in &mut lanes {
                let e =
                    super::activation::exp256(_mm256_sub_ps(_mm256_loadu_ps(lane.as_ptr()), shift));
                _mm256_storeu_ps(lane.as_mut_ptr(), e);
                sums = _mm256_add_ps(sums, e);
            }
            let mut sum = super::quantized::hsum256(sums);
            for s in lanes.into_remainder() {
                let mut padded = [f32::NEG_INFINITY; 8];
                padded[0] = *s - max;
                let e = super::activation::exp256(_mm256_loadu_ps(padded.as_ptr()));
                *s = _mm256_cvtss_f32(e);
                sum += *s;
            }
            let inverse = 1.0 / sum;
            for s in head_scores.iter_mut() {
                *s *= inverse;
            }
        }
        for g in 0..group {
            let mut acc = [_mm512_setzero_ps(); CHUNKS];
            for (p, &slot) in query.slots.iter().enumerate() {
                let value = v_pool.as_ptr().add(slot as usize * width + column);
                let weight = _mm512_set1_ps(*scores.get_unchecked(g * positions + p));
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(weight, _mm512_loadu_ps(value.add(16 * c)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(g * head_dim + 16 * c), *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(
    shape: HeadShape,
    query: &DecodeQuery,
    kv_head: usize,
    k_pool: &[f32],
    v_pool: &[f32],
    out: &mut [f32],
) {
    attend_generic(shape, query, kv_head, k_pool, v_pool, out)
}

/// Lanes of the independent partial sums (one AVX-512 register; the compiler maps them onto
/// whatever vector width the caller was compiled for).
const LANES: usize = 16;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_main, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_main, b_tail) = b.split_at(a_main.len());
    for (ca, cb) in a_main.chunks_exact(LANES).zip(b_main.chunks_exact(LANES)) {
        for i in 0..LANES {
            lanes[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// The query heads of `kv_head`'s group against every visible position: scores, softmax,
/// weighted sum of values. Each key and value row is read once for the whole group.
#[inline(always)]
fn attend_generic(
    shape: HeadShape,
    query: &DecodeQuery,
    kv_head: usize,
    k_pool: &[f32],
    v_pool: &[f32],
    out: &mut [f32],
) {
    let HeadShape {
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
    } = shape;
    let group = num_heads / num_kv_heads;
    let width = num_kv_heads * head_dim;
    let positions = query.slots.len();
    let q = &query.q[kv_head * group * head_dim..(kv_head + 1) * group * head_dim];
    let column = kv_head * head_dim;
    // scores[g * positions + p]
    let mut scores = vec![0f32; group * positions];
    for (p, &slot) in query.slots.iter().enumerate() {
        let start = slot as usize * width + column;
        let key = &k_pool[start..start + head_dim];
        for (g, q_head) in q.chunks_exact(head_dim).enumerate() {
            scores[g * positions + p] = dot(q_head, key) * scale;
        }
    }
    for head_scores in scores.chunks_exact_mut(positions.max(1)) {
        let max = head_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in head_scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inverse = 1.0 / sum;
        for s in head_scores.iter_mut() {
            *s *= inverse;
        }
    }
    out.fill(0.0);
    for (p, &slot) in query.slots.iter().enumerate() {
        let start = slot as usize * width + column;
        let value = &v_pool[start..start + head_dim];
        for (g, out_head) in out.chunks_exact_mut(head_dim).enumerate() {
            let weight = scores[g * positions + p];
            for (o, &v) in out_head.iter_mut().zip(value) {
                *o += weight * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook computation, head by head, in f64.
    fn reference(shape: HeadShape, q: &[f32], slots: &[u32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let HeadShape {
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        } = shape;
        let width = num_kv_heads * head_dim;
        let mut out = vec![0f32; num_heads * head_dim];
        for h in 0..num_heads {
            let kv = h / (num_heads / num_kv_heads);
            let scores: Vec<f64> = slots
                .iter()
                .map(|&s| {
                    (0..head_dim)
                        .map(|i| {
                            f64::from(q[h * head_dim + i])
                                * f64::from(k[s as usize * width + kv * head_dim + i])
                        })
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for i in 0..head_dim {
                let value: f64 = slots
                    .iter()
                    .zip(&weights)
                    .map(|(&s, w)| w / total * f64::from(v[s as usize * width + kv * head_dim + i]))
                    .sum();
                out[h * head_dim + i] = value as f32;
            }
        }
        out
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0)
            .collect()
    }

    #[test]
    fn matches_the_textbook_computation_through_scattered_slots() {
        // 6 query heads over 2 KV heads (Qwen2's grouping); a head size that leaves a tail and
        // the sizes with vector kernels.
        for head_dim in [40, 64, 128, 256] {
            matches_the_textbook_computation_with_heads_of(head_dim);
        }
    }

    fn matches_the_textbook_computation_with_heads_of(head_dim: usize) {
        let shape = HeadShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
        };
        let slots_total = 64;
        let width = shape.num_kv_heads * shape.head_dim;
        let (k, v) = (
            values(slots_total * width, 1),
            values(slots_total * width, 2),
        );
        let qs: Vec<Vec<f32>> = (0..3)
            .map(|i| values(shape.num_heads * shape.head_dim, 10 + i))
            .collect();
        // Positions in scattered blocks, as a block table with shared prefixes makes them; one
        // query sees a single position.
        let slot_lists: Vec<Vec<u32>> = vec![
            (48..64).chain(0..5).collect(),
            vec![17],
            (20..40).rev().collect(),
        ];
        let queries: Vec<DecodeQuery> = qs
            .iter()
            .zip(&slot_lists)
            .map(|(q, slots)| DecodeQuery {
                q,
                slots: slots.clone(),
            })
            .collect();
        let got = decode_attention(shape, &queries, &k, &v).unwrap();
        let row = shape.num_heads * shape.head_dim;
        for (i, query) in queries.iter().enumerate() {
            let want = reference(shape, query.q, &query.slots, &k, &v);
            for (j, (a, b)) in got[i * row..(i + 1) * row].iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "heads of {head_dim}, query {i} [{j}]: {a} vs {b}"
                );
            }
        }
        // A query alone gets the bits it gets in the batch.
        let alone = decode_attention(shape, &queries[2..], &k, &v).unwrap();
        assert_eq!(alone, got[2 * row..]);
    }

    #[test]
    fn a_slot_outside_the_pool_is_an_error() {
        let shape = HeadShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 16,
            scale: 0.25,
        };
        let (k, v) = (vec![0f32; 4 * 16], vec![0f32; 4 * 16]);
        let q = vec![0f32; 32];
        let bad = [DecodeQuery {
            q: &q,
            slots: vec![0, 4],
        }];
        assert!(decode_attention(shape, &bad, &k, &v).is_err());
    }
}
