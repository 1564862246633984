//! `fleetdb-bench`: see the crate documentation (src/lib.rs) and `fleetdb-bench --help`.

use clap::{Parser, Subcommand};
use fleetdb_bench::gc::{run_gc_main, GcArgs};
use fleetdb_bench::work::{run_work_main, WorkArgs};
use fleetdb_bench::world::{run_world_main, WorldArgs};
use fleetdb_bench::{run_tagset_main, Command};

/// The library's subcommands plus `work`.
#[derive(Debug, Parser)]
#[command(
    name = "fleetdb-bench",
    about = "FleetDB benchmarks: FleetDB next to the raw engine, same driver, same run"
)]
struct MainCli {
    #[command(subcommand)]
    command: MainCommand,
}

#[derive(Debug, Subcommand)]
enum MainCommand {
    #[command(flatten)]
    Lib(Command),
    /// Work queues in the peers' shapes: one-at-a-time, burn-down, 10,000 live sessions.
    Work(WorkArgs),
    /// Watch fan-out, idle watcher memory and key-value set throughput (etcd's shapes).
    World(WorldArgs),
    /// A full garbage collection over 1,000,000 objects and blobs, with a concurrent writer.
    Gc(GcArgs),
}

fn main() {
    let cli = MainCli::parse();
    let code = match cli.command {
        MainCommand::Lib(Command::Tagset(args)) => run_tagset_main(args),
        MainCommand::Work(args) => run_work_main(args),
        MainCommand::World(args) => run_world_main(args),
        MainCommand::Gc(args) => run_gc_main(args),
    };
    std::process::exit(code);
}
