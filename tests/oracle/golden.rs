//! Checking the block against PyTorch reference cases ("golden files"): a test oracle, outside
//! the library (tests, examples and the fuzz targets include this file with `#[path]`), written
//! against the public API only.
//!
//! A golden file is a safetensors file holding a configured block's parameters (AlexHex7 or
//! mmcv keys), an `input` (B, T, H, W, C), the reference `output` and, in small cases, the
//! `attention` map; its `__metadata__` says how the block is configured (`mode`,
//! `in_channels`, `inter_channels`, `sub_sample`, `use_scale`, `bn_layer`, `bn_eps`, `naming`,
//! `prefix`, `dims`). The pass criterion is PyTorch's own float32 accuracy:
//! `max |got − want| ≤ 1e-4 · max(1, max |want|)` on the output and ≤ 5e-4 on the attention.
//!
//! A block in bf16 ([`GoldenCase::with_precision`]) is held to the bf16 accuracy contract
//! instead: `max |got − want| / max(1, max |want|) ≤ max(1.25 · e, 4e-3)` on the output, where
//! `e` is PyTorch's own error on the case under bf16 autocast ([`GoldenCase::with_torch_err`],
//! read from `tests/data/bf16_torch_err.txt` by [`torch_errors`]; 0 when not known, so the
//! floor applies). The attention maps and gradients run in f32 on a bf16 block, and keep the
//! f32 criteria.
//!
//! A case may hold no parameters and name a checkpoint instead (metadata `checkpoint`, e.g.
//! a `.pth`): [`GoldenCase::with_weights`] then takes the parameters from that file, under
//! the case's `naming` and `prefix`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ndarray::{Array5, ArrayD, Ix5, IxDyn};

use nonlocal::internal::parse_sub_sample;
use nonlocal::{
    ContextBlock, ContextConfig, CrissCrossAttention, CrissCrossConfig, DisentangledConfig, DisentangledNonLocal,
    Error, Mode, Naming, NonLocalBlock, NonLocalConfig, Precision, Result, TensorFile, WeightKeys,
};

/// Largest attention error that passes.
pub const ATTENTION_TOLERANCE: f32 = 5e-4;

/// The bf16 contract's floor on the output error, relative to `max(1, max |want|)`.
pub const BF16_FLOOR: f32 = 4e-3;
/// The bf16 contract's factor on PyTorch's own bf16-autocast error.
pub const BF16_TORCH_FACTOR: f32 = 1.25;

/// The relative output error a bf16 block may have on a case where PyTorch's bf16 autocast
/// has error `torch_err` (unknown: the floor).
pub fn bf16_bound(torch_err: Option<f32>) -> f32 {
    torch_err.map_or(BF16_FLOOR, |e| (BF16_TORCH_FACTOR * e).max(BF16_FLOOR))
}

/// The floor of the looser rule [`Precision::Bf16Logits`] is held to (PyTorch autocast's
/// error class rather than below it).
pub const BF16_LOGITS_FLOOR: f32 = 8e-3;
/// That rule's factor on PyTorch's own bf16-autocast error.
pub const BF16_LOGITS_TORCH_FACTOR: f32 = 2.0;

/// The relative output error a block in `precision` may have on a case where PyTorch's bf16
/// autocast has error `torch_err`: [`bf16_bound`] for [`Precision::Bf16`],
/// `max(2 × torch_err, 8e-3)` for [`Precision::Bf16Logits`], f32's 1e-4 for f32.
pub fn bound_in(precision: Precision, torch_err: Option<f32>) -> f32 {
    match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16Logits => {
            torch_err.map_or(BF16_LOGITS_FLOOR, |e| (BF16_LOGITS_TORCH_FACTOR * e).max(BF16_LOGITS_FLOOR))
        }
        _ => bf16_bound(torch_err),
    }
}

