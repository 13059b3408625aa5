//! The `optout-sync` binary: everything lives in the library; see `cli.rs`.

fn main() -> std::process::ExitCode {
    optout_sync::cli::main()
}
