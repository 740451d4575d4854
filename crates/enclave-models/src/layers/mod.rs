//! Layers shared by every architecture, written once.

pub mod activation;
pub mod attention;
pub mod bf16_matmul;
pub mod bf16_tiles;
pub mod block_tiles;
pub mod decode_attention;
pub mod decoder;
pub mod kquants;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod q8_tiles;
pub mod quantized;
pub mod rotary;