/// PyTorch's bf16-autocast error per case file name, from a table of `name error` lines
/// (`#` starts a comment), such as `tests/data/bf16_torch_err.txt`.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read, [`Error::InvalidConfig`] for a malformed line.
pub fn torch_errors(path: impl AsRef<Path>) -> Result<HashMap<String, f32>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.display().to_string(), source: e })?;
    let mut table = HashMap::new();
    for line in text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()) {
        let bad = || Error::InvalidConfig { reason: format!("{}: malformed line {line:?}", path.display()) };
        let mut fields = line.split_whitespace();
        let (name, err) = (fields.next().ok_or_else(bad)?, fields.next().ok_or_else(bad)?);
        let err: f32 = err.parse().map_err(|_| bad())?;
        if fields.next().is_some() || !err.is_finite() || err < 0.0 {
            return Err(bad());
        }
        table.insert(name.to_string(), err);
    }
    Ok(table)
}

/// The vendored tables of PyTorch's bf16 errors in `data` (tests/data): the shared cases'
/// (`bf16_torch_err.txt`) and the timm cases' (`bf16_torch_err_family.txt`), one map.
///
/// # Errors
/// As [`torch_errors`], for either file.
pub fn vendored_torch_errors(data: impl AsRef<Path>) -> Result<HashMap<String, f32>> {
    let data = data.as_ref();
    let mut table = torch_errors(data.join("bf16_torch_err.txt"))?;
    table.extend(torch_errors(data.join("bf16_torch_err_family.txt"))?);
    Ok(table)
}

/// Which block a golden case holds (metadata `block`, `non_local` when absent), configured.
#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    /// A non-local block (AlexHex7, mmcv, timm).
    NonLocal(NonLocalConfig),
    /// mmsegmentation's disentangled non-local block.
    Disentangled(DisentangledConfig),
    /// GCNet's global context block (mmcv's `ContextBlock`, timm's `GlobalContext`).
    Context(ContextConfig),
    /// CCNet's criss-cross attention (mmcv's `CrissCrossAttention`).
    CrissCross(CrissCrossConfig),
}

/// A golden case: the file and the block configuration its metadata describes.
#[derive(Debug)]
pub struct GoldenCase {
    /// The block and its configuration from the metadata.
    pub spec: Spec,
    /// Where the parameters are in the file.
    pub keys: WeightKeys,
    /// The file itself.
    pub file: TensorFile,
    /// A separate checkpoint holding the parameters, if one was given (shared between the
    /// cases that use it).
    pub weights: Option<Arc<TensorFile>>,
    /// The precision the block runs in ([`Precision::F32`] unless set).
    pub precision: Precision,
    /// bf16: PyTorch's own bf16-autocast error on the case, when known.
    pub torch_err: Option<f32>,
}

/// The outcome of running one golden case.
#[derive(Clone, Debug, PartialEq)]
pub struct GoldenReport {
    /// The precision the block ran in.
    pub precision: Precision,
    /// max |got − want| over the output (∞ when a NaN appears on one side only).
    pub output_err: f32,
    /// The output tolerance, `1e-4 · max(1, max |want|)`; in bf16 `bound · max(1, max |want|)`
    /// with the contract's relative bound ([`bf16_bound`]).
    pub tol: f32,
    /// `max(1, max |want|)`, the scale of the relative error.
    pub scale: f32,
    /// bf16: PyTorch's own bf16-autocast error on the case, when known.
    pub torch_err: Option<f32>,
    /// max |got − want| over the attention map, when the file has one.
    pub attention_err: Option<f32>,
    /// FNV-1a 64 of the output's f32 values as little-endian bytes, row-major.
    pub bits: u64,
    /// Gradient cases: max |got − want| over ∂L/∂input, and its tolerance.
    pub grad_input: Option<(f32, f32)>,
    /// Gradient cases: the largest per-tensor parameter-gradient error, each relative to
    /// max(1, max |want|); passes at ≤ 1e-4.
    pub grad_param_err: Option<f32>,
}

impl GoldenReport {
    /// Whether the output and (if present) the attention are within tolerance.
    pub fn passed(&self) -> bool {
        self.output_err <= self.tol
            && self.attention_err.is_none_or(|e| e <= ATTENTION_TOLERANCE)
            && self.grad_input.is_none_or(|(e, tol)| e <= tol)
            && self.grad_param_err.is_none_or(|e| e <= 1e-4)
    }
}

