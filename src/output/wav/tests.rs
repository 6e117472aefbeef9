use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::writer::HEADER_LEN;
use super::*;

/// Offset of the `data` chunk's size field in the header the recorder (hound) writes.
const DATA_SIZE_OFFSET: usize = 64;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A deterministic, non-trivial signal, including values whose bits must survive exactly.
fn signal(frames: usize, channels: usize) -> Vec<f32> {
    (0..frames * channels)
        .map(|i| match i % 7 {
            0 => -0.0,
            1 => f32::MIN_POSITIVE,
            2 => f32::MAX,
            _ => (i as f32 * 0.001).sin(),
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|s| s.to_bits()).collect()
}

#[test]
fn round_trip_is_bit_exact_and_header_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.wav");
    // A ring smaller than the signal and not a multiple of the block size, so reads wrap.
    let (mut tap, rec) = start(&path, 48_000, 2, 3000).unwrap();
    let input = signal(10_000, 2);
    for block in input.chunks(256 * 2) {
        // Test-only back-pressure, so the result does not depend on scheduling.
        while tap.producer.slots() < block.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
        tap.push(block);
    }
    assert_eq!(rec.dropped_frames(), 0);
    assert_eq!(rec.finish().unwrap(), 10_000);

    let wav = read_f32_wav(&path).unwrap();
    assert_eq!((wav.sample_rate, wav.channels), (48_000, 2));
    assert_eq!(bits(&wav.samples), bits(&input));

    let raw = std::fs::read(&path).unwrap();
    let data_bytes = 10_000 * 2 * 4;
    assert_eq!(raw.len(), HEADER_LEN as usize + data_bytes);
    assert_eq!(u32_at(&raw, 4) as usize, raw.len() - 8, "RIFF size");
    assert_eq!(&raw[12..16], b"fmt ");
    assert_eq!(u32_at(&raw, 16), 40, "fmt chunk size (WAVEFORMATEXTENSIBLE)");
    assert_eq!(u16_at(&raw, 20), 0xFFFE, "format tag: extensible");
    assert_eq!(u32_at(&raw, 28), 48_000 * 8, "byte rate");
    assert_eq!(u16_at(&raw, 34), 32, "bits per sample");
    assert_eq!(u16_at(&raw, 44), 3, "sub-format: IEEE float");
    assert_eq!(&raw[60..64], b"data");
    assert_eq!(u32_at(&raw, DATA_SIZE_OFFSET) as usize, data_bytes);
}

#[test]
fn header_is_refreshed_while_recording() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.wav");
    let (mut tap, rec) = start(&path, 44_100, 1, 8192).unwrap();
    let input = signal(3000, 1);
    tap.push(&input);
    std::thread::sleep(Duration::from_millis(1200));

    // The recorder is still alive: this is what a kill at this point would leave.
    let wav = read_f32_wav(&path).unwrap();
    assert_eq!(bits(&wav.samples), bits(&input));
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(u32_at(&raw, DATA_SIZE_OFFSET), 3000 * 4, "data size");

    assert_eq!(rec.finish().unwrap(), 3000);
}

#[test]
fn full_ring_counts_dropped_frames_without_blocking() {
    // A tap with nobody draining it: fully deterministic.
    let (producer, mut consumer) = rtrb::RingBuffer::new(8 * 2);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut tap = WavTap { producer, dropped: Arc::clone(&dropped), channels: 2 };
    tap.push(&[1.0; 6 * 2]);
    tap.push(&[2.0; 6 * 2]); // only 2 frames of room left: all-or-nothing
    assert_eq!(dropped.load(Ordering::Relaxed), 6);
    tap.push(&[3.0; 2 * 2]); // exactly fills the ring
    assert_eq!(dropped.load(Ordering::Relaxed), 6);
    tap.push(&[4.0; 2]);
    assert_eq!(dropped.load(Ordering::Relaxed), 7);

    let mut got = vec![0.0; consumer.slots()];
    consumer.pop_entire_slice(&mut got).unwrap();
    let mut want = vec![1.0; 12];
    want.extend([3.0; 4]);
    assert_eq!(got, want, "no partial block may enter the ring");
}

#[test]
fn recorder_reports_drops_and_keeps_what_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drop.wav");
    let (mut tap, rec) = start(&path, 48_000, 2, 8).unwrap();
    tap.push(&[0.5; 10 * 2]); // larger than the whole ring
    tap.push(&[0.25; 4 * 2]);
    assert_eq!(rec.dropped_frames(), 10);
    assert_eq!(rec.finish().unwrap(), 4);
    assert_eq!(read_f32_wav(&path).unwrap().samples, vec![0.25; 8]);
}

