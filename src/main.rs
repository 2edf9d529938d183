use clap::Parser;

fn main() {
    let cli = gated_lm::cli::Cli::parse();
    if let Err(e) = gated_lm::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
