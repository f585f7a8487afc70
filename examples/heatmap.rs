//! Draws what a non-local block attends to, as in the paper's figure: for a query point, the
//! attention over every key position of the clip, overlaid on the frames.
//!
//! ```text
//! cargo run --release --example heatmap -- --out DIR
//! cargo run --release --example heatmap -- --out DIR --weights FILE.safetensors [--input FILE.safetensors]
//!     [--query t,h,w]... [--mode M --in-channels C [--inter-channels C'] [--sub-sample none|kt,kh,kw]
//!      [--naming alexhex7|mmcv] [--prefix P] [--no-bn] [--use-scale] [--dims 1|2|3]]
//! ```
//!
//! Writes one PNG per query point and clip into DIR: the clip's frames side by side, the query
//! marked with a white ring, the attention over the key positions (upsampled from the pooled
//! key grid to frame size) as a colour map over the frames, and a colour bar from 0 to the
//! largest weight.
//!
//! **Without `--weights`** it needs no download: it makes a small synthetic video — a red
//! square moving right, a green disc moving down and a blue bar moving left over a grey
//! textured background — and a block whose weights are written by hand: θ and φ both read
//! the colour channels (centred on mid-grey) and θ scales them by 20, so the logit
//! θ(x_i)·φ(x_j) is large exactly when pixels i and j have the same saturated colour. A query
//! on the red square therefore attends to the red square in every frame, wherever it has
//! moved; a query on the background (nearly grey, so nearly zero colour vector) spreads its
//! attention thinly over the whole clip.
//!
//! **With `--weights`**: a golden-format file (its metadata configures the block) or a plain
//! checkpoint plus the configuration flags above. The `input` tensor (B, T, H, W, C) comes from
//! `--input` (default: the weights file itself). Frames are drawn from the first three
//! channels (or the first, as grey), each normalised to [0, 1] over the clip. Default queries:
//! the centre of the first frame and a corner of the last.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use ndarray::{s, Array1, Array2, Array3, Array5, ArrayView4};
#[path = "../tests/oracle/golden.rs"]
#[allow(dead_code)] // the example uses only the metadata reader
mod golden;

use golden::config_from_metadata;
use nonlocal::internal::parse_sub_sample;
use nonlocal::{BatchNorm, Conv1x1, Mode, NonLocalBlock, NonLocalConfig, Parameters, TensorFile, WeightKeys};

/// Pixels per feature-map cell in the pictures.
const SCALE: u32 = 6;
/// Gap between frames, in pixels.
const GAP: u32 = 6;
const BAR_HEIGHT: u32 = 14;
/// Height of the colour bar's labels (a 3x5 pixel font drawn at 2x).
const LABEL_HEIGHT: u32 = 10;

struct Options {
    out: PathBuf,
    weights: Option<PathBuf>,
    input: Option<PathBuf>,
    queries: Vec<[usize; 3]>,
    mode: Option<String>,
    in_channels: Option<usize>,
    inter_channels: Option<usize>,
    sub_sample: Option<String>,
    naming: Option<String>,
    prefix: Option<String>,
    no_bn: bool,
    use_scale: bool,
    dims: Option<usize>,
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        out: PathBuf::new(),
        weights: None,
        input: None,
        queries: Vec::new(),
        mode: None,
        in_channels: None,
        inter_channels: None,
        sub_sample: None,
        naming: None,
        prefix: None,
        no_bn: false,
        use_scale: false,
        dims: None,
    };
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--weights" => o.weights = Some(PathBuf::from(value()?)),
            "--input" => o.input = Some(PathBuf::from(value()?)),
            "--query" => {
                let v = value()?;
                let parts: Vec<usize> = v
                    .split(',')
                    .map(|p| p.trim().parse())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--query {v}: expected t,h,w"))?;
                o.queries.push(parts.try_into().map_err(|_| format!("--query {v}: expected t,h,w"))?);
            }
            "--mode" => o.mode = Some(value()?),
            "--in-channels" => o.in_channels = Some(number(value()?)?),
            "--inter-channels" => o.inter_channels = Some(number(value()?)?),
            "--sub-sample" => o.sub_sample = Some(value()?),
            "--naming" => o.naming = Some(value()?),
            "--prefix" => o.prefix = Some(value()?),
            "--dims" => o.dims = Some(number(value()?)?),
            "--no-bn" => o.no_bn = true,
            "--use-scale" => o.use_scale = true,
            "-h" | "--help" => return Err("see the comment at the top of examples/heatmap.rs".into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    o.out = out.ok_or("--out DIR is required")?;
    if o.input.is_some() && o.weights.is_none() {
        return Err("--input needs --weights".into());
    }
    Ok(o)
}

