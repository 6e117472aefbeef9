//! Errors are typed per subsystem (issue 12 item 5), strings only at the edge: a caller can
//! tell an output that does not open from any other start-up failure by its type.

mod common;

use audiowarden::output::OutputError;
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
