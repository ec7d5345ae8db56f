//! The `kiln` command line; everything lives in `kiln::cli`.

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}