fn main() {
    let result = parse_options().and_then(|o| run(&o));
    if let Err(e) = result {
        eprintln!("heatmap: {e}");
        std::process::exit(1);
    }
}

fn run(o: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&o.out).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let (block, x, frames, default_queries) = match &o.weights {
        None => demo(),
        Some(path) => from_files(o, path).map_err(|e| e.to_string())?,
    };
    let queries = if o.queries.is_empty() { default_queries } else { o.queries.clone() };
    let (_, t, h, w, _) = x.dim();
    let mut written = 0;
    for (qi, &[qt, qh, qw]) in queries.iter().enumerate() {
        let index = block.query_index([t, h, w], [qt, qh, qw]).map_err(|e| e.to_string())?;
        let attention = block.attention_rows(&x, &[index]).map_err(|e| e.to_string())?;
        for (clip, frames) in frames.iter().enumerate() {
            let weights = attention.slice(s![clip, 0, ..]).to_owned();
            let cells = cell_weights(&block, [t, h, w], &weights).map_err(|e| e.to_string())?;
            let picture = draw(frames.view(), &cells, [qt, qh, qw]);
            let path = o.out.join(format!("heatmap_q{qi}_clip{clip}.png"));
            picture.save(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!(
                "wrote {} (query t={qt} h={qh} w={qw}, max weight {:.4})",
                path.display(),
                weights.fold(0.0f32, |m, &v| m.max(v))
            );
            written += 1;
        }
    }
    if written < 2 {
        println!("note: only {written} picture(s): pass more --query points for more");
    }
    Ok(())
}

type Loaded = (NonLocalBlock, Array5<f32>, Vec<Array5Frames>, Vec<[usize; 3]>);
/// A clip's frames as RGB in [0, 1]: (T, H, W, 3).
type Array5Frames = ndarray::Array4<f32>;

/// The synthetic clip and the hand-written colour-matching block.
fn demo() -> Loaded {
    let (t, h, w, c) = (4, 24, 32, 6);
    let mut x = Array5::<f32>::zeros((1, t, h, w, c));
    for ti in 0..t {
        for hi in 0..h {
            for wi in 0..w {
                // Grey background with a fine texture.
                let tex = 0.5 + 0.06 * ((hi as f32 * 0.9).sin() * (wi as f32 * 0.7 + ti as f32).cos());
                let mut rgb = [tex, tex, tex];
                let (hf, wf) = (hi as f32, wi as f32);
                // Red square, 5x5, moving right 5 cells per frame.
                let (sr, sc) = (4.0, 3.0 + 5.0 * ti as f32);
                if (sr..sr + 5.0).contains(&hf) && (sc..sc + 5.0).contains(&wf) {
                    rgb = [0.95, 0.1, 0.1];
                }
                // Green disc, radius 3, moving down 4 cells per frame.
                let (dr, dc) = (4.0 + 4.0 * ti as f32, 24.0);
                if (hf - dr).powi(2) + (wf - dc).powi(2) <= 9.0 {
                    rgb = [0.1, 0.9, 0.15];
                }
                // Blue bar, 2x8, moving left 4 cells per frame.
                let (br, bc) = (19.0, 20.0 - 4.0 * ti as f32);
                if (br..br + 2.0).contains(&hf) && (bc..bc + 8.0).contains(&wf) {
                    rgb = [0.1, 0.2, 0.95];
                }
                x[[0, ti, hi, wi, 0]] = rgb[0];
                x[[0, ti, hi, wi, 1]] = rgb[1];
                x[[0, ti, hi, wi, 2]] = rgb[2];
                // Other channels: texture only, ignored by θ and φ.
                x[[0, ti, hi, wi, 3]] = tex;
                x[[0, ti, hi, wi, 4]] = (wi % 4) as f32 * 0.25;
                x[[0, ti, hi, wi, 5]] = (hi % 3) as f32 * 0.3;
            }
        }
    }
    let ci = 3;
    // θ and φ read the colour channels, centred on mid-grey (bias −0.5); θ sharpens by 20.
    let colour = |gain: f32| {
        let mut weight = Array2::<f32>::zeros((ci, c));
        for k in 0..3 {
            weight[[k, k]] = gain;
        }
        Conv1x1::new(weight, Some(Array1::from_elem(ci, -0.5 * gain)))
    };
    let mut g = Array2::<f32>::zeros((ci, c));
    g[[0, 0]] = 1.0;
    g[[1, 1]] = 1.0;
    g[[2, 2]] = 1.0;
    let config = NonLocalConfig::new(c).inter_channels(ci).sub_sample(Some([1, 2, 2]));
    let params = Parameters {
        theta: Some(colour(20.0)),
        phi: Some(colour(1.0)),
        g: Conv1x1::new(g, None),
        w_z: Conv1x1::zeros(c, ci),
        bn: Some(BatchNorm::zero_init(c)),
        concat_project: None,
    };
    let block = NonLocalBlock::from_parameters(config, params).expect("hand-written weights fit");
    let frames = vec![x.slice(s![0, .., .., .., 0..3]).to_owned()];
    // One query on the red square in frame 0, one on the background in frame 2.
    (block, x, frames, vec![[0, 6, 5], [2, 12, 10]])
}