impl fmt::Display for GoldenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "output_err={:.3e} tol={:.3e}", self.output_err, self.tol)?;
        if self.precision != Precision::F32 {
            write!(f, " precision={} rel_err={:.3e}", self.precision, self.output_err / self.scale)?;
            match self.torch_err {
                Some(e) => write!(f, " torch_err={e:.3e}")?,
                None => write!(f, " torch_err=unknown")?,
            }
            write!(f, " bound={:.3e}", self.tol / self.scale)?;
        }
        if let Some(e) = self.attention_err {
            write!(f, " attention_err={e:.3e}")?;
        }
        if let Some((e, _)) = self.grad_input {
            write!(f, " grad_input_err={e:.3e}")?;
        }
        if let Some(e) = self.grad_param_err {
            write!(f, " grad_param_err={e:.3e}")?;
        }
        write!(f, " bits={:016x} {}", self.bits, if self.passed() { "PASS" } else { "FAIL" })
    }
}

impl GoldenCase {
    /// Opens a golden file and reads its configuration.
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::NotACheckpoint`], [`Error::BadCheckpoint`], or
    /// [`Error::InvalidConfig`] for missing or malformed metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(TensorFile::open(path)?)
    }

    /// Reads the configuration of an already opened golden file.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] or [`Error::UnknownMode`] for missing or malformed metadata.
    pub fn from_file(file: TensorFile) -> Result<Self> {
        let meta = file.metadata();
        let (spec, keys) = match meta.get("block").map(String::as_str).unwrap_or("non_local") {
            "non_local" => {
                let (config, keys) = config_from_metadata(meta)?;
                (Spec::NonLocal(config), keys)
            }
            "disentangled" => {
                // mmsegmentation's block: mmcv's NonLocal2d keys plus conv_mask.
                let mut meta = meta.clone();
                meta.insert("naming".into(), "mmcv".into());
                let (config, keys) = config_from_metadata(&meta)?;
                let temperature = parse("temperature", meta.get("temperature").map_or("0.05", String::as_str))?;
                (
                    Spec::Disentangled(
                        DisentangledConfig::mmseg(config.in_channels).non_local(config).temperature(temperature),
                    ),
                    keys,
                )
            }
            "context_block" | "global_context" => {
                let naming: Naming = meta.get("naming").map_or("mmcv", String::as_str).parse()?;
                let keys = WeightKeys::new(naming, meta.get("prefix").cloned().unwrap_or_default());
                // Channels, planes, pooling and fusion from the keys; the epsilon from the metadata.
                let mut config = ContextConfig::from_keys(&file, &keys)?;
                if let Some(eps) = meta.get("ln_eps") {
                    config = config.ln_eps(parse("ln_eps", eps)?);
                }
                (Spec::Context(config), keys)
            }
            "criss_cross" => {
                let keys = WeightKeys::mmcv().with_prefix(meta.get("prefix").cloned().unwrap_or_default());
                // Channels from the keys; the recurrence (what the keys cannot show) from the metadata.
                let recurrence = parse("recurrence", meta.get("recurrence").map_or("1", String::as_str))?;
                (Spec::CrissCross(CrissCrossConfig::from_keys(&file, &keys)?.recurrence(recurrence)), keys)
            }
            other => {
                return Err(Error::InvalidConfig {
                    reason: format!("metadata block {other:?} is not a block this harness runs"),
                })
            }
        };
        Ok(GoldenCase { spec, keys, file, weights: None, precision: Precision::F32, torch_err: None })
    }

    /// The non-local configuration of a non-local case.
    pub fn config(&self) -> Option<&NonLocalConfig> {
        match &self.spec {
            Spec::NonLocal(config) => Some(config),
            Spec::Disentangled(config) => Some(&config.non_local),
            Spec::Context(_) | Spec::CrissCross(_) => None,
        }
    }

    /// Runs the block in `precision` (bf16: checked against the bf16 contract). The family
    /// blocks run in f32 only, and stay f32 (their reports say so).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        if matches!(self.spec, Spec::NonLocal(_)) {
            self.precision = precision;
        }
        self
    }

    /// PyTorch's own bf16-autocast error on this case (for the bf16 contract).
    pub fn with_torch_err(mut self, torch_err: Option<f32>) -> Self {
        self.torch_err = torch_err;
        self
    }

    /// Takes the parameters from `weights` (a checkpoint of any format) instead of the case
    /// file, under the case's `naming` and `prefix`.
    pub fn with_weights(mut self, weights: Arc<TensorFile>) -> Self {
        self.weights = Some(weights);
        self
    }

    /// The checkpoint the case's metadata names (`checkpoint`), if any.
    pub fn checkpoint_name(&self) -> Option<&str> {
        self.file.metadata().get("checkpoint").map(String::as_str)
    }

    /// The block, with the parameters of the checkpoint given by
    /// [`GoldenCase::with_weights`], else of the case file, loaded and checked against the
    /// metadata.
    ///
    /// # Errors
    /// Any loading error of [`NonLocalBlock::from_checkpoint`]; [`Error::InvalidConfig`] when
    /// the case is of another block.
    pub fn block(&self) -> Result<NonLocalBlock> {
        match self.runner()? {
            Runner::NonLocal(block) => Ok(*block),
            _ => Err(Error::InvalidConfig { reason: "not a non-local case".into() }),
        }
    }

    fn runner(&self) -> Result<Runner> {
        let weights = self.weights.as_deref().unwrap_or(&self.file);
        Ok(match &self.spec {
            Spec::NonLocal(config) => {
                let config = config.clone().precision(self.precision);
                Runner::NonLocal(Box::new(NonLocalBlock::from_checkpoint(config, weights, &self.keys)?))
            }
            Spec::Disentangled(config) => Runner::Disentangled(Box::new(DisentangledNonLocal::from_checkpoint(
                config.clone(),
                weights,
                &self.keys,
            )?)),
            Spec::Context(config) => {
                Runner::Context(Box::new(ContextBlock::from_checkpoint(config.clone(), weights, &self.keys)?))
            }
            Spec::CrissCross(config) => {
                Runner::CrissCross(Box::new(CrissCrossAttention::from_checkpoint(config.clone(), weights, &self.keys)?))
            }
        })
    }

    /// The `input` tensor, which must be rank 5 (B, T, H, W, C).
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::InputRank`].
    pub fn input(&self) -> Result<ndarray::Array5<f32>> {
        let input = self.file.tensor("input")?;
        let shape = input.shape().to_vec();
        input.into_dimensionality::<Ix5>().map_err(|_| Error::InputRank {
            expected: "5 (B, T, H, W, C)",
            actual: shape.len(),
            shape,
        })
    }

    /// Runs the block on `input` and compares with `output` (and `attention`).
    ///
    /// # Errors
    /// Any error loading the block, reading the tensors or running the block, and
    /// [`Error::WrongShape`] when `output` or `attention` has an unexpected shape.
    pub fn check(&self) -> Result<GoldenReport> {
        let block = self.runner()?;
        let input = self.input()?;
        let got = block.forward(&input)?;
        let want = self.file.tensor("output")?;
        let got_bits = fnv1a64(got.iter().copied());
        let (output_err, tol) = compare("output", &got.into_dyn(), &want)?;
        let scale = tol / 1e-4;
        let tol = match self.precision {
            Precision::F32 => tol,
            precision => bound_in(precision, self.torch_err) * scale,
        };
        let attention_err = match (&block, self.file.contains("attention")) {
            (Runner::NonLocal(block), true) => {
                let want = self.file.tensor("attention")?;
                let got = block.attention(&input)?;
                Some(compare("attention", &got.into_dyn(), &want)?.0)
            }
            _ => None,
        };
        let (grad_input, grad_param_err) = if self.file.contains("grad_output") {
            let (input_err, param_err) = self.check_gradients(&block, &input)?;
            (Some(input_err), Some(param_err))
        } else {
            (None, None)
        };
        Ok(GoldenReport {
            precision: self.precision,
            output_err,
            tol,
            scale,
            torch_err: self.torch_err,
            attention_err,
            bits: got_bits,
            grad_input,
            grad_param_err,
        })
    }

    /// Runs the training forward and backward with `grad_output` and compares ∂L/∂input and
    /// every `grad.<key>` of the file with the block's gradients.
    fn check_gradients(&self, block: &Runner, input: &ndarray::Array5<f32>) -> Result<((f32, f32), f32)> {
        let grad_output = self.file.tensor("grad_output")?;
        let shape = grad_output.shape().to_vec();
        let grad_output = grad_output.into_dimensionality::<Ix5>().map_err(|_| Error::WrongShape {
            key: "grad_output".into(),
            expected: input.shape().to_vec(),
            actual: shape,
        })?;
        let (input_grad, by_key) = block.gradients(input, &grad_output, &self.keys)?;
        let input_err = compare("grad_input", &input_grad.into_dyn(), &self.file.tensor("grad_input")?)?;
        let mut ours: HashMap<String, ArrayD<f32>> =
            by_key.into_iter().map(|(key, g)| (format!("grad.{key}"), g)).collect();
        let mut worst = 0.0f32;
        for key in self.file.keys().into_iter().filter(|k| k.starts_with("grad.")) {
            let want = self.file.tensor(key)?;
            let got = ours.remove(key).ok_or_else(|| Error::MissingKey { key: format!("{key} (no such gradient)") })?;
            let (err, tol) = compare(key, &got, &want)?;
            worst = worst.max(err / tol * 1e-4);
        }
        if let Some(extra) = ours.keys().next() {
            return Err(Error::MissingKey { key: format!("{extra} (gradient missing from the file)") });
        }
        Ok((input_err, worst))
    }
}

