//! Quick start: build a block, load PyTorch weights, run it on a video tensor and on images.
//!
//! ```text
//! cargo run --release --example quickstart
//! ```

use ndarray::{s, Array4, Array5};
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
    let block = NonLocalBlock::from_checkpoint_file(config, path, &WeightKeys::alexhex7())?;
    let file = nonlocal::TensorFile::open(path)?;
    let x = file.tensor("input")?.into_dimensionality::<ndarray::Ix5>().expect("rank 5 input");
    let z = block.forward(&x)?;
    let want = file.tensor("output")?;
    println!("trained block from {}: output {:?}", path.rsplit('/').next().unwrap_or(path), z.shape());
    println!("  z[0, 0, 0, 0, ..4] = {:?}", z.slice(s![0, 0, 0, 0, ..4]).to_vec());
    println!("  max |z - PyTorch| = {:.2e}", max_abs_diff(&z, &want.into_dimensionality().expect("rank 5")));

    // 3. What query (t, h, w) = (0, 0, 0) attends to: one row of the attention map, over the
    //    M keys, and where the strongest key sits on the pooled grid and in the input.
    let grid = [x.shape()[1], x.shape()[2], x.shape()[3]];
    let query = block.query_index(grid, [0, 0, 0])?;
    let row = block.attention_rows(&x, &[query])?;
    let (best, weight) =
        row.iter().enumerate().fold((0, f32::MIN), |acc, (j, &w)| if w > acc.1 { (j, w) } else { acc });
    println!(
        "  query {query} attends most to key {best} at (t, h, w) = {:?} in the pooled {:?} grid \
         (input region {:?}), weight {weight:.3}",
        block.key_position(grid, best)?,
        block.key_grid(grid),
        block.key_region(grid, best)?,
    );

    // 4. A batch of image feature maps (B, H, W, C), as mmcv's NonLocal2d takes them
    //    channels-first: each image attends within itself, never across the batch.
    let config = NonLocalConfig::new(16).conv_dims(2);
    let block = NonLocalBlock::new(config)?;
    let images = Array4::<f32>::from_shape_fn((2, 10, 12, 16), |(b, h, w, c)| ((b + h * 5 + w * 3 + c) % 7) as f32);
    let z = block.forward_images(&images)?;
    println!("image maps: input {:?} -> output {:?}", images.shape(), z.shape());
    if let Err(e) = block.forward(&images) {
        println!("  forward, which takes clips, refuses them: {e}");
    }
    Ok(())
}

fn max_abs_diff(a: &Array5<f32>, b: &Array5<f32>) -> f32 {
    a.iter().zip(b.iter()).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}