fn from_files(o: &Options, weights: &Path) -> nonlocal::Result<Loaded> {
    let file = TensorFile::open(weights)?;
    let (config, keys) = match (&o.mode, config_from_metadata(file.metadata())) {
        (None, Ok(found)) => found,
        _ => config_from_flags(o)?,
    };
    let block = NonLocalBlock::from_checkpoint(config, &file, &keys)?;
    let input_file = match &o.input {
        Some(p) => TensorFile::open(p)?,
        None => file,
    };
    let input = input_file.tensor("input")?;
    let shape = input.shape().to_vec();
    let x = input.into_dimensionality::<ndarray::Ix5>().map_err(|_| nonlocal::Error::InputRank {
        expected: "5 (B, T, H, W, C)",
        actual: shape.len(),
        shape,
    })?;
    let frames = x.outer_iter().map(frames_as_rgb).collect();
    let (_, t, h, w, _) = x.dim();
    Ok((block, x, frames, vec![[0, h / 2, w / 2], [t - 1, 0, w - 1]]))
}

fn config_from_flags(o: &Options) -> nonlocal::Result<(NonLocalConfig, WeightKeys)> {
    let c = o.in_channels.ok_or(nonlocal::Error::InvalidConfig {
        reason: "a checkpoint without golden metadata needs --mode and --in-channels".into(),
    })?;
    let mut config = NonLocalConfig::new(c);
    if let Some(m) = &o.mode {
        config.mode = m.parse::<Mode>()?;
    }
    if let Some(ci) = o.inter_channels {
        config.inter_channels = ci;
    }
    if let Some(sub) = &o.sub_sample {
        config.sub_sample = parse_sub_sample(sub)?;
    }
    if let Some(d) = o.dims {
        config.conv_dims = d;
    }
    config.bn_layer = !o.no_bn;
    config.use_scale = o.use_scale;
    let naming = o.naming.as_deref().unwrap_or("alexhex7").parse()?;
    Ok((config, WeightKeys { naming, prefix: o.prefix.clone().unwrap_or_default() }))
}

/// The first three channels (or the first, as grey) of a clip, each scaled to [0, 1].
fn frames_as_rgb(clip: ArrayView4<'_, f32>) -> Array5Frames {
    let (t, h, w, c) = clip.dim();
    let pick = |k: usize| if c >= 3 { k } else { 0 };
    let mut out = ndarray::Array4::<f32>::zeros((t, h, w, 3));
    for k in 0..3 {
        let ch = clip.slice(s![.., .., .., pick(k)]);
        let (lo, hi) = ch.fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let span = if hi > lo { hi - lo } else { 1.0 };
        out.slice_mut(s![.., .., .., k]).assign(&ch.mapv(|v| (v - lo) / span));
    }
    out
}

/// The attention weight of every input cell (T, H, W): the weight of the key whose region
/// holds it, 0 for cells cut off by the pooling floor.
fn cell_weights(block: &NonLocalBlock, grid: [usize; 3], weights: &Array1<f32>) -> nonlocal::Result<Array3<f32>> {
    let mut cells = Array3::<f32>::zeros(grid);
    for (j, &weight) in weights.iter().enumerate() {
        let [t, h, w] = block.key_region(grid, j)?;
        cells.slice_mut(s![t, h, w]).fill(weight);
    }
    Ok(cells)
}

