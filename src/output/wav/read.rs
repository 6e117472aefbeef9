//! Reading a recording back (tests and tools, not the audio path), with hound.

use std::path::Path;

use super::WavError;

/// A decoded 32-bit float WAV file.
#[derive(Debug, Clone, PartialEq)]
pub struct WavData {
    pub sample_rate: u32,
    pub channels: u16,
    /// Interleaved samples, `frames * channels` long.
    pub samples: Vec<f32>,
}

/// Reads a 32-bit IEEE float WAV (plain or `WAVE_FORMAT_EXTENSIBLE`). Loads the whole file.
/// Only the `data` chunk's declared size is read: bytes after it, which is what a recorder
/// killed between header refreshes leaves behind, are ignored.
///
/// # Errors
///
/// [`WavError::Io`] if the file cannot be read, [`WavError::Format`] if it is not a WAV file,
/// is not 32-bit float, or its `data` chunk runs past the end of the file.
pub fn read_f32_wav(path: &Path) -> Result<WavData, WavError> {
    let reader = hound::WavReader::open(path).map_err(WavError::hound(path))?;
    let spec = reader.spec();
    if spec.sample_format != hound::SampleFormat::Float || spec.bits_per_sample != 32 {
        return Err(WavError::Format(format!(
            "{}: {:?} samples of {} bits; only 32-bit IEEE float is supported",
            path.display(),
            spec.sample_format,
            spec.bits_per_sample
        )));
    }
    let samples = reader.into_samples::<f32>().collect::<Result<Vec<f32>, _>>().map_err(WavError::hound(path))?;
    Ok(WavData { sample_rate: spec.sample_rate, channels: spec.channels, samples })
}
