use clap::Parser;

fn main() {
    gated_lm::backend::cpu::tune_allocator();
    let cli = gated_lm::cli::Cli::parse();
    if let Err(e) = gated_lm::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
