//! Micro-benchmark of the Q8_0 product (`layers/quantized.rs`) on the matrices of Gemma 3 270M
//! (its Q8_0 embedding doubles as the output head) and of a DeepSeek-R1-Distill-Qwen-1.5B layer,
//! all threads:
//!
//!     cargo run --release -p enclave-models --example q8_0_matmul [rows...]
//!
//! Prints the median of 7 runs per shape: our kernel, candle's Q8_0 product (`QMatMul`) on the
//! same blocks, and our dense small-batch kernel on the same weights in bf16, with the weight
//! bytes each reads per second.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use enclave_models::layers::linear::Linear;

fn median(f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    f()?; // warm up
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[3])
}

fn main() -> candle_core::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 4, 16]
    } else {
        rows
    };
    let dev = Device::Cpu;
    // (in, out): Gemma's head, its gate/up, its down; Qwen-1.5B's gate/up.
    for (k, n) in [(640, 262144), (640, 2048), (2048, 640), (1536, 8960)] {
        let dense = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let q = Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?);
        let mut ours = Linear::new(dense.clone(), None);
        ours.set_quantized(q.clone())?;
        let candle = QMatMul::from_arc(q.clone())?;
        let bf16 = Linear::new(dense.to_dtype(DType::BF16)?, None);
        let q_bytes = q.storage_size_in_bytes() as f64;
        let bf16_bytes = (n * k * 2) as f64;
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let t_ours = median(&|| ours.forward(&x))?;
            let t_candle = median(&|| candle.forward(&x))?;
            let t_bf16 = median(&|| bf16.forward_small_batch(&x))?;
            println!(
                "rows {m:>3} [{k} -> {n}]  ours {:7.3} ms {:5.1} GB/s   candle {:7.3} ms ({:.2}x ours)   bf16 {:7.3} ms {:5.1} GB/s",
                t_ours * 1e3,
                q_bytes / t_ours / 1e9,
                t_candle * 1e3,
                t_candle / t_ours,
                t_bf16 * 1e3,
                bf16_bytes / t_bf16 / 1e9,
            );
        }
    }
    Ok(())
}