/// A case's block, built.
enum Runner {
    NonLocal(Box<NonLocalBlock>),
    Disentangled(Box<DisentangledNonLocal>),
    Context(Box<ContextBlock>),
    CrissCross(Box<CrissCrossAttention>),
}

/// Every parameter's gradient under its checkpoint key.
type KeyedGradients = Vec<(String, ArrayD<f32>)>;

impl Runner {
    fn forward(&self, x: &Array5<f32>) -> Result<Array5<f32>> {
        match self {
            Runner::NonLocal(block) => block.forward(x),
            Runner::Disentangled(block) => block.forward(x),
            Runner::Context(block) => block.forward(x),
            Runner::CrissCross(block) => block.forward(x),
        }
    }

    /// ∂L/∂input and every parameter's gradient under its checkpoint key (prefix included).
    fn gradients(&self, x: &Array5<f32>, dz: &Array5<f32>, keys: &WeightKeys) -> Result<(Array5<f32>, KeyedGradients)> {
        match self {
            Runner::NonLocal(block) => {
                let (_, ctx) = block.forward_train(x)?;
                let grads = block.backward(&ctx, dz)?;
                Ok((grads.input, grads.params.by_checkpoint_key(keys, block.config())?))
            }
            Runner::Disentangled(block) => {
                let (_, ctx) = block.forward_train(x)?;
                let grads = block.backward(&ctx, dz)?;
                let mut by_key = grads.params.by_checkpoint_key(keys, &block.config().non_local)?;
                let c = block.config().non_local.in_channels;
                let w = grads.conv_mask.weight.into_shape_with_order(IxDyn(&[1, c, 1, 1])).expect("(1, C)");
                by_key.push((format!("{}conv_mask.weight", keys.prefix), w));
                if let Some(b) = grads.conv_mask.bias {
                    by_key.push((format!("{}conv_mask.bias", keys.prefix), b.into_dyn()));
                }
                Ok((grads.input, by_key))
            }
            Runner::Context(block) => {
                let (_, ctx) = block.forward_train(x)?;
                let grads = block.backward(&ctx, dz)?;
                let by_key = grads
                    .params
                    .named()
                    .into_iter()
                    .map(|(k, g)| (format!("{}{k}", keys.prefix), g.to_owned()))
                    .collect();
                Ok((grads.input, by_key))
            }
            Runner::CrissCross(block) => {
                let (_, ctx) = block.forward_train(x)?;
                let grads = block.backward(&ctx, dz)?;
                let by_key = grads
                    .params
                    .named()
                    .into_iter()
                    .map(|(k, g)| (format!("{}{k}", keys.prefix), g.to_owned()))
                    .collect();
                Ok((grads.input, by_key))
            }
        }
    }
}

