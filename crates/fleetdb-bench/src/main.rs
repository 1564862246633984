//! `fleetdb-bench`: see the crate documentation (src/lib.rs) and `fleetdb-bench --help`.

use clap::Parser;
use fleetdb_bench::{run_tagset_main, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Tagset(args) => run_tagset_main(args),
    };
    std::process::exit(code);
}
