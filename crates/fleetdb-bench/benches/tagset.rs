//! `cargo bench -p fleetdb-bench`: the `tagset` benchmark with its default arguments (10 s per
//! measurement, 1 and 8 writers, SQLite and PostgreSQL). Same code as `fleetdb-bench tagset`.
//!
//! Only runs under `cargo bench` (which passes `--bench`); `cargo test --benches` merely checks
//! that it builds and starts.

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("tagset: skipped (not run by `cargo bench`)");
        return;
    }
    let code = fleetdb_bench::run_tagset_main(fleetdb_bench::TagsetArgs::default());
    std::process::exit(code);
}
