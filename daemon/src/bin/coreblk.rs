//! `coreblk`: the command-line client of coreblkd's gRPC API (issue 11). Until the API
//! exists it only says so; device listing and claiming are `coreblkd devices ...`.

fn main() -> std::process::ExitCode {
    eprintln!(
        "coreblk: the daemon API is not built yet; use `coreblkd devices list|claim` for devices"
    );
    std::process::ExitCode::from(2)
}
