//! Micro-benchmark of our block-quantized products (`layers/kquants.rs` for Q4_K / Q6_K,
//! `layers/quantized.rs` for Q8_0 / Q5_0) against candle's (`QMatMul`) on the matrices of a
//! DeepSeek-R1-Distill-Qwen-1.5B layer and its output head, and of Gemma 3 270M, all threads
//! (`RAYON_NUM_THREADS` sets them):
//!
//!     cargo run --release -p enclave-models --example kquant_matmul [rows...] [types...]
//!
//! (types as candle prints them: `Q4K`, `Q6K`, `Q8_0`, `Q5_0`; all by default).
//!
//! Each shape is held in enough copies to overflow the caches (64 MB or more), taken in turn, so
//! the weights come from memory as in a real decode step. Prints the median of 15 products per
//! shape and row count, with the bytes of the file's blocks read per second.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use enclave_models::layers::block_tiles::{BlockTiles, TileFormat};
use enclave_models::layers::kquants::{matmul_k_quant, KQuant};
use enclave_models::layers::q8_tiles::matmul_q8_tiles;
use enclave_models::layers::quantized::{matmul_q8_blocks, Q8Weights};

/// Which of our kernels a shape runs on.
#[derive(Clone, Copy)]
enum Ours {
    K(KQuant),
    Q8(Q8Weights),
}

fn median(mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[7]
}

fn main() -> candle_core::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let types: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a.parse::<usize>().is_err())
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 2, 4, 8, 16]
    } else {
        rows
    };
    let dev = Device::Cpu;
    // (in, out, type): attention q/o, gate/up, down (Q4_K, and Q6_K as Q4_K_M keeps some), head.
    for (k, n, dtype, kind) in [
        (1536, 1536, GgmlDType::Q4K, Ours::K(KQuant::Q4K)),
        (1536, 8960, GgmlDType::Q4K, Ours::K(KQuant::Q4K)),
        (8960, 1536, GgmlDType::Q4K, Ours::K(KQuant::Q4K)),
        (8960, 1536, GgmlDType::Q6K, Ours::K(KQuant::Q6K)),
        (1536, 151936, GgmlDType::Q6K, Ours::K(KQuant::Q6K)),
        (1536, 8960, GgmlDType::Q8_0, Ours::Q8(Q8Weights::Q8_0)),
        (8960, 1536, GgmlDType::Q8_0, Ours::Q8(Q8Weights::Q8_0)),
        (640, 262144, GgmlDType::Q8_0, Ours::Q8(Q8Weights::Q8_0)),
        (640, 2048, GgmlDType::Q5_0, Ours::Q8(Q8Weights::Q5_0)),
    ] {
        if !types.is_empty() && !types.contains(&format!("{dtype:?}")) {
            continue;
        }
        let dense = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let q = Arc::new(QTensor::quantize(&dense, dtype)?);
        let bytes = q.storage_size_in_bytes();
        let copies = (64usize << 20).div_ceil(bytes).max(1);
        let weights: Vec<Arc<QTensor>> = (0..copies)
            .map(|_| QTensor::quantize(&dense, dtype).map(Arc::new))
            .collect::<candle_core::Result<_>>()?;
        let candle: Vec<QMatMul> = weights
            .iter()
            .map(|w| QMatMul::from_arc(w.clone()))
            .collect::<candle_core::Result<_>>()?;
        let raw: Vec<Vec<u8>> = weights
            .iter()
            .map(|w| w.data().map(|d| d.to_vec()))
            .collect::<candle_core::Result<_>>()?;
        let weights_q = weights;
        // Q4_K, Q6_K and Q8_0 (and Q5_0 on AVX2 without VNNI): also the tiles repacked at load
        // (`layers/block_tiles.rs`).
        let load_tiles: Vec<BlockTiles> = TileFormat::from_ggml(dtype)
            .map(|format| {
                raw.iter()
                    .filter_map(|w| BlockTiles::new(format, w, n, k))
                    .collect()
            })
            .unwrap_or_default();
        // candle repacks a weight on its first product: do that outside the timings.
        let one = Tensor::zeros((1, k), candle_core::DType::F32, &dev)?;
        let two = Tensor::zeros((2, k), candle_core::DType::F32, &dev)?;
        for layer in &candle {
            layer.forward(&one)?;
            layer.forward(&two)?;
        }
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut turn = 0;
            let t_ours = median(|| {
                turn = (turn + 1) % copies;
                std::hint::black_box(match kind {
                    Ours::K(kind) => matmul_k_quant(kind, &xs, m, k, &raw[turn], n),
                    Ours::Q8(format) => matmul_q8_blocks(format, &xs, m, k, &raw[turn], n),
                });
            });
            let t_candle = median(|| {
                turn = (turn + 1) % copies;
                std::hint::black_box(candle[turn].forward(&x).map(|_| ()).ok());
            });
            // Q8_0 / Q5_0: also the tiled kernel, and the dequantised GEMM the layer falls back
            // to (dequantisation included, as it runs per product).
            let t_load_tiles = (!load_tiles.is_empty()).then(|| {
                median(|| {
                    turn = (turn + 1) % copies;
                    std::hint::black_box(load_tiles[turn].matmul(&xs, m));
                })
            });
            let load_tiles_column = t_load_tiles.map_or(String::new(), |t| {
                format!(
                    "   load-time tiles {:7.3} ms {:5.1} GB/s ({:.2}x ours, {:.2}x candle)",
                    t * 1e3,
                    bytes as f64 / t / 1e9,
                    t_ours / t,
                    t_candle / t
                )
            });
            let extra = if let Ours::Q8(format) = kind {
                // (Without AVX-512 VNNI there are none: NaN.)
                let t_tiles = if matmul_q8_tiles(format, &xs, m, k, &raw[0], n).is_some() {
                    median(|| {
                        turn = (turn + 1) % copies;
                        std::hint::black_box(matmul_q8_tiles(format, &xs, m, k, &raw[turn], n));
                    })
                } else {
                    f64::NAN
                };
                // (Not for heads: the route never dequantises those.)
                let t_gemm = if n * k < 1 << 24 {
                    median(|| {
                        turn = (turn + 1) % copies;
                        let dense = weights_q[turn].dequantize(&dev).ok();
                        let y =
                            dense.and_then(|d| candle_nn::Linear::new(d, None).forward(&x).ok());
                        std::hint::black_box(y);
                    })
                } else {
                    f64::NAN
                };
                format!(
                    "   unit tiles {:7.3} ms ({:.2}x ours)   dequantised GEMM {:7.3} ms{load_tiles_column}",
                    t_tiles * 1e3,
                    t_ours / t_tiles,
                    t_gemm * 1e3
                )
            } else {
                load_tiles_column
            };
            println!(
                "{dtype:?} rows {m:>3} [{k} -> {n}]  ours {:7.3} ms {:5.1} GB/s   candle {:7.3} ms {:5.1} GB/s ({:.2}x ours){extra}",
                t_ours * 1e3,
                bytes as f64 / t_ours / 1e9,
                t_candle * 1e3,
                bytes as f64 / t_candle / 1e9,
                t_candle / t_ours,
            );
        }
    }
    Ok(())
}