/// Parses a metadata value.
fn parse<T: std::str::FromStr>(key: &str, text: &str) -> Result<T> {
    text.trim().parse().map_err(|_| Error::InvalidConfig { reason: format!("metadata {key} = {text:?} is malformed") })
}

/// Maximum absolute difference and the tolerance `1e-4 · max(1, max |want|)`.
///
/// # Errors
/// [`Error::WrongShape`] when the shapes differ.
pub fn compare(key: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) -> Result<(f32, f32)> {
    if got.shape() != want.shape() {
        return Err(Error::WrongShape {
            key: key.into(),
            expected: want.shape().to_vec(),
            actual: got.shape().to_vec(),
        });
    }
    let mut err = 0.0f32;
    for (&g, &w) in got.iter().zip(want.iter()) {
        let d = if g.is_nan() || w.is_nan() {
            if g.is_nan() && w.is_nan() {
                0.0
            } else {
                f32::INFINITY
            }
        } else {
            (g - w).abs()
        };
        err = err.max(d);
    }
    let scale = want.iter().fold(1.0f32, |m, &w| m.max(w.abs()));
    Ok((err, 1e-4 * scale))
}

/// FNV-1a 64 (offset 0xcbf29ce484222325, prime 0x100000001b3) over f32 values as
/// little-endian bytes.
pub fn fnv1a64(values: impl IntoIterator<Item = f32>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for byte in v.to_le_bytes() {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

/// The block configuration and weight keys described by golden-file metadata.
///
/// # Errors
/// [`Error::InvalidConfig`] for a missing or malformed entry, [`Error::UnknownMode`].
pub fn config_from_metadata(meta: &HashMap<String, String>) -> Result<(NonLocalConfig, WeightKeys)> {
    let get = |key: &str| -> Result<&str> {
        meta.get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::InvalidConfig { reason: format!("metadata has no {key:?}") })
    };
    let flag = |key: &str, default: bool| -> Result<bool> {
        match meta.get(key).map(|s| s.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(s) if s == "true" || s == "1" => Ok(true),
            Some(s) if s == "false" || s == "0" => Ok(false),
            Some(s) => Err(Error::InvalidConfig { reason: format!("metadata {key} = {s:?} is not a boolean") }),
        }
    };
    let mode: Mode = get("mode")?.parse()?;
    let in_channels: usize = parse("in_channels", get("in_channels")?)?;
    let mut config = NonLocalConfig::new(in_channels).mode(mode);
    if let Some(ci) = meta.get("inter_channels") {
        config.inter_channels = parse("inter_channels", ci)?;
    }
    if let Some(sub) = meta.get("sub_sample") {
        config.sub_sample = parse_sub_sample(sub)?;
    }
    config.use_scale = flag("use_scale", false)?;
    config.bn_layer = flag("bn_layer", true)?;
    if let Some(eps) = meta.get("bn_eps") {
        config.bn_eps = parse("bn_eps", eps)?;
    }
    if let Some(dims) = meta.get("dims") {
        config.conv_dims = parse("dims", dims)?;
    }
    // timm's NonLocalAttn scales by in_channels^-0.5: the factor, outright.
    if let Some(factor) = meta.get("logit_scale").filter(|_| config.use_scale) {
        config.logit_factor = Some(parse("logit_scale", factor)?);
    }
    config.validate()?;
    let naming: Naming = meta.get("naming").map_or(Ok(Naming::AlexHex7), |s| s.parse())?;
    let prefix = meta.get("prefix").cloned().unwrap_or_default();
    Ok((config, WeightKeys { naming, prefix }))
}
