use clap::Parser;

fn main() {
    gated_lm::backend::cpu::tune_allocator();
    let cli = gated_lm::cli::Cli::parse();
    if let Err(e) = gated_lm::cli::run(cli) {
        // README "Errors and exit codes": 1 for an error, 2 for a bad command line (clap),
        // 3 for a diverged run, 130 for a run stopped by Ctrl-C
        let code = e.downcast_ref::<gated_lm::cli::ExitStatus>().map_or(1, |s| s.code);
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}
