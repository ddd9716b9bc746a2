//! `sluice`: see the crate docs of `sluice_agent`.
fn main() -> std::process::ExitCode {
    sluice_agent::cli::main()
}
