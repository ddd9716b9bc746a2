//! `sluice` itself, built in this package so the end-to-end tests can spawn it.
fn main() -> std::process::ExitCode {
    sluice_agent::cli::main()
}
