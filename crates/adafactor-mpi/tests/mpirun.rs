//! Runs the `mpi_collective` checks on two processes under `mpirun` (OpenMPI's
//! `--oversubscribe`, so two cores or fewer suffice; `--allow-run-as-root` when root).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longer than this is a hang (the checks take seconds).
const LIMIT: Duration = Duration::from_secs(300);

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn collective_contract_holds_on_two_ranks() {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", "2"]);
    if is_root() {
        cmd.arg("--allow-run-as-root");
    }
    cmd.arg(env!("CARGO_BIN_EXE_mpi_collective"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot start mpirun ({e}): install openmpi-bin libopenmpi-dev libclang-dev")
    });
    // Drain both pipes while waiting, so that a chatty failure cannot block mpirun.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for mpirun") {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("mpirun ran longer than {LIMIT:?}: a collective hung");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    println!("{out}");
    eprintln!("{err}");
    let last = out.lines().last().unwrap_or_default();
    assert!(status.success(), "mpirun exited with {status}: {last}");
    assert!(
        last.starts_with("mpi collective: ") && last.ends_with(" passed, 0 failed (2 ranks)"),
        "unexpected closing line: {last:?}"
    );
}