#[test]
fn size_limit_drops_instead_of_overflowing_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limit.wav");
    let (mut tap, rec) = start_with_limit(&path, 8000, 1, 64, Some(5)).unwrap();
    tap.push(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(rec.finish().unwrap(), 5);
    assert_eq!(tap.dropped.load(Ordering::Relaxed), 3);
    assert_eq!(read_f32_wav(&path).unwrap().samples, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn drop_without_finish_still_writes_final_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dropped.wav");
    let (mut tap, rec) = start(&path, 48_000, 1, 1024).unwrap();
    tap.push(&[0.125; 100]);
    drop(rec);
    assert_eq!(read_f32_wav(&path).unwrap().samples, vec![0.125; 100]);
}

#[test]
fn start_rejects_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.wav");
    for (rate, ch, cap) in [(0, 2, 16), (48_000, 0, 16), (48_000, u16::MAX, 16), (48_000, 2, 0)] {
        assert!(matches!(start(&path, rate, ch, cap), Err(WavError::Format(_))));
    }
    let err = start(&dir.path().join("no/such/dir.wav"), 48_000, 2, 16).err().unwrap();
    assert!(err.to_string().contains("no/such/dir.wav"), "{err}");
}

/// Builds a WAV by hand: fmt body, then arbitrary extra chunks before `data`.
fn handmade(fmt: &[u8], extra: &[(&[u8; 4], &[u8])], data: &[u8], trailing: &[u8]) -> Vec<u8> {
    let mut v = b"RIFF\0\0\0\0WAVE".to_vec();
    let chunk = |id: &[u8; 4], body: &[u8], v: &mut Vec<u8>| {
        v.extend_from_slice(id);
        v.extend_from_slice(&(body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        if body.len() % 2 == 1 {
            v.push(0);
        }
    };
    chunk(b"fmt ", fmt, &mut v);
    for (id, body) in extra {
        chunk(id, body, &mut v);
    }
    chunk(b"data", data, &mut v);
    v.extend_from_slice(trailing);
    v
}

fn float_fmt(channels: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(3u16.to_le_bytes());
    f.extend(channels.to_le_bytes());
    f.extend(22_050u32.to_le_bytes());
    f.extend((22_050 * 4 * u32::from(channels)).to_le_bytes());
    f.extend((4 * channels).to_le_bytes());
    f.extend(32u16.to_le_bytes());
    f
}

#[test]
fn reader_skips_unknown_chunks_and_ignores_trailing_bytes() {
    let data: Vec<u8> = [0.5f32, -0.5].iter().flat_map(|s| s.to_le_bytes()).collect();
    // An unknown chunk before `data` is skipped (hound does not skip the pad byte of an
    // odd-sized chunk, which our recorder never writes); the trailing bytes mimic samples
    // written after the last refresh of a killed recorder (and are not a valid chunk).
    let bytes = handmade(&float_fmt(2), &[(b"LIST", b"even")], &data, &[0xAB; 7]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handmade.wav");
    std::fs::write(&path, &bytes).unwrap();
    let wav = read_f32_wav(&path).unwrap();
    assert_eq!((wav.sample_rate, wav.channels), (22_050, 2));
    assert_eq!(wav.samples, vec![0.5, -0.5]);
}

#[test]
fn reader_rejects_bad_files_with_useful_messages() {
    let pcm = {
        let mut f = float_fmt(1);
        f[0] = 1; // PCM
        f[8..12].copy_from_slice(&(22_050u32 * 2).to_le_bytes()); // byte rate
        f[12] = 2; // block align
        f[14] = 16;
        f
    };
    let truncated = {
        let mut b = handmade(&float_fmt(1), &[], &[0; 8], &[]);
        b.truncate(b.len() - 4);
        b
    };
    let cases: [(Vec<u8>, &str); 4] = [
        (b"RIFX....WAVE".to_vec(), "RIFF"),
        (handmade(&pcm, &[], &[0; 2], &[]), "only 32-bit IEEE float"),
        (handmade(&float_fmt(2), &[], &[0; 4], &[]), "data chunk length"), // half a frame
        (truncated, ""),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (n, (bytes, want)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{n}.wav"));
        std::fs::write(&path, &bytes).unwrap();
        let err = read_f32_wav(&path).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("bad{n}.wav")) && text.contains(want), "{text:?} should mention {want:?}");
    }
    let missing = dir.path().join("missing.wav");
    let err = read_f32_wav(&missing).unwrap_err();
    assert!(matches!(err, WavError::Io { .. }));
    assert!(err.to_string().contains("missing.wav"), "{err}");
}
