//! Errors are typed per subsystem (issue 12 item 5), strings only at the edge: a caller can
//! tell an output that does not open from any other start-up failure by its type.

mod common;

use audiowarden::output::OutputError;
use audiowarden::supervisor::SpawnError;
use audiowarden::{OutputSpec, StandbyMode, StartError, Supervisor};
use common::*;

#[test]
fn an_output_that_does_not_open_is_a_typed_output_error() {
    let shm = ShmDir::new("typed-errors");
    let path = std::path::PathBuf::from("/nonexistent-aw-dir/tone.wav");
    let cfg = config(&shm, OutputSpec::Wav(path), StandbyMode::Hot, 440.0, 0.5);
    match Supervisor::start(cfg) {
        Err(StartError::Output(OutputError::Wav(e))) => {
            assert!(e.to_string().contains("nonexistent-aw-dir"), "the error names the file: {e}")
        }
        Err(other) => panic!("not an output error: {other:?}"),
        Ok(_) => panic!("a WAV file in a missing directory opened"),
    }
}

#[test]
fn a_worker_that_cannot_be_started_is_a_typed_spawn_error_and_leaks_nothing() {
    let shm = ShmDir::new("typed-errors-spawn");
    let mut cfg = config(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.5);
    cfg.worker_exe = Some(std::path::PathBuf::from("/nonexistent-aw-dir/audiowardend"));
    match Supervisor::start(cfg) {
        Err(e @ StartError::Spawn(SpawnError::Io { op: "exec the worker", errno: libc::ENOENT })) => {
            assert!(!e.is_no_space(), "a missing binary is not a full shm file system");
        }
        Err(other) => panic!("not the spawn error of a missing worker binary: {other:?}"),
        Ok(_) => panic!("a worker from a missing binary started"),
    }
    // A start that failed leaves nothing in the shm dir (segments, manifest) for anyone to reclaim.
    let left: Vec<String> = std::fs::read_dir(&shm.0)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind by a failed start: {left:?}");
}
