//! Micro-benchmark of the small-batch matmul kernel (`layers/linear.rs`) on the projections of
//! a DeepSeek-R1-Distill-Qwen-1.5B layer, bf16 weights and f32 inputs, all threads:
//!
//!     cargo run --release -p enclave-models --example small_batch_matmul \
//!         [--tiles-only] [--best] [rows...]
//!
//! Prints the median (`--best`: the fastest) of 21 runs per shape for our kernel (`vdpbf16ps`
//! on inputs rounded to bf16 where the CPU has AVX512-BF16), for the f32-FMA kernel on the same
//! weights (`matmul_rows`), for candle's GEMM (weights widened to f32 first), and for the
//! packed tiles of sixteen features (`layers/bf16_tiles.rs`: `vdpbf16ps` on AVX512-BF16, f32
//! FMAs on AVX2; `--tiles-only`: these alone), and the GFLOP/s they mean. The weights of each
//! shape are held in enough copies to overflow the caches, taken in turn.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use enclave_models::layers::bf16_tiles::Bf16Tiles;
use enclave_models::layers::linear::{matmul_rows, Linear};

const RUNS: usize = 21;

fn main() -> candle_core::Result<()> {
    // The other kernels take most of the run at 512 rows and more.
    let tiles_only = std::env::args().any(|a| a == "--tiles-only");
    // On a host whose timings vary from run to run, the fastest run says what the kernel can do.
    let best = std::env::args().any(|a| a == "--best");
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 4, 16, 64]
    } else {
        rows
    };
    let dev = Device::Cpu;
    // (in, out): q/o projection, gate/up, down.
    for (k, n) in [(1536, 1536), (1536, 8960), (8960, 1536)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16)?;
        let w_raw: Vec<half::bf16> = w.flatten_all()?.to_vec1()?;
        let layer = Linear::new(w, None);
        // Copies enough to overflow the caches, so the tiles' weights come from memory as in a
        // real step.
        let copies = (64usize << 20).div_ceil(2 * n * k).max(1);
        let tiles: Vec<Bf16Tiles> = (0..copies)
            .filter_map(|_| Bf16Tiles::new(&w_raw, n, k))
            .collect();
        let turn = std::cell::Cell::new(0usize);
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let median = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
                f()?; // warm up
                let mut times = Vec::new();
                for _ in 0..RUNS {
                    let start = Instant::now();
                    f()?;
                    times.push(start.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                Ok(if best { times[0] } else { times[RUNS / 2] })
            };
            let x_raw: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let (ours, fma, gemm) = if tiles_only {
                (f64::NAN, f64::NAN, f64::NAN)
            } else {
                let ours = median(&|| layer.forward_small_batch(&x))?;
                let fma = median(&|| {
                    let out = matmul_rows(&x_raw, m, &w_raw, n, k);
                    Tensor::from_vec(out, (m, n), &Device::Cpu)
                })?;
                (ours, fma, median(&|| layer.forward_gemm(&x))?)
            };
            let packed = if tiles.is_empty() {
                f64::NAN
            } else {
                median(&|| {
                    turn.set((turn.get() + 1) % tiles.len());
                    let out = tiles[turn.get()].matmul(&x_raw, m);
                    Tensor::from_vec(out, (m, n), &Device::Cpu)
                })?
            };
            let gflops = |t: f64| 2.0 * (m * k * n) as f64 / t / 1e9;
            println!(
                "rows {m:>4}  [{k} -> {n}]  ours {:8.3} ms {:6.1} GFLOP/s   f32 FMA {:8.3} ms {:6.1} GFLOP/s   candle GEMM {:8.3} ms {:6.1} GFLOP/s   GEMM/ours {:.2}   tiles {:8.3} ms {:6.1} GFLOP/s",
                ours * 1e3,
                gflops(ours),
                fma * 1e3,
                gflops(fma),
                gemm * 1e3,
                gflops(gemm),
                gemm / ours,
                packed * 1e3,
                gflops(packed)
            );
        }
    }
    Ok(())
}
