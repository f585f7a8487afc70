//! Quick start: build a block, load PyTorch weights, run it on a video tensor.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use ndarray::{s, Array5};
use nonlocal::{Mode, NonLocalBlock, NonLocalConfig, WeightKeys};

fn main() -> Result<(), nonlocal::Error> {
    // 1. A fresh block: embedded Gaussian, C = 64 → C' = 32, keys max-pooled 1x2x2.
    let config = NonLocalConfig::new(64).mode(Mode::EmbeddedGaussian).sub_sample(Some([1, 2, 2]));
    let block = NonLocalBlock::new(config)?;
    let video = Array5::<f32>::from_shape_fn((1, 4, 14, 14, 64), |(_, t, h, w, c)| {
        ((t * 7 + h * 3 + w * 5 + c) % 17) as f32 / 17.0 - 0.5
    });
    let z = block.forward(&video)?;
    println!("fresh block: input {:?} -> output {:?}", video.shape(), z.shape());
    println!("  a new block is the identity (BN weight zero): max |z - x| = {}", max_abs_diff(&z, &video));

    // 2. Weights trained in PyTorch (AlexHex7 keys), saved with safetensors.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/eg_video.safetensors");
    let config = NonLocalConfig::new(8).inter_channels(4);
    let block = NonLocalBlock::from_safetensors_file(config, path, &WeightKeys::alexhex7())?;
    let file = nonlocal::TensorFile::open(path)?;
    let x = file.tensor("input")?.into_dimensionality::<ndarray::Ix5>().expect("rank 5 input");
    let z = block.forward(&x)?;
    let want = file.tensor("output")?;
    println!("trained block from {}: output {:?}", path.rsplit('/').next().unwrap_or(path), z.shape());
    println!("  z[0, 0, 0, 0, ..4] = {:?}", z.slice(s![0, 0, 0, 0, ..4]).to_vec());
    println!("  max |z - PyTorch| = {:.2e}", max_abs_diff(&z, &want.into_dimensionality().expect("rank 5")));

    // 3. What query position 0 attends to: one row of the attention map, over the M keys.
    let row = block.attention_rows(&x, &[0])?;
    let key_grid = block.key_grid([x.shape()[1], x.shape()[2], x.shape()[3]]);
    let (best, weight) =
        row.iter().enumerate().fold((0, f32::MIN), |acc, (j, &w)| if w > acc.1 { (j, w) } else { acc });
    println!(
        "  query 0 attends most to key {best} at (t, h, w) = {:?} in the pooled {key_grid:?} grid, weight {weight:.3}",
        (best / (key_grid[1] * key_grid[2]), (best / key_grid[2]) % key_grid[1], best % key_grid[2])
    );
    Ok(())
}

fn max_abs_diff(a: &Array5<f32>, b: &Array5<f32>) -> f32 {
    a.iter().zip(b.iter()).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}
