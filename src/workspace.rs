//! Scratch buffers kept between calls, so large intermediate results (projections, pooled
//! keys, the attention output) do not pay for fresh pages on every forward pass.

use std::sync::Mutex;

use crate::error::{Error, Result};

/// At most this many idle buffers are kept, plus [`IDLE_PER_THREAD`] per thread of the pool
/// (each thread's kernel tiles hold a few buffers at once).
const MAX_IDLE: usize = 16;
/// See [`MAX_IDLE`].
const IDLE_PER_THREAD: usize = 8;

/// A pool of f32 buffers. Concurrent callers each get their own buffers; a caller that finds
/// none idle allocates new ones, and returns them for the next call.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    idle: Mutex<Vec<Vec<f32>>>,
}

/// A buffer taken from a [`Workspace`], given back when dropped.
pub(crate) struct Scratch<'w> {
    buf: Vec<f32>,
    home: &'w Workspace,
}

impl std::ops::Deref for Scratch<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf
    }
}

impl std::ops::DerefMut for Scratch<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
}

impl Scratch<'_> {
    /// Keeps the buffer instead of returning it to the workspace.
    pub(crate) fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.buf)
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        self.home.give(std::mem::take(&mut self.buf));
    }
}

impl Workspace {
    /// Keeps `buf` for a later [`Workspace::take`] (up to a few idle buffers).
    pub(crate) fn give(&self, buf: Vec<f32>) {
        if buf.capacity() == 0 {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < MAX_IDLE + IDLE_PER_THREAD * rayon::current_num_threads() {
                idle.push(buf);
            } else if let Some(smallest) = (0..idle.len()).min_by_key(|&i| idle[i].capacity()) {
                // Full: keep the larger buffers (small ones are cheap to allocate again; a
                // large one dropped here would come back as fresh pages).
                if idle[smallest].capacity() < buf.capacity() {
                    idle[smallest] = buf;
                }
            }
        }
    }

    /// A kernel's scratch buffer of `len` floats with unspecified (but initialised) contents:
    /// as [`Workspace::take`], but, like `vec!`, a failed allocation aborts. For the kernels'
    /// per-call and per-tile buffers, whose sizes are bounded by the tile sizes and the
    /// operands the block already holds.
    pub(crate) fn scratch(&self, len: usize) -> Scratch<'_> {
        self.take(len, "kernel scratch")
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<f32>()))
    }

    /// [`Workspace::scratch`], zeroed.
    pub(crate) fn zeroed(&self, len: usize) -> Scratch<'_> {
        let mut buf = self.scratch(len);
        buf.fill(0.0);
        buf
    }

    /// Frees every idle buffer.
    pub(crate) fn clear(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// A buffer of `len` floats with unspecified (but initialised) contents: callers
    /// overwrite it.
    ///
    /// # Errors
    /// [`Error::AllocationFailed`] when a new buffer cannot be allocated.
    pub(crate) fn take(&self, len: usize, what: &'static str) -> Result<Scratch<'_>> {
        let reused = self.idle.lock().ok().and_then(|mut idle| {
            // The smallest idle buffer that is large enough, else the largest one.
            let best = (0..idle.len())
                .filter(|&i| idle[i].capacity() >= len)
                .min_by_key(|&i| idle[i].capacity())
                .or_else(|| (0..idle.len()).max_by_key(|&i| idle[i].capacity()));
            best.map(|i| idle.swap_remove(i))
        });
        let mut buf = reused.unwrap_or_default();
        if buf.len() >= len {
            buf.truncate(len);
        } else {
            buf.try_reserve_exact(len - buf.len())
                .map_err(|_| Error::AllocationFailed { what, bytes: len.saturating_mul(4) })?;
            buf.resize(len, 0.0);
        }
        Ok(Scratch { buf, home: self })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let ws = Workspace::default();
        let ptr = {
            let mut a = ws.take(1000, "a").unwrap();
            a[999] = 1.0;
            a.as_ptr()
        };
        let b = ws.take(500, "b").unwrap();
        assert_eq!(b.len(), 500);
        assert_eq!(b.as_ptr(), ptr, "the idle buffer is reused");
        let c = ws.take(2000, "c").unwrap();
        assert_eq!(c.len(), 2000);
        assert!(ws.take(usize::MAX / 2, "huge").is_err());
    }

    #[test]
    fn a_full_pool_keeps_its_largest_buffers() {
        let ws = Workspace::default();
        let cap = MAX_IDLE + IDLE_PER_THREAD * rayon::current_num_threads();
        for _ in 0..cap {
            ws.give(vec![0.0; 10]);
        }
        ws.give(vec![0.0; 1000]);
        ws.give(vec![0.0; 5]);
        let idle = ws.idle.lock().unwrap();
        assert_eq!(idle.len(), cap);
        assert_eq!(idle.iter().map(Vec::capacity).max(), Some(1000), "the large buffer replaced a small one");
        assert_eq!(idle.iter().map(Vec::capacity).min(), Some(10), "the smaller one was dropped");
    }
}