/// The picture: frames side by side with the attention over their cells overlaid, the query
/// ringed, and a colour bar below.
fn draw(frames: ndarray::ArrayView4<'_, f32>, cells: &Array3<f32>, query: [usize; 3]) -> RgbImage {
    let (t, h, w, _) = frames.dim();
    let (fw, fh) = (w as u32 * SCALE, h as u32 * SCALE);
    let width = t as u32 * fw + (t as u32 + 1) * GAP;
    let height = fh + 4 * GAP + BAR_HEIGHT + LABEL_HEIGHT;
    let mut img = RgbImage::from_pixel(width, height, Rgb([24, 24, 24]));
    let max = cells.fold(0.0f32, |m, &v| m.max(v)).max(f32::MIN_POSITIVE);
    for ti in 0..t {
        let x0 = GAP + ti as u32 * (fw + GAP);
        for py in 0..fh {
            for px in 0..fw {
                let (hi, wi) = ((py / SCALE) as usize, (px / SCALE) as usize);
                let weight = cells[[ti, hi, wi]] / max;
                let base = [frames[[ti, hi, wi, 0]], frames[[ti, hi, wi, 1]], frames[[ti, hi, wi, 2]]];
                let heat = colour_map(weight);
                // Dim the frame, then blend the heat in proportion to the weight.
                let alpha = 0.25 + 0.65 * weight.sqrt();
                let rgb: [u8; 3] = std::array::from_fn(|k| {
                    let v = base[k] * 0.55 * (1.0 - alpha) + heat[k] * alpha;
                    (v.clamp(0.0, 1.0) * 255.0) as u8
                });
                img.put_pixel(x0 + px, GAP + py, Rgb(rgb));
            }
        }
        if ti == query[0] {
            let cx = x0 as f32 + (query[2] as f32 + 0.5) * SCALE as f32;
            let cy = GAP as f32 + (query[1] as f32 + 0.5) * SCALE as f32;
            ring(&mut img, cx, cy, SCALE as f32 * 1.6, Rgb([255, 255, 255]));
            ring(&mut img, cx, cy, SCALE as f32 * 1.6 + 1.5, Rgb([0, 0, 0]));
        }
    }
    // Colour bar from 0 (left) to the largest weight (right), labelled at both ends.
    let y0 = fh + 2 * GAP;
    let (bx0, bx1) = (GAP, width - GAP);
    for px in bx0..bx1 {
        let v = (px - bx0) as f32 / (bx1 - bx0 - 1).max(1) as f32;
        let heat = colour_map(v);
        let rgb: [u8; 3] = std::array::from_fn(|k| (heat[k] * 255.0) as u8);
        for py in y0..y0 + BAR_HEIGHT {
            img.put_pixel(px, py, Rgb(rgb));
        }
    }
    let label_y = y0 + BAR_HEIGHT + GAP;
    text(&mut img, bx0, label_y, "0");
    let max_label = format!("max={max:.4}");
    text(&mut img, bx1.saturating_sub(text_width(&max_label)), label_y, &max_label);
    img
}

/// 3x5 glyphs for the few characters the labels use, one row per entry, bit 2 = left column.
fn glyph(ch: char) -> [u8; 5] {
    match ch {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '=' => [0, 7, 0, 7, 0],
        'm' => [0, 0, 7, 7, 5],
        'a' => [0, 6, 1, 7, 7],
        'x' => [0, 0, 5, 2, 5],
        _ => [0; 5],
    }
}

fn text_width(s: &str) -> u32 {
    s.chars().count() as u32 * 8
}

/// Draws `s` in white at 2x scale with its top-left corner at (x, y).
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str) {
    for (i, ch) in s.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) != 0 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let (px, py) = (x + i as u32 * 8 + col * 2 + dx, y + row as u32 * 2 + dy);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb([235, 235, 235]));
                        }
                    }
                }
            }
        }
    }
}

/// A perceptual "inferno"-like map from 0 (black-purple) to 1 (pale yellow).
fn colour_map(v: f32) -> [f32; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]];
    let x = v.clamp(0.0, 1.0) * (STOPS.len() - 1) as f32;
    let i = (x as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    std::array::from_fn(|k| STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f)
}

fn ring(img: &mut RgbImage, cx: f32, cy: f32, radius: f32, colour: Rgb<u8>) {
    let steps = (radius * 8.0) as usize;
    for s in 0..steps {
        let a = s as f32 / steps as f32 * std::f32::consts::TAU;
        let (x, y) = (cx + radius * a.cos(), cy + radius * a.sin());
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}
