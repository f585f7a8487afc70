//! [`CrissCrossConfig`]: channels and recurrence of a criss-cross attention block.

use crate::error::{Error, Result};

/// Configuration of a [`CrissCrossAttention`](super::CrissCrossAttention) block.
///
/// Fields are public; [`CrissCrossConfig::new`] fills in mmcv's defaults and the builder
/// methods change one setting each.
///
/// # Example
/// ```
/// use nonlocal::CrissCrossConfig;
///
/// let config = CrissCrossConfig::new(512).recurrence(2); // CCNet's head
/// assert_eq!((config.qk_channels, config.recurrence), (64, 2));
/// config.validate()?;
/// # Ok::<(), nonlocal::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrissCrossConfig {
    /// C, the channels of the input, of the values and of the output.
    pub in_channels: usize,
    /// The channels of the queries and keys, at least 1. Default `C / 8`, rounded down as
    /// mmcv's `in_channels // 8`: that is 0 below 8 channels, which
    /// [`CrissCrossConfig::validate`] refuses (mmcv builds such a module, but its forward
    /// fails: PyTorch's `conv2d` takes no zero-channel weight), so set it there.
    pub qk_channels: usize,
    /// How many times the block is applied in a row, with the same weights (CCNet's head
    /// uses 2). Checkpoints do not show it. Default 1.
    pub recurrence: usize,
}

impl CrissCrossConfig {
    /// mmcv's `CrissCrossAttention(in_channels)`: `qk_channels = in_channels / 8` (rounded
    /// down), applied once.
    pub fn new(in_channels: usize) -> Self {
        CrissCrossConfig { in_channels, qk_channels: in_channels / 8, recurrence: 1 }
    }

    /// Sets the query/key channels. Default `in_channels / 8` (rounded down, as mmcv).
    ///
    /// ```
    /// # use nonlocal::CrissCrossConfig;
    /// assert_eq!(CrissCrossConfig::new(20).qk_channels, 2);
    /// assert_eq!(CrissCrossConfig::new(64).qk_channels(16).qk_channels, 16);
    /// // mmcv's CrissCrossAttention(4) has Conv2d(4, 0, 1) and cannot run: choose a width.
    /// assert!(CrissCrossConfig::new(4).validate().is_err());
    /// CrissCrossConfig::new(4).qk_channels(1).validate()?;
    /// # Ok::<(), nonlocal::Error>(())
    /// ```
    pub fn qk_channels(mut self, qk_channels: usize) -> Self {
        self.qk_channels = qk_channels;
        self
    }

    /// Sets how many times the block is applied in a row. Default 1; CCNet's segmentation
    /// head (mmseg's `CCHead`) uses 2.
    ///
    /// ```
    /// # use nonlocal::CrissCrossConfig;
    /// assert_eq!(CrissCrossConfig::new(64).recurrence(2).recurrence, 2);
    /// assert!(CrissCrossConfig::new(64).recurrence(0).validate().is_err());
    /// ```
    pub fn recurrence(mut self, recurrence: usize) -> Self {
        self.recurrence = recurrence;
        self
    }

    /// The width of the stacked projection `[q | k | v]`: `2·qk_channels + in_channels`.
    pub(crate) fn projection_width(&self) -> usize {
        2 * self.qk_channels + self.in_channels
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero input channels, zero query/key channels (the default
    /// below 8 input channels), a recurrence of 0, or channel counts whose parameter tensors
    /// cannot be sized.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Err(Error::InvalidConfig { reason });
        if self.in_channels == 0 {
            return invalid("in_channels is 0".into());
        }
        if self.qk_channels == 0 {
            return invalid(format!(
                "qk_channels is 0 (in_channels {} // 8 as mmcv: its module has zero-channel query and key \
                 convolutions and cannot run); set qk_channels to at least 1",
                self.in_channels
            ));
        }
        if self.recurrence == 0 {
            return invalid("recurrence is 0: the block must be applied at least once".into());
        }
        let floats = self.qk_channels.checked_mul(2).and_then(|q| q.checked_add(self.in_channels));
        if floats.and_then(|p| p.checked_mul(self.in_channels)).is_none_or(|n| n > isize::MAX as usize / 4) {
            return invalid(format!(
                "in_channels {} and qk_channels {} give weights too large to hold",
                self.in_channels, self.qk_channels
            ));
        }
        Ok(())
    }
}
